"""A DP run killed hard (SIGKILL, no clean-up) at random points of its first rounds, then
resumed, releases every round once: each round's row is the same in every copy of
metrics.jsonl it ever appeared in (the same noise), the key is never redrawn once a row is
out, and the final epsilon is dp-accounting's for the rounds released."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import dp_accounting
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the slow tier: SIGKILL of DP runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS, CLIENTS, PER_ROUND, Z, DELTA = 8, 4, 2, 0.8, 1e-3
ARGS = [f"--config=configs/tiny.py:bias,rounds={ROUNDS}", "--no_progress",
        "--config.privacy.mechanism=dp_fedavg", f"--config.privacy.noise_multiplier={Z}",
        "--config.privacy.clip_norm=0.5", f"--config.privacy.delta={DELTA}",
        "--config.privacy.sampling=poisson", "--config.checkpoint_every=0"]


def _start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "fedpeft_jax.main", f"--workdir={workdir}",
                           *ARGS], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(workdir: str) -> dict[int, dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = {}
  with open(path) as f:
    lines = f.readlines()
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a row torn by the kill is not released
      continue
    rows[row["round"]] = row
  return rows


def _secret(workdir: str) -> bytes | None:
  path = os.path.join(workdir, "checkpoints", "dp_secret")
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return f.read()


def test_sigkill_at_random_points_never_releases_a_round_twice(tmp_path):
  workdir = str(tmp_path / "run")
  seen: dict[int, list[dict]] = {}
  key_when_released = None
  random = np.random.default_rng(2026)
  # The first try is killed at a random time of its start-up or round 0; each later one at a
  # random time after its first row is out (the rounds take a fraction of a second here).
  kills = 0
  for attempt in range(4):
    proc = _start(workdir)
    if attempt == 0:
      deadline = time.time() + float(random.uniform(2.0, 8.0))
    else:
      started = time.time()
      while proc.poll() is None and not (
          os.path.exists(os.path.join(workdir, "metrics.jsonl"))
          and os.path.getmtime(os.path.join(workdir, "metrics.jsonl")) > started
          and _rows(workdir)):
        time.sleep(0.01)
      deadline = time.time() + float(random.uniform(0.0, 0.4))
    while time.time() < deadline and proc.poll() is None:
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait(timeout=120)
    for r, row in _rows(workdir).items():
      seen.setdefault(r, []).append(row)
    if seen:
      key_now = _secret(workdir)
      if key_when_released is None:
        key_when_released = key_now
      # Once a row is out, the key stays (until the finished run erases it).
      assert key_now in (key_when_released, None)
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert kills >= 3, "the run finished before it could be killed: lengthen it"
  assert sum(len(c) for c in seen.values()) >= 3  # rows were out when killed
  final = _rows(workdir)
  assert sorted(final) == list(range(1, ROUNDS + 1))
  for r, copies in seen.items():
    for row in copies:
      assert row == final[r], (r, row, final[r])  # one release per round
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(PER_ROUND / CLIENTS, dp_accounting.GaussianDpEvent(Z)),
      ROUNDS))
  assert summary["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
