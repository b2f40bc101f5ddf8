"""DP runs: the noise key comes from the OS, lives beside the checkpoints (never in them)
while the run lasts, and is erased with the per-client rows when it finishes.

Two runs of one DP config must differ (nobody holding config.json can regenerate the
noise), a run killed and resumed must equal its own uninterrupted self, and no round is
released twice.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedpeft_jax import rng as rng_lib
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import run
from fedpeft_jax.runner.validate import ConfigError
from tests.test_runner import _final_params

pytestmark = pytest.mark.slow  # the slow tier: DP runs end to end through the runner


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


class _Secrets:
  """Records every key `rng.secret_key_data` hands out (the attacker's target)."""

  def __init__(self, monkeypatch):
    self.drawn: list[np.ndarray] = []
    real = rng_lib.secret_key_data

    def draw():
      self.drawn.append(real())
      return self.drawn[-1].copy()

    monkeypatch.setattr(rng_lib, "secret_key_data", draw)


def _disk_bytes(workdir: str, since: float = 0.0) -> bytes:
  """Every file under `workdir` (modified at or after `since`), joined."""
  chunks = []
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getmtime(path) >= since:
        with open(path, "rb") as f:
          chunks.append(f.read())
  return b"\n".join(chunks)


def _modes(path: str) -> set[int]:
  modes = set()
  for root, dirs, names in os.walk(path):
    modes.add(stat.S_IMODE(os.stat(root).st_mode) | 0o1000)  # folders tagged apart
    modes |= {stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) for n in names}
  return modes


def test_two_dp_runs_differ_and_leave_no_key_on_disk(tmp_path, monkeypatch):
  secrets = _Secrets(monkeypatch)
  config = _dp_config()
  start = time.time() - 1.0  # file times may be coarser than the clock
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  run(config, a, progress=False)
  run(config, b, progress=False)
  sa, sb = _final_params(a), _final_params(b)
  assert len(secrets.drawn) == 2 and not np.array_equal(*secrets.drawn)
  assert secrets.drawn[0].dtype == np.uint32 and secrets.drawn[0].shape == (4,)  # 128 bits
  assert any(not np.array_equal(sa[k], sb[k]) for k in sa if k.startswith("trainable"))
  for words, workdir, final in ((secrets.drawn[0], a, sa), (secrets.drawn[1], b, sb)):
    # The attack of the audit: regenerate the noise from the key on disk. No file under the
    # workdir holds the key, either half of it, its words or the sampling seed made of it;
    # the checkpoints' dp_rng is zeros and the secret file is gone.
    raw, text = _disk_bytes(workdir), _published(workdir)
    key = words.astype("<u4").tobytes()
    assert key[:8] not in raw and key[8:] not in raw
    # Nor the entries these runs wrote to the compilation cache the suite shares
    # (tests/conftest.py): a key closed over as a constant of a jitted function would be
    # written there, outside any workdir.
    cache = _disk_bytes(os.environ["JAX_COMPILATION_CACHE_DIR"], since=start)
    assert key[:8] not in cache and key[8:] not in cache
    assert str(rng_lib.key_seed(words)) not in text
    assert all(str(int(w)) not in text for w in words if int(w) > 10 ** 6)
    assert not final["dp_rng"].any()
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "dp_secret"))
    # Private from the start: 0700 folders, 0600 files.
    assert _modes(os.path.join(workdir, "checkpoints")) == {0o1700, 0o600}

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
  secret = np.asarray([31337, 4242, 7, 99], np.uint32)
  monkeypatch.setattr(rng_lib, "secret_key_data", lambda: secret.copy())
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  run(config, whole, progress=False)
  run(config, killed, progress=False, stop_after_round=1)
  with open(os.path.join(killed, "checkpoints", "dp_secret"), "rb") as f:
    assert np.array_equal(np.frombuffer(f.read(), "<u4"), secret)  # kept while the run lasts
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
  assert not sa["dp_rng"].any()  # derivable from the seed, and still never checkpointed
  for k in sa:
    assert np.array_equal(sa[k], sb[k]), k
  with open(os.path.join(a, "summary.json")) as f:
    summary = json.load(f)
  assert summary["formal_guarantee"] is False


def _residual_config():
  config = _dp_config(rounds=2)
  config.federated.compression = "topk"  # error feedback: per-client residual rows
  config.federated.compression_fraction = 0.25
  # Every client reports every round, so residual rows are written for sure (Poisson at
  # q = 2/4 leaves a round without clients once in 16 runs, and the secret key is fresh).
  config.federated.clients_per_round = config.federated.num_clients
  return config


def test_a_finished_dp_run_keeps_no_client_rows(tmp_path):
  # Mid-run (stopped after round 1) the checkpoint holds real residual rows and the secret;
  # once the run finishes, every kept step's rows are zeros, the secret file is gone, and
  # the released model (trainable leaves) is what it was.
  config = _residual_config()
  config.keep_checkpoints = 3
  workdir = str(tmp_path / "w")
  run(config, workdir, progress=False, stop_after_round=1)
  mid = _final_params(workdir)
  residuals = [k for k in mid if k.startswith("clients/residual")]
  assert residuals and any(np.abs(mid[k]).sum() > 0 for k in residuals)
  run(config, workdir, progress=False)
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert steps == [0, 1, 2] and sorted(os.listdir(ckpts)) == ["0", "1", "2"]
  for step in steps:
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(step), "state"))
    assert not np.asarray(state["dp_rng"]).any()
    for leaf in jax.tree_util.tree_leaves(state["clients"]):
      assert not np.asarray(leaf).any(), step
  final = _final_params(workdir)
  assert any(np.abs(final[k]).sum() > 0 for k in final if k.startswith("trainable"))
  assert _modes(ckpts) == {0o1700, 0o600}


def test_no_dp_round_is_released_twice_after_losing_the_checkpoints(tmp_path, capsys):
  # Rows released, checkpoints gone: a fresh start would release them again with new noise.
  config = _dp_config(rounds=3)
  workdir = str(tmp_path / "w")
  run(config, workdir, progress=False, stop_after_round=2)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with pytest.raises(ConfigError, match=r"--workdir .*: metrics.jsonl holds 2 released rounds "
                     r"but no checkpoint can be restored; restore .*checkpoints or use a new "
                     r"--workdir"):
    run(config, workdir, progress=False)
  # The secret file alone lost: resuming under a new key is refused too.
  other = str(tmp_path / "o")
  run(config, other, progress=False, stop_after_round=1)
  os.unlink(os.path.join(other, "checkpoints", "dp_secret"))
  with pytest.raises(ConfigError, match="checkpoints hold no DP key"):
    run(config, other, progress=False)
  # Without DP: a warning, and the run starts afresh.
  plain = _dp_config(rounds=2)
  plain.privacy.mechanism = "none"
  free = str(tmp_path / "free")
  run(plain, free, progress=False, stop_after_round=1)
  shutil.rmtree(os.path.join(free, "checkpoints"))
  capsys.readouterr()
  run(plain, free, progress=False)
  assert "Warning: --workdir" in capsys.readouterr().out
  assert [r["round"] for r in map(json.loads, open(os.path.join(free, "metrics.jsonl")))] == [1, 2]


def test_dp_fedavg_with_compressed_uploads_keeps_epsilon_and_counts_bytes(tmp_path):
  # Compression is post-processing of what the server clips: epsilon is the uncompressed
  # run's; the bytes per upload are counted by hand (int8: one byte per value plus a float32
  # scale per tensor; top-k: k = ceil(0.25 n) float32 values and int32 indices per tensor).
  summaries, rows = {}, {}
  for method in ("none", "int8", "topk"):
    config = _dp_config(rounds=2)
    config.federated.compression = method
    config.federated.compression_fraction = 0.25
    config.privacy.log_non_private_metrics = True
    workdir = str(tmp_path / method)
    summaries[method] = run(config, workdir, progress=False)
    rows[method] = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert summaries["int8"]["epsilon"] == summaries["topk"]["epsilon"] == summaries["none"][
      "epsilon"]
  sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(
      {k: v for k, v in _final_params(str(tmp_path / "none")).items()
       if k.startswith("trainable/")})]
  per_upload = {"none": 4 * sum(sizes), "int8": sum(sizes) + 4 * len(sizes),
                "topk": sum(8 * -(-n // 4) for n in sizes)}
  for method, got in rows.items():
    for row in got:
      if row["clients_reporting"]:
        assert row["bytes_up"] == per_upload[method] * row["clients_reporting"], method


def test_a_seal_killed_mid_way_is_completed_by_the_next_start(tmp_path):
  # As if killed between the seal's two renames of the last step: the step sits under
  # .retired-2, the swapped copy in .sealing, no summary yet. The next start puts the step
  # back, finds no round left, seals and finishes; nothing but the steps (no hidden folder) stays.
  config = _residual_config()
  workdir = str(tmp_path / "w")
  run(config, workdir, progress=False, stop_after_round=1)
  run(config, workdir, progress=False)
  ckpts = os.path.join(workdir, "checkpoints")
  os.replace(os.path.join(ckpts, "2"), os.path.join(ckpts, ".retired-2"))
  os.makedirs(os.path.join(ckpts, ".sealing", "2"))
  os.unlink(os.path.join(workdir, "summary.json"))
  summary = run(config, workdir, progress=False)
  assert summary["rounds"] == 2
  assert "2" in os.listdir(ckpts) and not [n for n in os.listdir(ckpts) if n.startswith(".")]
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpts, "2", "state"))
  for leaf in jax.tree_util.tree_leaves(state["clients"]):
    assert not np.asarray(leaf).any()


def test_checkpoints_of_an_older_state_are_one_config_error(tmp_path):
  # A step whose dp_rng has the old 2 words (threefry's 64-bit key) does not restore into
  # today's 4-word state: one ConfigError naming the workdir, not an orbax traceback.
  config = _dp_config(rounds=2)
  config.privacy.mechanism = "none"
  workdir = str(tmp_path / "w")
  run(config, workdir, progress=False, stop_after_round=1)
  ckpts = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(step), "state"))
  state["dp_rng"] = np.zeros(2, np.uint32)
  shutil.rmtree(os.path.join(ckpts, str(step), "state"))
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.join(ckpts, str(step), "state"), state)
  with pytest.raises(ConfigError, match=r"its checkpoints do not fit this run's server state"):
    run(config, workdir, progress=False)
