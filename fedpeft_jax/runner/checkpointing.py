"""Resumable runs: the server state (never the frozen backbone) in an orbax CheckpointManager.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from fedpeft_jax.federated.server import ServerState


class RunCheckpointer:
  """Saves ServerState plus JSON metadata (cumulative counters, privacy ledger) per round."""

  def __init__(self, directory: str, keep: int = 3):
    self._dir = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self._dir, options=options)

  def save(self, step: int, state: ServerState, meta: dict) -> None:
    state = jax.device_get(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, template: ServerState) -> Optional[tuple[ServerState, dict]]:
    """(state, meta) of the newest complete checkpoint, or None for a fresh run."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def close(self) -> None:
    self._manager.close()

