"""A model scored on an evaluation set inside one jit, split over the mesh: the scoring loop
every evaluator runs (`scored_sums`), the evaluator of one model (`make_evaluate`, used by
central pre-training and by the federated runs' global model) and the set's placement."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

import fedpeft_jax.data as fdata
from fedpeft_jax.mesh import AXIS, make_mesh, split_rows
from fedpeft_jax.scoring.inputs import InputSpec, images_input

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


def scored_sums(model: nn.Module, inputs: InputSpec, params: PyTree,
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
                  inputs: Optional[InputSpec] = None) -> Callable[..., dict]:
  """evaluate(params, examples, labels) -> {'accuracy', 'loss'}, batched inside one jit.

  The examples are split over `mesh`'s devices (default: all devices); each device runs
  its share and the correct counts and losses are summed with `psum`. Rows labelled -1
  are padding (see `place_eval_set`). `inputs` says what the examples are (default: uint8
  images; or a cached frozen prefix, see `federated.feature_cache`).
  """
  mesh = mesh if mesh is not None else make_mesh()
  num_devices = mesh.devices.size
  inputs = inputs or images_input(image_size)

  def local(params, examples, labels):
    # Padding rows (label -1) are not scored.
    rows = jnp.where(labels >= 0, jnp.arange(labels.shape[0], dtype=jnp.int32), -1)
    return jax.lax.psum(scored_sums(model, inputs, params, examples, labels, rows,
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
