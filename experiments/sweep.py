"""A hyper-parameter sweep of any config, selected on the validation split, never on test.

  python -m experiments.sweep --config=configs/tiny.py:bias,rounds=5 \
      --config.data.val_size=0.2 --workdir=runs/sweep \
      --grid=federated.client_lr=0.003,0.01,0.03,0.1 [--grid=federated.server_lr=0.5,1] \
      [--last=3] [--workers=1]

Every point of the grid (the product of the --grid lists, in the order given) is a resumable
run of `fedpeft_jax.runner.train.run` in WORKDIR/<point> through `run_pool` (a finished point is
reused, an interrupted one resumes from its checkpoint). A point's score is the mean
`val_accuracy` of its last `--last` evaluations (a plateau, not one lucky round); the winner is
the highest score, the first in grid order among equals. The config must hold out a validation
split (`data.val_size`): the sweep reads no test number to choose. Written to WORKDIR:
  sweep.csv   one row per point: its overrides, score, final validation and test accuracy
  sweep.md    the same as a table, the winner marked
  best.json   the winner's overrides, score and the flags that reproduce it

Tuning on private data costs privacy too: under a DP mechanism each point's epsilon covers one
run, not the sweep's choice among them (Papernot & Steinke 2022). Count the sweep (e.g. tune on
a public proxy, or account for the selection) before reporting the winner's epsilon.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import run_pool
from fedpeft_jax.files import atomic_write_json, atomic_write_text
from fedpeft_jax.runner.validate import ConfigError, validate_config

BAD_INPUT = 2
FLAGS = flags.FLAGS


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Base config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (one folder per grid point).")
  flags.DEFINE_multi_string("grid", [], "field=v1,v2,... (repeat for a product grid).")
  flags.DEFINE_integer("last", 3, "Score: mean val_accuracy of this many last evaluations.")
  flags.DEFINE_integer("workers", 1, "Runs in parallel (processes).")
  flags.mark_flags_as_required(["config", "workdir", "grid"])


def coerce_override(field: str, current: Any, text: str) -> Any:
  """`text` as the type of the field's current value (a typo'd value fails here, not later):
  how a `--grid` value (and, in tests/test_docs.py, a documented `--config.field=value`) is
  read."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
  except ValueError:
    pass
  raise ConfigError(f"--grid={field}: {text!r} is not a {type(current).__name__} (the "
                    f"field's type)", field=f"config.{field}")


def parse_grid(base: ml_collections.ConfigDict, specs: Sequence[str]
               ) -> list[dict[str, Any]]:
  """The grid's points, each {field: value}, in product order of `specs` ('field=v1,v2')."""
  axes = []
  for spec in specs:
    field, sep, values = spec.partition("=")
    field = field.strip().removeprefix("config.")
    if not sep or not values.strip():
      raise ConfigError(f"--grid={spec}: write field=v1,v2,... (e.g. "
                        "federated.client_lr=0.01,0.1)", field="grid")
    node: Any = base
    for part in field.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"--grid={spec}: config has no field {field!r}", field="grid")
      node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--grid={spec}: {field!r} is a section, not a field", field="grid")
    axes.append([(field, coerce_override(field, node, v.strip())) for v in values.split(",")])
  if len({a[0][0] for a in axes}) != len(axes):
    raise ConfigError("--grid: a field appears twice; give all its values in one --grid",
                      field="grid")
  return [dict(point) for point in itertools.product(*axes)]


def point_name(point: dict[str, Any]) -> str:
  """A folder name for a grid point: its last field names and values."""
  name = "__".join(f"{f.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float)
                   else f"{f.rsplit('.', 1)[-1]}={v}" for f, v in point.items())
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


def configure(base: ml_collections.ConfigDict, point: dict[str, Any]
              ) -> ml_collections.ConfigDict:
  """`base` with the point's overrides (module level: run_pool's workers build it)."""
  config = copy.deepcopy(base)
  with config.unlocked():
    config.update_from_flattened_dict(point)
  return config


def score(run_dir: str, last: int) -> dict[str, Any]:
  """A finished point's score: mean val_accuracy of its last `last` evaluations."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evaluated = [r for r in rows if "test_accuracy" in r]
  vals = [r["val_accuracy"] for r in evaluated if "val_accuracy" in r]
  if len(vals) != len(evaluated) or not vals:
    raise ConfigError(f"{run_dir}: its rows hold no val_accuracy; the sweep needs "
                      "config.data.val_size > 0", field="config.data.val_size")
  return {"score": float(np.mean(vals[-last:])), "evaluations": len(vals[-last:]),
          "final_val_accuracy": vals[-1], "final_test_accuracy": evaluated[-1]["test_accuracy"]}


def sweep(base: ml_collections.ConfigDict, specs: Sequence[str], workdir: str,
          last: int = 3, workers: int = 1) -> dict[str, Any]:
  """Runs (or resumes) the grid and writes sweep.csv, sweep.md and best.json; returns
  best.json's content. Raises ConfigError for a grid or config the sweep cannot use."""
  if not base.data.val_size:
    raise ConfigError("the sweep selects on the validation split: set config.data.val_size "
                      "(e.g. --config.data.val_size=0.1)", field="config.data.val_size")
  if last < 1:
    raise ConfigError(f"--last={last}: must be >= 1", field="last")
  points = parse_grid(base, specs)
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ConfigError("--grid: two points share a folder name; make the values distinct",
                      field="grid")
  for name, point in zip(names, points):  # every point's config checked before any runs
    try:
      validate_config(configure(base, point))
    except ConfigError as e:
      raise ConfigError(f"grid point {name}: {e}", field=e.field) from e
  os.makedirs(workdir, exist_ok=True)
  pool = run_pool.RunPool(workdir, workers, noun="point")
  jobs = [run_pool.Job(name, os.path.join(workdir, name), configure, (base, point))
          for name, point in zip(names, points)]
  pool.run(jobs)
  rows = []
  for name, point, job in zip(names, points, jobs):
    if name in pool.failed:
      continue
    rows.append({"point": name, **{f: v for f, v in point.items()},
                 **score(job.run_dir, last)})
  if not rows:
    pool.exit_if_failed()
  best = max(rows, key=lambda r: r["score"])  # max keeps the first of equal scores
  fields = list(points[0])
  columns = ["point", *fields, "score", "evaluations", "final_val_accuracy",
             "final_test_accuracy"]
  run_pool.write_csv(rows, columns, os.path.join(workdir, "sweep.csv"))
  body = [[("**" + r["point"] + "**") if r is best else r["point"], *(str(r[f]) for f in fields),
           f"{r['score']:.4f}", f"{r['final_val_accuracy']:.4f}",
           f"{r['final_test_accuracy']:.4f}"] for r in rows]
  table = run_pool.markdown_table(
      ["point", *fields, f"score (mean val, last {last})", "final val", "final test (reported)"],
      body)
  atomic_write_text(os.path.join(workdir, "sweep.md"),
                    f"Selected on validation: **{best['point']}**.\n\n{table}\n")
  winner = {"point": best["point"], "overrides": {f: best[f] for f in fields},
            "score": best["score"], "last": last,
            "flags": " ".join(f"--config.{f}={best[f]}" for f in fields)}
  atomic_write_json(os.path.join(workdir, "best.json"), winner)
  print(table)
  print(f"best: {winner['flags']} (mean val accuracy {best['score']:.4f})")
  pool.exit_if_failed()
  return winner


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"Invalid command line: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(BAD_INPUT)
  logging.set_verbosity(logging.ERROR)
  try:
    sweep(FLAGS.config, FLAGS.grid, os.path.abspath(FLAGS.workdir), FLAGS.last, FLAGS.workers)
  except ConfigError as e:
    print(f"Invalid sweep: {e}", file=sys.stderr)
    sys.exit(BAD_INPUT)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
