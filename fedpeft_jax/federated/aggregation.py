"""How a round's client updates become the server's mean update: pluggable aggregators.

An `Aggregator` is a pair of pure functions the jitted round calls; the round itself has
no branch per rule. `contribute` runs per chunk of clients (updates stacked on a leading
axis) and returns what enters the running sums; `finalize` runs once on the sums.

* `weighted_mean`: FedAvg's mean, weighted by examples or uniform over the clients that
  trained on data, with optional robustness clipping of each update (`max_update_norm`).
* `dp_fedavg`: DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et
  al. 2021). Clipping, noise and the clip-norm update are `fedpeft_jax.privacy.mechanisms`'
  functions: the one implementation of each, tested there.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax.choices import one_of
from fedpeft_jax.privacy import mechanisms
from fedpeft_jax.privacy.dp_specs import ServerDP

PyTree = Any
WEIGHTINGS = ("examples", "uniform")


class Contribution(NamedTuple):
  """A chunk's clients as they enter the round's sums."""
  updates: PyTree  # [K, ...] the updates to sum (clipped where the rule clips)
  coefficients: jax.Array  # [K] multiplier of each update in the sum (0 excludes it)
  weights: jax.Array  # [K] what each adds to the denominator of the weighted mean
  norms: jax.Array  # [K] each update's global L2 norm before clipping


class Aggregator(NamedTuple):
  """contribute(updates, num_examples, ok, clip_norm, norms=None) -> Contribution, per chunk
  (`norms`: given where the clients clipped their updates to `bound` themselves, each
  update's norm before that clip, to report in place of the clipped updates' own);
  finalize(update_sum, weight_sum, norms, ok, clip_norm, key) -> (mean_update,
  new_clip_norm, apply, metrics), once per round over all slots (`norms`, `ok`: [slots]);
  bound(clip_norm) -> the L2 norm `contribute` clips each update to, or None where it does
  not clip. A client that keeps error feedback clips update + residual to `bound` before
  it compresses, so the server's clip cuts nothing the residual does not hold."""
  contribute: Callable[..., Contribution]
  finalize: Callable[..., tuple[PyTree, jax.Array, jax.Array, dict]]
  bound: Optional[Callable[[jax.Array], jax.Array]] = None


def check_weighting(weighting: str) -> str:
  """federated.weighting: how client updates are weighted (WEIGHTINGS)."""
  return one_of("federated.weighting", weighting, WEIGHTINGS)


def weighted_mean(weighting: str = "examples", max_update_norm: float = 0.0) -> Aggregator:
  """The mean of the reporting clients' updates weighted by their example counts
  ('examples') or equally ('uniform'); only clients that trained on data (n_i > 0) count.
  `max_update_norm` > 0 clips each update to that norm first (robustness, not privacy)."""
  check_weighting(weighting)

  def contribute(updates, num_examples, ok, clip_norm, norms=None):
    if max_update_norm > 0:
      updates, own_norms = mechanisms.clip_per_example(updates, max_update_norm)
    else:
      own_norms = jax.vmap(optax.tree.norm)(updates)
    norms = own_norms if norms is None else norms
    trained = ok & (num_examples > 0)
    w = (jnp.where(trained, num_examples, 0.0) if weighting == "examples"
         else trained.astype(jnp.float32))
    return Contribution(updates, w, w, norms)

  def finalize(update_sum, weight_sum, norms, ok, clip_norm, key):
    mean = optax.tree.scale(1.0 / jnp.maximum(weight_sum, 1e-12), update_sum)
    return mean, clip_norm, weight_sum > 0, {}

  bound = (lambda clip_norm: jnp.asarray(max_update_norm, jnp.float32)
           ) if max_update_norm > 0 else None
  return Aggregator(contribute, finalize, bound)


def dp_fedavg(dp: ServerDP, max_update_norm: float = 0.0) -> Aggregator:
  """DP-FedAvg: each reporting client's update clipped to the current clip norm C, the
  sum noised with N(0, (z C)^2) and divided by the expected number of clients (a fixed
  denominator: the realised count would leak who took part). With `dp.adaptive`, C
  follows the noised fraction of unclipped clients towards `dp.target_quantile`."""

  def contribute(updates, num_examples, ok, clip_norm, norms=None):
    if max_update_norm > 0:
      updates, _ = mechanisms.clip_per_example(updates, max_update_norm)
    clipped, own_norms = mechanisms.clip_per_example(updates, clip_norm)
    # The adaptive count's norms: after the robustness clip, before the clip to C.
    if norms is None:
      norms = own_norms
    elif max_update_norm > 0:
      norms = jnp.minimum(norms, max_update_norm)
    one = ok.astype(jnp.float32)
    return Contribution(clipped, one, one, norms)

  def finalize(update_sum, weight_sum, norms, ok, clip_norm, key):
    k_sum, k_count = jax.random.split(key)
    noisy = mechanisms.noisy_sum(update_sum, k_sum, clip_norm, dp.noise_multiplier,
                                 dp.secure_noise)
    mean = optax.tree.scale(1.0 / dp.expected_clients, noisy)
    metrics = {"clip_norm": clip_norm,
               # Not private (no noise): a diagnostic of the simulation.
               "unclipped_fraction": jnp.sum(ok & (norms <= clip_norm))
               / jnp.maximum(jnp.sum(ok), 1)}
    new_clip = clip_norm
    if dp.adaptive:
      fraction = mechanisms.noisy_unclipped_fraction(norms, ok, k_count, clip_norm,
                                                     dp.count_noise_std, dp.expected_clients,
                                                     dp.secure_noise)
      new_clip = mechanisms.adaptive_clip_update(clip_norm, fraction, dp.target_quantile,
                                                 dp.clip_lr)
      metrics["unclipped_fraction_noisy"] = fraction
    return mean, new_clip, jnp.asarray(True), metrics

  def bound(clip_norm):
    c = jnp.asarray(clip_norm, jnp.float32)
    return jnp.minimum(c, max_update_norm) if max_update_norm > 0 else c

  return Aggregator(contribute, finalize, bound)
