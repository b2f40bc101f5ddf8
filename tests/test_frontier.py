"""experiments/frontier.py: `--quick` per group end to end, checked against its own runs.

Each group in GROUPS runs once per module in a subprocess, as a user would run it (2 rounds,
a 1-epoch backbone; ~25 s on two busy CPU cores). Its results.csv must be the runs' own
numbers: final accuracy from each summary.json, MB up and down and bytes per upload summed
here from each metrics.jsonl, the frontier's accuracy deltas and upload reductions
recomputed here with NumPy from those files. Re-running the command must reuse every run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import frontier, run_pool

pytestmark = pytest.mark.slow  # the slow tier: the quick frontier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
# The groups checked; "personal" and "lora" join (one entry each) once the config fields
# they set (federated.personal..., federated.lora_aggregation) exist.
GROUPS = ["frontier"]


def _quick(workdir: str, group: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.frontier", "--quick",
                         f"--groups={group}", f"--workdir={workdir}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module", params=GROUPS)
def quick(request, tmp_path_factory) -> tuple[str, str]:
  """(group, workdir) of a finished `--quick --groups=<group>` invocation."""
  group = request.param
  workdir = str(tmp_path_factory.mktemp(f"frontier_{group}"))
  proc = _quick(workdir, group)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return group, workdir


def _csv(workdir: str) -> list[dict[str, str]]:
  with open(os.path.join(workdir, "results.csv")) as f:
    return list(csv.DictReader(f))


def _summary(workdir: str, run: str) -> dict:
  with open(os.path.join(workdir, run, "summary.json")) as f:
    return json.load(f)


def _metrics(workdir: str, run: str) -> list[dict]:
  with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _md_rows(workdir: str, title: str) -> list[dict[str, str]]:
  """The rows of results.md's table under '### title', as {header: cell}."""
  with open(os.path.join(workdir, "results.md")) as f:
    text = f.read()
  section = re.split(r"^### ", text, flags=re.M)
  body = next(s for s in section if s.startswith(title)).split("\n", 1)[1]
  lines = [l for l in body.splitlines() if l.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def test_every_planned_run_has_a_row(quick):
  group, workdir = quick
  rows = _csv(workdir)
  assert [r["run"] for r in rows] == [s.name for s in frontier.plan([group], quick=True)]
  assert {r["group"] for r in rows} == {group}
  for r in rows:
    assert os.path.exists(os.path.join(workdir, r["run"], "summary.json"))


def test_csv_rows_are_the_runs_own_numbers(quick):
  _, workdir = quick
  for r in _csv(workdir):
    s, metrics = _summary(workdir, r["run"]), _metrics(workdir, r["run"])
    assert float(r["final_accuracy"]) == pytest.approx(s["final_accuracy"], abs=1e-12)
    assert int(r["rounds"]) == s["rounds"] == frontier.QUICK_ROUNDS == len(metrics)
    up = np.sum([m["bytes_up"] for m in metrics])
    down = np.sum([m["bytes_down"] for m in metrics])
    uploads = np.sum([m["clients_reporting"] for m in metrics])
    assert float(r["MB_up"]) == pytest.approx(up / 1e6, rel=1e-12)
    assert float(r["MB_down"]) == pytest.approx(down / 1e6, rel=1e-12)
    assert float(r["bytes_per_upload"]) == pytest.approx(up / uploads, rel=1e-12)
    evaluated = [m for m in metrics if "personalized_accuracy" in m]
    for key in frontier.PERSONAL_KEYS:
      if evaluated:
        assert float(r[key]) == pytest.approx(evaluated[-1][key], abs=1e-12)
      else:
        assert r[key] == ""
    if run_pool.time_is_hidden(s):  # DP-FedAvg: run time reveals who took part
      assert r["wall_seconds"] == ""
    else:
      assert float(r["wall_seconds"]) > 0


def test_frontier_deltas_and_reductions_recomputed(quick):
  group, workdir = quick
  if group != "frontier":
    pytest.skip("frontier rows only")
  rows = _csv(workdir)
  runs = [r["run"] for r in rows]
  methods = np.array([r["method"] for r in rows])
  uploads = np.array([r["setting"] for r in rows])
  acc = np.array([_summary(workdir, run)["final_accuracy"] for run in runs])
  up = np.array([np.sum([m["bytes_up"] for m in _metrics(workdir, run)]) for run in runs],
                dtype=np.float64)
  reference = np.array([np.flatnonzero((methods == m) & (uploads == "float32"))[0]
                        for m in methods])
  delta = 100.0 * (acc - acc[reference])
  reduction = up[reference] / up
  np.testing.assert_allclose([float(r["acc_delta_points"]) for r in rows], delta, atol=1e-9)
  np.testing.assert_allclose([float(r["upload_reduction"]) for r in rows], reduction,
                             rtol=1e-12)
  np.testing.assert_array_equal(reduction[uploads == "float32"], 1.0)
  np.testing.assert_allclose(reduction[uploads == "bf16"], 2.0)  # 2 bytes a value, not 4
  table = _md_rows(workdir, "Accuracy vs MB uploaded")
  assert [(t["method"], t["upload"]) for t in table] == list(zip(methods, uploads))
  for t, a, d in zip(table, acc, delta):
    assert float(t["final accuracy"]) == pytest.approx(a, abs=5e-5)
    assert float(t["Δ accuracy vs float32 (points)"]) == pytest.approx(d, abs=0.05)


def test_figure_written(quick):
  _, workdir = quick
  with open(os.path.join(workdir, "frontier.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_finished_runs(quick):
  group, workdir = quick
  runs = [r["run"] for r in _csv(workdir)]
  stamps = {r: os.path.getmtime(os.path.join(workdir, r, "summary.json")) for r in runs}
  before = _csv(workdir)
  proc = _quick(workdir, group)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "runs to run" not in proc.stdout
  assert stamps == {r: os.path.getmtime(os.path.join(workdir, r, "summary.json"))
                    for r in runs}
  assert _csv(workdir) == before
