"""`runner.train.run` against golden outputs: metrics.jsonl, summary.json, partition.json,
config.json and the printed lines of a few runs, byte for byte once the wall-clock fields
are dropped. The golden files were written by the runner before `run` was split into
set-up, loop and summary, so they pin that the split changed no output.

Regenerate them (only on purpose, e.g. after a deliberate change of the outputs) with
  FEDPEFT_WRITE_GOLDEN=1 JAX_PLATFORMS=cpu python -m pytest -q tests/test_runner_split.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Callable

import ml_collections
import pytest

from fedpeft_jax.privacy.accounting import dp_fedavg_epsilon
from fedpeft_jax.runner.config_files import repo_config
from fedpeft_jax.runner.train import run

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "runner_split")
WRITE = os.environ.get("FEDPEFT_WRITE_GOLDEN") == "1"
# Wall-clock values and the installed versions: the only fields that differ between runs.
TIME_FIELDS = ("seconds",)
SUMMARY_TIME_FIELDS = ("train_seconds", "wall_seconds_this_session", "versions")


def _quickstart_bias() -> ml_collections.ConfigDict:
  # The quickstart's backbone file is not in the repo (experiments.quickstart pre-trains it):
  # from scratch instead, so the run is offline and derives from the seed alone.
  c = repo_config("quickstart").get_config("bias")
  c.model.pretrained = ""
  return c


def _tiny_head_cached() -> ml_collections.ConfigDict:
  # Head tuning: the frozen prefix is cached; with a validation split.
  c = repo_config("tiny").get_config("head,rounds=3")
  c.data.val_size = 0.2
  return c


def _tiny_personal(schedule: str, **federated: Any) -> Callable[[], ml_collections.ConfigDict]:
  def config() -> ml_collections.ConfigDict:
    c = repo_config("tiny").get_config("lora,rounds=3")
    c.federated.personal = "head"
    c.federated.personal_schedule = schedule
    for k, v in federated.items():
      c.federated[k] = v
    return c
  return config


def _tiny_dp_budget() -> ml_collections.ConfigDict:
  # DP-FedAvg with noise from the seed (reproducible), adaptive clipping, and a budget with
  # room for one round of three: the run stops early for the budget.
  c = repo_config("tiny").get_config("bias,rounds=3")
  c.privacy.mechanism = "dp_fedavg"
  c.privacy.noise_multiplier = 0.1
  c.privacy.clip_norm = 0.5
  c.privacy.delta = 1e-3
  c.privacy.adaptive_clip = True
  c.privacy.reproducible_noise = True
  c.privacy.max_epsilon = (dp_fedavg_epsilon(2, 4, 0.1, 1, 1e-3)
                           + dp_fedavg_epsilon(2, 4, 0.1, 2, 1e-3)) / 2
  return c


# name -> (config, the successive calls of `run` in one workdir: their keyword arguments).
CASES: dict[str, tuple[Callable[[], ml_collections.ConfigDict], list[dict]]] = {
    "quickstart_bias": (_quickstart_bias, [{}]),
    "tiny_head_cached": (_tiny_head_cached, [{}]),
    "tiny_fedbabu": (_tiny_personal("fedbabu"), [{}]),
    # Killed after round 1, resumed to the end, then started once more (already finished).
    "tiny_fedrep_resumed": (_tiny_personal("fedrep", personal_epochs=2),
                            [{"stop_after_round": 1}, {}, {}]),
    "tiny_dp_budget": (_tiny_dp_budget, [{}]),
}


def _drop(row: dict, fields: tuple[str, ...]) -> dict:
  return {k: v for k, v in row.items() if k not in fields}


def run_outputs(config: ml_collections.ConfigDict, workdir: str, calls: list[dict]
                ) -> dict[str, str]:
  """The run's outputs as the golden files hold them: the file name -> its text."""
  printed = io.StringIO()
  for kwargs in calls:
    with contextlib.redirect_stdout(printed):
      run(config, workdir, progress=False, **kwargs)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  out = {
      "metrics.jsonl": "".join(json.dumps(_drop(r, TIME_FIELDS)) + "\n" for r in rows),
      "summary.json": json.dumps(_drop(summary, SUMMARY_TIME_FIELDS), indent=2) + "\n",
      "stdout.txt": printed.getvalue().replace(workdir, "<WORKDIR>"),
      "files.txt": "".join(f"{name}\n" for name in sorted(os.listdir(workdir))),
  }
  for name in ("config.json", "partition.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        out[name] = f.read()
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_run_outputs_match_the_golden_files(tmp_path, name):
  config, calls = CASES[name]
  got = run_outputs(config(), str(tmp_path / "run"), calls)
  folder = os.path.join(GOLDEN, name)
  if WRITE:
    os.makedirs(folder, exist_ok=True)
    for file, text in got.items():
      with open(os.path.join(folder, file), "w") as f:
        f.write(text)
  want = {}
  for file in sorted(os.listdir(folder)):
    with open(os.path.join(folder, file)) as f:
      want[file] = f.read()
  assert sorted(got) == sorted(want)
  for file in want:
    assert got[file] == want[file], file
