"""The study's analyses at CPU scale: learning rates chosen on validation, paired verdicts.

  python -m experiments.cpu_study --workdir=runs/cpu_study                # ~80 minutes
  python -m experiments.cpu_study --workdir=runs/cpu_study_quick --quick  # smoke test, < 3 min

A ViT pre-trained on Fashion-MNIST classes 0-4 (cached in WORKDIR/pretrain) is fine-tuned
federatedly on a close target (Fashion-MNIST classes 5-9: new classes of its own domain, as
ImageNet-21k is to CIFAR-100) and a far one (scikit-learn digits, as ImageNet-21k is to PCam);
the same ViT from random init is the scratch baseline. configs/cpu_study.py holds the
scale-down and why. In three phases:

1. tuning: every (setting group, method) sweeps its learning rate (DP-FedAvg: rate x clip) on
   seed 0, scored by the mean validation accuracy of the last 3 evaluations
   (`experiments.sweep.score`), walking past its grid while the best point is at an edge
   (`extend_tuning`); the test split is never read to choose. Groups: the close
   target (16 clients, also the 16-client grid cells), the far target, 64 clients (their grid
   cells and DP's no-DP reference), each scarcity size, DP (epsilon 5; reused at 10 and by
   paper_gaussian);
2. the study: each cell runs on seeds 1..5 when a pre-registered primary comparison
   (docs/study.md, "The CPU study") uses it, else on seed 1 (supplementary);
3. results: results.csv (a row per analysis, cell and seed; the final accuracy is the mean of
   the last 3 test evaluations), tuning.csv, results.md, accuracy_vs_mb.png,
   grid_heatmap.png.

Verdicts (experiments/paired.py): each claim has one primary comparison, L > margin, L a
linear combination of accuracies in percentage points. It is judged on its per-seed values
(runs of a seed share the split, the partition and the sampling): "reproduced" when the 95%
Student-t interval of the mean lies above the margin, "contradicted" below it, else
"inconclusive". Supplementary comparisons are reported the same way and decide nothing.

Every (config, seed) is one resumable run in WORKDIR/cells/<name>; a cell shared by several
analyses runs once, a finished one is skipped and an interrupted one resumes, so re-running
the command continues an interrupted study. Cells run in --workers processes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
# Agg through the object API, never pyplot (as fedpeft_jax.runner.outputs).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

from experiments import paired, run_pool
from experiments.run_pool import markdown_table, write_csv
from experiments.sweep import score as sweep_score
from fedpeft_jax.files import atomic_write_bytes, atomic_write_text
from fedpeft_jax.pretrain import pretrain
from fedpeft_jax.runner import outputs
from fedpeft_jax.config_files import repo_config

_WORKDIR = flags.DEFINE_string("workdir", "runs/cpu_study", "Output directory.")
_QUICK = flags.DEFINE_bool("quick", False, "A tiny model, three methods, two rounds, two seeds: "
                           "a smoke test of the whole pipeline.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Cells run in this many processes (1: in this "
                                "process).")
_SEEDS = flags.DEFINE_integer("seeds", 0, "Seeds of the primary cells, 1..N (0 = the plan's: "
                              "5; --quick: 2).")
_SUPPLEMENTARY_SEEDS = flags.DEFINE_integer(
    "supplementary_seeds", 0, "Seeds of the other cells, 1..N (0 = the plan's: 1; --quick: 1).")
_PUBLISH = flags.DEFINE_bool(
    "publish", False, "Also copy the results into the repository: docs/cpu_study/ (results.md, "
    "results.csv, tuning.csv, the figures) and README.md's block between the cpu_study "
    "markers (results.md up to its first table of runs, unedited).")
_FASHION_DIR = flags.DEFINE_string("fashion_mnist_dir", "", "Folder of the four Fashion-MNIST "
                                   "IDX files ('' = /usr/share/datasets/fashion-mnist).")

CONFIG = "cpu_study"  # configs/cpu_study.py
TUNING_SEED = 0  # the sweeps' seed; the study's seeds start at 1
LAST = 3  # evaluations averaged: the final test metric, the sweep's validation score
PEFT = ("head", "bias", "adapter", "prompt", "lora")
FEW_POINTS = 5.0  # claim 1: "within a few points" (percentage points)
WIDE_MARGIN = 10.0  # claim 4: "by a wide margin" (percentage points)
MIN_RATIO = 100.0  # claim 1: at >= 100x less communication

# Every sweep starts on its method's grid and walks outwards: while the best point so far has
# an untried neighbour on a ladder (learning rate: x3 half-decades; DP's clip: 1-2-5), that
# neighbour runs, up to MAX_EXTENSIONS points beyond the grid. A winner left at the edge of
# what was tried is flagged in the tuning table.
LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
CLIP_LADDER = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_LR_PEFT = (0.01, 0.03, 0.1)
LR_GRID = {"full": (0.003, 0.01, 0.03), "scratch": (0.01, 0.03, 0.1), "head": (0.03, 0.1, 0.3),
           "bias": _LR_PEFT, "adapter": _LR_PEFT, "prompt": _LR_PEFT, "lora": _LR_PEFT}
CLIP_GRID = (0.02, 0.05)  # DP-FedAvg's bound C, tuned with the rate (and walked)
MAX_EXTENSIONS = 3

_GRID = tuple((c, p, s) for c in (16, 64) for p in (1.0, 0.125) for s in ("iid", "dirichlet"))
PLAN = {
    "full": {"seeds": 5, "supplementary_seeds": 1,
             "methods": ("full", "head", "bias", "adapter", "prompt", "lora", "scratch"),
             "grid_methods": ("full", "bias"), "grid": _GRID,
             "scarcity_methods": ("full", "bias"), "scarcity_sizes": (300, 1500, 3000),
             "dp_methods": ("full", "bias"),
             "dp_settings": (("dp_fedavg", 5.0), ("dp_fedavg", 10.0), ("paper_gaussian", 5.0)),
             "lr_grid": LR_GRID, "clip_grid": CLIP_GRID, "max_extensions": MAX_EXTENSIONS},
    # Every code path once: the primary cells (claim 2's corners at 64 clients), one more
    # scarcity size, both DP mechanisms; one- or two-point sweeps.
    "quick": {"seeds": 2, "supplementary_seeds": 1,
              "methods": ("full", "bias", "scratch"), "grid_methods": ("full", "bias"),
              "grid": ((64, 1.0, "iid"), (64, 0.125, "dirichlet")),
              "scarcity_methods": ("bias",), "scarcity_sizes": (300, 1500),
              "dp_methods": ("full", "bias"),
              "dp_settings": (("dp_fedavg", 5.0), ("paper_gaussian", 5.0)),
              "lr_grid": {**{m: v[1:2] for m, v in LR_GRID.items()}, "bias": LR_GRID["bias"][1:]},
              "clip_grid": CLIP_GRID[1:], "max_extensions": 0},
}
DP_CLIENTS, DP_PARTICIPATION = 64, 0.125
ALPHA = repo_config(CONFIG).DIRICHLET_ALPHA
CSV_COLUMNS = ["analysis", "target", "method", "setting", "tier", "seed", "final_accuracy",
               "final_val_accuracy", "val_plateau_delta", "total_MB", "rounds", "lr", "clip",
               "wall_seconds", "cell"]
TUNING_COLUMNS = ["group", "method", "lr", "clip", "score", "final_val_accuracy", "chosen",
                  "beyond_grid", "edge", "cell"]
# Summary fields (at any depth) reported as privacy columns, by their last key.
_PRIVACY_KEYS = ("epsilon", "sigma", "noise_multiplier", "delta", "formal_guarantee")


# ---------------------------------------------------------------------------------- the plan


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


def scarcity_setting(images: int) -> str:
  total = repo_config(CONFIG).CLOSE_TRAIN_EXAMPLES
  return f"{_pct(images / total)} ({images} images)"


BASE = grid_setting(16, 1.0, "dirichlet")
NO_DP = dp_setting("none", 0.0)
_PRIMARY_DP = dp_setting("dp_fedavg", 5.0)
# The cells the pre-registered primary comparisons read (docs/study.md, "The CPU study"):
# (analysis, target, method, setting). They run on the primary seeds.
PRIMARY = frozenset(
    [("methods", "close", m, BASE) for m in ("full", "bias", "scratch")]
    + [("methods", "far", m, BASE) for m in ("full", "bias")]
    + [("grid", "close", m, grid_setting(64, p, s)) for m in ("full", "bias")
       for p, s in ((1.0, "iid"), (0.125, "dirichlet"))]
    + [("privacy", "close", m, s) for m in ("full", "bias") for s in (NO_DP, _PRIMARY_DP)])


@dataclasses.dataclass(frozen=True)
class Design:
  """One analysis' view of a cell, before seeds and tuned rates: `keys` are the config keys
  (configs/cpu_study.py) other than method, lr, clip and seed; `group` the tuning group whose
  chosen rate (and clip) it runs with."""
  analysis: str
  target: str
  method: str
  setting: str
  keys: tuple[tuple[str, Any], ...]
  group: str


def tuning_groups(scale: str) -> dict[str, dict[str, Any]]:
  """Each tuning group's config keys: where its sweeps run."""
  p = PLAN[scale]
  groups = {"close": {"target": "close"}, "far": {"target": "far"},
            "64 clients": {"clients": 64}}
  base_train = repo_config(CONFIG).SCALE[scale]["close_train"]
  for n in p["scarcity_sizes"]:
    if n != base_train:
      groups[f"{n} images"] = {"train_size": n}
  groups["DP"] = {"clients": DP_CLIENTS, "participation": DP_PARTICIPATION,
                  "mechanism": "dp_fedavg", "epsilon": 5.0}
  return groups


def plan_designs(scale: str) -> list[Design]:
  """Every (analysis, cell) of the study, in table order."""
  p = PLAN[scale]
  base_train = repo_config(CONFIG).SCALE[scale]["close_train"]
  out = []
  for target in ("close", "far"):
    for method in p["methods"]:
      out.append(Design("methods", target, method, BASE, (("target", target),), target))
  for method in p["grid_methods"]:
    for clients, part, split in p["grid"]:
      keys = (("clients", clients), ("participation", part), ("split", split))
      out.append(Design("grid", "close", method, grid_setting(clients, part, split), keys,
                        "close" if clients == 16 else "64 clients"))
  for method in p["scarcity_methods"]:
    for n in sorted(set(p["scarcity_sizes"]) | {base_train}):
      keys = () if n == base_train else (("train_size", n),)
      out.append(Design("scarcity", "close", method, scarcity_setting(n), keys,
                        "close" if n == base_train else f"{n} images"))
  for method in p["dp_methods"]:
    for mechanism, epsilon in (("none", 5.0),) + tuple(p["dp_settings"]):
      keys = (("clients", DP_CLIENTS), ("participation", DP_PARTICIPATION))
      if mechanism != "none":
        keys += (("mechanism", mechanism), ("epsilon", epsilon))
      out.append(Design("privacy", "close", method, dp_setting(mechanism, epsilon), keys,
                        "DP" if mechanism != "none" else "64 clients"))
  return out


@dataclasses.dataclass(frozen=True)
class TuningPoint:
  group: str
  method: str
  lr: float
  clip: float  # 0: the group does not tune it
  cell: str  # the config arg


def tuning_point(scale: str, group: str, method: str, lr: float, clip: float = 0.0
                 ) -> TuningPoint:
  """The sweep run of (group, method) at this rate (and clip: DP only), on TUNING_SEED."""
  extra = {"clip": clip} if clip else {}
  return TuningPoint(group, method, lr, clip, cell_arg(
      scale, TUNING_SEED, method=method, lr=lr, **tuning_groups(scale)[group], **extra))


def plan_tuning(scale: str, designs: Sequence[Design]) -> list[TuningPoint]:
  """The sweeps' starting grids: every (group, method) some design uses, over the method's
  rate grid (DP: rate x clip), on TUNING_SEED. `extend_tuning` walks on from them."""
  p = PLAN[scale]
  for grid, ladder in [(v, LR_LADDER) for v in p["lr_grid"].values()] + [
      (p["clip_grid"], CLIP_LADDER)]:
    for value in grid:
      _ladder_neighbours(value, ladder)  # raises before anything runs, not after the grid
  needed = list(dict.fromkeys((d.group, d.method) for d in designs))
  return [tuning_point(scale, group, method, lr, clip)
          for group, method in needed for lr in p["lr_grid"][method]
          for clip in (p["clip_grid"] if group == "DP" else (0.0,))]


def _ladder_neighbours(value: float, ladder: Sequence[float]) -> list[float]:
  """The values beside `value` on `ladder` (one or two)."""
  index = [i for i, v in enumerate(ladder) if math.isclose(v, value, rel_tol=1e-9)]
  if not index:
    raise ValueError(f"{value:g} is not on the ladder {tuple(ladder)}")
  i = index[0]
  return [ladder[j] for j in (i - 1, i + 1) if 0 <= j < len(ladder)]


def untried_neighbours(best: tuple[float, float], tried: Iterable[tuple[float, float]]
                       ) -> list[tuple[float, float]]:
  """The (lr, clip) points next to `best` on the ladders that no run has tried: along the
  rate, and along the clip when the sweep tunes it (clip > 0). Empty: `best` is interior."""
  lr, clip = best
  around = [(n, clip) for n in _ladder_neighbours(lr, LR_LADDER)]
  if clip:
    around += [(lr, n) for n in _ladder_neighbours(clip, CLIP_LADDER)]
  tried = list(tried)
  return [(a, c) for a, c in around
          if not any(math.isclose(a, x, rel_tol=1e-9) and math.isclose(c, y, rel_tol=1e-9)
                     for x, y in tried)]


def at_edge(best: tuple[float, float], scored: Iterable[tuple[float, float]]) -> bool:
  """Whether a winner is not known to be interior: a ladder neighbour has no score (untried,
  or its run failed) or the winner is at a ladder's end (along the clip too when tuned)."""
  lr, clip = best
  ends = len(_ladder_neighbours(lr, LR_LADDER)) < 2 or (
      bool(clip) and len(_ladder_neighbours(clip, CLIP_LADDER)) < 2)
  return ends or bool(untried_neighbours(best, scored))


def _best(points: Sequence[TuningPoint], scores: dict[str, float]) -> TuningPoint | None:
  """The highest score among the scored points (first in order among equals; NaN never)."""
  best, best_score = None, -math.inf
  for t in points:
    score = scores.get(t.cell, math.nan)
    if not math.isnan(score) and (best is None or score > best_score):
      best, best_score = t, score
  return best


def _sweeps(points: Sequence[TuningPoint]) -> dict[tuple[str, str], list[TuningPoint]]:
  out: dict[tuple[str, str], list[TuningPoint]] = {}
  for t in points:
    out.setdefault((t.group, t.method), []).append(t)
  return out


def extend_tuning(scale: str, points: Sequence[TuningPoint], scores: dict[str, float]
                  ) -> list[TuningPoint]:
  """The sweeps' next points: the untried ladder neighbours of each sweep's best point so
  far, while the sweep has run fewer than its grid plus `max_extensions` points. Empty when
  every best point is interior (or out of budget): the tuning phase is done."""
  p = PLAN[scale]
  out = []
  for (group, method), tried in _sweeps(points).items():
    grid = len(p["lr_grid"][method]) * (len(p["clip_grid"]) if group == "DP" else 1)
    budget = grid + p["max_extensions"] - len(tried)
    best = _best(tried, scores)
    if best is None or budget <= 0:
      continue
    new = untried_neighbours((best.lr, best.clip), ((t.lr, t.clip) for t in tried))
    out += [tuning_point(scale, group, method, lr, clip) for lr, clip in new[:budget]]
  return out


def _sweep_scores(points: Sequence[TuningPoint], workdir: str) -> dict[str, dict[str, Any]]:
  """Each finished point's `experiments.sweep.score` (score, final validation), by cell arg."""
  out = {}
  for t in points:
    run_dir = cell_dir(workdir, t.cell)
    if run_pool.read_summary(run_dir) is not None:
      out[t.cell] = sweep_score(run_dir, LAST)
  return out


def _scores_only(read: dict[str, dict[str, Any]]) -> dict[str, float]:
  return {cell: s["score"] for cell, s in read.items()}


def tuning_scores(points: Sequence[TuningPoint], workdir: str) -> dict[str, float]:
  """Each finished point's validation score (`experiments.sweep.score`), by its cell arg."""
  return _scores_only(_sweep_scores(points, workdir))


def choose(points: Sequence[TuningPoint], workdir: str, scale: str
           ) -> tuple[dict[tuple[str, str], TuningPoint], list[dict[str, Any]]]:
  """The winner of each (group, method) sweep: the highest validation score (first in run
  order among equals; a diverged run never wins), and one row per finished point for
  tuning.csv. A sweep with no finished, finite point chooses nothing."""
  p = PLAN[scale]
  read = _sweep_scores(points, workdir)
  scores = _scores_only(read)
  sweeps = _sweeps(points)
  chosen = {key: best for key, tried in sweeps.items()
            if (best := _best(tried, scores)) is not None}
  rows = []
  for t in points:
    if t.cell not in scores:
      continue
    winner = chosen.get((t.group, t.method)) is t
    scored = [(u.lr, u.clip) for u in sweeps[(t.group, t.method)] if u.cell in scores]
    on_grid = t.lr in p["lr_grid"][t.method] and (not t.clip or t.clip in p["clip_grid"])
    rows.append({"group": t.group, "method": t.method, "lr": t.lr, "clip": t.clip or "",
                 "score": scores[t.cell],
                 "final_val_accuracy": read[t.cell]["final_val_accuracy"],
                 "chosen": winner, "beyond_grid": not on_grid,
                 "edge": winner and at_edge((t.lr, t.clip), scored),
                 "cell": cell_name(t.cell)})
  return chosen, rows


def dropped_designs(designs: Sequence[Design], chosen: dict[tuple[str, str], TuningPoint]
                    ) -> list[Design]:
  """The designs `plan_members` leaves out: their sweep chose nothing."""
  return [d for d in designs if (d.group, d.method) not in chosen]


@dataclasses.dataclass(frozen=True)
class Member:
  """One run as one analysis sees it: `cell` is the configs/cpu_study.py arg."""
  analysis: str
  target: str
  method: str
  setting: str
  seed: int
  cell: str
  tier: str  # 'primary' (the cell feeds a primary comparison) or 'supplementary'
  lr: float
  clip: float

  @property
  def name(self) -> str:
    return cell_name(self.cell)


def plan_members(scale: str, designs: Sequence[Design],
                 chosen: dict[tuple[str, str], TuningPoint], seeds: int,
                 supplementary_seeds: int) -> list[Member]:
  """Each design on its seeds with its group's chosen rate: a cell any primary comparison
  reads runs on seeds 1..`seeds`, the rest on 1..`supplementary_seeds`. Designs whose sweep
  chose nothing (no point finished with a finite score) are left out; results.md names
  them (`dropped_designs`)."""
  primary_cells = set()
  tuned = []
  for d in designs:
    t = chosen.get((d.group, d.method))
    if t is None:
      continue
    keys = dict(d.keys)
    if t.clip and keys.get("mechanism") == "dp_fedavg":
      keys["clip"] = t.clip
    arg = cell_arg(scale, 1, method=d.method, lr=t.lr, **keys)
    tuned.append((d, t, keys, arg))
    if (d.analysis, d.target, d.method, d.setting) in PRIMARY:
      primary_cells.add(arg)
  out = []
  for d, t, keys, arg in tuned:
    tier = "primary" if arg in primary_cells else "supplementary"
    for seed in range(1, (seeds if tier == "primary" else supplementary_seeds) + 1):
      out.append(Member(d.analysis, d.target, d.method, d.setting, seed,
                        cell_arg(scale, seed, method=d.method, lr=t.lr, **keys), tier, t.lr,
                        keys.get("clip", 0.0)))
  return out


# ----------------------------------------------------------------------------------- running


def cell_dir(workdir: str, arg: str) -> str:
  return os.path.join(workdir, "cells", cell_name(arg))


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
  return examples * (2.0 if keys["method"] in ("full", "scratch") else 1.0)


def cell_jobs(args: Iterable[str], workdir: str, pretrained: str,
              fashion_dir: str) -> list[run_pool.Job]:
  """One job per distinct cell (a cell shared by several analyses runs once), the costly
  first."""
  return [run_pool.Job(cell_name(a), cell_dir(workdir, a), cell_config,
                       (a, pretrained, fashion_dir))
          for a in sorted(set(args), key=_cost, reverse=True)]


# ---------------------------------------------------------------------------------- results


def evaluations(run_dir: str) -> list[dict[str, Any]]:
  """The run's evaluated rows of metrics.jsonl, in round order."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if "test_accuracy" in r]


def plateau(values: Sequence[float], last: int = LAST) -> float:
  """Mean of the last `last` values minus the mean of the `last` before them (nan if there
  are fewer than 2 x last): how much the curve still moved at the end."""
  if len(values) < 2 * last:
    return math.nan
  return float(np.mean(values[-last:]) - np.mean(values[-2 * last:-last]))


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
  """One row per member with a finished run: the mean test (and validation) accuracy of its
  last LAST evaluations, how much validation still moved, bytes and privacy fields."""
  rows = []
  for m in members:
    run_dir = cell_dir(workdir, m.cell)
    s = run_pool.read_summary(run_dir)
    if s is None:
      continue
    evals = evaluations(run_dir)
    val = [r["val_accuracy"] for r in evals]
    total = s.get("total_bytes")  # under DP-FedAvg it may be withheld (who took part)
    row = {"analysis": m.analysis, "target": m.target, "method": m.method,
           "setting": m.setting, "tier": m.tier, "seed": m.seed,
           "final_accuracy": float(np.mean([r["test_accuracy"] for r in evals[-LAST:]])),
           "final_val_accuracy": float(np.mean(val[-LAST:])),
           "val_plateau_delta": plateau(val),
           "total_MB": None if total is None else total / outputs.MB,
           "rounds": s["rounds"], "lr": m.lr, "clip": m.clip or None,
           "wall_seconds": seconds.get(m.name), "cell": m.name}
    row.update(_privacy_fields(s))
    rows.append(row)
  return rows


def equal_bytes_rows(members: Sequence[Member], workdir: str) -> list[dict[str, Any]]:
  """Claim 6 along the curves, per seed: at each budget B that full fine-tuning's curve
  reaches at an evaluation (its cumulative bytes then), full's test accuracy there against
  bias tuning's mean test accuracy over its last LAST evaluations within B."""
  base = {(m.method, m.seed): m for m in members
          if m.analysis == "methods" and m.target == "close" and m.method in ("full", "bias")}
  rows = []
  for seed in sorted({s for _, s in base}):
    full, bias = base.get(("full", seed)), base.get(("bias", seed))
    if full is None or bias is None:
      continue
    dirs = [cell_dir(workdir, full.cell), cell_dir(workdir, bias.cell)]
    if any(run_pool.read_summary(d) is None for d in dirs):
      continue
    full_curve, bias_curve = (evaluations(d) for d in dirs)
    for i, r in enumerate(full_curve):
      budget = r["cumulative_bytes"]
      within = [b for b in bias_curve if b["cumulative_bytes"] <= budget]
      if not within:
        continue
      setting = f"<= {budget / outputs.MB:.2f} MB (full: {r['round']} rounds)"
      common = {"analysis": "equal_comm", "target": "close", "setting": setting,
                "tier": "primary" if i == 0 else "supplementary", "seed": seed,
                "total_MB": budget / outputs.MB}
      rows.append({**common, "method": "full", "final_accuracy": r["test_accuracy"],
                   "rounds": r["round"], "cell": full.name})
      rows.append({**common, "method": "bias", "final_accuracy": float(np.mean(
          [b["test_accuracy"] for b in within[-LAST:]])), "rounds": within[-1]["round"],
                   "cell": bias.name})
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


def _present(value: Any) -> bool:
  return value is not None and value != "" and not (isinstance(value, float) and
                                                     math.isnan(value))


def group(rows: Sequence[dict[str, Any]], field: str) -> dict[GroupKey, Stat]:
  """Rows -> Stat of `field` per (analysis, target, method, setting), in first-seen order."""
  out: dict[GroupKey, Stat] = {}
  for r in rows:
    stat = out.setdefault((r["analysis"], r["target"], r["method"], r["setting"]), Stat([]))
    if _present(r.get(field)):
      stat.values.append(float(r[field]))
  return out


def per_seed(rows: Sequence[dict[str, Any]], field: str = "final_accuracy"
             ) -> dict[GroupKey, dict[int, float]]:
  """Rows -> {group key: {seed: value}}: what the paired comparisons read."""
  out: dict[GroupKey, dict[int, float]] = {}
  for r in rows:
    key = (r["analysis"], r["target"], r["method"], r["setting"])
    if _present(r.get(field)):
      out.setdefault(key, {})[int(r["seed"])] = float(r[field])
  return out


ANALYSIS_TITLES = {
    "methods": f"Methods (16 clients, 100%, Dirichlet {ALPHA:g})",
    "grid": "Client stability x data distribution (close target)",
    "scarcity": f"Data scarcity (close target, 16 clients, 100%, Dirichlet {ALPHA:g})",
    "privacy": f"Privacy (close target, 64 clients, 12.5% Poisson, Dirichlet {ALPHA:g})",
    "equal_comm": "Equal communication (close target): accuracy within full fine-tuning's "
                  "cumulative bytes B (full: its one evaluation at B; bias: the mean of its "
                  "last 3 evaluations within B)",
}


def analysis_tables(rows: Sequence[dict[str, Any]]) -> str:
  """A mean ± std table per analysis: accuracy, plateau, rate, MB and any privacy fields."""
  final, val, delta, mb = (group(rows, f) for f in (
      "final_accuracy", "final_val_accuracy", "val_plateau_delta", "total_MB"))
  lr, clip = group(rows, "lr"), group(rows, "clip")
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
      rate = "-" if not lr[key].values else f"{lr[key].values[0]:g}" + (
          f", C {clip[key].values[0]:g}" if clip[key].values else "")
      body.append([target, setting, method, str(final[key].n), final[key].text(),
                   val[key].text(), _points(delta[key]), rate,
                   mb[key].text(constant_plain=True)]
                  + [_number_text(eps[c][key]) for c in extra])
    parts.append(f"### {title}\n\n" + markdown_table(
        ["target", "setting", "method", "seeds", "test accuracy (last 3)",
         "val accuracy (last 3)", "val change (pts)", "rate (tuned)", "total MB"] + extra,
        body) + (PRIVACY_NOTE if analysis == "privacy" else ""))
  return "\n\n".join(parts)


PRIVACY_NOTE = (
    "\n\nEach DP-FedAvg epsilon covers one run. The rate and clip those runs use were tuned at "
    "epsilon 5 (reused at epsilon 10; paper_gaussian reuses the rate) on seed 0: a different "
    "split, partition and sampling of the same Fashion-MNIST pool, which the epsilon does not "
    "count (tuning on private data costs privacy too: Papernot & "
    "Steinke, ICLR 2022). paper_gaussian's epsilon is the accounted value of the noise the "
    "study's formula gives for a nominal epsilon 5: not comparable with DP-FedAvg's, so it "
    "decides no claim.")


def _points(stat: Stat) -> str:
  """The mean plateau change over seeds in percentage points ('-' without enough rows)."""
  return "-" if not stat.values else f"{100 * stat.mean:+.1f}"


def _number_text(stat: Stat) -> str:
  """Privacy numbers span 1e-3..1e4: mean (and std) in 4 significant digits."""
  if not stat.values:
    return "-"
  if stat.n < 2 or stat.std == 0:
    return f"{stat.mean:.4g}"
  return f"{stat.mean:.4g} ± {stat.std:.2g}"


def tuning_table(rows: Sequence[dict[str, Any]]) -> str:
  """The sweeps: each point's validation score, the chosen one in bold, the points the walk
  added beyond the starting grid and the winners it left at an edge noted."""
  body = []
  for r in rows:
    rate = f"{r['lr']:g}" + (f", C {r['clip']:g}" if r["clip"] else "")
    notes = (["beyond the starting grid"] if r["beyond_grid"] else []) + (
        ["chosen at the edge of what was tried"] if r["edge"] else [])
    body.append([r["group"], r["method"], f"**{rate}**" if r["chosen"] else rate,
                 f"{r['score']:.4f}", "; ".join(notes)])
  return ("### Tuning (seed 0, validation only)\n\n" + markdown_table(
      ["group", "method", "rate", f"val score (mean of last {LAST})", "note"], body))


# ---------------------------------------------------------------------------------- verdicts


@dataclasses.dataclass
class Comparison:
  """L = 100 x sum_i c_i accuracy_i (percentage points) against `margin`: the claim says
  L > margin. Judged on the per-seed values of L over the seeds every term has."""
  claim: str
  label: str
  terms: list[tuple[float, GroupKey]]
  margin: float = 0.0
  primary: bool = False
  note: str = ""

  def differences(self, values: dict[GroupKey, dict[int, float]]) -> dict[int, float]:
    """{seed: L on that seed} over the seeds all terms ran."""
    runs = [values.get(key, {}) for _, key in self.terms]
    seeds = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    return {s: 100.0 * sum(c * r[s] for (c, _), r in zip(self.terms, runs)) for s in seeds}

  def judge(self, values: dict[GroupKey, dict[int, float]]) -> dict[str, Any]:
    d = list(self.differences(values).values())
    interval = paired.t_interval(d)
    return {"interval": interval, "p": paired.sign_flip_p(d, self.margin) if d else math.nan,
            "verdict": paired.verdict(interval, self.margin) if d else "not run"}


CLAIMS = {
    "1": "PEFT is within a few (5) points of full fine-tuning at >= 100x less communication",
    "2": "PEFT holds up better than full fine-tuning when few clients take part and data are "
         "non-IID",
    "3": "Under DP, full fine-tuning loses the most accuracy",
    "4": "Pre-training beats training from scratch by a wide (10-point) margin",
    "5": "The domain gap widens the distance between PEFT and full fine-tuning",
    "6": "At equal communication, bias tuning beats full fine-tuning",
}


def _drop(analysis: str, method: str, easy: str, hard: str, sign: float
          ) -> list[tuple[float, GroupKey]]:
  """sign x (accuracy at `easy` - accuracy at `hard`) of one method, as terms."""
  return [(sign, (analysis, "close", method, easy)), (-sign, (analysis, "close", method, hard))]


def comparisons(rows: Sequence[dict[str, Any]]) -> list[Comparison]:
  """Each claim's primary comparison (pre-registered in docs/study.md) and the supplementary
  ones the rows allow."""
  mb = group(rows, "total_MB")
  keys = list(group(rows, "final_accuracy"))
  methods = [m for m in PLAN["full"]["methods"] if ("methods", "close", m, BASE) in keys]
  out = []
  full_mb = mb.get(("methods", "close", "full", BASE), Stat([])).mean
  for m in [m for m in PEFT if m in methods]:
    m_mb = mb.get(("methods", "close", m, BASE), Stat([])).mean
    ratio = full_mb / m_mb if m_mb else math.nan
    note = "" if ratio >= MIN_RATIO else f"only {ratio:.0f}x fewer bytes"
    out.append(Comparison("1", f"{m} - full, close target ({ratio:.0f}x fewer bytes)",
                          [(1.0, ("methods", "close", m, BASE)),
                           (-1.0, ("methods", "close", "full", BASE))], -FEW_POINTS,
                          primary=m == "bias", note=note))
  for clients in (64, 16):
    easy, hard = grid_setting(clients, 1.0, "iid"), grid_setting(clients, 0.125, "dirichlet")
    if ("grid", "close", "full", easy) in keys:
      out.append(Comparison(
          "2", f"{clients} clients, 100% IID -> 12.5% Dir: drop(full) - drop(bias)",
          _drop("grid", "full", easy, hard, 1.0) + _drop("grid", "bias", easy, hard, -1.0),
          primary=clients == 64))
  for setting in [k[3] for k in keys if k[0] == "privacy" and k[2] == "full"
                  and k[3] != NO_DP]:
    paper = setting.startswith("paper_gaussian")
    out.append(Comparison(
        "3", f"{setting}: loss(full) - loss(bias)",
        _drop("privacy", "full", NO_DP, setting, 1.0)
        + _drop("privacy", "bias", NO_DP, setting, -1.0), primary=setting == _PRIMARY_DP,
        note="its accounted epsilon is not comparable (privacy table)" if paper else ""))
  for target in ("close", "far"):
    out.append(Comparison("4", f"{target}: full (pre-trained) - scratch",
                          [(1.0, ("methods", target, "full", BASE)),
                           (-1.0, ("methods", target, "scratch", BASE))], WIDE_MARGIN,
                          primary=target == "close"))
  for m in [m for m in PEFT if m in methods]:
    out.append(Comparison("5", f"(full - {m}) on far - (full - {m}) on close",
                          [(1.0, ("methods", "far", "full", BASE)),
                           (-1.0, ("methods", "far", m, BASE)),
                           (-1.0, ("methods", "close", "full", BASE)),
                           (1.0, ("methods", "close", m, BASE))], primary=m == "bias"))
  budgets = [k[3] for k in keys if k[0] == "equal_comm" and k[2] == "full"]
  for i, setting in enumerate(budgets):  # in curve order: the first is full's first point
    out.append(Comparison("6", f"bias - full, {setting}",
                          [(1.0, ("equal_comm", "close", "bias", setting)),
                           (-1.0, ("equal_comm", "close", "full", setting))], primary=i == 0))
  return [c for c in out if all(k in keys for _, k in c.terms)]


def _comparison_row(c: Comparison, values: dict[GroupKey, dict[int, float]]) -> list[str]:
  j = c.judge(values)
  iv = j["interval"]
  ci = ("-" if math.isnan(iv.half_width)
        else f"[{iv.low:+.1f}, {iv.high:+.1f}]")
  return [c.claim, c.label, str(iv.n), f"{iv.mean:+.1f}", ci, f"> {c.margin:+g}",
          "-" if math.isnan(j["p"]) else f"{j['p']:.3f}",
          j["verdict"] + (f" ({c.note})" if c.note else "")]


SUPPLEMENTARY_TITLE = "### Supplementary comparisons (reported, no votes)"


def verdict_section(comps: Sequence[Comparison], rows: Sequence[dict[str, Any]]) -> str:
  """The claims' verdicts (their primary comparisons) and the supplementary comparisons."""
  values = per_seed(rows)
  header = ["claim", "comparison", "seeds", "mean (pts)", "95% CI (Student t)", "claimed",
            "one-sided sign-flip p (L > claimed)", "CI vs claim"]
  summary, primary, supplementary = [], [], []
  for claim, text in CLAIMS.items():
    mains = [c for c in comps if c.claim == claim and c.primary]
    verdict = mains[0].judge(values)["verdict"] if mains else "not run"
    summary.append([claim, text, mains[0].label if mains else "-", f"**{verdict}**"])
    for c in comps:
      if c.claim == claim:
        (primary if c.primary else supplementary).append(_comparison_row(c, values))
  return ("### Verdicts\n\n" + markdown_table(
      ["claim", "statement", "primary comparison (docs/study.md)", "verdict"], summary)
      + "\n\n### Primary comparisons (final test accuracy, percentage points, paired by seed)"
      "\n\n" + markdown_table(header, primary)
      + "\n\n" + SUPPLEMENTARY_TITLE + "\n\n"
      + markdown_table(header, supplementary))


def _order(method: str) -> int:
  order = PLAN["full"]["methods"]
  return order.index(method) if method in order else len(order)


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


def write_results(rows: Sequence[dict[str, Any]], tuning_rows: Sequence[dict[str, Any]],
                  workdir: str, header: str, scale: str) -> str:
  """results.csv, tuning.csv, results.md and the figures; returns the markdown."""
  write_csv(rows, csv_columns(rows), os.path.join(workdir, "results.csv"))
  write_csv(tuning_rows, TUNING_COLUMNS, os.path.join(workdir, "tuning.csv"))
  md = "\n\n".join([header, verdict_section(comparisons(rows), rows),
                    analysis_tables(rows), tuning_table(tuning_rows)]) + "\n"
  atomic_write_text(os.path.join(workdir, "results.md"), md)
  plot_accuracy_vs_mb(rows, os.path.join(workdir, "accuracy_vs_mb.png"))
  plot_grid_heatmap(rows, os.path.join(workdir, "grid_heatmap.png"))
  return md


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_DIR = os.path.join(REPO, "docs", "cpu_study")
PUBLISHED = ("results.md", "results.csv", "tuning.csv", "accuracy_vs_mb.png",
             "grid_heatmap.png")
README_BEGIN = "<!-- cpu_study results: begin (python -m experiments.cpu_study --publish) -->"
README_END = "<!-- cpu_study results: end -->"


def readme_block(results_md: str) -> str:
  """The part of results.md the README carries: the header, the verdicts and the primary
  comparisons, up to the supplementary ones (the rest stays in docs/cpu_study/results.md)."""
  return results_md.split(SUPPLEMENTARY_TITLE, 1)[0].rstrip() + "\n"


def publish(workdir: str, readme: str = os.path.join(REPO, "README.md"),
            docs_dir: str = DOCS_DIR) -> None:
  """Copies the results into docs_dir and replaces README's marked block with
  `readme_block` of results.md, unedited."""
  os.makedirs(docs_dir, exist_ok=True)
  for name in PUBLISHED:
    with open(os.path.join(workdir, name), "rb") as f:
      atomic_write_bytes(os.path.join(docs_dir, name), f.read())
  with open(os.path.join(workdir, "results.md")) as f:
    block = readme_block(f.read())
  with open(readme) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    raise RuntimeError(f"{readme}: no block between {README_BEGIN!r} and {README_END!r}")
  before, rest = text.split(README_BEGIN, 1)
  after = rest.split(README_END, 1)[1]
  atomic_write_text(readme, f"{before}{README_BEGIN}\n{block}{README_END}{after}")


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


def _schedule_text(schedule: str) -> str:
  """How the server's learning rate moves over a run, for the results header."""
  return {"constant": "constant",
          "cosine": "decaying by a cosine over the rounds that apply an update"}[schedule]


def _seeds_text(n: int) -> str:
  return "seed 1" if n == 1 else f"seeds 1-{n}"


def _phase_seconds(names: Iterable[str], seconds: dict[str, float]) -> float:
  return sum(seconds.get(n, 0.0) for n in set(names))


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  t0 = time.time()
  if _PUBLISH.value and _QUICK.value:
    print("Invalid flags: --publish with --quick would replace the published study with a "
          "smoke test; drop one", file=sys.stderr)
    sys.exit(2)
  scale = "quick" if _QUICK.value else "full"
  plan = PLAN[scale]
  seeds = _SEEDS.value or plan["seeds"]
  supplementary_seeds = min(seeds, _SUPPLEMENTARY_SEEDS.value or plan["supplementary_seeds"])
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

  designs = plan_designs(scale)
  points = plan_tuning(scale, designs)
  new = points
  while new:  # the starting grids, then each walk outwards from the best point so far
    runner.run(cell_jobs((t.cell for t in new), workdir, ckpt, _FASHION_DIR.value))
    new = extend_tuning(scale, points, tuning_scores(points, workdir))
    points += new
  chosen, tuning_rows = choose(points, workdir, scale)
  members = plan_members(scale, designs, chosen, seeds, supplementary_seeds)
  runner.run(cell_jobs((m.cell for m in members), workdir, ckpt, _FASHION_DIR.value))
  rows = collect_rows(members, workdir, runner.seconds)
  rows += equal_bytes_rows(members, workdir)

  tuning_s = _phase_seconds((cell_name(t.cell) for t in points), runner.seconds)
  study_s = _phase_seconds((m.name for m in members), runner.seconds)
  s = config.SCALE[scale]
  n_primary = len({m.name for m in members if m.tier == "primary"})
  n_runs = len({m.name for m in members})
  header = (
      f"### Results ({scale} scale)\n\n"
      f"Generated by `python -m experiments.cpu_study{' --quick' if _QUICK.value else ''}`. "
      f"Backbone: ViT hidden {s['hidden']}, depth {s['depth']}, MLP {s['mlp']}, patch "
      f"{config.PATCH_SIZE} at {config.IMAGE_SIZE}x{config.IMAGE_SIZE}, pre-trained on "
      f"Fashion-MNIST classes {config.SOURCE_CLASSES} ({pt_summary['test_accuracy']:.3f} test "
      f"accuracy, {pt_summary['seconds']:.0f} s). {s['rounds']} rounds of "
      f"{config.LOCAL_EPOCHS} local epochs at full participation (x 1/p rounds at "
      f"participation p), the server's step {_schedule_text(config.SERVER_LR_SCHEDULE)}; "
      f"close target {s['close_train']} training images. Accuracy: the mean "
      f"of the last {LAST} test evaluations per run, then mean ± std over seeds (ddof 1); MB "
      f"= 10^6 bytes, up + down.\n\n"
      f"How the budget was spent: {len(points)} tuning runs (seed {TUNING_SEED}, "
      f"{tuning_s:.0f} s); {n_runs} study runs ({study_s:.0f} s): the {n_primary} runs of "
      f"cells a primary comparison reads on {_seeds_text(seeds)}, the others on "
      f"{_seeds_text(supplementary_seeds)}. Seconds are summed over the runs' processes "
      f"({_WORKERS.value} in parallel; DP-FedAvg runs keep their time private and are not "
      f"counted)" + (f"; this invocation ran {runner.runs_done} runs in "
                     f"{time.time() - t0:.0f} s." if runner.runs_done else "."))
  dropped = dropped_designs(designs, chosen)
  if dropped:
    header += ("\n\nLeft out, their sweep having no finished run with a finite score: "
               + "; ".join(f"{d.analysis} {d.target} {d.method} ({d.setting})"
                           for d in dropped) + ".")
  md = write_results(rows, tuning_rows, workdir, header, scale)
  print(md)
  runner.exit_if_failed()
  if _PUBLISH.value:
    publish(workdir)


if __name__ == "__main__":
  app.run(main)
