"""The static DP settings the round engine reads: one definition each.

`PrivacyPlan` (plan.py) fills them from a config; the engine (`fedpeft_jax.federated`)
takes them as `ClientSpec.dp` and `RoundSpec.dp`. They live here, beside the mechanisms,
so the engine depends on privacy and never the other way round.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ClientDP:
  """What each client does to its gradients (`ClientSpec.dp`); static, part of the jit key."""
  mechanism: str = "none"  # 'none' | 'paper_gaussian' | 'dp_sgd'
  clip_norm: float = 1.0
  noise_std: float = 0.0  # paper_gaussian: sigma; dp_sgd: noise multiplier (std sigma*C)
  poisson: bool = False  # dp_sgd: Poisson sampling of each batch at rate batch/n_i
  capacity: int = 0  # dp_sgd + poisson: static batch capacity (rows beyond it are dropped)
  per_example_chunk: int = 0  # dp_sgd: per-example gradients this many at a time
  secure_noise: bool = False  # each coordinate a sum of draws (mechanisms.standard_normal)


@dataclasses.dataclass(frozen=True)
class ServerDP:
  """What the server does to the sum of updates (`RoundSpec.dp`): client-level DP-FedAvg
  (McMahan et al. 2018) with optional adaptive clipping (Andrew et al. 2021)."""
  enabled: bool = False
  noise_multiplier: float = 0.0  # of the update sum (with adaptive clipping: the value part)
  expected_clients: int = 1  # the sum is divided by this (clients_per_round)
  adaptive: bool = False
  target_quantile: float = 0.5
  clip_lr: float = 0.2
  count_noise_std: float = 0.0  # std of the noise on the count of unclipped clients
  secure_noise: bool = False  # each coordinate a sum of draws (mechanisms.standard_normal)
