"""DP runs: the noise key comes from the OS and lives only in the checkpointed state.

Two runs of one DP config must differ (nobody holding config.json can regenerate the
noise), while a run killed and resumed must equal its own uninterrupted self.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedpeft_jax import rng as rng_lib
from fedpeft_jax.runner.config_files import repo_config
from fedpeft_jax.runner.train import run
from tests.test_runner import _final_params


def _dp_config(rounds: int = 2):
  c = repo_config("tiny").get_config(f"bias,rounds={rounds}")
  c.privacy.mechanism = "dp_fedavg"
  c.privacy.noise_multiplier = 0.5
  c.privacy.clip_norm = 0.5
  c.privacy.delta = 1e-3
  c.privacy.sampling = "poisson"  # clients drawn from the secret stream
  c.checkpoint_every = 1
  return c


def _published(workdir: str) -> str:
  text = ""
  for name in ("config.json", "summary.json", "metrics.jsonl"):
    with open(os.path.join(workdir, name)) as f:
      text += f.read()
  return text


def test_two_dp_runs_differ_and_publish_neither_key_nor_non_private_fields(tmp_path):
  config = _dp_config()
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  run(config, a, progress=False)
  run(config, b, progress=False)
  sa, sb = _final_params(a), _final_params(b)
  assert not np.array_equal(sa["dp_rng"], sb["dp_rng"])
  assert any(not np.array_equal(sa[k], sb[k]) for k in sa if k.startswith("trainable"))
  # The secret is in no published file (as decimal words or as the sampling seed).
  for words, workdir in ((sa["dp_rng"], a), (sb["dp_rng"], b)):
    text = _published(workdir)
    assert str(rng_lib.key_seed(words)) not in text
    assert all(str(int(w)) not in text for w in words if int(w) > 10 ** 6)

  # What epsilon does not cover is not written (privacy.log_non_private_metrics defaults to
  # False under DP): DP-FedAvg hides who took part, so counts and bytes go too.
  rows = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))]
  with open(os.path.join(a, "summary.json")) as f:
    summary = json.load(f)
  hidden = {"train_loss", "clients_sampled", "clients_reporting", "clients_contributed",
            "bytes_up", "cumulative_bytes", "local_steps"}
  assert hidden <= set(summary["non_private"])
  assert all(not hidden & set(r) for r in rows) and "test_accuracy" in rows[-1]
  assert "total_bytes" not in summary and "partition" not in summary
  assert not os.path.exists(os.path.join(a, "partition.json"))
  assert summary["epsilon"] > 0 and summary["formal_guarantee"] is True


def test_killed_and_resumed_dp_run_equals_itself(tmp_path, monkeypatch):
  """The secret comes back from the checkpoint, even for a run killed before its first
  periodic checkpoint: round 0's checkpoint holds the key, so the restart replays the rows
  it had written (released under that key) instead of drawing new noise."""
  config = _dp_config(rounds=2)
  config.checkpoint_every = 5  # no periodic checkpoint before the end
  secret = np.asarray([31337, 4242], np.uint32)
  monkeypatch.setattr(rng_lib, "secret_key_data", lambda: secret.copy())
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  run(config, whole, progress=False)
  run(config, killed, progress=False, stop_after_round=1)
  monkeypatch.setattr(rng_lib, "secret_key_data", lambda: pytest.fail("restart drew a new key"))
  run(config, killed, progress=False)
  sw, sk = _final_params(whole), _final_params(killed)
  for k in sw:
    assert np.array_equal(sw[k], sk[k]), k
  rows = [[json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))] for w in (whole, killed)]
  assert rows[0] == rows[1] and len(rows[0]) == 2


def test_reproducible_noise_derives_the_key_from_the_seed(tmp_path):
  config = _dp_config(rounds=1)
  config.privacy.reproducible_noise = True
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  run(config, a, progress=False)
  run(config, b, progress=False)
  sa, sb = _final_params(a), _final_params(b)
  assert np.array_equal(sa["dp_rng"], rng_lib.stream_key_data(config.seed, "dp"))
  for k in sa:
    assert np.array_equal(sa[k], sb[k]), k
  with open(os.path.join(a, "summary.json")) as f:
    summary = json.load(f)
  assert summary["formal_guarantee"] is False
