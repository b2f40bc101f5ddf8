"""Federated aggregation of LoRA factors: FedIT, FFA-LoRA, FedEx-LoRA and FLoRA.

LoRA (Hu et al., ICLR 2022) as `fedpeft_jax.peft.layers.LoRA` computes y = x W + s x A B with
A: [in, r], B: [r, out] (B zero at init) and s = alpha / r (alpha / sqrt(r) with rsLoRA), so a
client's effective weight is W + s A B (the product reshaped to the target kernel's shape:
DenseGeneral kernels [in, heads, head_dim] and [heads, head_dim, out] flatten row-major to
the same [in, out] the LoRA module multiplies by).

Averaging A and B separately (FedIT, Zhang et al., ICASSP 2024) does not average the models:
sum_k w_k A_k B_k != (sum_k w_k A_k)(sum_k w_k B_k) in general. The rules here differ in how
they close that gap:

* `fedit`: average A and B separately; the baseline, inexact.
* `ffa`: FFA-LoRA (Sun et al., ICLR 2024) freezes A at its shared random init
  (`peft.lora.freeze_a`), so sum_k w_k A B_k = A (sum_k w_k B_k): averaging B is exact.
* `fedex`: FedEx-LoRA (Singhal et al., 2025) averages A and B like FedIT and returns the
  residual dW = sum_k w_k s_k A_k B_k - s A'B' that, added to the frozen weight, makes the
  global model the exact weighted average of the client models.
* `flora`: FLoRA (Wang et al., NeurIPS 2024) stacks the client adapters along the rank axis
  (A_stack = [w_1 A_1 | ... | w_K A_K], B_stack = [B_1; ...; B_K]) so A_stack B_stack =
  sum_k w_k A_k B_k, folds s * that product into the frozen weight and re-initialises LoRA.
  Stacking is what lets clients hold different ranks (noise-free heterogeneous ranks).

The per-target functions take clients stacked on a leading axis (A: [K, in, r], B: [K, r,
out], weights: [K], normalised here) and return an `LoraAggregate`. The tree functions apply
a rule to every `<target>_lora/lora_{a,b}` pair of a stacked param pytree.

Heterogeneous ranks are zero-padded to r_max: client k's A columns and B rows beyond r_k are
multiplied by `rank_mask` before anything else, so garbage in the padding contributes
nothing. Scaling: every rule takes the model's scaling `scaling` (what the global LoRA module
computes with) and optionally `client_scaling` [K], the scaling client k actually trained
with. Padded clients vmapped through one model all compute with the model's alpha / r_max,
which is the default and what FLoRA's own code does too (one scaling for every rank); a
client that trains a genuine rank-r_k LoRA with its own alpha / r_k must pass
`client_scalings(alpha, ranks)`. Each client's own scaling is folded into
its A (equivalently into its product) before the weighted sum, so the residual / merged delta
is exact whatever the mix of ranks; the returned A', B' are then used with `scaling`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax.choices import one_of
from fedpeft_jax.peft.layers import kaiming_uniform_a_sqrt5
from fedpeft_jax.peft.partition import flatten, unflatten

PyTree = Any
Scaling = float | jax.Array

LORA_AGGREGATIONS = ("fedit", "ffa", "fedex", "flora")
# Rules that change the frozen target weights (the server must hold and send them).
FOLDING_AGGREGATIONS = ("fedex", "flora")
_PAIR = re.compile(r"^(.*)_lora/lora_([ab])$")
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes: the residual is a small difference


def check_rule(rule: str) -> str:
  """federated.lora_aggregation: one of LORA_AGGREGATIONS."""
  return one_of("federated.lora_aggregation", rule, LORA_AGGREGATIONS)


def check_round(rule: str, compression: str, privacy_mechanism: str) -> None:
  """The rule's combinations with the rest of the round, checked here once (the engine and
  the config validation both call it); each error names the field to change first: a
  folding rule merges the plain mean of the client models, so it runs without any privacy
  mechanism; FLoRA restarts the factors every round, so no top-k error-feedback residual can
  follow them."""
  check_rule(rule)
  if rule in FOLDING_AGGREGATIONS and privacy_mechanism != "none":
    raise ValueError(f"privacy.mechanism is {privacy_mechanism!r}; it must be 'none' with "
                     f"federated.lora_aggregation={rule!r}, which folds the plain mean of the "
                     "client models into the frozen weights (the residual and the merge are not "
                     "defined for a noised, clipped mean)")
  if rule == "flora" and compression == "topk":
    raise ValueError("federated.compression is 'topk', whose error-feedback residual belongs "
                     "to the LoRA factors a client trained; FLoRA restarts them every round, so "
                     "the residual would be added to factors it was not computed for: use "
                     "int8/int4/none with flora")


class LoraAggregate(NamedTuple):
  """One target's aggregate: the new global factors and what to add to the frozen weight."""
  a: jax.Array  # [in, r] global A
  b: jax.Array  # [r, out] global B
  delta_w: jax.Array | None  # [in, out] to add to the target kernel; None: nothing to fold


# ----------------------------------------------------------------------------- ranks


def client_ranks(spec: int | str | Sequence[int], num_clients: int, seed: int,
                 max_rank: int | None = None) -> np.ndarray:
  """Per-client LoRA ranks [num_clients] (int32) from `peft.lora.client_ranks`.

  `spec` is an int (every client), a list of ints or a comma string "r1,...,rK" (one per
  client), or "uniform:r1,r2,..." (each client draws one of the listed ranks uniformly,
  deterministically from `seed`, as in FLoRA's heterogeneous-rank experiments). `max_rank`
  (the model's `peft.lora.rank`, the padded width) bounds every rank.
  """
  field = "peft.lora.client_ranks"
  num_clients = int(num_clients)
  if num_clients <= 0:
    raise ValueError(f"{field}: num_clients must be > 0, got {num_clients}")

  def ints(items: Sequence[Any], what: str) -> list[int]:
    out = []
    for x in items:
      try:
        v = int(str(x).strip()) if isinstance(x, str) else int(x)
      except (TypeError, ValueError):
        raise ValueError(f"{field}: {what} {x!r} is not an integer") from None
      if isinstance(x, (float, np.floating)) and v != x:
        raise ValueError(f"{field}: {what} {x!r} is not an integer")
      out.append(v)
    if not out:
      raise ValueError(f"{field}: no rank given")
    return out

  allowed = None
  if isinstance(spec, str):
    text = spec.strip()
    if text.startswith("uniform:"):
      choices = ints([s for s in text[len("uniform:"):].split(",") if s.strip()], "rank")
      rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x10A5]))
      ranks = np.asarray(choices, np.int64)[rng.integers(0, len(choices), num_clients)]
      allowed = np.asarray(choices, np.int64)  # every listed rank, drawn or not, is checked
    elif ":" in text:
      raise ValueError(f"{field}: unknown distribution in {spec!r}; use a list of ranks "
                       "'r1,...,rK' or 'uniform:r1,r2,...'")
    else:
      ranks = np.asarray(ints(text.split(","), "rank"), np.int64)
  elif isinstance(spec, (int, np.integer)):
    ranks = np.full(num_clients, int(spec), np.int64)
  else:
    ranks = np.asarray(ints(list(spec), "rank"), np.int64)
  if ranks.size == 1 and num_clients > 1:
    ranks = np.full(num_clients, int(ranks[0]), np.int64)
  if ranks.shape != (num_clients,):
    raise ValueError(f"{field}: {ranks.size} ranks for {num_clients} clients; give one per "
                     "client, a single rank or 'uniform:r1,r2,...'")
  listed = allowed if allowed is not None else ranks
  if (listed <= 0).any():
    raise ValueError(f"{field}: ranks must be > 0, got {sorted(set(listed.tolist()))}")
  if max_rank is not None and (listed > int(max_rank)).any():
    raise ValueError(f"{field}: rank {int(listed.max())} exceeds peft.lora.rank ({max_rank}), "
                     "the padded width every client's adapter lives in")
  return ranks.astype(np.int32)


def client_scalings(alpha: float, ranks: Any, rslora: bool = False) -> jax.Array:
  """alpha / r_k (alpha / sqrt(r_k) with rsLoRA, Kalajdzievski 2023) per client [K]: the
  scalings of clients that train genuine rank-r_k adapters (see the module docstring)."""
  r = jnp.asarray(ranks, jnp.float32)
  return alpha / (jnp.sqrt(r) if rslora else r)


def rank_mask(ranks: Any, r_max: int) -> jax.Array:
  """[K, r_max] float mask, 1 on the first r_k rank slots of client k, 0 on its padding."""
  if isinstance(ranks, (np.ndarray, list, tuple)):
    r = np.asarray(ranks)
    if r.ndim != 1 or (r <= 0).any() or (r > r_max).any():
      raise ValueError(f"rank_mask: ranks must be a 1-D list in [1, {r_max}], got {r.tolist()}")
  return (jnp.arange(r_max)[None, :] < jnp.asarray(ranks)[:, None]).astype(jnp.float32)


def apply_rank_mask(a: jax.Array, b: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Zero client k's A columns and B rows beyond its rank (a: [K, in, r], b: [K, r, out])."""
  mask = mask.astype(a.dtype)
  return a * mask[:, None, :], b * mask.astype(b.dtype)[:, :, None]


# ----------------------------------------------------------------------------- one target


def normalize_weights(weights: jax.Array) -> jax.Array:
  """weights / sum(weights); all-zero weights (no client reported) give zeros, not NaN."""
  w = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(w)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def _prepare(a: jax.Array, b: jax.Array, weights: jax.Array,
             mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
    raise ValueError(f"LoRA factors must be stacked A [K, in, r] and B [K, r, out]; got "
                     f"{a.shape} and {b.shape}")
  if mask is not None:
    a, b = apply_rank_mask(a, b, mask)
  return a, b, normalize_weights(weights)


def _mean(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.tensordot(w.astype(x.dtype), x, axes=1, precision=_HIGHEST)


def _client_scaling(scaling: Scaling, client_scaling: jax.Array | None, k: int) -> jax.Array:
  s = scaling if client_scaling is None else client_scaling
  return jnp.broadcast_to(jnp.asarray(s, jnp.float32), (k,))


def product_sum(a: jax.Array, b: jax.Array, coefficients: jax.Array,
                client_scaling: Scaling = 1.0, mask: jax.Array | None = None) -> jax.Array:
  """sum_k c_k s_k A_k B_k [in, out] with the coefficients as given (not normalised): the
  engine accumulates it chunk by chunk and divides by the round's weight sum once."""
  if mask is not None:
    a, b = apply_rank_mask(a, b, mask)
  coef = (jnp.asarray(coefficients, jnp.float32)
          * _client_scaling(client_scaling, None, a.shape[0])).astype(a.dtype)
  return jnp.einsum("k,kir,kro->io", coef, a, b, precision=_HIGHEST)


def weighted_product(a: jax.Array, b: jax.Array, weights: jax.Array,
                     client_scaling: Scaling = 1.0, mask: jax.Array | None = None) -> jax.Array:
  """sum_k w_k s_k A_k B_k [in, out]: the exact average of the clients' LoRA deltas."""
  a, b, w = _prepare(a, b, weights, mask)
  return product_sum(a, b, w, client_scaling)


def fedex_residual(product_mean: jax.Array, a_new: jax.Array, b_new: jax.Array,
                   scaling: Scaling) -> jax.Array:
  """FedEx-LoRA's residual sum_k w_k s_k A_k B_k - s A'B' [in, out]: what the frozen weight
  must absorb so that W + residual + s A'B' is the average model whatever A', B' are."""
  approx = jnp.asarray(scaling, a_new.dtype) * jnp.matmul(a_new, b_new, precision=_HIGHEST)
  return product_mean - approx


def fresh_factors(key: jax.Array, d_in: int, r: int, d_out: int,
                  dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """LoRA's init (`peft.layers.LoRA`): A from `kaiming_uniform_a_sqrt5` on [in, r], B zero."""
  return kaiming_uniform_a_sqrt5(key, (d_in, r), dtype), jnp.zeros((r, d_out), dtype)


def fedit(a: jax.Array, b: jax.Array, weights: jax.Array,
          mask: jax.Array | None = None) -> LoraAggregate:
  """FedIT (Zhang et al., ICASSP 2024): A' = sum w_k A_k, B' = sum w_k B_k, nothing folded.
  The baseline whose product A'B' is not the average of the products."""
  a, b, w = _prepare(a, b, weights, mask)
  return LoraAggregate(_mean(a, w), _mean(b, w), None)


def ffa(a: jax.Array, b: jax.Array, weights: jax.Array,
        mask: jax.Array | None = None) -> LoraAggregate:
  """FFA-LoRA (Sun et al., ICLR 2024): A is frozen at the shared init, so only B is averaged
  and A (sum w_k B_k) = sum w_k A B_k exactly. A is not communicated: the server keeps its
  own copy, returned here as client 0's (identical across clients by construction)."""
  a, b, w = _prepare(a, b, weights, mask)
  return LoraAggregate(a[0], _mean(b, w), None)


def fedex(a: jax.Array, b: jax.Array, weights: jax.Array, scaling: Scaling,
          client_scaling: jax.Array | None = None,
          mask: jax.Array | None = None) -> LoraAggregate:
  """FedEx-LoRA (Singhal et al., 2025): FedIT's A', B' plus the residual
  dW = sum_k w_k s_k A_k B_k - s A'B' for the frozen weight, so that W + dW + s A'B' is
  exactly sum_k w_k (W + s_k A_k B_k): the averaged model, not an approximation of it."""
  a, b, w = _prepare(a, b, weights, mask)
  a_mean, b_mean = _mean(a, w), _mean(b, w)
  exact = product_sum(a, b, w, _client_scaling(scaling, client_scaling, a.shape[0]))
  return LoraAggregate(a_mean, b_mean, fedex_residual(exact, a_mean, b_mean, scaling))


def stack_adapters(a: jax.Array, b: jax.Array, weights: jax.Array, scaling: Scaling = 1.0,
                   client_scaling: jax.Array | None = None,
                   mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """FLoRA's stacking: A_stack [in, K r] = [w_1 s_1 A_1 | ... | w_K s_K A_K] and
  B_stack [K r, out] = [B_1; ...; B_K], so A_stack B_stack = sum_k w_k s_k A_k B_k. Each
  client's own scaling goes into its A block; padded rank slots are zero columns / rows."""
  a, b, w = _prepare(a, b, weights, mask)
  k, d_in, r = a.shape
  coef = (w * _client_scaling(scaling, client_scaling, k)).astype(a.dtype)
  a_stack = jnp.moveaxis(a * coef[:, None, None], 0, 1).reshape(d_in, k * r)
  return a_stack, b.reshape(k * r, b.shape[2])


def flora(a: jax.Array, b: jax.Array, weights: jax.Array, scaling: Scaling, key: jax.Array,
          client_scaling: jax.Array | None = None,
          mask: jax.Array | None = None) -> LoraAggregate:
  """FLoRA (Wang et al., NeurIPS 2024): merge dW = A_stack B_stack (`stack_adapters`) into the
  frozen weight and restart LoRA from a fresh A (the model's init,
  `kaiming_uniform_a_sqrt5` on [in, r]) drawn from `key` and a zero B, so the global model
  after the round is exactly sum_k w_k (W + s_k A_k B_k)."""
  a_stack, b_stack = stack_adapters(a, b, weights, scaling, client_scaling, mask)
  delta = jnp.matmul(a_stack, b_stack, precision=_HIGHEST)
  _, d_in, r = a.shape
  fresh_a, fresh_b = fresh_factors(key, d_in, r, b.shape[2], a.dtype)
  return LoraAggregate(fresh_a, fresh_b, delta)


def aggregate(rule: str, a: jax.Array, b: jax.Array, weights: jax.Array, scaling: Scaling = 1.0,
              key: jax.Array | None = None, client_scaling: jax.Array | None = None,
              mask: jax.Array | None = None) -> LoraAggregate:
  """Dispatch one target to `rule` (one of LORA_AGGREGATIONS)."""
  check_rule(rule)
  if rule == "fedit":
    return fedit(a, b, weights, mask)
  if rule == "ffa":
    return ffa(a, b, weights, mask)
  if rule == "fedex":
    return fedex(a, b, weights, scaling, client_scaling, mask)
  if rule == "flora":
    if key is None:
      raise ValueError("flora re-initialises LoRA's A: pass a PRNG key")
    return flora(a, b, weights, scaling, key, client_scaling, mask)
  raise NotImplementedError(f"federated.lora_aggregation {rule!r} has no aggregation here")


# ----------------------------------------------------------------------------- pytrees


def lora_targets(params: PyTree) -> dict[str, dict[str, str]]:
  """{target prefix: {'a': path, 'b': path, 'kernel': path}} for every LoRA module of a
  (possibly pruned or stacked) param tree; 'a' is absent where the tree holds only B (the
  trainable part under FFA-LoRA). The kernel is the wrapped layer's, `<target>/kernel`."""
  out: dict[str, dict[str, str]] = {}
  for path in flatten(params):
    m = _PAIR.match(path)
    if m:
      out.setdefault(m.group(1), {"kernel": f"{m.group(1)}/kernel"})[m.group(2)] = path
  return dict(sorted(out.items()))


def aggregate_lora_tree(client_params: PyTree, weights: jax.Array, rule: str,
                        scaling: Scaling = 1.0, key: jax.Array | None = None,
                        client_scaling: jax.Array | None = None,
                        mask: jax.Array | None = None) -> tuple[dict, dict]:
  """Apply `rule` to every LoRA pair of `client_params` (leaves stacked [K, ...]).

  Returns (lora, deltas): `lora` the nested tree of the aggregated lora_a / lora_b leaves
  (unstacked; only B under FFA-LoRA when the tree holds no A), `deltas` the nested tree
  {<target>/kernel: dW [in, out]} to add to the frozen weights with `fold_into` (empty
  for fedit / ffa). Leaves other than LoRA factors are not touched: the engine's usual mean
  covers them. flora's `key` is split once per target (in sorted path order).
  """
  check_rule(rule)
  flat = flatten(client_params)
  targets = lora_targets(client_params)
  if not targets:
    raise ValueError("aggregate_lora_tree: no '<target>_lora/lora_a|lora_b' leaf in the params; "
                     "was the model built with peft.method=lora?")
  keys = (jax.random.split(key, len(targets)) if rule == "flora" and key is not None
          else [None] * len(targets))
  lora: dict[str, jax.Array] = {}
  deltas: dict[str, jax.Array] = {}
  for (prefix, paths), k in zip(targets.items(), keys):
    if "b" not in paths:
      raise ValueError(f"LoRA target {prefix!r} has lora_a but no lora_b in the client params")
    b = flat[paths["b"]]
    if "a" not in paths:
      if rule != "ffa":
        raise ValueError(f"LoRA target {prefix!r} has no lora_a in the client params; only "
                         "'ffa' (peft.lora.freeze_a) aggregates B alone")
      w = normalize_weights(weights)
      if mask is not None:
        b = b * mask.astype(b.dtype)[:, :, None]
      lora[paths["b"]] = _mean(b, w)
      continue
    agg = aggregate(rule, flat[paths["a"]], b, weights, scaling, k, client_scaling, mask)
    lora[paths["a"]], lora[paths["b"]] = agg.a, agg.b
    if agg.delta_w is not None:
      deltas[paths["kernel"]] = agg.delta_w
  return unflatten(lora), unflatten(deltas)


def fold_into(frozen: PyTree, folded: PyTree | None) -> PyTree:
  """The frozen tree as clients and evaluation see it: each [in, out] delta of `folded`
  ({<target>/kernel: delta}, `ServerState.folded`) reshaped to its kernel's shape (row-major,
  the layout LoRA multiplies by), added in float32 and cast back to the kernel's dtype (the
  compute dtype of the frozen backbone). `folded` None or empty: `frozen` itself."""
  if not folded:
    return frozen
  fp, fd = flatten(frozen), flatten(folded)
  missing = sorted(fd.keys() - fp.keys())
  if missing:
    raise ValueError(f"fold_into: no kernel in the frozen params for {missing[:5]}; the LoRA "
                     "targets' kernels must be frozen (not trained) to fold deltas into them")
  out = dict(fp)
  for path, d in fd.items():
    kernel = fp[path]
    if np.prod(np.shape(kernel)) != np.prod(np.shape(d)):
      raise ValueError(f"fold_into: delta {np.shape(d)} does not fit kernel {path!r} "
                       f"{np.shape(kernel)}")
    summed = jnp.asarray(kernel, jnp.float32) + jnp.reshape(d, np.shape(kernel)).astype(jnp.float32)
    out[path] = summed.astype(kernel.dtype)
  return unflatten(out)


# ----------------------------------------------------------------------------- the round


def folded_zeros(trainable: PyTree) -> dict:
  """{<target>/kernel: float32 zeros [in, out]} for every LoRA pair of `trainable`: round 0's
  `ServerState.folded` (NumPy, so it places like the rest of the initial state)."""
  flat = flatten(trainable)
  out = {}
  for prefix, paths in lora_targets(trainable).items():
    if "a" not in paths or "b" not in paths:
      raise ValueError(f"LoRA target {prefix!r}: folding rules (fedex, flora) need both lora_a "
                       "and lora_b trainable; peft.lora.freeze_a is FFA-LoRA's setting")
    out[paths["kernel"]] = np.zeros((np.shape(flat[paths["a"]])[0],
                                     np.shape(flat[paths["b"]])[1]), np.float32)
  return unflatten(out)


def _map_pairs(params: PyTree, fn: Any) -> dict:
  """`params` with every LoRA pair (a, b) replaced by fn(prefix, a, b) -> (a, b)."""
  flat = dict(flatten(params))
  for i, (prefix, paths) in enumerate(lora_targets(params).items()):
    flat[paths["a"]], flat[paths["b"]] = fn(i, flat[paths["a"]], flat[paths["b"]])
  return unflatten(flat)


def reinit_lora(trainable: PyTree, key: jax.Array) -> dict:
  """`trainable` with every LoRA pair restarted (`fresh_factors`), target i (in sorted path
  order) drawn from fold_in(key, i); other leaves untouched. FLoRA's restart."""
  def fresh(i, a, b):
    return fresh_factors(jax.random.fold_in(key, i), a.shape[0], a.shape[1], b.shape[1], a.dtype)
  return _map_pairs(trainable, fresh)


@dataclasses.dataclass(frozen=True)
class LoraRound:
  """What a folding rule (fedex, flora) adds to the engine's round, as one pluggable piece:

  * `client_start`: the factors client k starts from (A columns and B rows beyond its rank
    zeroed; the identity with homogeneous ranks). With B = 0 (FLoRA's restart) the padded
    slots then get zero gradients and stay exactly zero under SGD / Adam / weight decay.
  * `products`: a chunk's sum_k c_k s A_k B_k per target, A_k, B_k the client's final
    factors (start + decoded upload, rank-masked): the engine adds it to its running sums.
  * `finalize`: from the round's sums and the server's new trainable tree, the delta to add
    to `ServerState.folded` and the trainable tree the next round starts from.

  Every client computes with the model's scaling s = alpha / r_max (padded ranks share one
  model), so s is one number here.
  """
  rule: str
  scaling: float
  ranks: tuple[int, ...] = ()  # per client id; () = every client at the model's rank

  def __post_init__(self):
    if self.rule not in FOLDING_AGGREGATIONS:
      raise ValueError(f"LoraRound: {self.rule!r} folds nothing; folding rules: "
                       f"{', '.join(FOLDING_AGGREGATIONS)}")

  def _mask(self, client_ids: jax.Array, r_max: int) -> jax.Array:
    return rank_mask(jnp.asarray(self.ranks, jnp.int32)[client_ids], r_max)

  def client_start(self, trainable: PyTree, client_id: jax.Array) -> PyTree:
    if not self.ranks:
      return trainable

    def masked(i, a, b):
      a, b = apply_rank_mask(a[None], b[None], self._mask(client_id[None], a.shape[1]))
      return a[0], b[0]
    return _map_pairs(trainable, masked)

  def products(self, sent: PyTree, updates: PyTree, coefficients: jax.Array,
               client_ids: jax.Array) -> dict:
    """{<target>/kernel: sum_k c_k s A_k B_k}; `sent` unstacked, `updates` [K, ...]."""
    fs, fu = flatten(sent), flatten(updates)
    out = {}
    for paths in lora_targets(sent).values():
      a = fs[paths["a"]][None] + fu[paths["a"]]
      b = fs[paths["b"]][None] + fu[paths["b"]]
      mask = self._mask(client_ids, a.shape[2]) if self.ranks else None
      out[paths["kernel"]] = product_sum(a, b, coefficients, self.scaling, mask)
    return unflatten(out)

  def finalize(self, product_sums: PyTree, weight_sum: jax.Array, trainable: PyTree,
               key: jax.Array) -> tuple[PyTree, dict]:
    """(next trainable, delta for `folded`); `trainable` is the server's updated tree (the
    FedIT mean of the factors under fedavg with lr 1), `weight_sum` the aggregator's
    denominator, `key` flora's restart key."""
    total = jnp.where(weight_sum > 0, weight_sum, 1.0)
    means = jax.tree_util.tree_map(lambda p: p / total, product_sums)
    if self.rule == "flora":
      return reinit_lora(trainable, key), means
    flat, fm = flatten(trainable), flatten(means)
    delta = {paths["kernel"]: fedex_residual(fm[paths["kernel"]], flat[paths["a"]],
                                             flat[paths["b"]], self.scaling)
             for paths in lora_targets(trainable).values()}
    return trainable, unflatten(delta)


class Folding(NamedTuple):
  """The round's LoRA folding plug, shaped like `aggregation.Aggregator` so the round calls
  it without a branch per rule:

  * `init(trainable) -> folded`: round 0's `ServerState.folded` (and the zeros the round's
    product sums start from); None where the rule folds nothing.
  * `client_start(trainable, client_id) -> trainable`: the factors a client starts from.
  * `contribute(sent, updates, coefficients, client_ids) -> sums`: a chunk's share of the
    round's product sums (None where nothing folds).
  * `finalize(sums, weight_sum, trainable, key) -> (trainable, delta)`: the tree the next
    round starts from, and the delta added to `folded` (None where nothing folds).

  fedit and ffa fold nothing (their aggregation is the plain mean of the trainable leaves):
  their plug is the identity. fedex and flora are `LoraRound`'s methods.
  """
  init: Callable[[PyTree], dict | None]
  client_start: Callable[[PyTree, jax.Array], PyTree]
  contribute: Callable[..., dict | None]
  finalize: Callable[..., tuple[PyTree, dict | None]]


def _no_folded_state(rule: str) -> Callable[[PyTree], None]:
  def init(trainable: PyTree) -> None:
    if rule == "ffa" and any("a" in paths for paths in lora_targets(trainable).values()):
      raise ValueError("federated.lora_aggregation='ffa' (FFA-LoRA) keeps A frozen: build the "
                       "trainable mask with peft.lora.freeze_a=True")
    return None
  return init


def lora_round(rule: str, scaling: float, ranks: Sequence[int] = (),
               num_clients: int | None = None) -> Folding:
  """The round's folding plug for `rule` (`Folding`); `ranks` (flora only) one per client
  id, checked against `num_clients` (the round's: `RoundSpec.num_clients`) unless None."""
  check_rule(rule)
  if len(ranks) and rule != "flora":
    raise ValueError("peft.lora.client_ranks needs federated.lora_aggregation='flora': "
                     "FedIT and FedEx-LoRA average factors of one shape")
  if len(ranks) and num_clients is not None and len(ranks) != num_clients:
    raise ValueError(f"peft.lora.client_ranks: {len(ranks)} ranks, but RoundSpec.num_clients "
                     f"is {num_clients}; give one rank per client")
  if rule not in FOLDING_AGGREGATIONS:
    return Folding(init=_no_folded_state(rule), client_start=lambda trainable, cid: trainable,
                   contribute=lambda sent, updates, coefficients, ids: None,
                   finalize=lambda sums, weight_sum, trainable, key: (trainable, None))
  r = LoraRound(rule, float(scaling), tuple(int(x) for x in ranks))
  return Folding(init=folded_zeros, client_start=r.client_start, contribute=r.products,
                 finalize=r.finalize)


def effective_weights(params: PyTree, scaling: Scaling) -> dict[str, jax.Array]:
  """{<target>/kernel: W + s A B} (kernel-shaped) for every LoRA target of a full param tree:
  the weights the model actually computes with, what aggregation rules are judged by."""
  fp = flatten(params)
  out = {}
  for paths in lora_targets(params).values():
    kernel = fp[paths["kernel"]]
    prod = jnp.matmul(fp[paths["a"]], fp[paths["b"]], precision=_HIGHEST)
    out[paths["kernel"]] = kernel + (jnp.asarray(scaling, prod.dtype) * prod).reshape(kernel.shape)
  return out


__all__ = [
  "FOLDING_AGGREGATIONS",
  "LORA_AGGREGATIONS",
  "Folding",
  "LoraAggregate",
  "LoraRound",
  "aggregate",
  "aggregate_lora_tree",
  "apply_rank_mask",
  "client_ranks",
  "client_scalings",
  "effective_weights",
  "fedex",
  "fedex_residual",
  "fedit",
  "ffa",
  "flora",
  "fold_into",
  "folded_zeros",
  "fresh_factors",
  "lora_round",
  "lora_targets",
  "normalize_weights",
  "product_sum",
  "rank_mask",
  "reinit_lora",
  "stack_adapters",
  "weighted_product",
]
