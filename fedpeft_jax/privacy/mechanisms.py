"""Privacy mechanisms as pure JAX functions (jittable, vmappable over clients).

Three mechanisms, kept apart on purpose:
  * `paper_gaussian`: the study's per-tensor batch-gradient clipping plus noise. Two
    clipped batch gradients differ by at most 2C per tensor, so each step is a Gaussian
    mechanism of sensitivity 2C sqrt(k) for k tensors; composed without amplification
    over every step that can use an example (or a client), that gives a real but very
    large epsilon (accounting.paper_gaussian_noise_multiplier). The study's own epsilon
    is only an input of its sigma formula (`paper_sigma`), not that guarantee.
  * DP-SGD (Abadi et al. 2016): per-example clipping of the whole trainable
    gradient, Gaussian noise on the sum, divide by the *expected* batch size.
  * DP-FedAvg (McMahan et al. 2018): each client's whole update is clipped, noise is
    added to the sum at the server; optional adaptive clipping (Andrew et al. 2021).

Each rule has one implementation here: global-norm clipping is `clip_update` (per
example, per client and per tensor alike), the noised sum is `noisy_sum`, Poisson
sampling is `poisson_batch`. The DP-FedAvg aggregation itself lives in
`fedpeft_jax.federated.aggregation`, built from these pieces. Tree arithmetic is
optax's (`optax.tree`), so the norm, scaling and per-leaf key splitting are the ones the
optimizers use.

Every random function takes a key and splits it per leaf, so no two tensors share
noise. Host-side argument checks run only on concrete Python numbers; traced values
(e.g. an adaptive clip norm carried through a jitted round) pass straight through.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats  # a dependency of dp-accounting

PyTree = Any
Scalar = Union[float, jax.Array]


# ----------------------------------------------------------------------------- checks

def _concrete(x: Any) -> Optional[float]:
  """float(x) when x is a concrete number, None when it is traced."""
  if isinstance(x, (int, float, np.integer, np.floating)):
    return float(x)
  if isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0:
    try:
      return float(x)
    except Exception:  # a tracer: checked by nobody, by design
      return None
  return None


def _check(x: Any, name: str, ok: Callable[[float], bool], rule: str) -> None:
  v = _concrete(x)
  if v is not None and (math.isnan(v) or not ok(v)):
    raise ValueError(f"{name} must be {rule}, got {v}")


def check_clip_norm(clip_norm: Any, name: str = "clip_norm") -> None:
  _check(clip_norm, name, lambda v: 0 < v < math.inf, "> 0 and finite")


def check_noise(noise: Any, name: str = "noise_multiplier") -> None:
  _check(noise, name, lambda v: 0 <= v < math.inf, ">= 0 and finite")


def check_delta(delta: Any, name: str = "delta") -> None:
  _check(delta, name, lambda v: 0 < v < 1, "in the open interval (0, 1)")


def check_epsilon(epsilon: Any, name: str = "epsilon") -> None:
  _check(epsilon, name, lambda v: 0 < v < math.inf, "> 0 and finite")


# ----------------------------------------------------------------------------- helpers

def clip_factor(norm: jax.Array, clip_norm: Scalar) -> jax.Array:
  """min(1, C / norm), written as C / max(norm, C) so a gradient already within the
  bound is multiplied by exactly 1.0 (unchanged bit for bit) and a zero norm is safe."""
  c = jnp.asarray(clip_norm, jnp.float32)
  return c / jnp.maximum(norm, c)


def _norm_f32(tree: PyTree) -> jax.Array:
  """optax's global L2 norm, taken in float32: on bfloat16 leaves optax.tree.norm
  returns a bfloat16 norm about 0.3% off, enough for a clipped update to exceed C and
  so break the sensitivity bound the accountant assumes."""
  return optax.tree.norm(optax.tree.cast(tree, jnp.float32))


# `secure` noise: each coordinate the normalised sum of this many independent draws, as
# Opacus's secure mode (after Holohan & Braghin 2021), against the floating-point attacks on
# a single Gaussian sample's low-order bits (Mironov 2012).
SECURE_DRAWS = 4


def standard_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32,
                    secure: bool = False) -> jax.Array:
  """N(0, 1) draws of `shape`; `secure`: (z_1 + ... + z_4) / 2, still exactly N(0, 1)."""
  if not secure:
    return jax.random.normal(key, shape, dtype)
  draws = jax.random.normal(key, (SECURE_DRAWS, *shape), dtype)
  return draws.sum(axis=0) / jnp.sqrt(jnp.asarray(SECURE_DRAWS, dtype))


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: Scalar,
                       secure: bool = False) -> PyTree:
  """tree + N(0, stddev^2) per element; one independent key per leaf (optax's per-leaf
  key split; drawn in float32 and cast to the leaf dtype, so a bfloat16 leaf gets the
  same draw, rounded, as a float32 one). `secure`: `standard_normal`'s secure draws."""
  check_noise(stddev, "noise stddev")
  if not jax.tree_util.tree_leaves(tree):
    return tree
  noise = optax.tree.random_like(key, tree, functools.partial(standard_normal, secure=secure),
                                 jnp.float32)
  scaled = optax.tree.scale(jnp.asarray(stddev, jnp.float32), noise)
  return optax.tree.add(tree, optax.tree.cast_like(scaled, tree))


def masked_sum(per_example: PyTree, mask: jax.Array) -> PyTree:
  """Sum over the leading axis of the rows where `mask` is True.

  `where` rather than multiply: a padded example may carry inf/nan gradients, and
  0 * nan would leak into the sum.
  """
  m = jnp.asarray(mask, bool)

  def one(x: jax.Array) -> jax.Array:
    mm = m.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(mm, x, jnp.zeros((), x.dtype)), axis=0)

  return jax.tree_util.tree_map(one, per_example)


# ----------------------------------------------------------------------------- the study's mechanism

def paper_sigma(epsilon: float, delta: float, clip_norm: float = 1.0) -> float:
  """The study's noise std, sigma = 2C * sqrt(2 ln(1.25/delta) / epsilon).

  It comes from the classic Gaussian mechanism (Dwork & Roth 2014, Thm. A.1): noise
  Delta sqrt(2 ln(1.25/delta)) / epsilon gives (epsilon, delta)-DP for L2 sensitivity
  Delta, and only for epsilon < 1. The study takes Delta = 2C and puts epsilon inside
  the square root (less noise than the theorem's for epsilon < 1, where it holds); we
  keep their formula to reproduce their noise level (~3.38 at epsilon 5, delta 1e-3,
  C 1). So (epsilon, delta) here are formula inputs, not a guarantee: the theorem does
  not apply at the study's epsilon 5 or 10, one step clips k tensors (sensitivity
  2C sqrt(k), not 2C), and a run composes thousands of steps.
  accounting.paper_gaussian_noise_multiplier and the PrivacyLedger give the epsilon
  that does hold.
  """
  check_epsilon(epsilon)
  check_delta(delta)
  check_clip_norm(clip_norm)
  return 2.0 * float(clip_norm) * math.sqrt(2.0 * math.log(1.25 / float(delta)) / float(epsilon))


def clip_per_tensor(grads: PyTree, clip_norm: Scalar) -> PyTree:
  """Each leaf separately scaled to L2 norm <= C (the study's clipping): `clip_update`
  with every tensor as its own tree."""
  check_clip_norm(clip_norm)
  return jax.tree_util.tree_map(lambda g: clip_update(g, clip_norm)[0], grads)


def paper_gaussian(grads: PyTree, key: jax.Array, clip_norm: Scalar, sigma: Scalar,
                   secure: bool = False) -> PyTree:
  """The study's step: clip each tensor's *batch* gradient to norm C, add N(0, sigma^2)
  to every element (fresh key per leaf). A Gaussian mechanism with multiplier
  sigma / (2C sqrt(k)) for k leaves (accounting.paper_gaussian_noise_multiplier)."""
  check_noise(sigma, "sigma")
  return add_gaussian_noise(clip_per_tensor(grads, clip_norm), key, sigma, secure)


# ----------------------------------------------------------------------------- DP-SGD

def clip_per_example(per_example_grads: PyTree, clip_norm: Scalar) -> tuple[PyTree, jax.Array]:
  """(clipped, norms): each example's *whole* gradient (global norm over every leaf,
  leading axis = examples) scaled to norm <= C; norms are the pre-clip norms [B].
  `clip_update` vmapped over the examples: one clipping rule for examples and clients."""
  check_clip_norm(clip_norm)
  return jax.vmap(clip_update, in_axes=(0, None))(per_example_grads, clip_norm)


def noisy_sum(sum_of_clipped: PyTree, key: jax.Array, clip_norm: Scalar,
              noise_multiplier: Scalar, secure: bool = False) -> PyTree:
  """Sum of clipped contributions + N(0, (noise_multiplier * C)^2) per element.

  The Gaussian mechanism on a sum whose L2 sensitivity is C (one example for DP-SGD,
  one client for DP-FedAvg): shared by both."""
  check_clip_norm(clip_norm)
  check_noise(noise_multiplier)
  std = jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip_norm, jnp.float32)
  return add_gaussian_noise(sum_of_clipped, key, std, secure)


def clip_stats(norms: jax.Array, mask: jax.Array, clip_norm: Scalar) -> dict[str, jax.Array]:
  """Diagnostics over the real rows: how many were clipped, mean/max pre-clip norm.
  (Not private: for monitoring a simulation, not for release.)"""
  m = jnp.asarray(mask, bool)
  n = jnp.sum(m).astype(jnp.float32)
  safe = jnp.maximum(n, 1.0)
  clipped = jnp.sum(jnp.where(m, norms > clip_norm, False)).astype(jnp.float32)
  return {
      "clipped_fraction": clipped / safe,
      "norm_mean": jnp.sum(jnp.where(m, norms, 0.0)) / safe,
      "norm_max": jnp.max(jnp.where(m, norms, 0.0)),
      "num_examples": n,
  }


def _batch_size(batch: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("empty batch")
  return int(leaves[0].shape[0])


def _per_example_losses_and_grads(loss_fn: Callable[..., Any], trainable: PyTree,
                                  batch: PyTree, *args: Any) -> tuple[jax.Array, PyTree]:
  """(losses [B], grads [B, ...]): vmap of value_and_grad, so the loss costs no extra pass."""
  vg = jax.value_and_grad(loss_fn)

  def one(example: PyTree) -> Any:
    return vg(trainable, jax.tree_util.tree_map(lambda x: x[None], example), *args)

  return jax.vmap(one)(batch)


def _clipped_sum_and_losses(loss_fn: Callable[..., Any], trainable: PyTree, batch: PyTree,
                            example_mask: jax.Array, clip_norm: Scalar, *args: Any,
                            chunk_size: int = 0) -> tuple[PyTree, jax.Array, jax.Array]:
  """(sum of the clipped per-example gradients over the real rows, pre-clip norms [B],
  losses [B]): the noise-free part of `dp_sgd_grad`, whole or `chunk_size` at a time."""
  b = _batch_size(batch)
  if not chunk_size or chunk_size >= b:
    losses, grads = _per_example_losses_and_grads(loss_fn, trainable, batch, *args)
    clipped, norms = clip_per_example(grads, clip_norm)
    return masked_sum(clipped, example_mask), norms, losses
  if b % chunk_size:
    raise ValueError(f"chunk_size {chunk_size} must divide the batch size {b}")
  n = b // chunk_size
  chunks = jax.tree_util.tree_map(lambda x: x.reshape((n, chunk_size) + x.shape[1:]), batch)
  mchunks = jnp.asarray(example_mask, bool).reshape(n, chunk_size)

  def body(acc: PyTree, xs: tuple[PyTree, jax.Array]) -> tuple[PyTree, tuple]:
    sub, m = xs
    losses, grads = _per_example_losses_and_grads(loss_fn, trainable, sub, *args)
    clipped, norms = clip_per_example(grads, clip_norm)
    return optax.tree.add(acc, masked_sum(clipped, m)), (norms, losses)

  init = optax.tree.zeros_like(trainable)
  total, (norms, losses) = jax.lax.scan(body, init, (chunks, mchunks))
  return total, norms.reshape(b), losses.reshape(b)


def dp_sgd_grad(loss_fn: Callable[..., Any], trainable: PyTree, batch: PyTree,
                example_mask: jax.Array, key: jax.Array, clip_norm: Scalar,
                noise_multiplier: Scalar, expected_batch_size: Scalar, *args: Any,
                chunk_size: int = 0, secure: bool = False
                ) -> tuple[PyTree, dict[str, jax.Array]]:
  """The whole DP-SGD gradient of one local step: (noisy mean gradient, clip stats).

  Per-example gradients of `loss_fn(trainable, example_batch_of_one, *args)` (vmap of
  value_and_grad), each clipped to global norm C, summed over the real rows of
  `example_mask` (NaN-safe), noised with N(0, (sigma C)^2) and divided by the *expected*
  batch size: a fixed denominator (q * n_i under Poisson sampling, B under shuffling)
  rather than the realised count, which depends on the data and would leak.

  With `chunk_size` (> 0, dividing B) the per-example gradients are built `chunk_size`
  at a time in a lax.scan and summed as they go, so memory is chunk_size x |trainable|
  instead of B x |trainable| (matters for full fine-tuning; PEFT subsets are small).
  The stats also hold the per-example `losses` [B] (from the same forward pass).
  """
  _check(expected_batch_size, "expected_batch_size", lambda v: v > 0, "> 0")
  summed, norms, losses = _clipped_sum_and_losses(loss_fn, trainable, batch, example_mask,
                                                  clip_norm, *args, chunk_size=chunk_size)
  noisy = noisy_sum(summed, key, clip_norm, noise_multiplier, secure)
  # x / B leaf by leaf in the leaf's dtype: optax.tree.scale(1 / B, .) rounds differently
  # and, with a traced float32 B (Poisson: min(B, n_i)), would promote bfloat16 leaves.
  d = jnp.asarray(expected_batch_size, jnp.float32)
  grads = jax.tree_util.tree_map(lambda x: (x / d).astype(x.dtype), noisy)
  stats = dict(clip_stats(norms, example_mask, clip_norm))
  stats["losses"] = losses
  return grads, stats


# ----------------------------------------------------------------------------- Poisson sampling

def poisson_batch(key: jax.Array, client_size: Scalar, sampling_rate: Scalar, max_batch: int,
                  pool_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Poisson sampling into a fixed-capacity batch: (indices [max_batch] int32,
  mask [max_batch] bool, num_dropped int32).

  Each of the client's first `client_size` examples (of a padded pool of `pool_size`
  rows, static) is taken independently with probability `sampling_rate`, the
  accountant's assumption. Shapes must be static under jit, so the batch has room for
  `max_batch` rows; if more are drawn, a uniformly random `max_batch` of them are kept
  and the rest dropped (`num_dropped` > 0). That truncation departs from the Poisson
  mechanism the ledger accounts for; choose `max_batch = poisson_capacity(...)` so it
  has negligible probability (and report num_dropped), or account for it exactly with
  accounting.dp_sgd_epsilon_truncated (PLD). Unused slots have mask False, index 0.
  """
  if max_batch <= 0 or max_batch > pool_size:
    raise ValueError(f"max_batch must be in [1, pool_size={pool_size}], got {max_batch}")
  _check(sampling_rate, "sampling_rate", lambda v: 0 <= v <= 1, "in [0, 1]")
  k_take, k_order = jax.random.split(key)
  take = jax.random.uniform(k_take, (pool_size,)) < sampling_rate
  take = take & (jnp.arange(pool_size) < client_size)
  # Random positive score for drawn rows, 0 for the rest: top_k then keeps drawn rows
  # first and, on overflow, a uniformly random subset of them.
  score = jnp.where(take, 1.0 + jax.random.uniform(k_order, (pool_size,)), 0.0)
  values, idx = jax.lax.top_k(score, max_batch)
  mask = values > 0
  dropped = jnp.sum(take).astype(jnp.int32) - jnp.sum(mask).astype(jnp.int32)
  return jnp.where(mask, idx, 0).astype(jnp.int32), mask, dropped


def poisson_schedule(key: jax.Array, client_size: Scalar, sampling_rate: Scalar,
                     num_steps: int, max_batch: int,
                     pool_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`poisson_batch` for `num_steps` independent steps: (positions [S, max_batch],
  mask [S, max_batch], num_dropped [S]), a drop-in for a local schedule's
  (positions, example_mask); positions index the client's row of examples."""
  keys = jax.random.split(key, num_steps)
  return jax.vmap(lambda k: poisson_batch(k, client_size, sampling_rate, max_batch,
                                          pool_size))(keys)


def _smallest_within(sf: Callable[[int], float], lo: int, hi: int, prob: float) -> int:
  """Smallest integer k in [lo, hi] with sf(k) <= prob, for a non-increasing sf with
  sf(hi) <= prob (bisection on the survival function: scipy's isf loses its accuracy
  below ~1e-16, where the run-level capacities of accounting live)."""
  while lo < hi:
    mid = (lo + hi) // 2
    if sf(mid) <= prob:
      hi = mid
    else:
      lo = mid + 1
  return lo


def poisson_capacity(expected_batch: float, overflow_prob: float = 1e-6,
                     client_size: Optional[int] = None) -> int:
  """Batch capacity k with P(sampled count > k) <= overflow_prob, per step (host side):
  the smallest such k.

  With `client_size` n: the Binomial(n, expected_batch / n) tail, exact. Without: the
  Poisson(expected_batch) tail, which bounds the binomial one for every n (Anderson &
  Samuels 1967), so one static capacity serves clients of all sizes when the expected
  batch (q_i n_i = B) is the same. For B = 32 and 1e-6 it is 62: Poisson sampling under
  static shapes costs about 2x the compute of fixed batches of B.
  """
  if not expected_batch > 0:
    raise ValueError(f"expected_batch must be > 0, got {expected_batch}")
  if not 0 < overflow_prob < 1:
    raise ValueError(f"overflow_prob must be in (0, 1), got {overflow_prob}")
  if client_size is None:
    dist = stats.poisson(expected_batch)
    hi = max(1, math.ceil(expected_batch))
    while dist.sf(hi) > overflow_prob:
      hi *= 2
    return max(1, _smallest_within(dist.sf, 0, hi, overflow_prob))
  if client_size <= 0:
    raise ValueError(f"client_size must be > 0, got {client_size}")
  q = min(1.0, expected_batch / client_size)
  dist = stats.binom(client_size, q)
  return max(1, _smallest_within(dist.sf, 0, int(client_size), overflow_prob))


# ----------------------------------------------------------------------------- DP-FedAvg

def clip_update(update: PyTree, clip_norm: Scalar) -> tuple[PyTree, jax.Array]:
  """(update scaled to global L2 norm <= C, its pre-clip norm): one client's whole
  model delta is the unit of privacy in DP-FedAvg. vmap over clients."""
  check_clip_norm(clip_norm)
  norm = _norm_f32(update)
  scale = clip_factor(norm, clip_norm)
  return optax.tree.cast_like(optax.tree.scale(scale, update), update), norm


def default_count_stddev(expected_clients: float, count_noise_multiplier: float = 1.0) -> float:
  """Noise std of the clipped-count query: count_noise_multiplier * m / 20 (1.0 gives
  Andrew et al.'s default m / 20 for m expected clients per round)."""
  if not count_noise_multiplier > 0:
    raise ValueError(f"count_noise_multiplier must be > 0, got {count_noise_multiplier}")
  return 0.05 * float(expected_clients) * float(count_noise_multiplier)


def value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
  """Noise multiplier to put on the clipped updates when the clip norm is adapted.

  Andrew et al. (2021), Thm. 1: releasing the update sum with multiplier z_v and the
  count of unclipped clients (values b_i - 1/2, sensitivity 1/2) with std s is, per
  round, a Gaussian mechanism with multiplier z = (z_v^-2 + (2 s)^-2)^-1/2. Given the
  target z we solve for z_v; the accountant then uses z unchanged.
  """
  check_noise(noise_multiplier)
  if count_stddev <= 0:
    raise ValueError(f"count_stddev must be > 0 with adaptive clipping, got {count_stddev}")
  if noise_multiplier == 0:
    return 0.0
  if noise_multiplier >= 2 * count_stddev:
    raise ValueError(
        f"count_stddev={count_stddev} is too small for noise_multiplier={noise_multiplier}: "
        f"adaptive clipping needs noise_multiplier < 2 * count_stddev (increase "
        "count_stddev or clients per round, or decrease noise_multiplier)")
  return float((noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5)


def noisy_unclipped_fraction(norms: jax.Array, client_mask: jax.Array, key: jax.Array,
                             clip_norm: Scalar, count_stddev: Scalar,
                             expected_clients: Scalar, secure: bool = False) -> jax.Array:
  """Private estimate of the fraction of clients whose update norm was <= C.

  Each client contributes b_i - 1/2 (b_i = 1[norm_i <= C]) so one client changes the
  sum by at most 1/2; noise N(0, count_stddev^2); divide by the expected count, add
  1/2 back, clip to [0, 1]."""
  m = jnp.asarray(client_mask, bool)
  b = jnp.where(m, (norms <= clip_norm).astype(jnp.float32) - 0.5, 0.0)
  noisy = jnp.sum(b) + jnp.asarray(count_stddev, jnp.float32) * standard_normal(
      key, (), jnp.float32, secure)
  return jnp.clip(noisy / jnp.asarray(expected_clients, jnp.float32) + 0.5, 0.0, 1.0)


def adaptive_clip_update(clip_norm: Scalar, unclipped_fraction_noisy: Scalar,
                         target_quantile: Scalar, lr: Scalar) -> jax.Array:
  """Geometric quantile tracking (Andrew et al. 2021): C <- C * exp(-lr (b - gamma)).

  If more than the target fraction gamma of clients fall under C, C shrinks, and vice
  versa; only the noised fraction is used, so the update is post-processing."""
  _check(target_quantile, "target_quantile", lambda v: 0 < v < 1, "in (0, 1)")
  _check(lr, "clip_lr", lambda v: v > 0, "> 0")
  b = jnp.asarray(unclipped_fraction_noisy, jnp.float32)
  return jnp.asarray(clip_norm, jnp.float32) * jnp.exp(
      -jnp.asarray(lr, jnp.float32) * (b - jnp.asarray(target_quantile, jnp.float32)))
