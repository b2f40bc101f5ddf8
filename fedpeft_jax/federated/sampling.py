"""Deterministic client sampling and client stability, from (seed, round) alone.

Sampling on the host from a counter-based seed keeps rounds reproducible after a
resume and independent of how clients are later laid out on devices.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedpeft_jax.choices import one_of

# federated.client_sampling: 'uniform' draws exactly clients_per_round without replacement;
# 'poisson' takes each client with probability clients_per_round / num_clients (a random
# count), the draw DP-FedAvg's accounting assumes, so a non-DP reference can sample alike.
CLIENT_SAMPLINGS = ("uniform", "poisson")


def check_client_sampling(sampling: str) -> str:
  """`sampling` if it is one of CLIENT_SAMPLINGS (ValueError naming the field)."""
  return one_of("client_sampling", sampling, CLIENT_SAMPLINGS)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """Who trains in a round: `sampled` clients, of which `reporting` send an update."""
  round: int
  sampled: np.ndarray  # int32 client ids, sorted
  reporting: np.ndarray  # int32 client ids that did not drop out, sorted

  @property
  def num_sampled(self) -> int:
    return int(self.sampled.size)

  @property
  def num_reporting(self) -> int:
    return int(self.reporting.size)


def resolve_clients_per_round(num_clients: int, clients_per_round: int = 0,
                              participation: float = 0.0) -> int:
  """`clients_per_round` if > 0, else round(participation * num_clients) (at least 1)."""
  if num_clients <= 0:
    raise ValueError(f"federated.num_clients must be > 0, got {num_clients}")
  if clients_per_round > 0:
    if clients_per_round > num_clients:
      raise ValueError(f"federated.clients_per_round ({clients_per_round}) exceeds "
                       f"federated.num_clients ({num_clients})")
    return int(clients_per_round)
  if not 0.0 < participation <= 1.0:
    raise ValueError(f"federated.participation must be in (0, 1] when clients_per_round is 0, "
                     f"got {participation}")
  return max(1, int(round(participation * num_clients)))


def plan_round(seed: int, round_index: int, num_clients: int, clients_per_round: int,
               dropout: float = 0.0, poisson: bool = False) -> RoundPlan:
  """Uniform sampling without replacement, then each client drops with prob `dropout`.

  `poisson=True` instead takes every client independently with probability
  clients_per_round / num_clients (a random number per round): the sampling that
  client-level DP accounting (DP-FedAvg) assumes.

  `seed` (any integer >= 0, all its bits used): a run passes its `sampling` stream's
  seed (`fedpeft_jax.rng.stream_seed`), or under DP-FedAvg its secret `dp` stream's
  (`rng.key_seed` of the key), since who takes part is what client-level DP hides.
  """
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"federated.dropout must be in [0, 1), got {dropout}")
  if int(seed) < 0:
    raise ValueError(f"plan_round: seed must be >= 0, got {seed}")
  rng = np.random.default_rng([int(seed), int(round_index), 0x5A3])
  if poisson:
    sampled = np.flatnonzero(rng.random(num_clients) < clients_per_round / num_clients)
  elif clients_per_round == num_clients:
    sampled = np.arange(num_clients)
  else:
    sampled = np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))
  drop = rng.random(sampled.size) < dropout
  return RoundPlan(round=int(round_index), sampled=sampled.astype(np.int32),
                   reporting=sampled[~drop].astype(np.int32))
