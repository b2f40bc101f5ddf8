"""experiments/cpu_study.py: the --quick study end to end, checked against its own runs.

The quick study (one seed, two methods, two rounds, a tiny ViT; 1-5 minutes on two busy CPU
cores) runs once per module in a subprocess, as a user would run it. Its tables must be the
runs' own numbers: every results.csv row equals its run's summary.json, and every mean in
results.md is NumPy's over those rows. Re-running the command must skip every finished cell.
The verdict rule and the cell naming are checked on constructed numbers, without runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import cpu_study, run_pool
from fedpeft_jax.runner.config_files import repo_config

pytestmark = pytest.mark.slow  # the slow tier: the quick CPU study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900


def _quick(workdir: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.cpu_study", "--quick",
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("cpu_study"))
  proc = _quick(workdir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir


def _csv(workdir: str) -> list[dict[str, str]]:
  with open(os.path.join(workdir, "results.csv")) as f:
    return list(csv.DictReader(f))


def _summary(workdir: str, cell: str) -> dict:
  with open(os.path.join(workdir, "cells", cell, "summary.json")) as f:
    return json.load(f)


def _md_tables(workdir: str) -> dict[str, list[dict[str, str]]]:
  """results.md's tables by section title ('### title'), rows as {header: cell}."""
  with open(os.path.join(workdir, "results.md")) as f:
    text = f.read()
  tables: dict[str, list[dict[str, str]]] = {}
  for section in re.split(r"^### ", text, flags=re.M)[1:]:
    title, _, body = section.partition("\n")
    lines = [l for l in body.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    tables[title.strip()] = [dict(zip(header, (c.strip() for c in l.strip("|").split("|"))))
                             for l in lines[2:]]
  return tables


def test_every_planned_run_has_a_row(study):
  rows = _csv(study)
  planned = cpu_study.plan_members("quick", [1])
  keys = {(r["analysis"], r["target"], r["method"], r["setting"], r["cell"]) for r in rows}
  for m in planned:
    assert (m.analysis, m.target, m.method, m.setting, m.name) in keys
  assert {r["analysis"] for r in rows} == set(cpu_study.ANALYSIS_TITLES)
  assert {r["seed"] for r in rows} == {"1"}


def test_csv_rows_are_the_runs_own_summaries(study):
  rows = _csv(study)
  for r in rows:
    s = _summary(study, r["cell"])
    assert float(r["final_accuracy"]) == pytest.approx(s["final_accuracy"], abs=1e-12)
    assert float(r["best_accuracy"]) == pytest.approx(s["best_accuracy"], abs=1e-12)
    assert int(r["rounds"]) == s["rounds"]
    if "total_bytes" in s:  # withheld under DP-FedAvg (it reveals who took part)
      assert float(r["total_MB"]) * 1e6 == pytest.approx(s["total_bytes"], rel=1e-12)
    else:
      assert r["total_MB"] == ""
    for key in ("epsilon", "noise_multiplier", "paper_sigma"):
      if key in s:
        assert float(r[key]) == pytest.approx(s[key], rel=1e-12)
    if run_pool.time_is_hidden(s):  # DP-FedAvg: run time reveals who took part
      assert r["wall_seconds"] == ""
    else:
      assert float(r["wall_seconds"]) > 0


def test_shared_cells_run_once(study):
  """A cell in several analyses (the base setting is in methods, grid and scarcity) is one run."""
  rows = _csv(study)
  base = [r for r in rows if r["method"] == "bias" and r["target"] == "close"
          and r["setting"] == cpu_study.grid_setting(16, 1.0, "dirichlet")]
  assert {r["analysis"] for r in base} >= {"methods", "grid"}
  assert len({r["cell"] for r in base}) == 1
  scarcity_base = [r for r in rows if r["analysis"] == "scarcity" and r["method"] == "bias"
                   and r["setting"].startswith("5%")]
  assert scarcity_base[0]["cell"] == base[0]["cell"]
  assert len(os.listdir(os.path.join(study, "cells"))) == len({r["cell"] for r in rows})


def test_md_tables_are_numpy_over_the_csv(study):
  rows = _csv(study)
  tables = _md_tables(study)
  for analysis, title in cpu_study.ANALYSIS_TITLES.items():
    table = tables[title]
    group = [r for r in rows if r["analysis"] == analysis]
    assert len(table) == len({(r["target"], r["method"], r["setting"]) for r in group})
    for line in table:
      runs = [r for r in group if (r["target"], r["method"], r["setting"])
              == (line["target"], line["method"], line["setting"])]
      assert int(line["seeds"]) == len(runs)
      for column, field in (("final accuracy", "final_accuracy"),
                            ("best accuracy", "best_accuracy")):
        values = np.array([float(r[field]) for r in runs])
        mean, *std = (float(x) for x in line[column].split("±"))
        assert mean == pytest.approx(np.mean(values), abs=5e-4)
        if len(values) > 1:
          assert std[0] == pytest.approx(np.std(values, ddof=1), abs=5e-4)
        else:
          assert not std
      megabytes = [float(r["total_MB"]) for r in runs if r["total_MB"]]
      if megabytes:  # constant over seeds unless clients are Poisson-sampled
        assert float(line["total MB"].split("±")[0]) == pytest.approx(np.mean(megabytes),
                                                                      abs=5e-4)
      else:
        assert line["total MB"] == "-"


def test_privacy_rows_carry_the_accounted_epsilon(study):
  rows = [r for r in _csv(study) if r["analysis"] == "privacy"]
  fedavg = [r for r in rows if r["setting"].startswith("DP-FedAvg")]
  paper = [r for r in rows if r["setting"].startswith("paper_gaussian")]
  assert fedavg and paper
  for r in fedavg:  # calibrated to the target epsilon 5 over the run
    assert float(r["epsilon"]) == pytest.approx(5.0, rel=1e-3)
    assert float(r["delta"]) == pytest.approx(1 / 64 ** 2)
  for r in paper:  # the nominal 5 is a formula input; the accounted epsilon is far larger
    assert float(r["epsilon"]) > 5.0
  for r in rows:  # the noise comes from the OS, never from the seed
    with open(os.path.join(study, "cells", r["cell"], "config.json")) as f:
      assert json.load(f)["privacy"]["reproducible_noise"] is False


def test_equal_communication_stays_within_bias_bytes(study):
  rows = [r for r in _csv(study) if r["analysis"] == "equal_comm"]
  by = {r["method"]: r for r in rows}
  assert float(by["full"]["total_MB"]) <= float(by["bias"]["total_MB"])
  assert float(by["full"]["total_MB"]) > 0


def test_verdicts_and_figures_written(study):
  tables = _md_tables(study)
  verdicts = {row["claim"]: row["verdict"].strip("*") for row in tables["Verdicts"]}
  assert set(verdicts) == set(cpu_study.CLAIMS)
  # One seed: no error bar, so nothing can be decided.
  assert set(verdicts.values()) == {"inconclusive"}
  for name in ("accuracy_vs_mb.png", "grid_heatmap.png"):
    with open(os.path.join(study, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_cells(study):
  stamps = {c: os.path.getmtime(os.path.join(study, "cells", c, "summary.json"))
            for c in os.listdir(os.path.join(study, "cells"))}
  proc = _quick(study)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cells to run" not in proc.stdout
  assert stamps == {c: os.path.getmtime(os.path.join(study, "cells", c, "summary.json"))
                    for c in stamps}


# ------------------------------------------------------------------- without runs (fast)


def _stat(values):
  return cpu_study.Stat(list(values))


def test_verdict_rule_two_standard_errors():
  a, b = _stat([0.80, 0.82, 0.81]), _stat([0.70, 0.71, 0.69])
  c = cpu_study.Comparison("x", "a - b", [(1.0, a), (-1.0, b)])
  se = 100 * math.sqrt(np.var([0.80, 0.82, 0.81], ddof=1) / 3
                       + np.var([0.70, 0.71, 0.69], ddof=1) / 3)
  assert c.estimate == pytest.approx(11.0)
  assert c.se == pytest.approx(se)
  assert c.verdict == "reproduced"
  assert cpu_study.Comparison("x", "b - a", [(1.0, b), (-1.0, a)]).verdict == "not reproduced"
  # A margin moves the bar: 11 points is not "more than 10 by 2 SE" here.
  assert cpu_study.Comparison("x", "", [(1.0, a), (-1.0, b)], 10.0).verdict == "inconclusive"
  noisy = _stat([0.5, 0.9, 0.7])
  assert cpu_study.Comparison("x", "", [(1.0, noisy), (-1.0, b)]).verdict == "inconclusive"
  one_seed = _stat([0.9])
  assert cpu_study.Comparison("x", "", [(1.0, one_seed), (-1.0, b)]).verdict == "inconclusive"
  assert cpu_study.Comparison("x", "", [(1.0, _stat([])), (-1.0, b)]).verdict.startswith(
      "inconclusive")


def test_overall_is_a_strict_majority():
  up, down = _stat([0.9, 0.91, 0.9]), _stat([0.5, 0.51, 0.5])
  yes = cpu_study.Comparison("x", "", [(1.0, up), (-1.0, down)])
  no = cpu_study.Comparison("x", "", [(1.0, down), (-1.0, up)])
  skipped = cpu_study.Comparison("x", "", [(1.0, down), (-1.0, up)], note="not >= 100x")
  assert cpu_study.overall([yes, yes, no]) == "reproduced"
  assert cpu_study.overall([yes, no]) == "inconclusive"
  assert cpu_study.overall([no, no, yes, skipped, skipped]) == "not reproduced"
  assert cpu_study.overall([skipped]) == "inconclusive"


def test_stat_text_is_mean_and_sample_std():
  s = _stat([0.5, 0.6, 0.7])
  assert s.text() == f"{0.6:.3f} ± {np.std([0.5, 0.6, 0.7], ddof=1):.3f}"
  assert _stat([0.25]).text() == "0.250"
  assert _stat([]).text() == "-"
  assert _stat([3.5, 3.5]).text(constant_plain=True) == "3.500"
  assert _stat([3.5, 3.5]).text() == "3.500 ± 0.000"


def test_equal_configs_share_a_cell():
  config = repo_config("cpu_study")
  base = cpu_study.cell_arg("full", 42, method="bias")
  # Defaults spelled out, and the base training size, name the same cell.
  assert cpu_study.cell_arg("full", 42, method="bias", clients=16, participation=1.0,
                            split="dirichlet", mechanism="none") == base
  assert cpu_study.cell_name(base) == "close_bias_seed42"
  assert config.get_config(base).to_json() == config.get_config(
      "close,bias,train_size=1500,seed=42").to_json()
  members = cpu_study.plan_members("full", [1, 42, 3407])
  assert len({m.name for m in members}) == 177  # 42 + 84 + 24 + 27 distinct runs
  assert len(members) == 42 + 96 + 36 + 36
