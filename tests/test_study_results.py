"""The CPU study's published results (docs/cpu_study/, README.md's block) against their own
per-seed numbers: every interval is scipy's one-sample t over the paired differences
rebuilt from results.csv, every verdict follows from its interval and the pre-registered
margin, and the README carries results.md's verdicts unedited."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from scipy import stats

from experiments import cpu_study
from tests.test_cpu_study import _differences, _md_tables

DOCS = cpu_study.DOCS_DIR


def _read(name: str) -> str:
  with open(os.path.join(DOCS, name)) as f:
    return f.read()


def _rows() -> list[dict[str, str]]:
  with open(os.path.join(DOCS, "results.csv")) as f:
    return list(csv.DictReader(f))


def test_readme_carries_results_md_unedited():
  with open(os.path.join(cpu_study.REPO, "README.md")) as f:
    readme = f.read()
  block = readme.split(cpu_study.README_BEGIN, 1)[1].split(cpu_study.README_END, 1)[0]
  assert block.strip() == cpu_study.readme_block(_read("results.md")).strip()


def test_every_published_interval_and_verdict_is_scipys():
  rows = _rows()
  tables = _md_tables(DOCS)
  lines = tables["Primary comparisons (final test accuracy, percentage points, paired by "
                 "seed)"] + tables["Supplementary comparisons (reported, no votes)"]
  by_label = {(l["claim"], l["comparison"]): l for l in lines}
  comps = cpu_study.comparisons(rows)
  assert len(comps) == len(by_label)
  primary_seeds = set()
  for c in comps:
    line = by_label[(c.claim, c.label)]
    d = _differences(rows, c.terms)
    assert int(line["seeds"]) == len(d)
    assert float(line["mean (pts)"]) == pytest.approx(np.mean(d), abs=0.051)
    if len(d) < 2:  # one seed: no interval, so no verdict but inconclusive
      assert line["95% CI (Student t)"] == "-" and not c.primary
      assert line["CI vs claim"].startswith("inconclusive"), c.label
      continue
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    low, high = (float(x) for x in line["95% CI (Student t)"].strip("[]").split(","))
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=0.051)
    # The verdict from scipy's one-sided tests against the claimed margin.
    margin = float(line["claimed"].removeprefix("> "))
    assert margin == c.margin
    above = stats.ttest_1samp(d, margin, alternative="greater").pvalue < 0.025
    below = stats.ttest_1samp(d, margin, alternative="less").pvalue < 0.025
    expected = "reproduced" if above else "contradicted" if below else "inconclusive"
    assert line["CI vs claim"].split(" (")[0] == expected, c.label
    if c.primary:
      primary_seeds.add(len(d))
  assert min(primary_seeds) >= 5  # the pre-registered primaries ran on at least 5 seeds
  verdicts = {r["claim"]: r["verdict"].strip("*") for r in tables["Verdicts"]}
  assert set(verdicts) == set(cpu_study.CLAIMS)
  for c in comps:
    if c.primary:
      assert by_label[(c.claim, c.label)]["CI vs claim"].startswith(verdicts[c.claim])


def test_published_rates_were_chosen_on_validation():
  """Each published row ran with its tuning group's winner (the best validation score of its
  sweep, recomputed here), the clip too under DP-FedAvg."""
  with open(os.path.join(DOCS, "tuning.csv")) as f:
    tuning = list(csv.DictReader(f))
  best: dict = {}
  for t in tuning:
    key = (t["group"], t["method"])
    if key not in best or float(t["score"]) > float(best[key]["score"]):
      best[key] = t
  assert {k for k in best} == {(t["group"], t["method"]) for t in tuning
                               if t["chosen"] == "True"}
  groups = {(d.analysis, d.target, d.method, d.setting): d.group
            for d in cpu_study.plan_designs("full")}
  for r in _rows():
    if r["analysis"] == "equal_comm":
      continue
    winner = best[(groups[(r["analysis"], r["target"], r["method"], r["setting"])],
                   r["method"])]
    assert float(r["lr"]) == float(winner["lr"]), r["cell"]
    if "mechanismdp_fedavg" in r["cell"]:
      assert float(r["clip"]) == float(winner["clip"])
