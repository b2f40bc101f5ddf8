"""Asynchronous checkpoints: saves run in orbax's background thread, yet a run killed while a
save is in flight resumes from the last complete checkpoint and ends exactly as an
uninterrupted one.

The in-flight state is forced, not raced for: orbax's `AsyncOptions.post_finalization_callback`
runs in the background thread after a checkpoint's files are written and before it is renamed
into place, and the tests block it there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import orbax.checkpoint as ocp

from fedpeft_jax.federated.state import ServerState
from fedpeft_jax.runner.checkpointing import RunCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a step still being written
CONFIG = "configs/tiny.py:bias,rounds=4"

# The CLI, with every RunCheckpointer holding its second save (step 2) in flight forever:
# the files are written, the rename that commits them never happens.
HELD_CLI = textwrap.dedent("""
    import os, runpy, sys, time
    sys.path.insert(0, {root!r})
    from fedpeft_jax.runner import checkpointing, loop

    class Held(checkpointing.RunCheckpointer):
      def __init__(self, directory, keep=3, **kwargs):
        calls = []
        def hook():
          calls.append(1)
          if len(calls) == 2:
            open({marker!r}, "w").close()
            time.sleep(3600)
        super().__init__(directory, keep, post_finalization_callback=hook, **kwargs)

    checkpointing.RunCheckpointer = loop.RunCheckpointer = Held
    sys.argv = ["fedpeft_jax.main", *{args!r}]
    runpy.run_module("fedpeft_jax.main", run_name="__main__")
""")


def _env() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _args(workdir: str) -> list[str]:
  return [f"--config={CONFIG}", f"--workdir={workdir}", "--no_progress"]


def _cli(workdir: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "fedpeft_jax.main", *_args(workdir)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in f if line.strip()]


def _final_params(workdir: str) -> dict:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), "state"))
  return {jax.tree_util.keystr(path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(state)}


def _state(value: float) -> ServerState:
  return ServerState(trainable={"w": jnp.full((4, 3), value, jnp.float32),
                                "b": jnp.arange(3, dtype=jnp.float32) + value},
                     opt_state=(jnp.full((4, 3), -value, jnp.float32),),
                     round=jnp.int32(value), rng=jnp.array([7, int(value)], jnp.uint32),
                     dp_rng=jnp.array([9, int(value)], jnp.uint32),
                     clip_norm=jnp.float32(1.0))


def _assert_state(state: ServerState, value: float) -> None:
  want = _state(value)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Gate:
  """post_finalization_callback that holds the n-th save in flight until released."""

  def __init__(self, hold: int):
    self.calls, self.hold = 0, hold
    self.entered, self.release = threading.Event(), threading.Event()

  def __call__(self) -> None:
    self.calls += 1
    if self.calls == self.hold:
      self.entered.set()
      assert self.release.wait(60)


def test_save_returns_before_commit_and_snapshots_donated_state(tmp_path):
  d = str(tmp_path / "ckpt")
  gate = _Gate(hold=2)
  ckpt = RunCheckpointer(d, keep=5, post_finalization_callback=gate)
  ckpt.save(1, _state(1.0), {"cumulative": {"bytes": 1}})
  state, meta = _state(2.0), {"cumulative": {"bytes": 2}}
  ckpt.save(2, state, meta)
  # save returned while step 2 is still uncommitted; its buffers are donated and the meta
  # mutated, as the round loop does, before the background write finishes.
  assert gate.entered.wait(60)
  assert sorted(os.listdir(d)) == ["1", "2" + TMP]
  bump = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 3 + 1, s), donate_argnums=0)
  state = bump(state)
  meta["cumulative"]["bytes"] = 99
  assert ckpt.latest_step() == 2  # counts the save in flight (train.py relies on this)
  gate.release.set()
  ckpt.wait()
  assert sorted(os.listdir(d)) == ["1", "2"]
  restored, got = ckpt.restore_latest(_state(0.0))
  _assert_state(restored, 2.0)
  assert got == {"cumulative": {"bytes": 2}}
  ckpt.close()


def test_restore_ignores_an_uncommitted_step_and_the_next_save_replaces_it(tmp_path):
  d = str(tmp_path / "ckpt")
  ckpt = RunCheckpointer(d, keep=5)
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.save(2, _state(2.0), {"step": 2})
  ckpt.close()
  # What a kill mid-save leaves: step 2 only under orbax's temporary name, half written.
  os.rename(os.path.join(d, "2"), os.path.join(d, "2" + TMP))
  for root, _, files in os.walk(os.path.join(d, "2" + TMP)):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  ckpt = RunCheckpointer(d, keep=5)
  assert ckpt.latest_step() == 1
  restored, meta = ckpt.restore_latest(_state(0.0))
  _assert_state(restored, 1.0)
  assert meta == {"step": 1}
  # The next run saves step 2 again over the debris.
  ckpt.save(2, _state(5.0), {"step": 2})
  ckpt.close()
  assert sorted(os.listdir(d)) == ["1", "2"]
  restored, meta = RunCheckpointer(d).restore_latest(_state(0.0))
  _assert_state(restored, 5.0)
  assert meta == {"step": 2}


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_exactly(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  marker = str(tmp_path / "save_2_in_flight")
  script = HELD_CLI.format(root=ROOT, marker=marker, args=_args(killed))
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpt_dir = os.path.join(killed, "checkpoints")
  try:
    reference = _cli(full)  # the uninterrupted run, meanwhile
    assert reference.returncode == 0, reference.stderr[-3000:]
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert os.path.exists(marker), f"step 2 never went in flight (exit {proc.poll()})"
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2" + TMP]  # step 2 in flight
  finally:
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2" + TMP]
  assert not os.path.exists(os.path.join(killed, "summary.json"))
  assert 2 <= len(_rows(killed)) < 4  # round 3 may have run while step 2 was being saved

  resumed = _cli(killed)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from round 1" in resumed.stdout
  assert not any(TMP in name for name in os.listdir(ckpt_dir))
  assert _rows(killed) == _rows(full)
  a, b = _final_params(full), _final_params(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
