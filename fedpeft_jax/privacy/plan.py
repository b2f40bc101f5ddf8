"""A run's privacy policy, from its config to the ledger: `PrivacyPlan`.

The plan turns `config.privacy` and the run's shape (client sizes, clients per round,
local steps per client, trainable tensors) into plain numbers: what each client does
to its gradients (`ClientDP`), what the server does to the sum (`ServerDP`),
the noise calibrated to a target, the batch capacity of Poisson sampling, the planned
epsilon and the budget checks; during the run it keeps the `PrivacyLedger` and writes
the privacy fields of each metrics row and of the summary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np

from fedpeft_jax.privacy.dp_specs import ClientDP, ServerDP
from fedpeft_jax.privacy.accounting import (CALIBRATION_TOL, OVERFLOW_DELTA_FRACTION,
                                            PrivacyBudgetError, PrivacyLedger,
                                            calibrate_noise_multiplier,
                                            check_budget, dp_fedavg_epsilon, dp_sgd_epsilon,
                                            example_uses_per_round, gaussian_epsilon,
                                            overflow_budget, paper_gaussian_noise_multiplier,
                                            poisson_capacity_for_run,
                                            poisson_overflow_probability, truncation_delta)
from fedpeft_jax.privacy.config import (REPRODUCIBLE_NOISE_NOTE, paper_sigma_from_config,
                                        privacy_metadata, resolve_noise_multiplier,
                                        validate_privacy)
from fedpeft_jax.privacy.mechanisms import (default_count_stddev, poisson_capacity,
                                            value_noise_multiplier)

# What no epsilon covers: fields of metrics rows (and of the run summary, which shares the
# runner's names) computed from the training data or from who took part, without noise.
# Un-noised statistics of the clients' training, under every DP mechanism:
#   train_loss (mean of the real losses), clients_nonfinite (whether an update came out
#   NaN/inf: clipping does not bound a NaN) and clients_contributed (reporting minus those).
_UNNOISED = ("train_loss", "clients_contributed", "clients_nonfinite")
# The partition's per-client sizes and label statistics (summary 'partition'), and the
# per-client evaluation: each client's test set follows its training class mix.
_DATA_STATISTICS = ("partition", "personalized_accuracy", "personalized_accuracy_min",
                    "personalized_accuracy_max", "final_personalized_accuracy",
                    "personalized_accuracy_trained", "final_personalized_accuracy_trained")
# Who took part: what Poisson sampling of clients hides under DP-FedAvg (the unit is a
# client), so counts of clients and everything derived from them (steps, bytes, time).
_PARTICIPATION = ("clients_sampled", "clients_reporting", "local_steps", "executed_steps",
                  "bytes_up", "bytes_down", "cumulative_bytes",
                  "cumulative_bytes_full_equivalent", "seconds", "total_bytes",
                  "total_bytes_full_equivalent", "train_seconds", "wall_seconds_this_session")
NON_PRIVATE_METRICS: dict[str, tuple[str, ...]] = {
    "none": (),  # nothing is private without DP
    "paper_gaussian": _UNNOISED + _DATA_STATISTICS,
    # poisson_dropped: how many sampled rows overflowed the capacity, a function of the
    # realised (secret) Poisson batch sizes.
    "dp_sgd": _UNNOISED + ("poisson_dropped",) + _DATA_STATISTICS,
    # unclipped_fraction: the exact share of clients under the clip norm (the adaptive
    # clipping uses only its noised version, unclipped_fraction_noisy).
    "dp_fedavg": _UNNOISED + _PARTICIPATION + ("unclipped_fraction",) + _DATA_STATISTICS,
}


def _round_up(x: float, digits: int = 3) -> float:
  """x rounded up to `digits` significant digits (for advice: 'at least this')."""
  if not (x > 0 and math.isfinite(x)):
    return x
  scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
  return math.ceil(x / scale) * scale


def _round_down(x: float, digits: int = 3) -> float:
  """x rounded down to `digits` significant digits (for advice: 'at most this')."""
  if not (x > 0 and math.isfinite(x)):
    return x
  scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
  return math.floor(x / scale) * scale


class PrivacyPlan:
  """Builds the client/server DP settings of a run and keeps its privacy ledger.

  PrivacyPlan(config, sizes, clients_per_round, steps_of, num_trainable_tensors)

  config: the run's config (uses config.privacy and config.federated: num_clients,
    rounds, batch_size). sizes: examples per client (int array, one per client).
    clients_per_round: the resolved number m (q = m / num_clients). steps_of: n -> the
    real local steps a client of n examples runs in one round (what the engine runs:
    epochs x ceil(n / B), capped by federated.local_steps). num_trainable_tensors: k,
    the number of trainable leaves (paper_gaussian clips each one: sensitivity
    2C sqrt(k)); ignored by the other mechanisms.

  Raises PrivacyBudgetError (one line naming the fields and what would work) when the
  configuration cannot be run as asked: a calibration target out of reach, adaptive
  clipping whose count noise is too small for the noise multiplier, a pinned
  privacy.poisson_overflow_prob whose truncation would add more than delta/10 to
  delta, or budget_action='refuse' with a plan over privacy.max_epsilon.

  Attributes for the runner: mechanism, client (ClientDP), server (ServerDP),
  clip_norm (the server's initial clip norm: C for dp_fedavg, else 0), noise (the
  accounted noise multiplier; paper_gaussian: sigma / (2C sqrt(k))), ledger (None
  without DP; replace it with PrivacyLedger.from_dict on resume), max_epsilon,
  planned_epsilon, poisson_clients (draw clients by Poisson sampling), non_private_metrics
  and log_non_private (see filter_metrics), reproducible_noise.
  """

  def __init__(self, config: ml_collections.ConfigDict, sizes: Sequence[int],
               clients_per_round: int, steps_of: Callable[[int], int],
               num_trainable_tensors: int):
    p = config.privacy
    fed = config.federated
    self.mechanism = validate_privacy(p)
    self.sizes = np.asarray(sizes, np.int64)
    if self.sizes.ndim != 1 or self.sizes.size != fed.num_clients:
      raise ValueError(f"sizes: expected {fed.num_clients} client sizes, got shape "
                       f"{self.sizes.shape}")
    self.batch = int(fed.batch_size)
    self.num_clients = int(fed.num_clients)
    self.rounds = int(fed.rounds)
    self.clients_per_round = int(clients_per_round)
    self.q_round = self.clients_per_round / self.num_clients
    self.steps_of = steps_of
    self.num_trainable_tensors = int(num_trainable_tensors)
    self.delta = float(p.delta)
    self.max_epsilon = None if p.max_epsilon is None else float(p.max_epsilon)
    self.budget_action = p.budget_action
    self.reproducible_noise = bool(p.reproducible_noise)
    self.non_private_metrics: tuple[str, ...] = NON_PRIVATE_METRICS[self.mechanism]
    self.log_non_private = (self.mechanism == "none" if p.log_non_private_metrics is None
                            else bool(p.log_non_private_metrics))
    self.poisson_clients = self.mechanism == "dp_fedavg" and p.sampling == "poisson"
    self._metadata = privacy_metadata(p)
    self.client = ClientDP()
    self.server = ServerDP()
    self.ledger: Optional[PrivacyLedger] = None
    self.clip_norm = 0.0
    self.noise = 0.0
    self.paper_sigma: Optional[float] = None
    self.nominal_epsilon: Optional[float] = None
    self.planned_epsilon: Optional[float] = None
    self.planned_epsilon_client: Optional[float] = None  # paper_gaussian's per-client unit
    self.capacity = 0
    self.overflow_probability = 0.0  # dp_sgd + poisson: P(any batch truncated), worst client
    self.delta_total = self.delta  # delta of the guarantee, truncation included
    if self.mechanism == "none":
      return
    self.ledger = PrivacyLedger(self.mechanism, self.delta, p.accountant, p.sampling,
                                num_clients=self.num_clients)
    if self.mechanism == "paper_gaussian":
      self._plan_paper_gaussian(p)
    elif self.mechanism == "dp_sgd":
      self._plan_dp_sgd(p)
    else:
      self._plan_dp_fedavg(p)
    if self.budget_action == "refuse":
      check_budget(self.planned_epsilon, self.max_epsilon, "the planned run")

  # -- the mechanisms

  def _uses_of(self, n: int) -> int:
    return example_uses_per_round(int(n), self.batch, int(self.steps_of(int(n))))

  def _plan_paper_gaussian(self, p: Any) -> None:
    """sigma from the study's formula; accounted as Gaussian steps (planned: the worst
    client joining every round)."""
    self.paper_sigma = paper_sigma_from_config(p)
    self.nominal_epsilon = float(p.epsilon)
    self.noise = paper_gaussian_noise_multiplier(self.paper_sigma, float(p.clip_norm),
                                                 self.num_trainable_tensors)
    self.client = ClientDP("paper_gaussian", float(p.clip_norm), self.paper_sigma,
                           secure_noise=bool(p.secure_noise))
    present = [int(n) for n in np.unique(self.sizes) if n > 0]
    example_steps = self.rounds * max((self._uses_of(n) for n in present), default=0)
    client_steps = self.rounds * max((int(self.steps_of(n)) for n in present), default=0)
    self.planned_epsilon = gaussian_epsilon(self.noise, example_steps, self.delta)
    self.planned_epsilon_client = gaussian_epsilon(self.noise, client_steps, self.delta)

  def _plan_dp_sgd(self, p: Any) -> None:
    """Calibrated for the smallest client (largest rate B / n_i) training every round;
    with Poisson batches, a capacity whose truncation costs at most delta/10."""
    present = self.sizes[self.sizes > 0]
    if present.size == 0:
      raise ValueError("dp_sgd: no client holds an example")
    n_min = int(np.min(present))
    q, steps = min(1.0, self.batch / n_min), self.rounds * int(self.steps_of(n_min))
    self.noise = resolve_noise_multiplier(p, q, steps)
    self.planned_epsilon = float(dp_sgd_epsilon(q, self.noise, steps, self.delta,
                                                p.accountant))
    poisson = p.sampling == "poisson"
    if poisson:
      self._plan_capacity(p)
    self.client = ClientDP("dp_sgd", float(p.clip_norm), self.noise, poisson=poisson,
                           capacity=self.capacity, per_example_chunk=int(p.per_example_chunk),
                           secure_noise=bool(p.secure_noise))

  def _run_steps(self) -> list[int]:
    """Local steps of each client if it joined every planned round (the worst case)."""
    return [self.rounds * int(self.steps_of(int(n))) if n > 0 else 0 for n in self.sizes]

  def _plan_capacity(self, p: Any) -> None:
    """The static Poisson batch capacity and what its truncation costs.

    The engine keeps a random `capacity` rows of an overflowing batch, a mechanism that
    equals the accounted (untruncated) one except with probability p_run (union bound
    over the worst client's steps in all planned rounds), so the guarantee is
    (epsilon, delta + (1 + e^epsilon) p_run) (accounting.truncation_delta). With
    privacy.poisson_overflow_prob None the capacity is the smallest whose extra delta
    is <= delta/10 (for the planned epsilon); a pinned per-step value giving more is
    refused, naming the value and capacity that would do.
    """
    max_n = int(np.max(self.sizes))
    run_steps = self._run_steps()
    budget = overflow_budget(self.planned_epsilon, self.delta)
    if p.poisson_overflow_prob is None:
      self.capacity = poisson_capacity_for_run(self.batch, self.sizes.tolist(), run_steps,
                                               budget)
    else:
      self.capacity = min(poisson_capacity(self.batch, float(p.poisson_overflow_prob)), max_n)
    self.overflow_probability, worst = poisson_overflow_probability(
        self.capacity, self.batch, self.sizes.tolist(), run_steps)
    extra = truncation_delta(self.planned_epsilon, self.overflow_probability)
    self.delta_total = self.delta + extra
    if p.poisson_overflow_prob is not None and extra > OVERFLOW_DELTA_FRACTION * self.delta:
      t_max = max(run_steps)
      per_step = budget / t_max if t_max else 0.0
      ok = min(poisson_capacity(self.batch, per_step), max_n) if 0 < per_step < 1 else max_n
      while ok < max_n and poisson_overflow_probability(
          ok, self.batch, self.sizes.tolist(), run_steps)[0] > budget:
        ok += 1
      raise PrivacyBudgetError(
          f"privacy.poisson_overflow_prob={p.poisson_overflow_prob:g} gives Poisson batches a "
          f"capacity of {self.capacity} rows, which client {worst} ({int(self.sizes[worst])} "
          f"examples, {run_steps[worst]} steps in {self.rounds} rounds) overflows with "
          f"probability {self.overflow_probability:.3g}; truncation then adds (1 + e^epsilon) "
          f"x {self.overflow_probability:.3g} = {extra:.3g} to delta (epsilon "
          f"{self.planned_epsilon:.4g}), more than privacy.delta/10 = "
          f"{OVERFLOW_DELTA_FRACTION * self.delta:.3g}: set privacy.poisson_overflow_prob <= "
          f"{_round_down(per_step, 2):.2g} (capacity {ok}), or None to size the capacity "
          "automatically")

  def _plan_dp_fedavg(self, p: Any) -> None:
    self.noise = resolve_noise_multiplier(p, self.q_round, self.rounds)
    self.clip_norm = float(p.clip_norm)
    m = self.clients_per_round
    count_std, value_z = 0.0, self.noise
    if p.adaptive_clip:
      count_std = default_count_stddev(m, float(p.count_noise_multiplier))
      if not self.noise < 2.0 * count_std:
        raise PrivacyBudgetError(self._adaptive_advice(p))
      value_z = value_noise_multiplier(self.noise, count_std)
    self.server = ServerDP(True, value_z, m, bool(p.adaptive_clip), float(p.target_quantile),
                           float(p.clip_lr), count_std, secure_noise=bool(p.secure_noise))
    self.planned_epsilon = float(dp_fedavg_epsilon(m, self.num_clients, self.noise, self.rounds,
                                                   self.delta, p.accountant))

  def _calibrated_noise(self, p: Any, clients: int) -> Optional[float]:
    """The multiplier calibration would choose with `clients` per round (None: unreachable)."""
    try:
      return calibrate_noise_multiplier(float(p.epsilon), self.delta, clients / self.num_clients,
                                        self.rounds, p.accountant)
    except PrivacyBudgetError:
      return None

  def _adaptive_advice(self, p: Any) -> str:
    """One line: why adaptive clipping cannot run, and the smallest changes that fix it.

    Adaptive clipping splits the noise multiplier z between the update sum and the
    count of unclipped clients, whose std is s = default_count_stddev(m, cnm) = 0.05 m cnm
    (m clients per round, cnm = count_noise_multiplier); that needs z < 2 s
    (mechanisms.value_noise_multiplier). So: cnm > z / (0.1 m); with a fixed z,
    noise_multiplier < 0.1 m cnm or m > 10 z / cnm; with calibration, the epsilon that the
    threshold multiplier spends and the smallest m (searched by bisection, feasibility
    taken as monotone in m) whose calibrated z is below its threshold.
    """
    m, n, z = self.clients_per_round, self.num_clients, self.noise
    cnm = float(p.count_noise_multiplier)

    def bound(clients: int, multiplier: float) -> float:  # z must stay below 2 s
      return 2.0 * default_count_stddev(clients, multiplier)

    def fits(noise: float, clients: int) -> bool:  # strictly: z = 2 s is infinite update noise
      return noise < bound(clients, cnm) * (1 - 1e-9)

    threshold = bound(m, cnm)
    per_unit = bound(1, 1.0)  # the bound is linear in clients and in count_noise_multiplier
    fixes = []
    if p.calibrate:
      why = (f"calibrated to privacy.epsilon={float(p.epsilon):g} over {self.rounds} rounds of "
             f"{m} of {n} clients")
      # below the threshold by more than calibration's tolerance
      z_ok = threshold * (1 - 1e-3) - 2 * CALIBRATION_TOL
      if z_ok > 0:
        eps_ok = dp_fedavg_epsilon(m, n, z_ok, self.rounds, self.delta, p.accountant)
        fixes.append(f"privacy.epsilon >= {_round_up(eps_ok):.4g}")

      def feasible(k: int) -> bool:
        zk = self._calibrated_noise(p, k)
        return zk is not None and fits(zk, k)

      if m < n and feasible(n):
        lo, hi = m, n
        while hi - lo > 1:
          mid = (lo + hi) // 2
          lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
        fixes.append(f"federated.clients_per_round >= {hi}")
      else:
        fixes.append(f"(no federated.clients_per_round <= {n} works at this epsilon)")
    else:
      why = "privacy.noise_multiplier"
      fixes.append(f"privacy.noise_multiplier <= {_round_down(threshold * (1 - 1e-6)):.4g}")
      m_ok = max(1, math.floor(z / (per_unit * cnm)))
      while not fits(z, m_ok):
        m_ok += 1
      fixes.append(f"federated.clients_per_round >= {m_ok}" if m_ok <= n else
                   f"(no federated.clients_per_round <= {n} works at this noise_multiplier)")
    fixes.append(f"privacy.count_noise_multiplier >= "
                 f"{_round_up(z / (per_unit * m) * (1 + 1e-6)):.4g}")
    return (f"privacy.adaptive_clip needs noise_multiplier < {per_unit:g} x clients_per_round x "
            f"privacy.count_noise_multiplier = {threshold:.4g}, but it is {z:.4g} ({why}); "
            f"it works with {', or '.join(fixes)}, or with privacy.adaptive_clip=False")

  # -- during the run

  def _round_args(self, reporting: np.ndarray) -> tuple[list[int], list[int]]:
    ids = [int(c) for c in np.asarray(reporting).tolist()]
    return ids, [int(self.sizes[c]) for c in ids]

  def _dp_sgd_round(self, reporting: np.ndarray) -> tuple:
    ids, ns = self._round_args(reporting)
    return (ids, [min(1.0, self.batch / max(n, 1)) for n in ns], self.noise,
            [int(self.steps_of(n)) for n in ns])

  def _paper_round(self, reporting: np.ndarray) -> tuple:
    ids, ns = self._round_args(reporting)
    return ids, self.noise, [int(self.steps_of(n)) for n in ns], [self._uses_of(n) for n in ns]

  def would_exceed(self, reporting: np.ndarray) -> bool:
    """Budget 'stop': True if recording this round would exceed privacy.max_epsilon
    (paper_gaussian: its per-example epsilon)."""
    if self.ledger is None or self.max_epsilon is None or self.budget_action != "stop":
      return False
    if self.mechanism == "dp_sgd":
      eps = self.ledger.preview_dp_sgd_round(*self._dp_sgd_round(reporting))
    elif self.mechanism == "dp_fedavg":
      eps = self.ledger.preview_dp_fedavg_round(self.q_round, self.noise)
    else:
      eps = self.ledger.preview_paper_gaussian_round(*self._paper_round(reporting))
    return eps > self.max_epsilon

  def record(self, reporting: np.ndarray) -> None:
    """Account a round that ran with these reporting clients."""
    if self.ledger is None:
      return
    if self.mechanism == "dp_sgd":
      self.ledger.record_dp_sgd_round(*self._dp_sgd_round(reporting))
    elif self.mechanism == "dp_fedavg":
      self.ledger.record_dp_fedavg_round(self.q_round, self.noise)
    else:
      self.ledger.record_paper_gaussian_round(*self._paper_round(reporting))

  def restore_ledger(self, state: Optional[dict]) -> None:
    """Resume: the ledger from a checkpoint's `ledger.to_dict()` (None: keep this one)."""
    if self.ledger is None or state is None:
      return
    ledger = PrivacyLedger.from_dict(state)
    if (ledger.mechanism, ledger.delta) != (self.ledger.mechanism, self.ledger.delta):
      raise ValueError(f"the checkpoint's privacy ledger is for {ledger.mechanism!r} at delta "
                       f"{ledger.delta}, this run for {self.mechanism!r} at delta {self.delta}")
    self.ledger = ledger

  def _guarantee(self, out: dict[str, Any]) -> None:
    """Overrides the ledger's formal_guarantee/note where the run's noise is not secret."""
    if self.reproducible_noise:
      out["formal_guarantee"] = False
      out["note"] = "; ".join(x for x in (out.get("note"), REPRODUCIBLE_NOISE_NOTE) if x)

  def metrics(self) -> dict[str, Any]:
    """Privacy fields of a metrics row (what has been spent so far); {} without DP."""
    if self.ledger is None:
      return {}
    report = self.ledger.report()
    out: dict[str, Any] = {"privacy_mechanism": report.pop("mechanism")}
    report.pop("rounds", None)
    if self.noise:
      out["noise_multiplier"] = self.noise
    if self.mechanism == "paper_gaussian":
      out["paper_sigma"] = self.paper_sigma
      out["nominal_epsilon"] = self.nominal_epsilon
    out.update(report)
    if self.client.poisson:
      out["delta_total"] = self.delta_total
    self._guarantee(out)
    return out

  def summary(self) -> dict[str, Any]:
    """Privacy fields of the run summary: the metrics plus the plan (planned epsilon,
    capacity and truncation, the unit, the non-private fields)."""
    # 'mechanism' and 'sigma' come again as privacy_mechanism and paper_sigma
    out = {k: v for k, v in self._metadata.items() if k not in ("mechanism", "sigma")}
    out["privacy_mechanism"] = self.mechanism
    if self.ledger is not None:
      out["planned_epsilon"] = self.planned_epsilon
      if self.mechanism == "paper_gaussian":
        out["planned_epsilon_client"] = self.planned_epsilon_client
        out["num_trainable_tensors"] = self.num_trainable_tensors
      if self.client.poisson:
        out.update(poisson_capacity=self.capacity,
                   poisson_overflow_prob_run=self.overflow_probability,
                   delta_total=self.delta_total)
    out.update(self.metrics())
    out["non_private"] = list(self.non_private_metrics)
    out["log_non_private_metrics"] = self.log_non_private
    return out

  def filter_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
    """`row` without the fields no epsilon covers, unless log_non_private."""
    if self.log_non_private:
      return dict(row)
    return {k: v for k, v in row.items() if k not in self.non_private_metrics}
