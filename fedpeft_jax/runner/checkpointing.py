"""Resumable runs: the server state (never the frozen backbone) in an orbax CheckpointManager.

Saves are asynchronous: `save` snapshots the state into host memory and returns, and orbax
writes it from a background thread (`CheckpointManagerOptions(enable_async_checkpointing=
True)`), so a round never waits on disk. Each step is written into
`<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every file is on disk, so
`restore_latest` (and orbax's `latest_step`) only ever see complete checkpoints: a run killed
mid-save resumes from the previous one. A crashed run's leftover temporary directory is
removed when the next run opens the checkpoints (`cleanup_tmp_directories=True`), and orbax
removes a stale one again before it writes that step.

Under a privacy mechanism (`private=True`) the checkpoints are as secret as the training
data, and less is kept in them:
  * the folder is 0700 from its creation and every file in it 0600 once committed;
  * the dp stream's key never enters a checkpoint (its `dp_rng` is saved as zeros); the
    runner keeps it in `SECRET_FILE` (0600), written before anything is released;
  * when the run finishes, `seal` zeroes the per-client rows of every kept checkpoint
    (top-k residuals, personal heads: un-noised client data, not part of the released
    model), re-saves each step whole before swapping it in, and scrubs the secret file and
    the old files. What stays is the released model and the server's optimizer state.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fedpeft_jax import files
from fedpeft_jax.mesh import to_global
from fedpeft_jax.federated.state import ServerState

SECRET_FILE = "dp_secret"  # the dp stream's raw key (uint32 little-endian), beside the steps
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_SEALING = ".sealing"  # where `seal` writes the cleaned steps before swapping them in


_fresh_copy = jax.jit(lambda x: x + jnp.zeros((), x.dtype))


def _host_snapshot(state: ServerState) -> ServerState:
  """A copy of `state` that shares no memory with its device buffers.

  `np.array(..., copy=True)` rather than relying on orbax's device-to-host copy: on the CPU
  backend `device_get` may hand back a zero-copy view of the device buffer, which the next
  jitted round may donate and overwrite while the background thread is still writing. The
  PEFT server state is small (trainable leaves and optimizer moments), so the copy is cheap.
  An array split over several processes (the per-client rows, `client_rows`) has no host
  value on any one process: it is copied into fresh device buffers, which orbax writes
  shard by shard.
  """
  def copy(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return _fresh_copy(x)
    return np.array(jax.device_get(x), copy=True)
  return jax.tree_util.tree_map(copy, state)


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

  def __init__(self, directory: str, keep: int = 3, *, private: bool = False,
               post_finalization_callback: Optional[Callable[[], None]] = None):
    self._dir = os.path.abspath(directory)
    self._private = private
    if private and jax.process_index() == 0:  # 0700 before orbax writes the first file
      os.makedirs(self._dir, mode=PRIVATE_DIR_MODE, exist_ok=True)
      os.chmod(self._dir, PRIVATE_DIR_MODE)
      _finish_interrupted_seal(self._dir)
    _sync_processes("private checkpoints")
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=post_finalization_callback))
    self._manager = ocp.CheckpointManager(self._dir, options=self._options,
                                         item_handlers=_handlers())

  @property
  def directory(self) -> str:
    return self._dir

  def save(self, step: int, state: ServerState, meta: dict) -> None:
    """Starts saving `step`; returns once `state` and `meta` are snapshotted on the host."""
    if self._private:
      self.wait()  # the previous step is committed: restrict its files now
      state = state.replace(dp_rng=np.zeros(np.shape(state.dp_rng), np.uint32))
    state = _host_snapshot(state)
    meta = json.loads(json.dumps(meta))  # the caller keeps mutating its counters
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Blocks until the last save is committed (re-raises a background write's error)."""
    self._manager.wait_until_finished()
    if self._private and jax.process_index() == 0:
      _restrict(self._dir)

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
    return self._restore(step, template)

  def close(self) -> None:
    """Waits for the last save to commit, then closes the manager."""
    self._manager.close()
    if self._private and jax.process_index() == 0:
      _restrict(self._dir)

  # The dp stream's secret key, kept beside the checkpoints (never inside them).
  def write_secret(self, key_data: np.ndarray) -> None:
    """Stores the dp key (0600, atomic, fsynced): before the first release, so a run killed
    at any point resumes under the key its released rows were noised with."""
    files.atomic_write_bytes(os.path.join(self._dir, SECRET_FILE),
                             np.asarray(key_data, "<u4").tobytes(), mode=PRIVATE_FILE_MODE)

  def read_secret(self) -> Optional[np.ndarray]:
    """The stored dp key, or None (never written, or erased by `seal`)."""
    path = os.path.join(self._dir, SECRET_FILE)
    if not os.path.exists(path):
      return None
    with open(path, "rb") as f:
      return np.frombuffer(f.read(), "<u4").astype(np.uint32)

  def seal(self, template: ServerState) -> list[int]:
    """A finished run's erasure: every kept step's per-client rows zeroed, each step saved whole into a side folder and swapped in for the old one,
    whose files are then scrubbed, and the secret file scrubbed last. `template` gives the
    state's structure. Returns the steps sealed. Every process calls it (orbax's reads and
    writes are collective); process 0 moves and scrubs the files. Closes the checkpointer."""
    self._manager.close()  # waits for the last save; then a fresh view of what is on disk
    self._manager = ocp.CheckpointManager(self._dir, options=self._options,
                                         item_handlers=_handlers())
    steps = sorted(self._manager.all_steps())
    primary = jax.process_index() == 0
    side = ocp.CheckpointManager(
        os.path.join(self._dir, _SEALING),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    for step in steps:
      state, meta = self._restore(step, template)
      # (dp_rng is zeros already: `save` never writes the key.)
      clean = state.replace(clients=jax.tree_util.tree_map(_zeros_like_placed, state.clients))
      meta["sealed"] = True
      side.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_host_snapshot(clean)), meta=ocp.args.JsonSave(meta)))
      side.wait_until_finished()
      if primary:
        old = os.path.join(self._dir, str(step))
        retired = os.path.join(self._dir, f".retired-{step}")
        os.replace(old, retired)
        os.replace(os.path.join(self._dir, _SEALING, str(step)), old)
        files.scrub(retired)
      _sync_processes(f"seal {step}")
    side.close()
    self._manager.close()
    if primary:
      files.scrub(os.path.join(self._dir, _SEALING))
      secret = os.path.join(self._dir, SECRET_FILE)
      if os.path.exists(secret):
        files.scrub(secret)
      _restrict(self._dir)
    _sync_processes("sealed")
    return steps

  def _restore(self, step: int, template: ServerState) -> tuple[ServerState, dict]:
    """Step `step` placed like `template`. Per-client rows saved by a run on another number
    of devices (another padding, `client_rows`) are read whole and refitted: the rows both
    tables have are kept, the new table's padding rows are zeros."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    stored = self._manager.item_metadata(step)["state"].tree.get("clients")
    refit = stored is not None and template.clients is not None and any(
        tuple(s.shape) != tuple(t.shape) for s, t in zip(jax.tree_util.tree_leaves(stored),
                                                      jax.tree_util.tree_leaves(template.clients)))
    if refit:  # read to the host (not onto every device), then each device takes its block
      abstract = abstract.replace(clients=jax.tree_util.tree_map(
          lambda s, t: np.empty(tuple(s.shape), t.dtype), stored, template.clients,
          is_leaf=lambda x: hasattr(x, "shape")))
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = out["state"]
    if refit:
      def fit(saved, t):
        rows = np.zeros(t.shape, t.dtype)
        n = min(saved.shape[0], t.shape[0])
        rows[:n] = np.asarray(saved)[:n]
        return to_global(rows, t.sharding)
      state = state.replace(clients=jax.tree_util.tree_map(fit, state.clients,
                                                           template.clients))
    return state, dict(out["meta"])


def _zeros_like_placed(x: jax.Array) -> jax.Array:
  """Zeros with `x`'s shape and placement, made on the devices (a table split over them is
  never gathered whole onto one host)."""
  return jax.jit(jnp.zeros_like, out_shardings=x.sharding)(x)


def _handlers() -> dict:
  """The items of a step, so a fresh manager can read a step's metadata before restoring."""
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _finish_interrupted_seal(directory: str) -> None:
  """A seal killed mid-way: a step between its two renames is put back (`.retired-N` -> `N`;
  its client rows are then still there, and the next seal zeroes them), an already swapped
  one's retired copy is scrubbed, and the side folder is scrubbed."""
  for name in os.listdir(directory):
    if name.startswith(".retired-"):
      retired, step = os.path.join(directory, name), os.path.join(directory, name[9:])
      if os.path.exists(step):
        files.scrub(retired)
      else:
        os.replace(retired, step)
  if os.path.exists(os.path.join(directory, _SEALING)):
    files.scrub(os.path.join(directory, _SEALING))


def _restrict(directory: str) -> None:
  """Folders 0700 and files 0600 under `directory` (orbax writes under the umask; the 0700
  folder already keeps others out while it does). A file orbax removes meanwhile (an old
  step past `max_to_keep`) is skipped."""
  for root, dirs, names in os.walk(directory):
    for path, mode in [(root, PRIVATE_DIR_MODE)] + [
        (os.path.join(root, n), PRIVATE_FILE_MODE) for n in names]:
      try:
        os.chmod(path, mode)
      except FileNotFoundError:
        pass
