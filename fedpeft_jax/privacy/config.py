"""Privacy configuration: one ConfigDict shape for every mechanism.

Any preset can switch privacy on from the command line, e.g.
`--config.privacy.mechanism=dp_sgd --config.privacy.noise_multiplier=1.1`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from fedpeft_jax.privacy.accounting import (ACCOUNTANTS, MECHANISMS, PAPER_GAUSSIAN_NOTE,
                                            SAMPLINGS, SHUFFLE_NOTE, calibrate_noise_multiplier)
from fedpeft_jax.privacy.mechanisms import paper_sigma

BUDGET_ACTIONS = ("stop", "refuse")
REPRODUCIBLE_NOISE_NOTE = ("privacy.reproducible_noise: the noise and the Poisson sampling were "
                           "derived from the published seed, so anyone with config.json can "
                           "regenerate and subtract them: no guarantee holds")


def default_privacy_config() -> ml_collections.ConfigDict:
  """Every privacy field with its default (privacy off)."""
  c = ml_collections.ConfigDict()
  c.mechanism = "none"  # one of MECHANISMS.
  # Clip bound C: per tensor (paper_gaussian), per example (dp_sgd), per client update
  # (dp_fedavg; the initial value with adaptive_clip).
  c.clip_norm = 1.0
  # sigma / C for dp_sgd and dp_fedavg (ignored by paper_gaussian, whose sigma comes
  # from epsilon/delta; and replaced by calibration when calibrate=True).
  c.noise_multiplier = 1.0
  # paper_gaussian: inputs of the study's sigma formula (the study: epsilon 5 or 10,
  # delta 1e-3); delta is also the delta of its accounted epsilon. dp_sgd / dp_fedavg:
  # delta of the reported epsilon; epsilon is the calibration target when calibrate=True.
  c.epsilon = 5.0
  c.delta = 1e-5
  c.calibrate = False  # dp_sgd/dp_fedavg: choose noise_multiplier to reach `epsilon`.
  c.accountant = "rdp"  # 'rdp' or 'pld' (tighter, slower).
  # How the accounted unit is drawn: examples in each local step (dp_sgd) or clients
  # per round (dp_fedavg). The accountant assumes 'poisson'; 'shuffle' (fixed-size)
  # is reported with formal_guarantee=False.
  c.sampling = "poisson"
  # dp_sgd + poisson: per-step probability that a Poisson batch overflows its static
  # capacity (the rows beyond it are dropped). None: size the capacity so truncation adds
  # at most delta/10 to delta over the whole run. A value that would add more is refused.
  c.poisson_overflow_prob = config_dict.placeholder(float)
  c.per_example_chunk = 0  # dp_sgd: per-example grads this many at a time (0 = whole batch).
  # dp_fedavg adaptive clipping (Andrew et al. 2021): track the target_quantile of
  # client update norms, C <- C exp(-clip_lr (b - target_quantile)).
  c.adaptive_clip = False
  c.target_quantile = 0.5
  c.clip_lr = 0.2
  # Noise std of the unclipped-count query = count_noise_multiplier * clients_per_round
  # / 20 (1.0: Andrew et al.'s default); the update noise is raised to keep the
  # overall multiplier at noise_multiplier (mechanisms.value_noise_multiplier).
  c.count_noise_multiplier = 1.0
  # Budget: None = no limit. 'stop' ends training before a round that would exceed
  # it; 'refuse' rejects the config before training if the plan would exceed it.
  c.max_epsilon = config_dict.placeholder(float)
  c.budget_action = "stop"
  # Write the metrics the epsilon does not cover (un-noised losses, client counts, ...;
  # see privacy.plan.NON_PRIVATE_METRICS) to metrics.jsonl and summary.json?
  # None: not under DP, yes without it.
  c.log_non_private_metrics = config_dict.placeholder(bool)
  # False: the DP randomness (noise, Poisson sampling of clients and examples) comes from
  # OS entropy, never from the seed. True: it is derived from the seed, for tests and
  # debugging only; the guarantee is then void (anyone with config.json can regenerate
  # the noise), and the run summary says formal_guarantee: false.
  c.reproducible_noise = False
  # True: each Gaussian noise coordinate is (z_1 + ... + z_4) / 2 of four independent float32
  # draws (still N(0, 1)), as Opacus's secure mode, against the floating-point attacks on a
  # single sample's low-order bits (Mironov 2012); costs 4x the noise draws.
  c.secure_noise = False
  return c


def _num(cfg: Any, field: str) -> float:
  v = cfg[field]
  try:
    return float(v)
  except (TypeError, ValueError):
    raise ValueError(f"privacy.{field} must be a number, got {v!r}") from None


def _choice(cfg: Any, field: str, allowed: tuple[str, ...]) -> None:
  if cfg[field] not in allowed:
    raise ValueError(f"privacy.{field}: unknown value {cfg[field]!r}; allowed: {', '.join(allowed)}")


def validate_privacy(cfg: ml_collections.ConfigDict) -> str:
  """Check every field; return the mechanism. Errors name the field and the rule."""
  _choice(cfg, "mechanism", MECHANISMS)
  _choice(cfg, "accountant", ACCOUNTANTS)
  _choice(cfg, "sampling", SAMPLINGS)
  _choice(cfg, "budget_action", BUDGET_ACTIONS)
  mech = cfg.mechanism
  clip = _num(cfg, "clip_norm")
  if not 0 < clip < math.inf:
    raise ValueError(f"privacy.clip_norm must be > 0 and finite, got {cfg.clip_norm}")
  z = _num(cfg, "noise_multiplier")
  if not 0 <= z < math.inf:
    raise ValueError(f"privacy.noise_multiplier (sigma) must be >= 0 and finite, "
                     f"got {cfg.noise_multiplier}")
  delta = _num(cfg, "delta")
  if not 0 < delta < 1:
    raise ValueError(f"privacy.delta must be in the open interval (0, 1), got {cfg.delta}")
  eps = _num(cfg, "epsilon")
  if not 0 < eps < math.inf:
    raise ValueError(f"privacy.epsilon must be > 0 and finite, got {cfg.epsilon}")
  if mech in ("dp_sgd", "dp_fedavg") and z == 0 and not cfg.calibrate:
    raise ValueError(f"privacy.noise_multiplier is 0 with mechanism {mech!r}: that gives no "
                     "privacy (epsilon = inf); set it > 0, set privacy.calibrate=True, or use "
                     "mechanism 'none'")
  if cfg.poisson_overflow_prob is not None and not 0 < _num(cfg, "poisson_overflow_prob") < 1:
    raise ValueError(f"privacy.poisson_overflow_prob must be in (0, 1) (or None: sized "
                     f"automatically), got {cfg.poisson_overflow_prob}")
  for field in ("log_non_private_metrics", "reproducible_noise", "secure_noise"):
    value = cfg[field]
    if not (isinstance(value, bool) or (value is None and field == "log_non_private_metrics")):
      allowed = "True, False or None" if field == "log_non_private_metrics" else "True or False"
      raise ValueError(f"privacy.{field} must be {allowed}, got {value!r}")
  if int(cfg.per_example_chunk) < 0:
    raise ValueError(f"privacy.per_example_chunk must be >= 0, got {cfg.per_example_chunk}")
  if cfg.adaptive_clip:
    if mech != "dp_fedavg":
      raise ValueError(f"privacy.adaptive_clip is only defined for mechanism 'dp_fedavg', "
                       f"not {mech!r}")
    if not 0 < _num(cfg, "target_quantile") < 1:
      raise ValueError(f"privacy.target_quantile must be in (0, 1), got {cfg.target_quantile}")
    if not _num(cfg, "clip_lr") > 0:
      raise ValueError(f"privacy.clip_lr must be > 0, got {cfg.clip_lr}")
    if not _num(cfg, "count_noise_multiplier") > 0:
      raise ValueError(f"privacy.count_noise_multiplier must be > 0, "
                       f"got {cfg.count_noise_multiplier}")
  if cfg.max_epsilon is not None and not _num(cfg, "max_epsilon") > 0:
    raise ValueError(f"privacy.max_epsilon must be > 0 (or None for no budget), "
                     f"got {cfg.max_epsilon}")
  return mech


def paper_sigma_from_config(cfg: ml_collections.ConfigDict) -> float:
  """sigma of the study's mechanism from privacy.{epsilon, delta, clip_norm}."""
  return paper_sigma(float(cfg.epsilon), float(cfg.delta), float(cfg.clip_norm))


def resolve_noise_multiplier(cfg: ml_collections.ConfigDict, sampling_rate: float,
                             steps: int) -> float:
  """The noise multiplier to train with: privacy.noise_multiplier, or calibrated to
  privacy.epsilon when privacy.calibrate (q, steps: worst client's for dp_sgd;
  clients_per_round / num_clients and rounds for dp_fedavg)."""
  validate_privacy(cfg)
  if not cfg.calibrate:
    return float(cfg.noise_multiplier)
  return calibrate_noise_multiplier(float(cfg.epsilon), float(cfg.delta), sampling_rate, steps,
                                    cfg.accountant)


def privacy_metadata(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Run-summary fields stating what the privacy numbers mean (JSON types); what is
  known from the config alone (PrivacyPlan.summary adds the planned numbers)."""
  mech = validate_privacy(cfg)
  out: dict[str, Any] = {"mechanism": mech}
  if mech == "none":
    out["formal_guarantee"] = False
    return out
  notes = []
  if mech == "paper_gaussian":
    out.update(formal_guarantee=True, unit="example and client", accountant="pld",
               sigma=paper_sigma_from_config(cfg), clip_norm=float(cfg.clip_norm),
               nominal_epsilon=float(cfg.epsilon), delta=float(cfg.delta))
    notes.append(PAPER_GAUSSIAN_NOTE)
  else:
    out.update(formal_guarantee=cfg.sampling == "poisson", sampling=cfg.sampling,
               accountant=cfg.accountant, delta=float(cfg.delta),
               clip_norm=float(cfg.clip_norm), unit="example" if mech == "dp_sgd" else "client")
    if cfg.sampling != "poisson":
      notes.append(SHUFFLE_NOTE)
  out["reproducible_noise"] = bool(cfg.reproducible_noise)
  out["secure_noise"] = bool(cfg.secure_noise)
  if cfg.reproducible_noise:
    out["formal_guarantee"] = False
    notes.append(REPRODUCIBLE_NOISE_NOTE)
  if notes:
    out["note"] = "; ".join(notes)
  return out
