"""Resumable runs: the server state (never the frozen backbone) in an orbax CheckpointManager.

Saves are asynchronous: `save` snapshots the state into host memory and returns, and orbax
writes it from a background thread (`CheckpointManagerOptions(enable_async_checkpointing=
True)`), so a round never waits on disk. Each step is written into
`<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every file is on disk, so
`restore_latest` (and orbax's `latest_step`) only ever see complete checkpoints: a run killed
mid-save resumes from the previous one. A crashed run's leftover temporary directory is
removed when the next run opens the checkpoints (`cleanup_tmp_directories=True`), and orbax
removes a stale one again before it writes that step.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedpeft_jax.federated.state import ServerState


def _host_snapshot(state: ServerState) -> ServerState:
  """A host copy of `state` that shares no memory with its device buffers.

  `np.array(..., copy=True)` rather than relying on orbax's device-to-host copy: on the CPU
  backend `device_get` may hand back a zero-copy view of the device buffer, which the next
  jitted round may donate and overwrite while the background thread is still writing. The
  PEFT server state is small (trainable leaves and optimizer moments), so the copy is cheap.
  """
  return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(state))


class RunCheckpointer:
  """Saves ServerState plus JSON metadata (cumulative counters, privacy ledger) per round.

  `save` returns as soon as the state is copied to host memory; the caller may then donate
  or overwrite the state's buffers and mutate `meta`. The write finishes in the background;
  `wait` blocks until the last save is committed, `close` waits and closes. A new `save`
  first waits for the previous one (orbax keeps at most one save in flight).

  `post_finalization_callback` (orbax `AsyncOptions`) runs in the background thread after a
  checkpoint's files are written and before it is committed (renamed into place); tests
  use it to hold a save in flight.
  """

  def __init__(self, directory: str, keep: int = 3, *,
               post_finalization_callback: Optional[Callable[[], None]] = None):
    self._dir = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=post_finalization_callback))
    self._manager = ocp.CheckpointManager(self._dir, options=options)

  @property
  def directory(self) -> str:
    return self._dir

  def save(self, step: int, state: ServerState, meta: dict) -> None:
    """Starts saving `step`; returns once `state` and `meta` are snapshotted on the host."""
    state = _host_snapshot(state)
    meta = json.loads(json.dumps(meta))  # the caller keeps mutating its counters
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Blocks until the last save is committed (re-raises a background write's error)."""
    self._manager.wait_until_finished()

  wait_until_finished = wait

  def latest_step(self) -> Optional[int]:
    """The newest step saved, counting one still being written by this process."""
    return self._manager.latest_step()

  def restore_latest(self, template: ServerState) -> Optional[tuple[ServerState, dict]]:
    """(state, meta) of the newest complete checkpoint, or None for a fresh run."""
    self.wait()
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def close(self) -> None:
    """Waits for the last save to commit, then closes the manager."""
    self._manager.close()
