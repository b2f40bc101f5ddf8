"""Test-set evaluation inside one jit, split over the mesh: the global model on the test split
(`make_evaluate`), and every client's model on its own local test set (`make_client_evaluate`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from fedpeft_jax.federated import client_rows
from fedpeft_jax.mesh import AXIS, make_mesh
from fedpeft_jax.scoring import InputSpec, images_input, scored_sums
from fedpeft_jax.peft.partition import merge

PyTree = Any


def make_client_evaluate(model: nn.Module, batch_size: int, image_size: int,
                         mesh: Optional[Mesh] = None,
                         inputs: Optional[InputSpec] = None,
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
  inputs = inputs or images_input(image_size)

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
    correct, loss, _ = scored_sums(model, inputs, params, test.images, test.labels, row,
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
