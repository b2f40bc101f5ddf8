"""Per-client rows (personal heads, top-k residuals) split over the mesh's devices by client id.

A cross-device population (10^4-10^5 clients) keeps one row per client. Replicated, every
device would hold all of them; here client c's row lives only on device
c // rows_per_device (contiguous blocks). The table is padded to devices x rows_per_device
rows, the padding rows last (`init` fills them with the initial row, `place` with zeros);
no real client ever reads or writes them.

Why on the devices rather than on the host: the round stays one jitted program with no
host round trip. Kept on the host, the round's rows would have to be read back after each
round before the next round's could be gathered, a device-to-host sync per round that the
runner's deferred metrics otherwise avoid. Here a round moves each of its rows twice between
devices (a reduce-scatter in, an all-gather out) and holds, beside its block, only the rows
of its own slots.

Inside the round (`shard_map` over `AXIS`, each device holding its block):
  * `gather`: every device serves the rows it owns for every slot of the round (zeros for
    the rest) and a reduce-scatter hands each device the rows of its own slots;
  * `scatter`: the new rows of every slot are all-gathered and each device writes the ones
    it owns.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedpeft_jax.mesh import AXIS, to_global

PyTree = Any


def rows_per_device(num_clients: int, num_devices: int) -> int:
  """Rows of the table each device holds (the population over the devices, rounded up)."""
  return -(-num_clients // num_devices)


def padded_rows(num_clients: int, num_devices: int) -> int:
  """Rows of the table over all devices: `num_clients` plus the padding rows."""
  return rows_per_device(num_clients, num_devices) * num_devices


def pad(tree: PyTree, num_rows: int, xp: Any = np) -> PyTree:
  """`tree`'s rows extended with zero rows to `num_rows` (padding rows are never a client's,
  so they copy nobody's data)."""
  def one(x):
    extra = num_rows - x.shape[0]
    if extra < 0:
      raise ValueError(f"{x.shape[0]} client rows do not fit a table of {num_rows}")
    return x if extra == 0 else xp.concatenate([x, xp.zeros((extra,) + x.shape[1:], x.dtype)])
  return jax.tree_util.tree_map(one, tree)


def sharding(mesh: Mesh) -> NamedSharding:
  """The table's placement: rows split over `mesh`'s devices."""
  return NamedSharding(mesh, P(AXIS))


def place(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host rows (leaves [num_clients, ...]; views are copied once where padding is needed)
  padded with zero rows and split over `mesh`'s devices. Each leaf is padded for its own
  population, so tables of different sizes may share the tree."""
  devices, split = mesh.devices.size, sharding(mesh)

  def one(x):
    x = np.asarray(x)
    return to_global(pad(x, padded_rows(x.shape[0], devices)), split)
  return jax.tree_util.tree_map(one, tree)


def bytes_per_device(tree: PyTree) -> int:
  """Bytes of a placed table (arrays, or ShapeDtypeStructs with shardings) on one device."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def gather(block: PyTree, slot_ids: jax.Array) -> PyTree:
  """Inside `shard_map` over `AXIS`: this device's slots' rows, [slots_per_device, ...].

  `block` is this device's rows of the table(s); `slot_ids` the client ids of every slot of
  the round, [devices * slots_per_device] with device d's slots at d's position (the
  all-gathered layout). Each device contributes the rows it owns and zeros elsewhere, and
  the reduce-scatter sums them, exactly (one nonzero term per slot). Each leaf's block size
  is its own (tables of different populations may share the tree)."""
  me = jax.lax.axis_index(AXIS)

  def one(x):
    per = x.shape[0]
    local = slot_ids - me * per
    mine = (local >= 0) & (local < per)
    owned = jnp.where(mine.reshape((-1,) + (1,) * (x.ndim - 1)), x[jnp.clip(local, 0, per - 1)],
                      jnp.zeros((), x.dtype))
    summed = owned.astype(jnp.int32) if x.dtype == jnp.bool_ else owned
    out = jax.lax.psum_scatter(summed, AXIS, scatter_dimension=0, tiled=True)
    return out.astype(x.dtype)
  return jax.tree_util.tree_map(one, block)


def scatter(block: PyTree, slot_ids: jax.Array, write: jax.Array, rows: PyTree) -> PyTree:
  """Inside `shard_map` over `AXIS`: `block` with the rows this device owns among `rows`.

  `slot_ids`, `write` ([devices * slots_per_device], every device's slots) and `rows`
  (leaves [devices * slots_per_device, ...]) are the round's, all-gathered; a slot whose
  `write` is False (padding, a non-finite update) writes nothing."""
  me = jax.lax.axis_index(AXIS)

  def one(old, new):
    per = old.shape[0]
    local = slot_ids - me * per
    target = jnp.where(write & (local >= 0) & (local < per), local, per)  # per: dropped
    return old.at[target].set(new, mode="drop")
  return jax.tree_util.tree_map(one, block, rows)
