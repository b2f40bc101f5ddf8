"""Communication and personalisation frontiers on the offline quickstart, one seed.

  python -m experiments.frontier --workdir=runs/frontier                      # all groups
  python -m experiments.frontier --workdir=runs/frontier --groups=frontier    # one group
  python -m experiments.frontier --workdir=runs/frontier_quick --quick        # smoke test

The quickstart setting (configs/quickstart.py: a small ViT pre-trained on Fashion-MNIST,
cached in WORKDIR/pretrain, fine-tuned by 10 clients on scikit-learn digits, 5 per round,
Dirichlet partition) answers three questions, one group of runs each:

  frontier  What does compressing uploads cost? bias, lora and adapter tuning, each with
            float32, bfloat16 (`federated.wire_dtype`, both directions), int8, int4 and top-10%
            (`federated.compression`) uploads: final test accuracy against MB uploaded. The
            reading checks the expectation "int8 uploads stay within 1 point of float32 at
            about 4x fewer upload bytes" per method.
  personal  Does keeping part of the model on the client pay at strong heterogeneity? At
            Dirichlet alpha 0.1 and 1.0, LoRA tuning as global FedAvg (scored per client too,
            `federated.eval_per_client`), FedPer, FedRep, FedBABU and FedSA-LoRA; metric: the
            mean (min, max) over clients of the accuracy on each client's own test set. LoRA
            for all five, so they differ only in what stays local (FedSA-LoRA needs LoRA).
  lora      How should LoRA factors be aggregated? `federated.lora_aggregation` fedit, ffa,
            fedex and flora: accuracy against MB uploaded and downloaded.

Every run is resumable in WORKDIR/<group>/<name> (`fedpeft_jax.runner.train.run`): a finished
one is reused, an interrupted one resumes from its checkpoint, so re-running the command
continues where it stopped. A workdir holds one round count: a run asked for with other
rounds finds a different config.json and fails with that message (use another workdir).
Outputs: results.csv (one row per run), results.md (tables and a reading computed from
them) and frontier.png (one panel per group that ran).

Numbers come from the runs' own files: final accuracy from summary.json; MB uploaded
(downloaded) is the sum of `bytes_up` (`bytes_down`) over metrics.jsonl's rows, MB = 10^6
bytes; bytes per upload = MB uploaded / uploads made (sum of `clients_reporting`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.ticker import FuncFormatter

from experiments import run_pool
from experiments.run_pool import markdown_table, write_csv
from fedpeft_jax.federated import personal
from fedpeft_jax.files import atomic_write_text
from fedpeft_jax.pretrain import pretrain
from fedpeft_jax.runner import outputs
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import load_data

CONFIG = "quickstart"  # configs/quickstart.py: every run is its get_config(method) + overrides
GROUPS = ("frontier", "personal", "lora")
QUICK_ROUNDS = 2

FRONTIER_METHODS = ("bias", "lora", "adapter")
REFERENCE_UPLOAD = "float32"
UPLOADS: dict[str, dict[str, Any]] = {  # upload label -> config overrides
    REFERENCE_UPLOAD: {},
    "bf16": {"federated.wire_dtype": "bfloat16"},
    "int8": {"federated.compression": "int8"},
    "int4": {"federated.compression": "int4"},
    "topk0.1": {"federated.compression": "topk", "federated.compression_fraction": 0.1},
}
# The expectation the frontier group checks: int8 within this many points of float32 ...
WITHIN_POINTS = 1.0
# ... at "about 4x" fewer upload bytes: a reduction in this range (int8 is 1 byte per value
# instead of 4, plus a 4-byte scale per tensor, so small tensors fall a little short of 4x).
ABOUT_4X = (3.5, 4.5)

PERSONAL_METHOD = "lora"
ALPHAS = (0.1, 1.0)
BASELINE_SCHEME = "global"
SCHEMES: dict[str, dict[str, Any]] = {  # scheme -> config overrides
    BASELINE_SCHEME: {"federated.eval_per_client": True},
    "FedPer": {"federated.personal": "head"},
    # As published (fedpeft_jax.federated.personal): 10 head epochs, then 1 body epoch.
    "FedRep": {"federated.personal": "head", "federated.personal_schedule": "fedrep",
               "federated.personal_epochs": personal.FEDREP_HEAD_EPOCHS,
               "federated.local_epochs": personal.FEDREP_BODY_EPOCHS},
    "FedBABU": {"federated.personal": "head", "federated.personal_schedule": "fedbabu"},
    "FedSA-LoRA": {"federated.personal": "lora_b"},
}
# metrics.jsonl keys of the per-client (personalised) evaluation.
PERSONAL_KEYS = ("personalized_accuracy", "personalized_accuracy_min",
                 "personalized_accuracy_max")

LORA_RULES = ("fedit", "ffa", "fedex", "flora")

CSV_COLUMNS = ["group", "run", "method", "setting", "alpha", "rounds", "final_accuracy",
               "MB_up", "MB_down", "bytes_per_upload", "acc_delta_points", "upload_reduction",
               *PERSONAL_KEYS, "wall_seconds"]


# ---------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run: the quickstart config of `method` with `overrides` (dotted path, value)."""
  group: str
  name: str  # its folder under the workdir, e.g. 'frontier/bias-int8'
  method: str
  setting: str  # the upload, the personalisation scheme or the LoRA aggregation rule
  alpha: Optional[float]  # the Dirichlet alpha when the run sets it, else the quickstart's
  overrides: tuple[tuple[str, Any], ...]


def frontier_specs(quick: bool) -> list[Spec]:
  """Methods x uploads; --quick: the first method with float32 and the first other upload."""
  methods = FRONTIER_METHODS[:1] if quick else FRONTIER_METHODS
  uploads = list(UPLOADS)[:2] if quick else list(UPLOADS)
  return [Spec("frontier", f"frontier/{m}-{u}", m, u, None, tuple(UPLOADS[u].items()))
            for m in methods for u in uploads]


def personal_specs(quick: bool) -> list[Spec]:
  """Alphas x schemes (LoRA); --quick: the first alpha with the baseline and FedPer.
  data.min_size stays the quickstart's 10: at alpha 0.1 the partitioner's balance cap keeps
  every client at 70+ of digits' 1,437 training images, so a draw is found at once."""
  alphas = ALPHAS[:1] if quick else ALPHAS
  schemes = list(SCHEMES)[:2] if quick else list(SCHEMES)
  return [Spec("personal", f"personal/alpha{a:g}-{s.lower()}", PERSONAL_METHOD, s, a,
               (("data.alpha", a),) + tuple(SCHEMES[s].items()))
          for a in alphas for s in schemes]


def lora_specs(quick: bool) -> list[Spec]:
  """One run per aggregation rule; --quick: the first."""
  rules = LORA_RULES[:1] if quick else LORA_RULES
  return [Spec("lora", f"lora/{r}", "lora", r, None, (("federated.lora_aggregation", r),))
          for r in rules]


PLANNERS = {"frontier": frontier_specs, "personal": personal_specs, "lora": lora_specs}


def plan(groups: Sequence[str], quick: bool) -> list[Spec]:
  """The runs of `groups`, in GROUPS order."""
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f"--groups: unknown {', '.join(unknown)}; allowed: {', '.join(GROUPS)}")
  return [s for g in GROUPS if g in groups for s in PLANNERS[g](quick)]


def build_config(spec: Spec, pretrained: str, rounds: int) -> ml_collections.ConfigDict:
  """The run's config. An override must name an existing field: a misspelt (or not yet
  implemented) one would otherwise be added silently and the run would not be what its
  name says."""
  config = repo_config(CONFIG).get_config(spec.method)
  config.model.pretrained = pretrained
  for path, value in spec.overrides:
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
      node = node[key]
    if leaf not in node:
      raise KeyError(f"{spec.name}: config field {path} does not exist")
    node[leaf] = value
  if rounds:
    config.federated.rounds = rounds
  return config


def pretrain_config(quick: bool) -> ml_collections.ConfigDict:
  """The quickstart's backbone (configs/pretrain_fashion.py); --quick: 1 epoch on 5,000
  images, which is enough for a smoke test and takes seconds instead of a minute."""
  config = repo_config("pretrain_fashion").get_config()
  if quick:
    config.data.train_size = 5000
    config.pretrain.epochs = 1
  return config


# ----------------------------------------------------------------------------------- running


def read_summary(workdir: str, spec: Spec) -> Optional[dict]:
  return run_pool.read_summary(os.path.join(workdir, spec.name))


def job(spec: Spec, workdir: str, pretrained: str, rounds: int) -> run_pool.Job:
  """The run of `spec` for the pool; its wall seconds are kept under its name."""
  return run_pool.Job(spec.name, os.path.join(workdir, spec.name), build_config,
                      (spec, pretrained, rounds))


# ---------------------------------------------------------------------------------- results


def run_row(spec: Spec, workdir: str, seconds: dict[str, float]) -> Optional[dict[str, Any]]:
  """The row of a finished run from its summary.json and metrics.jsonl (None if unfinished)."""
  s = read_summary(workdir, spec)
  if s is None:
    return None
  metrics = outputs.MetricsLog(os.path.join(workdir, spec.name, "metrics.jsonl")).read()
  up = sum(r["bytes_up"] for r in metrics)
  uploads = sum(r["clients_reporting"] for r in metrics)
  row: dict[str, Any] = {
      "group": spec.group, "run": spec.name, "method": spec.method, "setting": spec.setting,
      "alpha": spec.alpha, "rounds": s["rounds"], "final_accuracy": s["final_accuracy"],
      "MB_up": up / outputs.MB, "MB_down": sum(r["bytes_down"] for r in metrics) / outputs.MB,
      "bytes_per_upload": up / uploads if uploads else None,
      "wall_seconds": seconds.get(spec.name)}
  evaluated = [r for r in metrics if PERSONAL_KEYS[0] in r]
  if evaluated:  # the last per-client evaluation, all three numbers from the same row
    row.update({k: evaluated[-1].get(k) for k in PERSONAL_KEYS})
  return row


def add_frontier_deltas(rows: Sequence[dict[str, Any]]) -> None:
  """Each frontier row against its method's float32 run: accuracy delta in points and the
  upload reduction (float32 MB uploaded / this run's; 4.0 = four times fewer bytes)."""
  reference = {r["method"]: r for r in rows
               if r["group"] == "frontier" and r["setting"] == REFERENCE_UPLOAD}
  for r in rows:
    ref = reference.get(r["method"])
    if r["group"] != "frontier" or ref is None:
      continue
    r["acc_delta_points"] = 100.0 * (r["final_accuracy"] - ref["final_accuracy"])
    r["upload_reduction"] = ref["MB_up"] / r["MB_up"] if r["MB_up"] else None


def collect_rows(specs: Sequence[Spec], workdir: str,
                 seconds: dict[str, float]) -> list[dict[str, Any]]:
  rows = [r for r in (run_row(s, workdir, seconds) for s in specs) if r is not None]
  add_frontier_deltas(rows)
  return rows


def _f(value: Optional[float], fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def _rows(rows: Sequence[dict[str, Any]], group: str) -> list[dict[str, Any]]:
  return [r for r in rows if r["group"] == group]


def accuracy_se_points(accuracy: float, test_examples: int) -> float:
  """The binomial standard error (points) of an accuracy measured on `test_examples`: how
  much the test set alone moves a number, a floor under the seed-to-seed spread that one
  seed cannot show."""
  return 100.0 * math.sqrt(accuracy * (1.0 - accuracy) / test_examples)


def frontier_section(rows: Sequence[dict[str, Any]], test_examples: int) -> str:
  """The table and the reading of the frontier group."""
  table = markdown_table(
      ["method", "upload", "final accuracy", "MB uploaded", "bytes per upload",
       "Δ accuracy vs float32 (points)", "upload reduction vs float32"],
      [[r["method"], r["setting"], _f(r["final_accuracy"], ".4f"), _f(r["MB_up"], ".4f"),
        _f(r["bytes_per_upload"], ",.0f"), _f(r.get("acc_delta_points"), "+.1f"),
        _f(r.get("upload_reduction"), ".2f") + "x"] for r in rows])
  reading = []
  methods = list(dict.fromkeys(r["method"] for r in rows))
  verdicts = []
  for method in methods:
    by = {r["setting"]: r for r in rows if r["method"] == method}
    int8 = by.get("int8")
    if REFERENCE_UPLOAD not in by or int8 is None:
      reading.append(f"- {method}: int8 or float32 not run; the expectation is not checked.")
      continue
    delta, reduction = int8["acc_delta_points"], int8["upload_reduction"]
    close = delta >= -WITHIN_POINTS
    cheap = ABOUT_4X[0] <= reduction <= ABOUT_4X[1]
    verdict = "reproduced" if close and cheap else "not reproduced"
    verdicts.append(verdict)
    why = [] if close else [f"it loses more than {WITHIN_POINTS:g} point"]
    why += [] if cheap else [f"{reduction:.2f}x is outside {ABOUT_4X[0]:g}-{ABOUT_4X[1]:g}x"]
    reading.append(f"- {method}: int8 is {delta:+.1f} points from float32 at {reduction:.2f}x "
                   f"fewer upload bytes: **{verdict}**" + (f" ({'; '.join(why)})." if why
                                                          else "."))
  for method in methods:
    ok = [r for r in rows if r["method"] == method and r.get("acc_delta_points") is not None
          and r["acc_delta_points"] >= -WITHIN_POINTS]
    if ok:
      best = min(ok, key=lambda r: r["MB_up"])
      reading.append(f"- {method}: the smallest upload within {WITHIN_POINTS:g} point of "
                     f"float32 is {best['setting']} ({best['MB_up']:.4f} MB, "
                     f"{best['upload_reduction']:.1f}x fewer bytes, "
                     f"{best['acc_delta_points']:+.1f} points).")
  if verdicts:
    reading.insert(0, f"- Expectation \"int8 uploads stay within {WITHIN_POINTS:g} point of "
                   f"float32 at about 4x fewer upload bytes\" (a gain counts as within): "
                   f"reproduced for {verdicts.count('reproduced')} of {len(verdicts)} methods.")
  reference = [r["final_accuracy"] for r in rows if r["setting"] == REFERENCE_UPLOAD]
  if reference:
    se = accuracy_se_points(float(np.mean(reference)), test_examples)
    worse = [r for r in rows if r.get("acc_delta_points") is not None
             and r["acc_delta_points"] < -WITHIN_POINTS]
    if worse:
      beyond = sum(abs(r["acc_delta_points"]) > 2 * se for r in worse)
      reading.append(
          f"- More than {WITHIN_POINTS:g} point below float32: " + ", ".join(
              f"{r['method']} {r['setting']} ({r['acc_delta_points']:+.1f})" for r in worse)
          + f"; {beyond} of {len(worse)} beyond 2 test-set SE ({2 * se:.1f} points).")
    else:
      reading.append(f"- No upload is more than {WITHIN_POINTS:g} point below float32.")
    reading.append(
        f"- One seed: one test image is {100.0 / test_examples:.2f} points of accuracy, and "
        f"at the float32 runs' mean accuracy the test set alone gives a standard error of "
        f"{se:.1f} points, so deltas smaller than about {2 * se:.1f} points (2 SE) are not "
        f"distinguishable from noise here; seed-to-seed variation, not measured, adds to it.")
  return ("### Accuracy vs MB uploaded\n\n" + table + "\n\n**Reading.**\n\n"
          + "\n".join(reading))


def personal_section(rows: Sequence[dict[str, Any]]) -> str:
  """The table and the reading of the personal group."""
  table = markdown_table(
      ["alpha", "scheme", "global test accuracy", "personalised mean", "personalised min",
       "personalised max"],
      [[f"{r['alpha']:g}", r["setting"], _f(r["final_accuracy"], ".4f"),
        *(_f(r.get(k), ".4f") for k in PERSONAL_KEYS)] for r in rows])
  reading = []
  gains: dict[float, list[float]] = {}
  for alpha in dict.fromkeys(r["alpha"] for r in rows):
    by = {r["setting"]: r for r in rows if r["alpha"] == alpha}
    base = by.get(BASELINE_SCHEME, {}).get(PERSONAL_KEYS[0])
    if base is None:
      reading.append(f"- alpha {alpha:g}: no per-client accuracy of the global model; "
                     "nothing to compare against.")
      continue
    others = [(s, r[PERSONAL_KEYS[0]]) for s, r in by.items()
              if s != BASELINE_SCHEME and r.get(PERSONAL_KEYS[0]) is not None]
    gains[alpha] = [100.0 * (p - base) for _, p in others]
    above = [f"{s} ({100.0 * (p - base):+.1f})" for s, p in others if p > base]
    below = [f"{s} ({100.0 * (p - base):+.1f})" for s, p in others if p <= base]
    reading.append(f"- alpha {alpha:g}: the global model's per-client accuracy is "
                   f"{base:.4f}; above it (points): {', '.join(above) or 'none'}; not above: "
                   f"{', '.join(below) or 'none'}.")
  if ALPHAS[0] in gains and gains[ALPHAS[0]]:
    n_up, n = sum(g > 0 for g in gains[ALPHAS[0]]), len(gains[ALPHAS[0]])
    answer = "yes" if n_up == n else "no" if n_up == 0 else f"for {n_up} of {n} schemes"
    reading.insert(0, f"- Does personalisation exceed the global model's per-client accuracy "
                   f"at alpha {ALPHAS[0]:g}? **{answer}** ({n_up} of {n} schemes above it; "
                   "one seed).")
  if len(gains) > 1 and all(gains.values()):
    means = ", ".join(f"{np.mean(g):+.1f} at alpha {a:g}" for a, g in gains.items())
    reading.append(f"- Mean gain of the personalised schemes over the global model "
                   f"(points): {means}.")
  head_personal = [s for s, o in SCHEMES.items() if o.get("federated.personal") == "head"]
  note = (f"Global test accuracy is the server's model on the shared test set. With a personal "
          f"head ({', '.join(head_personal)}) the server never trains a head, so that column "
          "scores the initial head, not the scheme; compare the personalised columns.")
  return ("### Personalisation (LoRA, per-client test sets)\n\n" + table + "\n\n" + note
          + "\n\n**Reading.**\n\n" + "\n".join(reading))


def lora_section(rows: Sequence[dict[str, Any]]) -> str:
  """The table and the reading of the lora group."""
  table = markdown_table(
      ["rule", "final accuracy", "MB uploaded", "MB downloaded"],
      [[r["setting"], _f(r["final_accuracy"], ".4f"), _f(r["MB_up"], ".4f"),
        _f(r["MB_down"], ".4f")] for r in rows])
  ref = rows[0]
  reading = [f"- Relative to {ref['setting']} ({ref['final_accuracy']:.4f}): " + "; ".join(
      f"{r['setting']} {100.0 * (r['final_accuracy'] - ref['final_accuracy']):+.1f} points, "
      f"{r['MB_up'] / ref['MB_up']:.2f}x the upload, {r['MB_down'] / ref['MB_down']:.2f}x the "
      "download" for r in rows[1:]) + "."] if len(rows) > 1 else []
  best = max(rows, key=lambda r: r["final_accuracy"])
  reading.append(f"- Highest final accuracy: {best['setting']} ({best['final_accuracy']:.4f}; "
                 "one seed).")
  return ("### LoRA aggregation rules\n\n" + table + "\n\n**Reading.**\n\n"
          + "\n".join(reading))


# ----------------------------------------------------------------------------------- figure


def _mb_axis(ax, xs: Sequence[float]) -> None:
  """outputs' log MB axis; over one to two decades (this experiment's span) its unlabelled
  minor ticks leave one or two numbers on the axis, so the 2s and 5s are labelled too."""
  outputs._log_mb_axis(ax, xs)
  if 10 <= max(xs) / min(xs) < 100:
    ax.xaxis.set_minor_formatter(FuncFormatter(_two_five))


def _two_five(value: float, _: Any) -> str:
  mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
  return f"{value:g}" if abs(mantissa - 2) < 1e-6 or abs(mantissa - 5) < 1e-6 else ""


def _panel_frontier(ax, rows: Sequence[dict[str, Any]]) -> None:
  xs_all = []
  for method in dict.fromkeys(r["method"] for r in rows):
    points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["MB_up"])
    xs = [r["MB_up"] for r in points]
    ys = [r["final_accuracy"] for r in points]
    xs_all += xs
    (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=method)
    for r in points:
      ax.annotate(r["setting"], (r["MB_up"], r["final_accuracy"]), textcoords="offset points",
                  xytext=(4, 3), fontsize=6, color=line.get_color())
  _mb_axis(ax, xs_all)
  outputs._accuracy_axis(ax)
  ax.set_ylabel("final test accuracy")
  ax.set_xlabel("MB uploaded per run (log scale)")
  ax.legend(fontsize=7)
  ax.set_title("(a) accuracy vs upload bytes", fontsize=9)


def _panel_personal(ax, rows: Sequence[dict[str, Any]]) -> None:
  alphas = list(dict.fromkeys(r["alpha"] for r in rows))
  schemes = list(dict.fromkeys(r["setting"] for r in rows))
  width = 0.8 / len(schemes)
  for j, scheme in enumerate(schemes):
    xs, means, err, glob = [], [], [[], []], []
    for i, alpha in enumerate(alphas):
      r = next((r for r in rows if r["alpha"] == alpha and r["setting"] == scheme), None)
      if r is None or r.get(PERSONAL_KEYS[0]) is None:
        continue
      mean, low, high = (r[k] for k in PERSONAL_KEYS)
      xs.append(i - 0.4 + width * (j + 0.5))
      means.append(mean)
      err[0].append(mean - low)
      err[1].append(high - mean)
      glob.append(r["final_accuracy"])
    ax.bar(xs, means, width, yerr=err, capsize=2, label=scheme,
           hatch="//" if scheme == BASELINE_SCHEME else None)
    ax.plot(xs, glob, "kD", markersize=3)
  ax.plot([], [], "kD", markersize=3, label="global test accuracy")
  ax.set_xticks(range(len(alphas)), [f"Dirichlet {a:g}" for a in alphas])
  outputs._accuracy_axis(ax)
  ax.set_ylabel("per-client accuracy (mean, min-max)")
  ax.legend(fontsize=6)
  ax.set_title("(b) personalised vs global", fontsize=9)


def _panel_lora(ax, rows: Sequence[dict[str, Any]]) -> None:
  xs = [r["MB_up"] + r["MB_down"] for r in rows]
  for r, x in zip(rows, xs):
    ax.plot([x], [r["final_accuracy"]], "o")
    ax.annotate(r["setting"], (x, r["final_accuracy"]), textcoords="offset points",
                xytext=(4, 3), fontsize=7)
  _mb_axis(ax, xs)
  outputs._accuracy_axis(ax)
  ax.set_ylabel("final test accuracy")
  ax.set_xlabel("MB uploaded + downloaded per run (log scale)")
  ax.set_title("(c) LoRA aggregation rules", fontsize=9)


PANELS = {"frontier": _panel_frontier, "personal": _panel_personal, "lora": _panel_lora}


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
  """One figure, a panel per group with rows (a group that did not run has none)."""
  groups = [g for g in GROUPS if _rows(rows, g)]
  if not groups:
    return
  fig = outputs._figure(5.0 * len(groups), 4.2)
  fig.subplots_adjust(wspace=0.3)
  for i, group in enumerate(groups):
    PANELS[group](fig.add_subplot(1, len(groups), i + 1), _rows(rows, group))
  outputs._save(fig, path)


# ------------------------------------------------------------------------------------- main


def write_results(rows: Sequence[dict[str, Any]], workdir: str, header: str,
                  test_examples: int) -> str:
  """results.csv, results.md and frontier.png; returns the markdown."""
  write_csv(rows, CSV_COLUMNS, os.path.join(workdir, "results.csv"))
  parts = [header]
  if _rows(rows, "frontier"):
    parts.append(frontier_section(_rows(rows, "frontier"), test_examples))
  if _rows(rows, "personal"):
    parts.append(personal_section(_rows(rows, "personal")))
  if _rows(rows, "lora"):
    parts.append(lora_section(_rows(rows, "lora")))
  md = "\n\n".join(parts) + "\n"
  atomic_write_text(os.path.join(workdir, "results.md"), md)
  plot(rows, os.path.join(workdir, "frontier.png"))
  return md


def _define_flags() -> None:
  """The command's flags; defined only when run as a command (as fedpeft_jax.pretrain does),
  so importing this module (tests do) adds no flags that clash with cpu_study's."""
  flags.DEFINE_string("workdir", "runs/frontier", "Output directory.")
  flags.DEFINE_list("groups", list(GROUPS), f"Groups to run, of {', '.join(GROUPS)}.")
  flags.DEFINE_integer("rounds", 0, f"Override the number of rounds (0: the quickstart's, or "
                       f"{QUICK_ROUNDS} with --quick).")
  flags.DEFINE_bool("quick", False, f"{QUICK_ROUNDS} rounds, the first method/upload pair per "
                    "group plus its reference, a 1-epoch backbone: a smoke test.")
  flags.DEFINE_integer("workers", 2, "Runs go in this many processes (1: in this process).")
  flags.DEFINE_string("fashion_mnist_dir", "", "Folder of the four Fashion-MNIST IDX files "
                      "('' = /usr/share/datasets/fashion-mnist).")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  t0 = time.time()
  f = flags.FLAGS
  quick = f.quick
  rounds = f.rounds or (QUICK_ROUNDS if quick else 0)
  workdir = os.path.abspath(f.workdir)
  os.makedirs(workdir, exist_ok=True)
  pt_config = pretrain_config(quick)
  pt_config.data.data_dir = f.fashion_mnist_dir
  pt_dir = os.path.join(workdir, "pretrain")
  ckpt = pretrain(pt_config, pt_dir)
  with open(os.path.join(pt_dir, "pretrain_summary.json")) as fp:
    pt_summary = json.load(fp)
  specs = plan(f.groups, quick)
  runner = run_pool.RunPool(workdir, f.workers, noun="run")
  runner.run(job(s, workdir, ckpt, rounds) for s in specs)
  rows = collect_rows(specs, workdir, runner.seconds)

  base = repo_config(CONFIG).get_config("bias")
  dataset, _ = load_data(base)
  run_seconds = sum(runner.seconds.get(s.name, 0.0) for s in specs)
  command = " ".join(["python -m experiments.frontier", f"--groups={','.join(f.groups)}"]
                     + (["--quick"] if quick else []) + ([f"--rounds={f.rounds}"] if f.rounds
                                                         else []))
  header = (
      f"## Results: communication and personalisation frontiers "
      f"({'quick' if quick else 'full'}, one seed)\n\n"
      f"Generated by `{command}` from {len(rows)} runs (of {len(specs)} planned). Setting: "
      f"configs/quickstart.py: a ViT (hidden {base.model.hidden_size}, depth "
      f"{base.model.depth}) pre-trained on Fashion-MNIST ({pt_summary['test_accuracy']:.3f} "
      f"test accuracy), fine-tuned on scikit-learn digits ({len(dataset.test_labels)} test "
      f"images) by {base.federated.num_clients} clients, {base.federated.clients_per_round} "
      f"per round, {rounds or base.federated.rounds} rounds of {base.federated.local_epochs} "
      f"local epochs, Dirichlet alpha {base.data.alpha:g} (personal group: as given), seed "
      f"{base.seed}. MB = 10^6 bytes, summed over metrics.jsonl rows. Wall time: "
      f"{run_seconds:.0f} s summed over the runs ({f.workers} process(es)); this invocation "
      f"ran {runner.runs_done} of them in {time.time() - t0:.0f} s.")
  md = write_results(rows, workdir, header, len(dataset.test_labels))
  print(md)
  runner.exit_if_failed()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
