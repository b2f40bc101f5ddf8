"""What a round sends, and its exact size: the wire format of parameters and updates.

The server keeps float32 master weights. What crosses the wire is `to_wire(tree)`: the
server model that clients start from, and every client's update, rounded to
`federated.wire_dtype`. The engine trains and aggregates the values `on_wire` gives back
(rounded, then widened back to each leaf's own dtype: the float32 of the master weights), so a bfloat16 run really is one whose clients
see and send bfloat16 numbers; the byte counts are the sizes of the arrays `to_wire` makes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedpeft_jax.choices import one_of
from fedpeft_jax.peft.partition import count, nbytes

PyTree = Any
# config.federated.wire_dtype: the dtype parameters travel in.
WIRE_DTYPES = ("float32", "bfloat16", "float16")


def check_wire_dtype(wire_dtype: str) -> str:
  """federated.wire_dtype: what parameters and updates are rounded to in transit."""
  return one_of("federated.wire_dtype", wire_dtype, WIRE_DTYPES)


def to_wire(tree: PyTree, wire_dtype: Any) -> PyTree:
  """The payload: every floating leaf rounded (to nearest even) to `wire_dtype`."""
  dtype = jnp.dtype(wire_dtype)
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def on_wire(tree: PyTree, wire_dtype: Any) -> PyTree:
  """`tree` as the receiver holds it: rounded to the wire dtype, back in its own dtype.
  An identity (no XLA op) when the wire dtype is the tree's own."""
  return jax.tree_util.tree_map(lambda sent, x: sent.astype(x.dtype),
                                to_wire(tree, wire_dtype), tree)


def payload_bytes(tree: PyTree, wire_dtype: Any) -> int:
  """Bytes of the arrays `to_wire(tree)` makes (shapes only: `tree` may be abstract)."""
  return nbytes(jax.eval_shape(lambda t: to_wire(t, wire_dtype), tree))


@dataclasses.dataclass(frozen=True)
class CommCost:
  """Bytes of one transfer of the trainable subtree and of full fine-tuning's."""
  trainable_params: int
  total_params: int
  trainable_bytes: int  # one one-way transfer of the trainable subtree
  # The same transfer for full fine-tuning of the same model without PEFT modules
  # (backbone + head): what the study compares against.
  full_bytes: int
  # One upload of the trainable subtree as encoded (compressed) by a client; 0 = the same
  # as trainable_bytes (uploads uncompressed, in the wire dtype).
  upload_bytes: int = 0
  # What every download carries besides the trainable subtree: under FedEx-LoRA / FLoRA the
  # folded deltas of the frozen target kernels, one dense [in, out] per target in the wire
  # dtype (a client that missed rounds needs the whole sum, so no per-round increment).
  download_extra_bytes: int = 0

  def round_bytes(self, num_sampled: int, num_reporting: int) -> dict[str, int]:
    """Download to every sampled client, upload from every client that reported."""
    down = (self.trainable_bytes + self.download_extra_bytes) * num_sampled
    up = (self.upload_bytes or self.trainable_bytes) * num_reporting
    full = self.full_bytes * (num_sampled + num_reporting)
    return {"bytes_down": down, "bytes_up": up, "bytes_full_equivalent": full}


def comm_cost(trainable: PyTree, all_params: PyTree, base_params: PyTree,
              wire_dtype: Any, upload_bytes: int = 0,
              download_extra: PyTree = None) -> CommCost:
  """Costs of sending `trainable` and of sending `base_params` (the model without PEFT
  modules; shapes suffice, e.g. from `jax.eval_shape`) in `wire_dtype`; `upload_bytes`:
  one compressed upload (`compression.compress`'s byte count), 0 when uploads are not
  compressed; `download_extra`: a tree every download also carries in `wire_dtype` (the
  folded deltas of `lora_aggregation.folded_zeros`), None for nothing."""
  extra = 0 if download_extra is None else payload_bytes(download_extra, wire_dtype)
  return CommCost(trainable_params=count(trainable), total_params=count(all_params),
                  trainable_bytes=payload_bytes(trainable, wire_dtype),
                  full_bytes=payload_bytes(base_params, wire_dtype), upload_bytes=upload_bytes,
                  download_extra_bytes=extra)
