"""The study's analyses at CPU scale, three seeds, each claim judged at its error bars.

  python -m experiments.cpu_study --workdir=runs/cpu_study            # ~180 cells
  python -m experiments.cpu_study --workdir=runs/cpu_study_quick --quick  # smoke test, ~1-3 min

A ViT pre-trained on Fashion-MNIST classes 0-4 (cached in WORKDIR/pretrain) is fine-tuned
federatedly on a close target (Fashion-MNIST classes 5-9: new classes of its own domain, as
ImageNet-21k is to CIFAR-100) and a far one (scikit-learn digits, as ImageNet-21k is to PCam);
the same ViT from random init is the scratch baseline. Analyses (configs/cpu_study.py holds the
scale-down and why):
  methods      full, head, bias, adapter, prompt, lora, scratch on both targets (16 clients,
               100%, Dirichlet 0.3: the study's 0.1 cannot be drawn over 5 classes here);
  grid         {16, 64} clients x {100%, 12.5%} x {Dirichlet, IID}; full, bias, prompt, lora;
  scarcity     the close target with 1%, 5% and 20% of its 30,000 training images;
  privacy      DP-FedAvg at epsilon 5 and 10, the study's paper_gaussian at nominal epsilon 5
               (its accounted epsilon reported); full, bias, prompt; 64 clients at 12.5%;
  equal_comm   full fine-tuning limited to the bytes bias tuning moves in its whole run.

Every (config, seed) is one resumable run in WORKDIR/cells/<name> (`fedpeft_jax.runner.train.run`);
a cell shared by several analyses runs once, a finished one is skipped, an interrupted one
resumes from its checkpoint, so re-running the command continues an interrupted study. Cells
run in --workers processes. Outputs: results.csv (a row per analysis, cell and seed),
results.md (mean +- std tables and the claim verdicts), accuracy_vs_mb.png, grid_heatmap.png.

Verdicts: a claim is an inequality on a linear combination L of group mean accuracies (e.g.
full's drop minus bias's drop). With SE = sqrt(sum c_i^2 s_i^2 / n_i) (s_i the std over seeds,
ddof 1; runs treated as independent), a comparison is "reproduced" when L - margin > 2 SE,
"not reproduced" when L - margin < -2 SE, else "inconclusive" (also with fewer than two seeds).
A claim with several comparisons takes the verdict of a strict majority of them, else
"inconclusive".
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from typing import Any, Iterable, Optional, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
# Agg through the object API, never pyplot (as fedpeft_jax.runner.outputs).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

from experiments import run_pool
from experiments.run_pool import markdown_table, write_csv
from fedpeft_jax.files import atomic_write_bytes, atomic_write_text
from fedpeft_jax.pretrain import pretrain
from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.config_files import repo_config

_WORKDIR = flags.DEFINE_string("workdir", "runs/cpu_study", "Output directory.")
_QUICK = flags.DEFINE_bool("quick", False, "One seed, two methods, two rounds, a tiny model: "
                           "a smoke test of the whole pipeline.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Cells run in this many processes (1: in this "
                                "process).")
_SEEDS = flags.DEFINE_list("seeds", [], "Seeds ('' = the study's 1, 42, 3407; --quick: 1).")
_FASHION_DIR = flags.DEFINE_string("fashion_mnist_dir", "", "Folder of the four Fashion-MNIST "
                                   "IDX files ('' = /usr/share/datasets/fashion-mnist).")

CONFIG = "cpu_study"  # configs/cpu_study.py
PEFT = ("head", "bias", "adapter", "prompt", "lora")
FEW_POINTS = 5.0  # claim 1: "within a few points" (percentage points)
WIDE_MARGIN = 10.0  # claim 4: "by a wide margin" (percentage points)
MIN_RATIO = 100.0  # claim 1: at >= 100x less communication
Z = 2.0  # standard errors a difference must clear

# What each scale runs; cells repeat across analyses where their configs are equal.
_GRID = tuple((c, p, s) for c in (16, 64) for p in (1.0, 0.125) for s in ("dirichlet", "iid"))
PLAN = {
    "full": {"methods": ("full", "head", "bias", "adapter", "prompt", "lora", "scratch"),
             "grid_methods": ("full", "bias", "prompt", "lora"), "grid": _GRID,
             "scarcity_methods": ("full", "bias", "prompt", "lora"),
             "scarcity_fractions": (0.01, 0.05, 0.2),
             "dp_methods": ("full", "bias", "prompt"),
             "dp_settings": (("dp_fedavg", 5.0), ("dp_fedavg", 10.0), ("paper_gaussian", 5.0))},
    # Every code path once: the grid's corners that claim 2 compares, one scarcity cell.
    "quick": {"methods": ("full", "bias"), "grid_methods": ("full", "bias"),
              "grid": ((16, 1.0, "dirichlet"), (16, 1.0, "iid"), (16, 0.125, "dirichlet")),
              "scarcity_methods": ("bias",), "scarcity_fractions": (0.01,),
              "dp_methods": ("full", "bias"),
              "dp_settings": (("dp_fedavg", 5.0), ("paper_gaussian", 5.0))},
}
DP_CLIENTS, DP_PARTICIPATION = 64, 0.125
ALPHA = repo_config(CONFIG).DIRICHLET_ALPHA
CSV_COLUMNS = ["analysis", "target", "method", "setting", "seed", "final_accuracy",
               "best_accuracy", "total_MB", "rounds", "wall_seconds", "cell"]
# Summary fields (at any depth) reported as privacy columns, by their last key.
_PRIVACY_KEYS = ("epsilon", "sigma", "noise_multiplier", "delta", "formal_guarantee")


# ---------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Member:
  """One run as one analysis sees it: `cell` is the configs/cpu_study.py arg."""
  analysis: str
  target: str
  method: str
  setting: str
  seed: int
  cell: str

  @property
  def name(self) -> str:
    return cell_name(self.cell)


def cell_arg(scale: str, seed: int, **keys: Any) -> str:
  """The config arg of a cell: only the keys that differ from the preset's defaults, in the
  preset's order, so equal configs get equal args (and share a workdir)."""
  config = repo_config(CONFIG)
  values = {**config.DEFAULTS, **keys, "seed": seed, "scale": scale}
  parts = []
  for key, default in config.DEFAULTS.items():
    value = values[key]
    if key in ("target", "method") or value != default:
      parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
  return ",".join(parts)


def cell_name(arg: str) -> str:
  """A folder name for a cell arg: 'target=close,method=bias,seed=1' -> 'close_bias_seed1'."""
  items = [item.split("=", 1) for item in arg.split(",")]
  return "_".join(v if k in ("target", "method") else f"{k}{v}" for k, v in items)


def _pct(fraction: float) -> str:
  return f"{fraction * 100:g}%"


def grid_setting(clients: int, participation: float, split: str) -> str:
  split_text = "IID" if split == "iid" else f"Dir {ALPHA:g}"
  return f"{clients} clients, {_pct(participation)}, {split_text}"


def dp_setting(mechanism: str, epsilon: float) -> str:
  if mechanism == "none":
    return "no DP"
  if mechanism == "paper_gaussian":
    return f"paper_gaussian, nominal eps {epsilon:g}"
  return f"DP-FedAvg, eps {epsilon:g}"


def plan_members(scale: str, seeds: Sequence[int]) -> list[Member]:
  """Every (analysis, cell, seed) of the study except equal_comm, which needs finished runs."""
  p = PLAN[scale]
  config = repo_config(CONFIG)
  base_train = config.SCALE[scale]["close_train"]
  base = grid_setting(16, 1.0, "dirichlet")
  out = []
  for seed in seeds:
    for target in ("close", "far"):
      for method in p["methods"]:
        out.append(Member("methods", target, method, base, seed,
                          cell_arg(scale, seed, target=target, method=method)))
    for method in p["grid_methods"]:
      for clients, part, split in p["grid"]:
        out.append(Member("grid", "close", method, grid_setting(clients, part, split), seed,
                          cell_arg(scale, seed, method=method, clients=clients,
                                   participation=part, split=split)))
    sizes = sorted({round(f * config.CLOSE_TRAIN_EXAMPLES) for f in p["scarcity_fractions"]}
                   | {base_train})
    for method in p["scarcity_methods"]:
      for n in sizes:
        setting = f"{_pct(n / config.CLOSE_TRAIN_EXAMPLES)} ({n} images)"
        out.append(Member("scarcity", "close", method, setting, seed,
                          cell_arg(scale, seed, method=method,
                                   train_size=0 if n == base_train else n)))
    for method in p["dp_methods"]:
      for mechanism, epsilon in (("none", 5.0),) + tuple(p["dp_settings"]):
        keys = {"mechanism": mechanism, "epsilon": epsilon} if mechanism != "none" else {}
        out.append(Member("privacy", "close", method, dp_setting(mechanism, epsilon), seed,
                          cell_arg(scale, seed, method=method, clients=DP_CLIENTS,
                                   participation=DP_PARTICIPATION, **keys)))
  return out


def equal_comm_members(scale: str, seeds: Sequence[int], workdir: str) -> list[Member]:
  """Full fine-tuning given only the bytes bias tuning moved in its whole base run (per seed,
  from the finished runs' summaries): whole rounds with every client if that affords one,
  else one round with as many clients as the bytes pay for (at least one)."""
  out = []
  config = repo_config(CONFIG)
  for seed in seeds:
    bias = cell_arg(scale, seed, method="bias")
    full = cell_arg(scale, seed, method="full")
    sb, sf = read_summary(workdir, bias), read_summary(workdir, full)
    if sb is None or sf is None:
      continue
    budget = sb["total_bytes"]
    client_round = 2 * sf["bytes_per_transfer"]  # down + up, per participating client
    clients = config.DEFAULTS["clients"]
    rounds = int(budget // (client_round * clients))
    if rounds >= 1:
      keys = {"rounds": rounds}
      setting = f"full, {rounds} rounds x {clients} clients"
    else:
      per_round = max(1, int(budget // client_round))
      keys = {"rounds": 1, "clients_per_round": per_round}
      setting = f"full, 1 round x {per_round} of {clients} clients (< 1 round)"
    out.append(Member("equal_comm", "close", "bias", f"bias, {sb['rounds']} rounds x "
                      f"{clients} clients", seed, bias))
    out.append(Member("equal_comm", "close", "full", setting, seed,
                      cell_arg(scale, seed, method="full", **keys)))
  return out


# ----------------------------------------------------------------------------------- running


def cell_dir(workdir: str, arg: str) -> str:
  return os.path.join(workdir, "cells", cell_name(arg))


def read_summary(workdir: str, arg: str) -> Optional[dict]:
  return run_pool.read_summary(cell_dir(workdir, arg))


def cell_config(arg: str, pretrained: str, fashion_dir: str) -> ml_collections.ConfigDict:
  """The config of one cell; module level: built in the workers."""
  config = repo_config(CONFIG).get_config(arg)
  if config.model.pretrained:
    config.model.pretrained = pretrained
  if config.data.dataset == "fashion_mnist":
    config.data.data_dir = fashion_dir
  return config


def _cost(arg: str) -> float:
  """A rough relative cost, to start long cells first (fewer stragglers at the end)."""
  keys = dict(item.split("=", 1) for item in arg.split(","))
  examples = float(keys.get("train_size", 1500))
  part = float(keys.get("participation", 1.0))
  return examples * part * (2.0 if keys["method"] in ("full", "scratch") else 1.0)


def cell_jobs(args: Iterable[str], workdir: str, pretrained: str,
              fashion_dir: str) -> list[run_pool.Job]:
  """One job per distinct cell (a cell shared by several analyses runs once), the costly
  first."""
  return [run_pool.Job(cell_name(a), cell_dir(workdir, a), cell_config,
                       (a, pretrained, fashion_dir))
          for a in sorted(set(args), key=_cost, reverse=True)]


# ---------------------------------------------------------------------------------- results


def _privacy_fields(summary: dict, prefix: str = "") -> dict[str, Any]:
  """Scalar summary fields about privacy (epsilon, sigma, noise, delta, guarantee), at any
  depth, keyed by their dotted path; whatever the privacy module writes is reported."""
  out: dict[str, Any] = {}
  for key, value in summary.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) and key not in ("versions", "partition"):
      out.update(_privacy_fields(value, path + "."))
    elif isinstance(value, (bool, int, float)) and any(k in key for k in _PRIVACY_KEYS):
      out[path] = value
  return out


def collect_rows(members: Sequence[Member], workdir: str,
                 seconds: dict[str, float]) -> list[dict[str, Any]]:
  """One row per member with a finished run, from its summary.json."""
  rows = []
  for m in members:
    s = read_summary(workdir, m.cell)
    if s is None:
      continue
    total = s.get("total_bytes")  # under DP-FedAvg it may be withheld (who took part)
    row = {"analysis": m.analysis, "target": m.target, "method": m.method,
           "setting": m.setting, "seed": m.seed, "final_accuracy": s["final_accuracy"],
           "best_accuracy": s["best_accuracy"],
           "total_MB": None if total is None else total / outputs.MB,
           "rounds": s["rounds"], "wall_seconds": seconds.get(m.name), "cell": m.name}
    row.update(_privacy_fields(s))
    rows.append(row)
  return rows


def csv_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
  """CSV_COLUMNS, then the privacy fields any row has, sorted: whatever the privacy module
  writes gets a column."""
  return CSV_COLUMNS + sorted({k for r in rows for k in r} - set(CSV_COLUMNS))


@dataclasses.dataclass
class Stat:
  """Mean and sample std (ddof 1; nan with one value) of a group's values over seeds."""
  values: list[float]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else math.nan

  @property
  def std(self) -> float:
    return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

  def text(self, digits: int = 3, constant_plain: bool = False) -> str:
    """'mean ± std'; the mean alone with one value, or (constant_plain) when all are equal."""
    if not self.values:
      return "-"
    if self.n < 2 or (constant_plain and min(self.values) == max(self.values)):
      return f"{self.mean:.{digits}f}"
    return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


GroupKey = tuple[str, str, str, str]  # analysis, target, method, setting


def group(rows: Sequence[dict[str, Any]], field: str) -> dict[GroupKey, Stat]:
  """Rows -> Stat of `field` per (analysis, target, method, setting), in first-seen order."""
  out: dict[GroupKey, Stat] = {}
  for r in rows:
    stat = out.setdefault((r["analysis"], r["target"], r["method"], r["setting"]), Stat([]))
    if r.get(field) is not None and r[field] != "":
      stat.values.append(float(r[field]))
  return out


ANALYSIS_TITLES = {
    "methods": f"Methods (16 clients, 100%, Dirichlet {ALPHA:g})",
    "grid": "Client stability x data distribution (close target)",
    "scarcity": f"Data scarcity (close target, 16 clients, 100%, Dirichlet {ALPHA:g})",
    "privacy": f"Privacy (close target, 64 clients, 12.5%, Dirichlet {ALPHA:g})",
    "equal_comm": "Equal communication (close target): full fine-tuning on bias tuning's bytes",
}


def analysis_tables(rows: Sequence[dict[str, Any]]) -> str:
  """A mean ± std table per analysis: accuracy, MB and any privacy fields."""
  final, best, mb = group(rows, "final_accuracy"), group(rows, "best_accuracy"), group(
      rows, "total_MB")
  # planned_* repeat the spent epsilon unless a run stopped early (results.csv keeps them)
  privacy_cols = sorted({k for r in rows if r["analysis"] == "privacy" for k in r
                         if k not in CSV_COLUMNS and not k.startswith("planned_")})
  parts = []
  for analysis, title in ANALYSIS_TITLES.items():
    keys = [k for k in final if k[0] == analysis]
    if not keys:
      continue
    extra = privacy_cols if analysis == "privacy" else []
    eps = {c: group(rows, c) for c in extra}
    body = []
    for key in keys:
      _, target, method, setting = key
      body.append([target, setting, method, str(final[key].n), final[key].text(),
                   best[key].text(), mb[key].text(constant_plain=True)]
                  + [_number_text(eps[c][key]) for c in extra])
    parts.append(f"### {title}\n\n" + markdown_table(
        ["target", "setting", "method", "seeds", "final accuracy", "best accuracy",
         "total MB"] + extra, body))
  return "\n\n".join(parts)


def _number_text(stat: Stat) -> str:
  """Privacy numbers span 1e-3..1e4: mean (and std) in 4 significant digits."""
  if not stat.values:
    return "-"
  if stat.n < 2 or stat.std == 0:
    return f"{stat.mean:.4g}"
  return f"{stat.mean:.4g} ± {stat.std:.2g}"


# ---------------------------------------------------------------------------------- verdicts


@dataclasses.dataclass
class Comparison:
  """L = sum_i c_i mean_i (percentage points) against `margin`: the claim says L > margin."""
  claim: str
  label: str
  terms: list[tuple[float, Stat]]
  margin: float = 0.0
  note: str = ""  # set: not counted (e.g. the method is not >= 100x cheaper)

  @property
  def estimate(self) -> float:
    return 100.0 * sum(c * s.mean for c, s in self.terms)

  @property
  def se(self) -> float:
    if any(s.n < 2 for _, s in self.terms):
      return math.nan
    return 100.0 * math.sqrt(sum(c * c * s.std ** 2 / s.n for c, s in self.terms))

  @property
  def verdict(self) -> str:
    if self.note:
      return "not counted"
    if not self.terms or any(not s.values for _, s in self.terms):
      return "inconclusive (not run)"
    if math.isnan(self.se):
      return "inconclusive"
    effect = self.estimate - self.margin
    if effect > Z * self.se:
      return "reproduced"
    if effect < -Z * self.se:
      return "not reproduced"
    return "inconclusive"


def overall(comparisons: Sequence[Comparison]) -> str:
  """The strict-majority verdict of the counted comparisons, else inconclusive."""
  counted = [c.verdict.split(" (")[0] for c in comparisons if not c.note]
  for label in ("reproduced", "not reproduced"):
    if counted and sum(v == label for v in counted) * 2 > len(counted):
      return label
  return "inconclusive"


CLAIMS = {
    "1": "PEFT is within a few (5) points of full fine-tuning at >= 100x less communication "
         "(close target)",
    "2": "PEFT holds up better than full fine-tuning when few clients take part and data are "
         "non-IID (drop from 100%/IID to 12.5%/Dirichlet)",
    "3": "Under DP, full fine-tuning loses the most (drop from no DP)",
    "4": "Pre-training beats scratch by a wide (10-point) margin",
    "5": "The domain gap widens the distance between PEFT and full fine-tuning",
    "6": "(supplementary) At equal communication, bias tuning beats full fine-tuning",
}


def comparisons(rows: Sequence[dict[str, Any]]) -> list[Comparison]:
  """The claims as comparisons of final accuracy (CLAIMS; module docstring for the rule)."""
  acc, mb = group(rows, "final_accuracy"), group(rows, "total_MB")
  empty = Stat([])

  def g(analysis: str, target: str, method: str, setting: str) -> Stat:
    return acc.get((analysis, target, method, setting), empty)

  base = grid_setting(16, 1.0, "dirichlet")
  out = []
  methods = {k[2] for k in acc if k[0] == "methods"}
  peft = [m for m in PEFT if m in methods]
  for m in peft:
    full_mb = mb.get(("methods", "close", "full", base), empty).mean
    m_mb = mb.get(("methods", "close", m, base), empty).mean
    ratio = full_mb / m_mb if m_mb else math.nan
    note = "" if ratio >= MIN_RATIO else f"only {ratio:.0f}x less communication"
    out.append(Comparison("1", f"{m} - full ({ratio:.0f}x fewer bytes)",
                          [(1.0, g("methods", "close", m, base)),
                           (-1.0, g("methods", "close", "full", base))], -FEW_POINTS, note))
  grid_methods = [m for m in sorted({k[2] for k in acc if k[0] == "grid"}, key=_order)
                  if m != "full"]
  grid_clients = sorted({int(k[3].split()[0]) for k in acc if k[0] == "grid"})
  for clients in grid_clients:
    easy, hard = grid_setting(clients, 1.0, "iid"), grid_setting(clients, 0.125, "dirichlet")
    for m in grid_methods:
      out.append(Comparison("2", f"{clients} clients: drop(full) - drop({m})",
                            [(1.0, g("grid", "close", "full", easy)),
                             (-1.0, g("grid", "close", "full", hard)),
                             (-1.0, g("grid", "close", m, easy)),
                             (1.0, g("grid", "close", m, hard))]))
  no_dp = dp_setting("none", 0.0)
  dp_settings = [k[3] for k in acc if k[0] == "privacy" and k[2] == "full" and k[3] != no_dp]
  dp_methods = [m for m in sorted({k[2] for k in acc if k[0] == "privacy"}, key=_order)
                if m != "full"]
  for setting in dp_settings:
    for m in dp_methods:
      out.append(Comparison("3", f"{setting}: loss(full) - loss({m})",
                            [(1.0, g("privacy", "close", "full", no_dp)),
                             (-1.0, g("privacy", "close", "full", setting)),
                             (-1.0, g("privacy", "close", m, no_dp)),
                             (1.0, g("privacy", "close", m, setting))]))
  for target in ("close", "far"):
    out.append(Comparison("4", f"{target}: full (pre-trained) - scratch",
                          [(1.0, g("methods", target, "full", base)),
                           (-1.0, g("methods", target, "scratch", base))], WIDE_MARGIN))
  for m in peft:
    out.append(Comparison("5", f"(full - {m}) on far - (full - {m}) on close",
                          [(1.0, g("methods", "far", "full", base)),
                           (-1.0, g("methods", "far", m, base)),
                           (-1.0, g("methods", "close", "full", base)),
                           (1.0, g("methods", "close", m, base))]))
  eq = {k[2]: v for k, v in acc.items() if k[0] == "equal_comm"}
  out.append(Comparison("6", "bias - full at bias's bytes",
                        [(1.0, eq.get("bias", empty)), (-1.0, eq.get("full", empty))]))
  return out


def _order(method: str) -> int:
  order = PLAN["full"]["methods"]
  return order.index(method) if method in order else len(order)


def verdict_section(comps: Sequence[Comparison]) -> str:
  body = []
  summary = []
  for claim, text in CLAIMS.items():
    cs = [c for c in comps if c.claim == claim]
    verdict = overall(cs)
    summary.append([claim, text, f"**{verdict}**"])
    for c in cs:
      se = "-" if math.isnan(c.se) else f"{Z * c.se:.1f}"
      body.append([claim, c.label, f"{c.estimate:+.1f}", se, f"> {c.margin:+g}",
                   c.note and f"not counted: {c.note}" or c.verdict])
  return ("### Verdicts\n\n" + markdown_table(["claim", "statement", "verdict"], summary)
          + "\n\n### Comparisons (final accuracy, percentage points)\n\n"
          + markdown_table(["claim", "comparison", "estimate", "2 SE", "claimed", "verdict"],
                           body))


# ---------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=120)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())


def plot_accuracy_vs_mb(rows: Sequence[dict[str, Any]], path: str) -> None:
  """The methods analysis: final accuracy (mean ± std) against total MB, log x, per target."""
  acc, mb = group(rows, "final_accuracy"), group(rows, "total_MB")
  fig = _figure(10.0, 4.2)
  fig.subplots_adjust(wspace=0.3)
  for i, target in enumerate(("close", "far")):
    ax = fig.add_subplot(1, 2, i + 1)
    for key in (k for k in acc if k[0] == "methods" and k[1] == target):
      a, m = acc[key], mb[key]
      if not a.values or not m.values:
        continue
      yerr = 0.0 if math.isnan(a.std) else a.std
      ax.errorbar([m.mean], [a.mean], yerr=[yerr], fmt="o", capsize=3, label=key[2])
      ax.annotate(key[2], (m.mean, a.mean), textcoords="offset points", xytext=(5, 3),
                  fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("total communication per run (MB, up + down, log scale)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{target} target", fontsize=9)
  _save(fig, path)


def plot_grid_heatmap(rows: Sequence[dict[str, Any]], path: str) -> None:
  """The grid analysis: mean final accuracy per (setting, method), annotated mean ± std."""
  acc = group(rows, "final_accuracy")
  keys = [k for k in acc if k[0] == "grid"]
  settings = list(dict.fromkeys(k[3] for k in keys))
  methods = sorted({k[2] for k in keys}, key=_order)
  values = np.full((len(settings), len(methods)), np.nan)
  for k in keys:
    values[settings.index(k[3]), methods.index(k[2])] = acc[k].mean
  fig = _figure(1.6 * len(methods) + 3.0, 0.5 * len(settings) + 1.5)
  ax = fig.add_subplot()
  image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
  for k in keys:
    i, j = settings.index(k[3]), methods.index(k[2])
    ax.text(j, i, acc[k].text(digits=2), ha="center", va="center", fontsize=7,
            color="white" if acc[k].mean < 0.6 else "black")
  ax.set_xticks(range(len(methods)), methods)
  ax.set_yticks(range(len(settings)), settings, fontsize=8)
  ax.set_title("final accuracy, close target (mean ± std over seeds)", fontsize=9)
  fig.colorbar(image, ax=ax, format=PercentFormatter(1.0))
  _save(fig, path)


# ------------------------------------------------------------------------------------- main


def write_results(rows: Sequence[dict[str, Any]], workdir: str, header: str) -> str:
  """results.csv, results.md and the figures; returns the markdown."""
  write_csv(rows, csv_columns(rows), os.path.join(workdir, "results.csv"))
  md = "\n\n".join([header, analysis_tables(rows), verdict_section(comparisons(rows))]) + "\n"
  atomic_write_text(os.path.join(workdir, "results.md"), md)
  plot_accuracy_vs_mb(rows, os.path.join(workdir, "accuracy_vs_mb.png"))
  plot_grid_heatmap(rows, os.path.join(workdir, "grid_heatmap.png"))
  return md


def check_backbone(path: str, classes: str) -> None:
  """The backbone must have learnt only the source classes: its head has one output per
  class. A head over all ten means pre-training ignored config.data.classes."""
  with np.load(path) as z:
    head_outputs = z["head/kernel"].shape[-1]
  expected = len(classes.split(","))
  if head_outputs != expected:
    raise RuntimeError(
        f"{path}: the backbone's head has {head_outputs} outputs, not {expected}: pre-training "
        f"did not keep only classes {classes} (fedpeft_jax.pretrain must pass "
        f"config.data.classes to load_dataset). Delete {os.path.dirname(path)} and re-run.")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  t0 = time.time()
  scale = "quick" if _QUICK.value else "full"
  seeds = ([int(s) for s in _SEEDS.value] if _SEEDS.value
           else [1] if _QUICK.value else list(repo_config(CONFIG).STUDY_SEEDS))
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  config = repo_config(CONFIG)
  pt_config = config.pretrain_config(scale)
  pt_config.data.data_dir = _FASHION_DIR.value
  pt_dir = os.path.join(workdir, "pretrain")
  ckpt = pretrain(pt_config, pt_dir)
  check_backbone(ckpt, config.SOURCE_CLASSES)
  with open(os.path.join(pt_dir, "pretrain_summary.json")) as f:
    pt_summary = json.load(f)
  runner = run_pool.RunPool(workdir, _WORKERS.value, noun="cell")
  members = plan_members(scale, seeds)
  runner.run(cell_jobs((m.cell for m in members), workdir, ckpt, _FASHION_DIR.value))
  extra = equal_comm_members(scale, seeds, workdir)
  runner.run(cell_jobs((m.cell for m in extra), workdir, ckpt, _FASHION_DIR.value))
  members += extra
  rows = collect_rows(members, workdir, runner.seconds)

  cells = {m.name for m in members}
  cell_seconds = sum(runner.seconds.get(c, 0.0) for c in cells)
  s = config.SCALE[scale]
  header = (
      f"## Results ({scale} scale, seeds {', '.join(map(str, seeds))})\n\n"
      f"Generated by `python -m experiments.cpu_study{' --quick' if _QUICK.value else ''}` "
      f"from {len(rows)} rows of results.csv ({len(cells)} distinct runs). Backbone: ViT "
      f"hidden {s['hidden']}, depth {s['depth']}, patch {config.PATCH_SIZE} at "
      f"{config.IMAGE_SIZE}x{config.IMAGE_SIZE}, pre-trained on Fashion-MNIST classes "
      f"{config.SOURCE_CLASSES} ({pt_summary['test_accuracy']:.3f} test accuracy, "
      f"{pt_summary['seconds']:.0f} s). {s['rounds']} rounds of 1 local epoch; close target "
      f"{s['close_train']} training images. Accuracy: mean ± std over seeds (ddof 1); MB = "
      f"10^6 bytes, up + down. Wall time: {cell_seconds:.0f} s summed over the runs' "
      f"processes ({_WORKERS.value} in parallel); this invocation ran {runner.runs_done} of "
      f"them in {time.time() - t0:.0f} s.")
  md = write_results(rows, workdir, header)
  print(md)
  runner.exit_if_failed()


if __name__ == "__main__":
  app.run(main)
