"""The device mesh of a run, and global arrays placed on it (single- and multi-process).

Every jitted piece of a round (training, evaluation) shards its clients or examples over
the one mesh axis `AXIS`; the frozen backbone, client data and server state are
replicated on it.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AXIS = "clients"


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (AXIS,))


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from identical host values (works single- and multi-process)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Place a pytree (frozen backbone, client data) replicated on every device of `mesh`."""
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: to_global(np.asarray(x), sharding), tree)


def split_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """`x` split along its first axis over `mesh`'s devices (its length must divide evenly)."""
  return to_global(np.asarray(x), NamedSharding(mesh, P(AXIS)))


def host_value(x: Any) -> np.ndarray:
  """A replicated array's value on the host (also from a multi-process global array,
  whose every addressable shard holds all of it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)
