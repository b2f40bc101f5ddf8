"""Device-resident client data and the per-round batch schedules the jitted engine scans over.

Why: the federated engine runs a whole round (all sampled clients, all local steps) inside
one jit. The training set therefore lives on device once (uint8), each client is a padded row
of example indices, and a client's local batches are gathers driven by a schedule derived
from a JAX key: static shapes, real lengths carried as masks, no host-side Python loops.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["images", "labels", "indices", "sizes"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ClientData:
  """The training set on device plus each client's padded index row.

  images uint8 [N,H,W,C], labels int32 [N], indices int32 [num_clients, max_n] (row c holds
  client c's example indices in its first sizes[c] slots, then 0-padding), sizes int32
  [num_clients]. A pytree: pass it into jit/scan/vmap like any array.
  """
  images: jax.Array
  labels: jax.Array
  indices: jax.Array
  sizes: jax.Array

  @property
  def num_clients(self) -> int:
    return self.indices.shape[0]

  @property
  def max_n(self) -> int:
    return self.indices.shape[1]

  def batch(self, client: Any, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint8 images, int32 labels) at `positions` (any shape) of `client`'s row."""
    ex = self.indices[client][positions]
    return self.images[ex], self.labels[ex]


def client_data(dataset: Any, partition: Any, device: Optional[Any] = None) -> ClientData:
  """Put `dataset`'s training arrays and `partition`'s padded index matrix on `device`.

  `dataset` is a `Dataset` (or anything with train_images/train_labels); `partition` a
  `Partition` or a plain list of index arrays. Memory: the uint8 training set plus
  4 * num_clients * max_n bytes of indices.
  """
  parts = getattr(partition, "client_indices", partition)
  images, labels = np.asarray(dataset.train_images), np.asarray(dataset.train_labels)
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f"train_images {images.shape} / train_labels {labels.shape}: expected "
                     "[N,H,W,C] and [N]")
  if not len(parts):
    raise ValueError("partition has no clients")
  sizes = np.array([len(p) for p in parts], np.int32)
  max_n = max(int(sizes.max()), 1)
  indices = np.zeros((len(parts), max_n), np.int32)
  for c, p in enumerate(parts):
    p = np.asarray(p)
    if p.size and (p.min() < 0 or p.max() >= len(labels)):
      raise ValueError(f"partition client {c} indexes outside the {len(labels)} training "
                       "examples (was it built on another dataset or train_size?)")
    indices[c, :len(p)] = p
  put = functools.partial(jax.device_put, device=device)
  return ClientData(put(images.astype(np.uint8)), put(labels.astype(np.int32)), put(indices),
                    put(sizes))


def num_local_steps(size: Any, batch_size: int, local_epochs: int, max_steps: int = 0) -> Any:
  """Real local steps of a client with `size` examples: epochs * ceil(size / batch), capped
  at `max_steps` when it is > 0 (`federated.local_steps`). NumPy or JAX, any shape."""
  steps = local_epochs * ((size + batch_size - 1) // batch_size)
  if max_steps > 0:
    steps = steps * (steps <= max_steps) + max_steps * (steps > max_steps)
  return steps


@functools.partial(jax.jit, static_argnames=("max_n", "batch_size", "local_epochs"))
def local_schedule(key: jax.Array, size: Any, max_n: int, batch_size: int, local_epochs: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One client's local-training batches for one round, as positions into its index row.

  Returns positions int32 [max_steps, batch], example_mask bool [max_steps, batch] and
  step_mask bool [max_steps], max_steps = local_epochs * ceil(max_n / batch_size) (static).
  Each epoch visits the client's `size` real examples once, in a fresh order drawn from `key`;
  an epoch's last batch may be partial (masked examples, as a DataLoader without drop_last).
  The real steps come first (local_epochs * ceil(size / batch_size) of them), then fully
  masked padding steps, so the engine can scan over max_steps and skip masked steps.
  Pure JAX: jittable, vmappable over (key, size); max_n, batch_size, local_epochs static.
  Masked positions point at slot 0 (a valid gather).
  """
  for k, v in (("max_n", max_n), ("batch_size", batch_size), ("local_epochs", local_epochs)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{k} must be a positive static int, got {v!r}")
  spe_max = -(-max_n // batch_size)
  max_steps = local_epochs * spe_max
  size = jnp.clip(jnp.asarray(size, jnp.int32), 0, max_n)
  spe = (size + batch_size - 1) // batch_size
  real_steps = local_epochs * spe

  def epoch_order(k: jax.Array) -> jax.Array:
    # A random permutation of the slots, then the real slots (< size) moved to the front
    # keeping their random order: a uniform permutation of 0..size-1 with a dynamic size.
    perm = jax.random.permutation(k, max_n).astype(jnp.int32)
    return perm[jnp.argsort((perm >= size).astype(jnp.int32), stable=True)]

  orders = jax.vmap(epoch_order)(jax.random.split(key, local_epochs))  # [E, max_n]
  t = jnp.arange(max_steps, dtype=jnp.int32)
  safe_spe = jnp.maximum(spe, 1)
  epoch = jnp.minimum(t // safe_spe, local_epochs - 1)
  slot = (t % safe_spe)[:, None] * batch_size + jnp.arange(batch_size, dtype=jnp.int32)[None]
  step_mask = t < real_steps
  example_mask = step_mask[:, None] & (slot < size)
  positions = orders[epoch[:, None], jnp.minimum(slot, max_n - 1)]
  return jnp.where(example_mask, positions, 0), example_mask, step_mask


def eval_schedule(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Batches over a whole evaluation set: index int32 [num_batches, batch] and mask bool;
  the last batch's padding points at example 0 and is masked out."""
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  nb = -(-num_examples // batch_size)
  flat = np.arange(nb * batch_size)
  mask = flat < num_examples
  return np.where(mask, flat, 0).astype(np.int32).reshape(nb, batch_size), mask.reshape(
      nb, batch_size)
