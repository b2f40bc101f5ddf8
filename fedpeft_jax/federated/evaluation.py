"""Test-set evaluation inside one jit, split over the mesh: the global model on the test split
(`make_evaluate`), and every client's model on its own local test set (`make_client_evaluate`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

import fedpeft_jax.data as fdata
from fedpeft_jax.federated import client_rows, feature_cache
from fedpeft_jax.federated.mesh import AXIS, make_mesh, split_rows
from fedpeft_jax.peft.partition import merge

PyTree = Any


def place_eval_set(images: np.ndarray, labels: np.ndarray, mesh: Mesh
                   ) -> tuple[jax.Array, jax.Array]:
  """An evaluation set split row-wise over `mesh`'s devices (each holds 1/devices of it),
  padded to a multiple of the device count with label -1 (not counted)."""
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  pad = (-len(labels)) % mesh.devices.size
  if pad:
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.full(pad, -1, np.int32)])
  return split_rows(images, mesh), split_rows(labels, mesh)


def _scored_sums(model: nn.Module, inputs: feature_cache.InputSpec, params: PyTree,
                 examples: jax.Array, labels: jax.Array, rows: jax.Array, batch_size: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(correct, summed cross-entropy, count) of `params` over the examples at `rows` (an int
  vector; -1 = padding, not counted), `batch_size` at a time in one `lax.scan`: the one
  scoring loop of both evaluators."""
  index, mask = fdata.eval_schedule(rows.shape[0], batch_size)

  def body(carry, xs):
    idx, m = xs
    r = rows[idx]
    x = inputs.prepare(examples[jnp.maximum(r, 0)], None, "none", train=False)
    logits = inputs.logits(model, params, x, train=False)
    y = labels[jnp.maximum(r, 0)]
    valid = (m & (r >= 0)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (carry[0] + jnp.sum(correct * valid), carry[1] + jnp.sum(ce * valid),
            carry[2] + jnp.sum(valid)), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, (zero, zero, zero), (index, mask))
  return sums


def make_evaluate(model: nn.Module, batch_size: int, image_size: int,
                  mesh: Optional[Mesh] = None,
                  inputs: Optional[feature_cache.InputSpec] = None) -> Callable[..., dict]:
  """evaluate(params, examples, labels) -> {'accuracy', 'loss'}, batched inside one jit.

  The examples are split over `mesh`'s devices (default: all devices); each device runs
  its share and the correct counts and losses are summed with `psum`. Rows labelled -1
  are padding (see `place_eval_set`). `inputs` says what the examples are (default: uint8
  images; or a cached frozen prefix, see `feature_cache`).
  """
  mesh = mesh if mesh is not None else make_mesh()
  num_devices = mesh.devices.size
  inputs = inputs or feature_cache.images_input(image_size)

  def local(params, examples, labels):
    # Padding rows (label -1) are not scored.
    rows = jnp.where(labels >= 0, jnp.arange(labels.shape[0], dtype=jnp.int32), -1)
    return jax.lax.psum(_scored_sums(model, inputs, params, examples, labels, rows,
                                     batch_size), AXIS)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(),
                          check_vma=False)

  @jax.jit
  def evaluate(params: PyTree, examples: jax.Array, labels: jax.Array) -> dict:
    pad = (-examples.shape[0]) % num_devices
    if pad:  # arrays not placed by place_eval_set
      examples = jnp.pad(examples, [(0, pad)] + [(0, 0)] * (examples.ndim - 1))
      labels = jnp.pad(labels, (0, pad), constant_values=-1)
    correct, loss, n = sharded(params, examples, labels)
    return {"accuracy": correct / n, "loss": loss / n}

  return evaluate


def make_client_evaluate(model: nn.Module, batch_size: int, image_size: int,
                         mesh: Optional[Mesh] = None,
                         inputs: Optional[feature_cache.InputSpec] = None,
                         adapt: Optional[Callable[..., PyTree]] = None,
                         clients_per_chunk: int = 1) -> Callable[..., dict]:
  """Every client's accuracy on its own local test set, in one jit:

    evaluate(shared, frozen, personal, test, train, key) -> {'accuracy': [num_clients],
        'loss': [num_clients], 'examples': [num_clients], 'mean', 'min', 'max'}

  Client k scores merge(shared, personal_k, frozen) on the rows of `test` (a `ClientData`
  over the test split, from `data.partition_test`) that are its own. `personal` is None
  (every client uses the global model) or a pytree whose leaves lead with [num_clients]
  (client k uses row k; placed by `client_rows.place`, or any array, padded and split
  here). `adapt(personal_k, merge(shared, frozen), train, k, key_k)`, if given, replaces
  row k before scoring (FedBABU's local fine-tuning on `train`, the
  clients' training `ClientData`); `key_k` = fold_in(key, k), so results do not depend
  on the device layout.

  'mean', 'min' and 'max' are over clients with a non-empty test set (each client's
  accuracy counts once, as in personalised-FL papers, not weighted by test size); a client
  without test data has accuracy NaN. Clients are split over `mesh`'s devices and, on each,
  evaluated `clients_per_chunk` at a time (vmapped), chunks in sequence (`lax.map`).
  """
  mesh = mesh if mesh is not None else make_mesh()
  num_devices = mesh.devices.size
  inputs = inputs or feature_cache.images_input(image_size)

  def one_client(shared, frozen, personal, test, train, key, client, position):
    row_k = None
    if personal is not None:
      row_k = jax.tree_util.tree_map(lambda x: x[position], personal)
      if adapt is not None:
        row_k = adapt(row_k, merge(shared, frozen), train,
                      client, jax.random.fold_in(key, client))
    params = merge(shared, frozen) if row_k is None else merge(merge(shared, row_k), frozen)
    # The client's index row, its padding slots (past its size) marked -1.
    row = jnp.where(jnp.arange(test.max_n) < test.sizes[client], test.indices[client], -1)
    correct, loss, _ = _scored_sums(model, inputs, params, test.images, test.labels, row,
                                    batch_size)
    return correct, loss

  def local(shared, frozen, personal, test, train, key, clients):
    # `personal` is this device's block of rows: its clients' rows, in order.
    positions = jnp.arange(clients.shape[1], dtype=jnp.int32)
    return jax.lax.map(
        lambda cp: one_client(shared, frozen, personal, test, train, key, *cp),
        (clients[0], positions), batch_size=clients_per_chunk)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(),) * 2 + (P(AXIS),) + (P(),) * 3
                          + (P(AXIS),), out_specs=P(AXIS), check_vma=False)

  @jax.jit
  def evaluate(shared: PyTree, frozen: PyTree, personal: Optional[PyTree], test: Any,
               train: Any, key: jax.Array) -> dict:
    num = test.sizes.shape[0]
    per_device = client_rows.rows_per_device(num, num_devices)
    # Client k on device k // per_device, where its row is (`client_rows`'s layout; rows
    # given unpadded or unplaced are padded and split here). Padding slots evaluate client
    # 0 again; their results are cut off below.
    if personal is not None:  # rows past `num` are another layout's padding
      personal = client_rows.pad(jax.tree_util.tree_map(lambda x: x[:num], personal),
                                 per_device * num_devices, xp=jnp)
    clients = jnp.arange(per_device * num_devices, dtype=jnp.int32) % num
    correct, loss = sharded(shared, frozen, personal, test, train, key,
                            clients.reshape(num_devices, per_device))
    correct, loss = correct.reshape(-1)[:num], loss.reshape(-1)[:num]
    n = test.sizes.astype(jnp.float32)
    has = n > 0
    accuracy = jnp.where(has, correct / jnp.maximum(n, 1.0), jnp.nan)
    return {"accuracy": accuracy, "loss": jnp.where(has, loss / jnp.maximum(n, 1.0), jnp.nan),
            "examples": n, "mean": jnp.nanmean(accuracy), "min": jnp.nanmin(accuracy),
            "max": jnp.nanmax(accuracy)}

  return evaluate
