"""experiments.sweep: a grid of resumable runs, scored on validation by hand, blind to test."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fedpeft_jax.data as fdata
from experiments import sweep
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = ["federated.client_lr=0.001,0.3"]


def _base(val_size: float = 0.2):
  c = repo_config("tiny").get_config("bias,rounds=4")
  c.data.val_size = val_size
  return c


def _rows(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_grid_is_the_product_in_order_with_typed_values():
  points = sweep.parse_grid(_base(), ["federated.client_lr=0.01,0.1",
                                      "config.federated.local_epochs=1,2"])
  assert points == [{"federated.client_lr": 0.01, "federated.local_epochs": 1},
                    {"federated.client_lr": 0.01, "federated.local_epochs": 2},
                    {"federated.client_lr": 0.1, "federated.local_epochs": 1},
                    {"federated.client_lr": 0.1, "federated.local_epochs": 2}]
  assert isinstance(points[0]["federated.local_epochs"], int)
  assert sweep.point_name(points[1]) == "client_lr=0.01__local_epochs=2"


@pytest.mark.parametrize("spec, match", [
    ("federated.client_lrr=0.1", "no field 'federated.client_lrr'"),
    ("federated=0.1", "is a section"),
    ("federated.local_epochs=two", "not a int"),
    ("federated.client_lr", "field=v1,v2"),
])
def test_bad_grid_is_one_config_error(spec, match):
  with pytest.raises(ConfigError, match=match):
    sweep.parse_grid(_base(), [spec])


def test_sweep_without_a_validation_split_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="config.data.val_size"):
    sweep.sweep(_base(val_size=0), GRID, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing half-written


def test_a_bad_point_is_refused_before_anything_runs(tmp_path):
  with pytest.raises(ConfigError, match="grid point client_lr=-1"):
    sweep.sweep(_base(), ["federated.client_lr=0.01,-1"], str(tmp_path))
  assert not os.listdir(tmp_path)


def _poison_test_labels(monkeypatch):
  real = fdata.load_dataset

  def load(*args, **kwargs):
    ds = real(*args, **kwargs)
    return dataclasses.replace(
        ds, test_labels=np.random.default_rng(7).permutation(ds.test_labels).astype(np.int32))
  monkeypatch.setattr(fdata, "load_dataset", load)


@pytest.mark.slow
def test_sweep_scores_on_validation_by_hand_resumes_and_ignores_test(tmp_path, monkeypatch):
  clean_dir, poisoned_dir = str(tmp_path / "clean"), str(tmp_path / "poisoned")
  winner = sweep.sweep(_base(), GRID, clean_dir, last=3)
  # By hand from each point's metrics.jsonl: mean val_accuracy of the last 3 evaluations.
  scores = {}
  for point in ("client_lr=0.001", "client_lr=0.3"):
    vals = [r["val_accuracy"] for r in _rows(os.path.join(clean_dir, point))]
    assert len(vals) == 4
    scores[point] = float(np.mean(vals[-3:]))
  assert scores["client_lr=0.001"] != scores["client_lr=0.3"]
  best = max(scores, key=scores.get)
  assert winner["point"] == best and winner["score"] == pytest.approx(scores[best], abs=1e-12)
  assert winner["flags"] == f"--config.federated.client_lr={best.split('=')[1]}"
  with open(os.path.join(clean_dir, "best.json")) as f:
    assert json.load(f) == winner
  with open(os.path.join(clean_dir, "sweep.csv")) as f:
    table = {r["point"]: float(r["score"]) for r in csv.DictReader(f)}
  assert table == pytest.approx(scores, abs=1e-12)
  # Resumable: a second invocation reuses every finished point (nothing reruns).
  mtime = os.path.getmtime(os.path.join(clean_dir, best, "summary.json"))
  assert sweep.sweep(_base(), GRID, clean_dir, last=3) == winner
  assert os.path.getmtime(os.path.join(clean_dir, best, "summary.json")) == mtime
  # Permuted test labels change every test number and not the choice.
  _poison_test_labels(monkeypatch)
  poisoned = sweep.sweep(_base(), GRID, poisoned_dir, last=3)
  assert poisoned == winner
  for point in scores:
    a, b = _rows(os.path.join(clean_dir, point)), _rows(os.path.join(poisoned_dir, point))
    assert [r["val_accuracy"] for r in a] == [r["val_accuracy"] for r in b]
    assert [r["test_accuracy"] for r in a] != [r["test_accuracy"] for r in b]


@pytest.mark.slow
def test_cli_bad_grid_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=configs/tiny.py:bias,rounds=2",
       "--config.data.val_size=0.2", f"--workdir={tmp_path / 'w'}",
       "--grid=federated.nope=1,2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "Invalid sweep: --grid=federated.nope=1,2: config has no field 'federated.nope'")
  assert "Traceback" not in proc.stderr
