"""experiments/cpu_study.py: the --quick study end to end, checked against its own runs.

The quick study (a tiny ViT, three methods, two rounds, two seeds for the primary cells;
2-4 minutes on two CPU cores) runs once per module in a subprocess, as a user would run it.
Its tables must be the runs' own numbers: every results.csv row is recomputed from its run's
metrics.jsonl, every mean in results.md is NumPy's over those rows, every rate a cell ran
with is the one its sweep scored best on validation, and every interval in the verdict tables
is scipy's over the per-seed differences. Re-running the command must skip every finished
cell. The plan and the cell naming are checked without runs.
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
from scipy import stats

from experiments import cpu_study, run_pool
from fedpeft_jax.config_files import repo_config


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
    if not lines:
      continue
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    tables[title.strip()] = [dict(zip(header, (c.strip() for c in l.strip("|").split("|"))))
                             for l in lines[2:]]
  return tables


def _evals(workdir: str, cell: str) -> list[dict]:
  with open(os.path.join(workdir, "cells", cell, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if "test_accuracy" in r]


def _plan(scale: str = "quick", seeds: int = 0, supplementary: int = 0):
  designs = cpu_study.plan_designs(scale)
  points = cpu_study.plan_tuning(scale, designs)
  chosen = {(t.group, t.method): t for t in points}  # any point: the plan's shape only
  plan = cpu_study.PLAN[scale]
  return designs, points, cpu_study.plan_members(
      scale, designs, chosen, seeds or plan["seeds"],
      supplementary or plan["supplementary_seeds"])


@pytest.mark.slow  # runs the quick study
def test_every_planned_run_has_a_row_on_its_tiers_seeds(study):
  rows = [r for r in _csv(study) if r["analysis"] != "equal_comm"]
  keys = {(r["analysis"], r["target"], r["method"], r["setting"], r["seed"], r["tier"])
          for r in rows}
  designs = cpu_study.plan_designs("quick")
  assert len(rows) == len(keys)
  for d in designs:
    key = (d.analysis, d.target, d.method, d.setting)
    seeds = {r["seed"] for r in rows if (r["analysis"], r["target"], r["method"],
                                        r["setting"]) == key}
    primary = any(r["tier"] == "primary" for r in rows
                  if (r["analysis"], r["target"], r["method"], r["setting"]) == key)
    assert seeds == ({"1", "2"} if primary else {"1"}), key
    if key in cpu_study.PRIMARY:
      assert primary
  assert {r["analysis"] for r in _csv(study)} == set(cpu_study.ANALYSIS_TITLES)


@pytest.mark.slow  # runs the quick study
def test_csv_rows_are_the_runs_own_numbers(study):
  for r in _csv(study):
    evals = _evals(study, r["cell"])
    s = _summary(study, r["cell"])
    if r["analysis"] == "equal_comm":
      continue
    test = [e["test_accuracy"] for e in evals]
    val = [e["val_accuracy"] for e in evals]
    assert float(r["final_accuracy"]) == pytest.approx(np.mean(test[-3:]), abs=1e-12)
    assert float(r["final_val_accuracy"]) == pytest.approx(np.mean(val[-3:]), abs=1e-12)
    if len(val) >= 6:
      assert float(r["val_plateau_delta"]) == pytest.approx(
          np.mean(val[-3:]) - np.mean(val[-6:-3]), abs=1e-12)
    assert int(r["rounds"]) == s["rounds"]
    if "total_bytes" in s:  # withheld under DP-FedAvg (it reveals who took part)
      assert float(r["total_MB"]) * 1e6 == pytest.approx(s["total_bytes"], rel=1e-12)
    else:
      assert r["total_MB"] == ""
    with open(os.path.join(study, "cells", r["cell"], "config.json")) as f:
      config = json.load(f)
    assert float(r["lr"]) == config["federated"]["client_lr"]
    for key in ("epsilon", "noise_multiplier", "paper_sigma"):
      if key in s:
        assert float(r[key]) == pytest.approx(s[key], rel=1e-12)
    if run_pool.time_is_hidden(s):  # DP-FedAvg: run time reveals who took part
      assert r["wall_seconds"] == ""
    else:
      assert float(r["wall_seconds"]) > 0


@pytest.mark.slow  # runs the quick study
def test_rates_are_chosen_on_validation_only(study):
  """Each sweep's winner is the best mean validation accuracy of the last 3 evaluations,
  recomputed here from the runs, and the study's cells of that group run with it.
  (tests/test_sweep.py shows that permuting the test labels leaves a sweep's choice.)"""
  with open(os.path.join(study, "tuning.csv")) as f:
    tuning = list(csv.DictReader(f))
  best = {}
  for t in tuning:
    score = np.mean([e["val_accuracy"] for e in _evals(study, t["cell"])][-3:])
    assert float(t["score"]) == pytest.approx(score, abs=1e-12)
    key = (t["group"], t["method"])
    if key not in best or score > best[key][0]:
      best[key] = (score, t)
    assert t["cell"].endswith("_seed0_scalequick")  # tuning never uses a study seed
  for key, (_, t) in best.items():
    assert t["chosen"] == "True"
  assert sum(t["chosen"] == "True" for t in tuning) == len(best)
  groups = {(d.analysis, d.target, d.method, d.setting): d.group
            for d in cpu_study.plan_designs("quick")}
  for r in _csv(study):
    if r["analysis"] == "equal_comm":
      continue
    winner = best[(groups[(r["analysis"], r["target"], r["method"], r["setting"])],
                   r["method"])][1]
    assert float(r["lr"]) == float(winner["lr"])
    if "mechanismdp_fedavg" in r["cell"]:
      assert float(r["clip"]) == float(winner["clip"])


@pytest.mark.slow  # runs the quick study
def test_shared_cells_run_once(study):
  """A cell in several analyses (the base setting is in methods and scarcity) is one run."""
  rows = _csv(study)
  base = [r for r in rows if r["method"] == "bias" and r["target"] == "close"
          and r["analysis"] in ("methods", "scarcity") and r["setting"] in (
              cpu_study.BASE, cpu_study.scarcity_setting(1500))]
  assert {r["analysis"] for r in base} == {"methods", "scarcity"}
  assert len({r["cell"] for r in base if r["seed"] == "1"}) == 1
  designs = cpu_study.plan_designs("quick")
  points = cpu_study.plan_tuning("quick", designs)
  chosen, _ = cpu_study.choose(points, study, "quick")
  members = cpu_study.plan_members("quick", designs, chosen, 2, 1)
  cells = {cpu_study.cell_name(t.cell) for t in points} | {m.name for m in members}
  assert sorted(os.listdir(os.path.join(study, "cells"))) == sorted(cells)


@pytest.mark.slow  # runs the quick study
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
      values = np.array([float(r["final_accuracy"]) for r in runs])
      mean, *std = (float(x) for x in line["test accuracy (last 3)"].split("±"))
      assert mean == pytest.approx(np.mean(values), abs=5e-4)
      if len(values) > 1:
        assert std[0] == pytest.approx(np.std(values, ddof=1), abs=5e-4)
      else:
        assert not std


def _differences(rows, terms):
  """{seed: 100 x sum c x accuracy} over the seeds every term has, from the csv."""
  by = {}
  for r in rows:
    by.setdefault((r["analysis"], r["target"], r["method"], r["setting"]), {})[
        r["seed"]] = float(r["final_accuracy"])
  seeds = set.intersection(*(set(by[k]) for _, k in terms))
  return [100 * sum(c * by[k][s] for c, k in terms) for s in sorted(seeds)]


@pytest.mark.slow  # runs the quick study
def test_verdict_tables_are_scipy_over_the_csv(study):
  """Every comparison's mean and 95% interval is scipy's one-sample t over the per-seed
  differences, rebuilt here from the csv; a claim's verdict is its primary comparison's."""
  rows = _csv(study)
  comps = cpu_study.comparisons(rows)
  tables = _md_tables(study)
  lines = tables["Primary comparisons (final test accuracy, percentage points, paired by "
                 "seed)"] + tables["Supplementary comparisons (reported, no votes)"]
  by_label = {(l["claim"], l["comparison"]): l for l in lines}
  assert len(by_label) == len(comps)
  for c in comps:
    line = by_label[(c.claim, c.label)]
    d = _differences(rows, c.terms)
    assert int(line["seeds"]) == len(d)
    assert float(line["mean (pts)"]) == pytest.approx(np.mean(d), abs=0.051)
    if len(d) > 1 and np.std(d) > 0:
      ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
      low, high = (float(x) for x in line["95% CI (Student t)"].strip("[]").split(","))
      assert (low, high) == pytest.approx((ci.low, ci.high), abs=0.051)
  verdicts = {row["claim"]: row["verdict"].strip("*") for row in tables["Verdicts"]}
  assert set(verdicts) == set(cpu_study.CLAIMS)
  primaries = {c.claim: c for c in comps if c.primary}
  for claim, verdict in verdicts.items():
    line = by_label[(claim, primaries[claim].label)]
    assert line["CI vs claim"].startswith(verdict)


@pytest.mark.slow  # runs the quick study
def test_equal_bytes_compares_within_fulls_budget(study):
  rows = [r for r in _csv(study) if r["analysis"] == "equal_comm"]
  assert rows
  for r in rows:
    evals = _evals(study, r["cell"])
    budget = float(r["total_MB"]) * 1e6
    if r["method"] == "full":
      at = [e for e in evals if e["round"] == int(r["rounds"])][0]
      assert at["cumulative_bytes"] == pytest.approx(budget)
      assert float(r["final_accuracy"]) == at["test_accuracy"]
    else:
      within = [e for e in evals if e["cumulative_bytes"] <= budget]
      assert float(r["final_accuracy"]) == pytest.approx(
          np.mean([e["test_accuracy"] for e in within[-3:]]), abs=1e-12)
      assert int(r["rounds"]) == within[-1]["round"]
      assert evals[-1]["cumulative_bytes"] <= budget  # bias's whole run fits 1 full round


@pytest.mark.slow  # runs the quick study
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
      config = json.load(f)
    assert config["privacy"]["reproducible_noise"] is False
    # the no-DP reference and the DP cells draw clients alike (Poisson)
    assert config["federated"]["client_sampling"] == "poisson"


@pytest.mark.slow  # runs the quick study
def test_figures_written(study):
  for name in ("accuracy_vs_mb.png", "grid_heatmap.png"):
    with open(os.path.join(study, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # runs the quick study
def test_rerun_skips_finished_cells(study):
  stamps = {c: os.path.getmtime(os.path.join(study, "cells", c, "summary.json"))
            for c in os.listdir(os.path.join(study, "cells"))}
  proc = _quick(study)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cells to run" not in proc.stdout
  assert stamps == {c: os.path.getmtime(os.path.join(study, "cells", c, "summary.json"))
                    for c in stamps}


# ------------------------------------------------------------------- without runs (fast)


def test_stat_text_is_mean_and_sample_std():
  s = cpu_study.Stat([0.5, 0.6, 0.7])
  assert s.text() == f"{0.6:.3f} ± {np.std([0.5, 0.6, 0.7], ddof=1):.3f}"
  assert cpu_study.Stat([0.25]).text() == "0.250"
  assert cpu_study.Stat([]).text() == "-"
  assert cpu_study.Stat([3.5, 3.5]).text(constant_plain=True) == "3.500"


def test_primary_comparisons_are_the_preregistered_ones():
  """The six primaries of docs/study.md ("The CPU study"), written out by hand: terms (sign,
  cell) and margins. A flipped sign or a wrong primary in comparisons() fails here."""
  rows = []
  for d in cpu_study.plan_designs("full"):
    rows.append({"analysis": d.analysis, "target": d.target, "method": d.method,
                 "setting": d.setting, "seed": 1, "final_accuracy": 0.5,
                 "total_MB": 100.0 if d.method in ("full", "scratch") else 0.5})
  budgets = ["<= 13.00 MB (full: 2 rounds)", "<= 26.00 MB (full: 4 rounds)"]
  for b in budgets:
    for m in ("full", "bias"):
      rows.append({"analysis": "equal_comm", "target": "close", "method": m, "setting": b,
                   "seed": 1, "final_accuracy": 0.5, "total_MB": 13.0})
  base = "16 clients, 100%, Dir 0.3"
  iid64, dir64 = "64 clients, 100%, IID", "64 clients, 12.5%, Dir 0.3"
  eps5 = "DP-FedAvg, eps 5"
  want = {
      "1": ([(1, ("methods", "close", "bias", base)), (-1, ("methods", "close", "full", base))],
            -5.0),
      "2": ([(1, ("grid", "close", "full", iid64)), (-1, ("grid", "close", "full", dir64)),
             (-1, ("grid", "close", "bias", iid64)), (1, ("grid", "close", "bias", dir64))],
            0.0),
      "3": ([(1, ("privacy", "close", "full", "no DP")), (-1, ("privacy", "close", "full", eps5)),
             (-1, ("privacy", "close", "bias", "no DP")), (1, ("privacy", "close", "bias", eps5))],
            0.0),
      "4": ([(1, ("methods", "close", "full", base)), (-1, ("methods", "close", "scratch", base))],
            10.0),
      "5": ([(1, ("methods", "far", "full", base)), (-1, ("methods", "far", "bias", base)),
             (-1, ("methods", "close", "full", base)), (1, ("methods", "close", "bias", base))],
            0.0),
      "6": ([(1, ("equal_comm", "close", "bias", budgets[0])),
             (-1, ("equal_comm", "close", "full", budgets[0]))], 0.0),
  }
  primaries = [c for c in cpu_study.comparisons(rows) if c.primary]
  assert sorted(c.claim for c in primaries) == sorted(want)
  for c in primaries:
    terms, margin = want[c.claim]
    assert sorted(c.terms) == sorted((float(k), key) for k, key in terms), c.claim
    assert c.margin == margin


def test_comparison_pairs_by_seed():
  """A seed missing from one term drops out of the difference; the others pair up."""
  a, b = ("methods", "close", "bias", "s"), ("methods", "close", "full", "s")
  values = {a: {1: 0.80, 2: 0.70, 3: 0.90}, b: {1: 0.75, 2: 0.71}}
  c = cpu_study.Comparison("1", "", [(1.0, a), (-1.0, b)], margin=-5.0)
  assert c.differences(values) == pytest.approx({1: 5.0, 2: -1.0})
  j = c.judge(values)
  assert j["interval"].n == 2 and j["interval"].mean == pytest.approx(2.0)


def test_plateau_is_last_three_minus_the_three_before():
  assert cpu_study.plateau([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]) == pytest.approx(0.3)
  assert np.isnan(cpu_study.plateau([0.1, 0.2, 0.3, 0.4, 0.5]))


def test_equal_configs_share_a_cell_and_the_plan_counts():
  config = repo_config("cpu_study")
  base = cpu_study.cell_arg("full", 4, method="bias", lr=0.03)
  # Defaults spelled out name the same cell.
  assert cpu_study.cell_arg("full", 4, method="bias", clients=16, participation=1.0,
                            split="dirichlet", mechanism="none", lr=0.03) == base
  assert cpu_study.cell_name(base) == "close_bias_lr0.03_seed4"
  assert config.get_config(base).to_json() == config.get_config(
      "close,bias,train_size=1500,lr=0.03,seed=4").to_json()
  designs, points, members = _plan("full")
  # 7 + 7 methods, 2 x 8 grid, 2 x 3 scarcity, 2 x 4 privacy
  assert len(designs) == 14 + 16 + 6 + 8
  # starting grids: 14 (target, method) pairs, 2 x (64 clients, 300 and 3000 images) x 3
  # rates, DP 2 x 3 rates x 2 clips
  assert len({t.cell for t in points}) == 14 * 3 + 2 * 3 * 3 + 2 * 6
  primary = {m.name for m in members if m.tier == "primary"}
  assert len(primary) == 11 * 5  # 11 primary cells on seeds 1-5
  assert {m.seed for m in members if m.tier == "supplementary"} == {1}


def _walk(surface):
  """The tuning phase on a made-up score surface {(group, method): f(lr, clip)}."""
  designs = [d for d in cpu_study.plan_designs("full") if (d.group, d.method) in surface]
  points = cpu_study.plan_tuning("full", designs)
  for _ in range(20):  # the cap bounds a walk at 3 passes; 20 would mean it never stops
    scores = {t.cell: surface[(t.group, t.method)](t.lr, t.clip) for t in points}
    new = cpu_study.extend_tuning("full", points, scores)
    if not new:
      return points, scores
    points += new
  raise AssertionError("the tuning walk did not stop")


def test_sweeps_walk_outwards_from_an_edge_winner():
  peak = lambda best: (lambda lr, clip: -abs(np.log(lr / best)))
  points, scores = _walk({
      ("close", "bias"): peak(0.3),  # above the grid (0.01, 0.03, 0.1): walks up
      ("close", "full"): peak(0.01),  # interior: nothing added
      ("far", "head"): peak(3.0),  # beyond the ladder's top (1.0): stops there
      ("64 clients", "full"): lambda lr, clip: np.nan if lr > 0.02 else -lr,  # NaN never wins
      # DP: best at (0.1, 0.01); the grid's clips are 0.02, 0.05, 0.1
      ("DP", "bias"): lambda lr, clip: -abs(np.log(lr / 0.1)) - abs(np.log(clip / 0.01)),
  })
  tried = lambda g, m: sorted((t.lr, t.clip) for t in points if (t.group, t.method) == (g, m))
  assert [lr for lr, _ in tried("close", "bias")] == [0.01, 0.03, 0.1, 0.3, 1.0]
  assert [lr for lr, _ in tried("close", "full")] == [0.003, 0.01, 0.03]
  assert [lr for lr, _ in tried("far", "head")] == [0.03, 0.1, 0.3, 1.0]
  # 0.003 wins (0.03 is NaN; -0.01 < -0.003), then each lower rate wins: 3 steps down.
  assert [lr for lr, _ in tried("64 clients", "full")] == [1e-4, 3e-4, 0.001, 0.003, 0.01,
                                                           0.03]
  # DP: the 3 x 2 grid's best (0.1, 0.02) adds (0.3, 0.02) and (0.1, 0.01); then the best
  # (0.1, 0.01) adds its first untried neighbour, (0.03, 0.01): 3 extensions, the cap.
  grid = {(lr, c) for lr in (0.01, 0.03, 0.1) for c in (0.02, 0.05)}
  assert set(tried("DP", "bias")) - grid == {(0.3, 0.02), (0.1, 0.01), (0.03, 0.01)}
  assert cpu_study.MAX_EXTENSIONS == 3
  assert cpu_study.untried_neighbours((0.1, 0.01), tried("DP", "bias")) == [
      (0.3, 0.01), (0.1, 0.005)]  # left at an edge: the tuning table flags it
  assert cpu_study.untried_neighbours((1.0, 0.0), [(0.3, 0.0)]) == []
  # The tuning table's edge flag: an interior winner is not flagged; a winner at a ladder's
  # end, beside an unscored (failed) neighbour, or left by the cap at an edge, is.
  assert not cpu_study.at_edge((0.01, 0.0), [(0.003, 0.0), (0.01, 0.0), (0.03, 0.0)])
  assert cpu_study.at_edge((1.0, 0.0), tried("far", "head"))
  assert cpu_study.at_edge((0.01, 0.0), [(0.01, 0.0), (0.03, 0.0)])
  assert cpu_study.at_edge((0.1, 0.01), tried("DP", "bias"))
  assert not cpu_study.at_edge((0.1, 0.05), [(a, c) for a in (0.03, 0.1, 0.3)
                                             for c in (0.02, 0.05, 0.1)])
  with pytest.raises(ValueError, match="not on the ladder"):
    cpu_study.untried_neighbours((0.02, 0.0), [])


def test_partial_participation_stretches_rounds_and_samples_by_poisson():
  config = repo_config("cpu_study")
  c = config.get_config("close,bias,clients=64,participation=0.125")
  base = config.get_config("close,bias")
  assert c.federated.rounds == 8 * base.federated.rounds
  assert c.federated.eval_every == 8 * base.federated.eval_every
  assert c.federated.client_sampling == "poisson"
  assert base.federated.client_sampling == "uniform"
  # Validation is held out on top of the training count.
  assert base.data.train_size - base.data.val_size == config.SCALE["full"]["close_train"]
