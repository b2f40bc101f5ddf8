"""Compressed uploads as pure codecs: what a client's update becomes before it is sent.

Two families, both pure JAX (jittable, and vmappable over a leading client axis):

* Stochastic-rounding quantisation (`quantize` / `dequantize`, QSGD-style, Alistarh et al.
  2017): each value becomes an integer in [-L, L], L = 2^(bits-1) - 1, times a float32 step
  (absmax / L of the whole tensor, or of each block of `block` consecutive values of the
  flattened tensor). The rounding is q = floor(x / step + u), u ~ U[0, 1), so
  E[dequantize(quantize(x))] = x: the server's mean stays unbiased without any client state.
* Top-k sparsification with error feedback (`topk_compress` / `topk_decompress`, Stich et al.
  2018): the client sends the k largest-magnitude entries of update + residual and keeps the
  rest as its new residual, so nothing is dropped, only delayed.

A payload is the update's pytree with each leaf replaced by a `Quantized` or a `Sparse`
record; its arrays are exactly what would be sent, so `compressed_bytes` is the sum of
their sizes, like `comm.payload_bytes` is of `comm.to_wire`'s arrays. int4 values are
really packed two per byte (uint8), so their count is ceil(n / 2) bytes, not a convention.

Top-k is per tensor, k = ceil(fraction * n) of each leaf (at least 1), not global over the
pytree: every tensor (a small bias or head as much as a LoRA factor) moves every round, k is
a static shape per leaf with no concatenation of all trainable parameters, and `lax.top_k`
runs on each leaf's own (short) vector, which is far cheaper on accelerators than one top-k
over millions of values.

The order with a server-side clip (DP-FedAvg, `federated.max_update_norm`): the client
compresses, the server decodes, clips each decoded update to C, sums, and (DP-FedAvg) adds
the noise. The clip bounds what is summed, so compression costs no privacy; quantisation
may lengthen an update a little, and the clip takes that off. With top-k's error feedback
the client first clips update + residual to C itself (the engine asks the aggregator's
`bound`), so the residual holds exactly what top-k kept back of the clipped message and the
server's clip cuts nothing: model + residuals = every clipped message. Client-level DP-SGD
and the study's Gaussian noise act on the gradients during local training, before any of
this.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fedpeft_jax.choices import one_of
from fedpeft_jax.federated import comm
from fedpeft_jax.peft.partition import nbytes
from fedpeft_jax.privacy import mechanisms

PyTree = Any
# config.federated.compression: how client updates are encoded for upload.
COMPRESSIONS = ("none", "int8", "int4", "topk")
_BITS = {"int8": 8, "int4": 4}


@struct.dataclass
class Quantized:
  """One quantised tensor as sent: integer values and their float32 steps.

  values: int8 [n] (8 bits), or uint8 [ceil(n / 2)] (4 bits: two values per byte, each
  stored as q + 8 in a nibble). scales: float32 [num_blocks], the step of each block
  (absmax / L), so a value is q * step; one block when `block` is 0."""
  values: jax.Array
  scales: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  block: int = struct.field(pytree_node=False)


@struct.dataclass
class Sparse:
  """One top-k tensor as sent: float32 values [k] at int32 flat indices [k]."""
  values: jax.Array
  indices: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)


def _is_record(x: Any) -> bool:
  return isinstance(x, (Quantized, Sparse))


def check_compression(method: str, block: int, fraction: float) -> None:
  """Raise on settings no codec accepts: the config checks these before any tracing."""
  one_of("federated.compression", method, COMPRESSIONS)
  if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 0:
    raise ValueError(f"federated.compression_block must be an integer >= 0 (0: one scale per "
                     f"tensor), got {block!r}")
  _check_fraction(fraction)


def _check_fraction(fraction: float) -> None:
  if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool)
      or not 0.0 < fraction <= 1.0):
    raise ValueError(f"federated.compression_fraction must be a number in (0, 1], got "
                     f"{fraction!r}")


def _levels(bits: int) -> int:
  if bits not in (4, 8):
    raise ValueError(f"quantisation bits must be 4 or 8, got {bits}")
  return 2 ** (bits - 1) - 1


def pack_int4(q: jax.Array) -> jax.Array:
  """Integers in [-7, 7], flat [n] -> uint8 [ceil(n / 2)]: element 2i in the low nibble,
  2i + 1 in the high one, each as q + 8 (an odd n pads one zero)."""
  n = q.shape[0]
  nib = (q.astype(jnp.int32) + 8).astype(jnp.uint8)
  nib = jnp.pad(nib, (0, n % 2), constant_values=8)
  return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: jax.Array, n: int) -> jax.Array:
  """Inverse of `pack_int4`: uint8 [ceil(n / 2)] -> int8 [n]."""
  lo = (packed & 0xF).astype(jnp.int8) - 8
  hi = (packed >> 4).astype(jnp.int8) - 8
  return jnp.stack([lo, hi], axis=-1).reshape(-1)[:n]


def _quantize_leaf(x: jax.Array, key: jax.Array, bits: int, block: int) -> Quantized:
  """Stochastic rounding of one tensor onto its per-tensor or per-block grid."""
  levels = _levels(bits)
  flat = x.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  size = n if block == 0 else block
  num_blocks = max(1, -(-n // size))
  rows = jnp.pad(flat, (0, num_blocks * size - n)).reshape(num_blocks, size)
  step = jnp.max(jnp.abs(rows), axis=1) / levels  # [num_blocks]
  # A zero block has step 0: divide by 1 instead, its values (all 0) then round to 0.
  safe = jnp.where(step > 0, step, 1.0)[:, None]
  u = jax.random.uniform(key, rows.shape, jnp.float32)
  q = jnp.clip(jnp.floor(rows / safe + u), -levels, levels).reshape(-1)[:n].astype(jnp.int8)
  values = pack_int4(q) if bits == 4 else q
  return Quantized(values=values, scales=step, shape=tuple(x.shape), dtype=x.dtype,
                   bits=bits, block=block)


def _dequantize_leaf(p: Quantized) -> jax.Array:
  n = math.prod(p.shape)
  q = unpack_int4(p.values, n) if p.bits == 4 else p.values
  size = n if p.block == 0 else p.block
  num_blocks = p.scales.shape[0]
  rows = jnp.pad(q.astype(jnp.float32), (0, num_blocks * size - n)).reshape(num_blocks, size)
  return (rows * p.scales[:, None]).reshape(-1)[:n].reshape(p.shape).astype(p.dtype)


def quantize(tree: PyTree, key: jax.Array, bits: int, block: int = 0) -> PyTree:
  """`tree` with each leaf a `Quantized`: unbiased stochastic rounding to `bits` (4 or 8)
  with an absmax step per tensor (`block` 0) or per `block` consecutive flat values.
  Each leaf draws its own uniforms from `key` (split per leaf)."""
  _levels(bits)
  if block < 0:
    raise ValueError(f"federated.compression_block must be >= 0, got {block}")
  keys = optax.tree.split_key_like(key, tree)
  return jax.tree_util.tree_map(lambda x, k: _quantize_leaf(x, k, bits, block), tree, keys)


def dequantize(payload: PyTree) -> PyTree:
  """The tree the server receives from a `quantize` payload: q * step, in each leaf's dtype."""
  return jax.tree_util.tree_map(_dequantize_leaf, payload, is_leaf=_is_record)


def topk_count(n: int, fraction: float) -> int:
  """k = ceil(fraction * n), at least 1 and at most n. The product is rounded to 9 decimals
  first so that e.g. 0.1 * 30 (3.0000000000000004 in floating point) gives 3, not 4."""
  return min(n, max(1, math.ceil(round(fraction * n, 9))))


def _topk_leaf(acc: jax.Array, fraction: float) -> tuple[Sparse, jax.Array]:
  flat = jnp.asarray(acc).reshape(-1)
  k = topk_count(flat.shape[0], fraction)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  idx = idx.astype(jnp.int32)
  # Zeroing the sent entries (not subtracting) keeps sent + residual == acc bit for bit.
  residual = flat.at[idx].set(0).reshape(acc.shape)
  sent = Sparse(values=flat[idx].astype(jnp.float32), indices=idx, shape=tuple(acc.shape),
                dtype=acc.dtype)
  return sent, residual


def topk_compress(update: PyTree, residual: PyTree | None,
                  fraction: float) -> tuple[PyTree, PyTree]:
  """(payload, new_residual): per tensor, the k = ceil(fraction * n) largest-magnitude
  entries of update + residual (a `Sparse` per leaf), and what was not sent, which the
  client adds to its next update (error feedback). `residual` None means zeros (round 0)."""
  _check_fraction(fraction)
  acc = update if residual is None else optax.tree.add(update, residual)
  leaves, treedef = jax.tree_util.tree_flatten(acc)
  pairs = [_topk_leaf(a, fraction) for a in leaves]
  return (jax.tree_util.tree_unflatten(treedef, [p for p, _ in pairs]),
          jax.tree_util.tree_unflatten(treedef, [r for _, r in pairs]))


def _topk_decompress_leaf(p: Sparse) -> jax.Array:
  dense = jnp.zeros((math.prod(p.shape),), p.dtype).at[p.indices].set(p.values.astype(p.dtype))
  return dense.reshape(p.shape)


def topk_decompress(payload: PyTree) -> PyTree:
  """The dense tree the server receives: the sent values at their indices, zeros elsewhere."""
  return jax.tree_util.tree_map(_topk_decompress_leaf, payload, is_leaf=_is_record)


def compressed_bytes(payload: PyTree) -> int:
  """Bytes of the payload's arrays (values, indices, scales), from shapes only: `payload`
  may be abstract (`jax.eval_shape`) or traced. An uncompressed tree counts its leaves.
  A payload batched over clients counts all of them; inside `vmap` it is one client's."""
  return nbytes(payload)


class UploadCodec(NamedTuple):
  """One client's upload path as a pure, vmappable triple (in the manner of an optax
  `GradientTransformation`), so the round holds no branch per compression:

  * `init(trainable) -> state`: one client's state, kept across rounds in the round's
    per-client table: top-k's error-feedback residual (float32 zeros like `trainable`,
    NumPy, so a table of them is a broadcast view until placed); None for stateless codecs.
  * `encode(update, state, key, bound=None) -> (payload, new_state, norm)`: the update
    rounded to the wire dtype, then compressed. With error feedback and a server clip
    (`bound`, the aggregator's), update + residual is first clipped to `bound` and `norm` is
    its norm before that clip (the aggregator reports it: adaptive clipping counts it);
    otherwise `norm` is None. `key` is the client's; stochastic rounding draws from its
    UPLOAD_STREAM sub-stream.
  * `decode(payload) -> update`: the dense tree the server receives.
  """
  init: Callable[[PyTree], PyTree | None]
  encode: Callable[..., tuple[PyTree, PyTree | None, jax.Array | None]]
  decode: Callable[[PyTree], PyTree]
  stateful: bool  # init returns a state the round must keep per client


# Folded into a client's key for its upload's stochastic rounding (the client's local
# training draws from other sub-streams of the same key).
UPLOAD_STREAM = 3


def upload_codec(wire_dtype: str = "float32", method: str = "none", block: int = 0,
                 fraction: float = 0.1) -> UploadCodec:
  """The codec of `federated.wire_dtype` and `federated.compression` (+ its block and
  fraction). 'none' sends the wire-rounded update as is; 'int8'/'int4' `quantize` it;
  'topk' sends `topk_compress` of update + residual and keeps the rest as the new state."""
  comm.check_wire_dtype(wire_dtype)
  check_compression(method, block, fraction)
  error_feedback = method == "topk"

  def init(trainable: PyTree) -> PyTree | None:
    if not error_feedback:
      return None
    return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), trainable)

  def encode(update: PyTree, state: PyTree | None, key: jax.Array,
             bound: jax.Array | None = None) -> tuple[PyTree, PyTree | None, jax.Array | None]:
    sent, norm = comm.on_wire(update, wire_dtype), None
    if error_feedback and bound is not None:
      # Clip the whole message (update + residual) before top-k, and keep the residual of
      # the clipped message: top-k never lengthens a vector, so the server's clip then cuts
      # nothing, and model + residuals = every clipped message exactly.
      combined = jax.tree_util.tree_map(lambda u, r: u.astype(r.dtype) + r, sent, state)
      sent, norm = mechanisms.clip_update(combined, bound)
      state = optax.tree.zeros_like(state)
    if error_feedback:
      payload, state = topk_compress(sent, state, fraction)
      return payload, state, norm
    if method == "none":
      return sent, state, norm
    return quantize(sent, jax.random.fold_in(key, UPLOAD_STREAM), _BITS[method], block), state, norm

  def decode(payload: PyTree) -> PyTree:
    if error_feedback:
      return topk_decompress(payload)
    return payload if method == "none" else dequantize(payload)

  return UploadCodec(init, encode, decode, error_feedback)


def compress(tree: PyTree, key: jax.Array, method: str, block: int = 0, fraction: float = 1.0,
             residual: PyTree | None = None) -> tuple[PyTree, PyTree | None, int]:
  """(decoded_tree, new_residual, num_bytes): one upload of `tree` through
  `upload_codec(method)` on a float32 wire (encode, then decode), the error-feedback residual
  after it ('topk'; `residual` None means zeros; for the other methods `residual` passes
  through unchanged), and the payload's bytes (a Python int: shapes are static)."""
  codec = upload_codec(method=method, block=block, fraction=fraction)
  payload, new_state, _ = codec.encode(tree, residual if codec.stateful else None, key)
  return (codec.decode(payload), new_state if codec.stateful else residual,
          compressed_bytes(payload))


def encoded_bytes(tree: PyTree, method: str, block: int = 0, fraction: float = 1.0) -> int:
  """Bytes of one client's encoded upload of `tree` under `method` (shapes suffice, e.g. a
  `jax.eval_shape` tree): what the communication accounting charges per upload. The
  payload is the codec's own (`upload_codec`), traced for its shapes only."""
  codec = upload_codec(method=method, block=block, fraction=fraction)
  payload = jax.eval_shape(
      lambda t: codec.encode(t, codec.init(t), jax.random.PRNGKey(0))[0], tree)
  return compressed_bytes(payload)
