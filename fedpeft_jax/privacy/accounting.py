"""Host-side privacy accounting with Google's `dp_accounting` (RDP and PLD).

Every epsilon reported here is `dp_accounting`'s own answer for an explicit DpEvent, never
a formula of ours, so anyone can rebuild the event and check the number.

* DP-SGD (sample level): the unit is one example of one client. Client i's examples
  are touched only in the local steps of rounds it joins, each a Poisson-subsampled
  Gaussian with q_i = batch / n_i (`PoissonSampledDpEvent(q, GaussianDpEvent(z))`); its
  epsilon composes those steps (amplification by client sampling is ignored, which is
  conservative). The run's epsilon is the worst client's; the distribution is reported too.
* DP-FedAvg (client level): the unit is a whole client; every round is one
  subsampled Gaussian with q = clients_per_round / num_clients.
* paper_gaussian (the study's mechanism): each local step releases the batch gradient
  with each of its k trainable tensors clipped to C plus N(0, sigma^2) per element. Any
  two such clipped batch gradients differ by at most 2C per tensor, 2C sqrt(k) overall,
  so a step is a Gaussian mechanism with multiplier sigma / (2C sqrt(k)); we compose
  `GaussianDpEvent`s without any amplification, per example (the steps whose batch holds
  it) and per client (all of its steps). The study's own epsilon is only an input of
  its sigma formula (`mechanisms.paper_sigma`); this is the guarantee that holds.
* none: nothing to account.

Client sizes n_i are treated as public throughout (the accountants use them for q_i,
the step counts and the FedAvg weights). Neighbouring datasets: DP-SGD and DP-FedAvg
add or remove one example / one client (dp_accounting's relation for Poisson
sampling); paper_gaussian replaces one example (per example) or one client's whole
data by any other data of the same size (per client).

`PrivacyLedger` keeps only (q, z, steps) triples, merged per distinct (q, z), so its
state is a few numbers per client and round-trips through plain dicts / JSON.
"""

from __future__ import annotations

import copy as _copy
import json
import math
from typing import Any, Iterable, Optional, Sequence, Union

import dp_accounting
import numpy as np
from scipy import stats

from fedpeft_jax.privacy.mechanisms import (check_delta, check_epsilon, check_noise,
                                            poisson_capacity)

ACCOUNTANTS = ("rdp", "pld")
MECHANISMS = ("none", "paper_gaussian", "dp_sgd", "dp_fedavg")
SAMPLINGS = ("poisson", "shuffle")
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value_discretization_interval
# Below this noise multiplier calibration stops: the target needs practically no noise.
MIN_NOISE_MULTIPLIER = 1e-3
CALIBRATION_TOL = 1e-4  # calibrated noise multipliers are within this of the smallest one
# Truncating Poisson batches to a static capacity may add at most this fraction of delta.
OVERFLOW_DELTA_FRACTION = 0.1

PAPER_GAUSSIAN_NOTE = (
    "paper_gaussian: epsilon (per example: the steps whose batch holds it) and "
    "epsilon_client (per client: all of its local steps) are dp_accounting's PLD epsilons "
    "of composing, without amplification, every local step as a Gaussian mechanism of L2 "
    "sensitivity 2C sqrt(k) (each of the k trainable tensors' batch gradients clipped to C) "
    "and noise sigma; nominal_epsilon (privacy.epsilon) is only the input of the study's "
    "sigma formula, not a guarantee")
SHUFFLE_NOTE = ("epsilon computed as if batches were Poisson-sampled; fixed-size shuffled "
                "batches are not covered by this analysis, so it is not a formal guarantee")


class PrivacyBudgetError(ValueError):
  """A target epsilon that cannot be met, or a budget a run would exceed."""


# ----------------------------------------------------------------------------- events

def _check_accountant(accountant: str) -> str:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"privacy.accountant: unknown accountant {accountant!r}; "
                     f"allowed: {', '.join(ACCOUNTANTS)}")
  return accountant


def _check_rate(q: float, name: str = "sampling_rate") -> float:
  q = float(q)
  if not 0.0 <= q <= 1.0 or math.isnan(q):
    raise ValueError(f"{name} must be in [0, 1], got {q}")
  return q


def _check_steps(steps: Any, name: str = "steps") -> int:
  if isinstance(steps, float) and not steps.is_integer():
    raise ValueError(f"{name} must be a non-negative integer, got {steps}")
  s = int(steps)
  if s < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {steps}")
  return s


def make_accountant(accountant: str = "rdp") -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant (add-or-remove-one neighbouring relation)."""
  if _check_accountant(accountant) == "rdp":
    return dp_accounting.rdp.RdpAccountant()
  return dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def sampled_gaussian_event(sampling_rate: float, noise_multiplier: float,
                           steps: int = 1) -> dp_accounting.DpEvent:
  """`steps` compositions of a Poisson-subsampled Gaussian (NoOp when nothing ran)."""
  q = _check_rate(sampling_rate)
  check_noise(noise_multiplier)
  s = _check_steps(steps)
  if s == 0 or q == 0.0:
    return dp_accounting.NoOpDpEvent()
  inner = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(float(noise_multiplier)))
  return dp_accounting.SelfComposedDpEvent(inner, s)


def epsilon_of(event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp") -> float:
  """dp_accounting's epsilon for `event` at `delta` (inf when a step had no noise)."""
  check_delta(delta)
  acc = make_accountant(accountant)
  acc.compose(event)
  return float(acc.get_epsilon(float(delta)))


def dp_sgd_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
                   accountant: str = "rdp") -> float:
  """Epsilon of `steps` DP-SGD steps with Poisson rate q and noise multiplier z."""
  return epsilon_of(sampled_gaussian_event(sampling_rate, noise_multiplier, steps), delta,
                    accountant)


def dp_sgd_epsilon_truncated(dataset_size: int, sampling_rate: float, max_batch: int,
                             noise_multiplier: float, steps: int, delta: float) -> float:
  """Epsilon of DP-SGD with Poisson sampling *truncated* to `max_batch` rows (a random
  subset kept on overflow, as mechanisms.poisson_batch does), by PLD only.

  Exact for the sampler we run where `dp_sgd_epsilon` covers the untruncated one;
  slow (seconds per call), so meant for a run summary, not every round.
  """
  q = _check_rate(sampling_rate)
  s = _check_steps(steps)
  check_noise(noise_multiplier)
  if int(dataset_size) <= 0 or int(max_batch) <= 0:
    raise ValueError(f"dataset_size and max_batch must be > 0, got {dataset_size}, {max_batch}")
  if s == 0 or q == 0.0:
    return 0.0
  event = dp_accounting.TruncatedSubsampledGaussianDpEvent(
      int(dataset_size), q, int(max_batch), float(noise_multiplier))
  return epsilon_of(dp_accounting.SelfComposedDpEvent(event, s), delta, "pld")


def dp_fedavg_epsilon(clients_per_round: float, num_clients: int, noise_multiplier: float,
                      rounds: int, delta: float, accountant: str = "rdp") -> float:
  """Client-level epsilon of `rounds` DP-FedAvg rounds (q = clients_per_round / num_clients)."""
  if num_clients <= 0:
    raise ValueError(f"num_clients must be > 0, got {num_clients}")
  return dp_sgd_epsilon(clients_per_round / num_clients, noise_multiplier, rounds, delta,
                        accountant)


# ----------------------------------------------------------------------------- paper_gaussian

def paper_gaussian_noise_multiplier(sigma: float, clip_norm: float, num_tensors: int) -> float:
  """Noise multiplier of one paper_gaussian step: sigma / (2 C sqrt(k)).

  The step releases the batch gradient with each of its k tensors clipped to norm C,
  plus N(0, sigma^2) per element. Two clipped batch gradients (with or without one
  example, or from two different clients) differ by at most 2C per tensor, so by
  2C sqrt(k) in L2: a Gaussian mechanism whose std is sigma / (2C sqrt(k)) sensitivities.
  """
  check_noise(sigma, "sigma")
  if not 0 < float(clip_norm) < math.inf:
    raise ValueError(f"clip_norm must be > 0 and finite, got {clip_norm}")
  k = _check_steps(num_tensors, "num_tensors")
  if k == 0:
    raise ValueError("num_tensors must be >= 1: paper_gaussian needs a trainable tensor")
  return float(sigma) / (2.0 * float(clip_norm) * math.sqrt(k))


def example_uses_per_round(client_size: int, batch_size: int, steps: int) -> int:
  """Local steps of one round that can use one given example of a client (paper_gaussian).

  Local training shuffles the client's n examples afresh every epoch and walks through
  them in ceil(n / B) batches, so an example sits in exactly one batch of each epoch.
  Of a round's `steps` (E ceil(n / B), or fewer with federated.local_steps) the example
  can therefore be used in at most ceil(steps / ceil(n / B)) of them: one per epoch
  begun (the last, partial epoch counted whole, as the worst case). Without
  amplification that is the number of Gaussian steps it is exposed to.
  """
  n = _check_steps(client_size, "client_size")
  b = _check_steps(batch_size, "batch_size")
  s = _check_steps(steps)
  if b == 0:
    raise ValueError("batch_size must be >= 1")
  if n == 0 or s == 0:
    return 0
  per_epoch = -(-n // b)
  return -(-s // per_epoch)


def gaussian_event(noise_multiplier: float, count: int = 1) -> dp_accounting.DpEvent:
  """`count` compositions of a Gaussian mechanism with multiplier z, no sampling."""
  check_noise(noise_multiplier)
  c = _check_steps(count, "count")
  if c == 0:
    return dp_accounting.NoOpDpEvent()
  return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(float(noise_multiplier)), c)


def _gaussian_mu(entries: Sequence[Sequence[Any]]) -> float:
  """sqrt(sum count / z^2): composed Gaussians are one Gaussian of sensitivity mu (Dong,
  Roth & Su 2019, mu-GDP), the quantity that orders clients by epsilon."""
  total = 0.0
  for _, z, count in entries:
    if count > 0:
      if z == 0:
        return math.inf
      total += count / (z * z)
  return math.sqrt(total)


def _gaussian_entries_event(entries: Sequence[Sequence[Any]]) -> dp_accounting.DpEvent:
  events = [gaussian_event(z, s) for _, z, s in entries if s > 0]
  if not events:
    return dp_accounting.NoOpDpEvent()
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def _gaussian_entries_epsilon(entries: Sequence[Sequence[Any]], delta: float) -> float:
  """PLD epsilon of composed unsampled Gaussians ([_, z, count] entries) at `delta`.

  dp_accounting's PLD of a Gaussian is pessimistic: an upper bound, within ~1e-8 of the
  exact (Balle & Wang) epsilon up to mu ~ 20 and about +1 above it (1e-3 relative at
  epsilon ~ 10^3, less beyond), whatever the grid. Its privacy loss spans about
  +-(10 mu + mu^2 / 2) for mu = sensitivity / std: the grid interval grows as
  max(1, mu, mu^2 / 10) x PLD_DISCRETIZATION, so the grid stays near 10^5 points (well
  under a second). (paper_gaussian's mu runs into the hundreds, where the default
  interval would need gigabytes.)
  """
  check_delta(delta)
  mu = _gaussian_mu(entries)
  if mu == 0.0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  interval = PLD_DISCRETIZATION * max(1.0, mu, mu * mu / 10.0)
  acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
  acc.compose(_gaussian_entries_event(entries))
  return float(acc.get_epsilon(float(delta)))


def gaussian_epsilon(noise_multiplier: float, count: int, delta: float) -> float:
  """Epsilon at `delta` of `count` Gaussian mechanisms with multiplier z (no sampling, no
  amplification), by dp_accounting's PLD accountant. Equal to one Gaussian with
  multiplier z / sqrt(count)."""
  check_noise(noise_multiplier)
  return _gaussian_entries_epsilon([[1.0, float(noise_multiplier), _check_steps(count, "count")]],
                                   delta)


# ----------------------------------------------------------------------------- truncated Poisson

def _client_tail(capacity: int, batch_size: int, client_size: int) -> float:
  """P(a client's Poisson batch, rate min(1, B / n), holds more than `capacity` rows)."""
  n = int(client_size)
  if n <= capacity or n <= 0:
    return 0.0
  return float(stats.binom.sf(capacity, n, min(1.0, batch_size / n)))


def poisson_overflow_probability(capacity: int, batch_size: int, client_sizes: Sequence[int],
                                 client_steps: Sequence[int]) -> tuple[float, int]:
  """(p, i): union bound on the probability that any Poisson batch of the worst client i
  overflows `capacity` over the whole run.

  Client i runs client_steps[i] steps (all rounds it may join), each drawing a
  Binomial(n_i, min(1, B / n_i)) batch; a batch overflows when it has more than
  `capacity` rows. Only the example's own client matters for per-example DP (other
  clients' steps never see it), so the run's number is max_i steps_i x P(overflow)_i.
  """
  if int(capacity) <= 0 or int(batch_size) <= 0:
    raise ValueError(f"capacity and batch_size must be > 0, got {capacity}, {batch_size}")
  if len(client_sizes) != len(client_steps):
    raise ValueError("client_sizes and client_steps must have one value per client")
  worst, p = -1, 0.0
  tails: dict[int, float] = {}
  for i, (n, t) in enumerate(zip(client_sizes, client_steps)):
    n, t = int(n), _check_steps(t)
    if t == 0:
      continue
    if n not in tails:
      tails[n] = _client_tail(int(capacity), int(batch_size), n)
    if t * tails[n] > p:
      worst, p = i, t * tails[n]
  return min(1.0, p), worst


def truncation_delta(epsilon: float, overflow_probability: float) -> float:
  """What truncating Poisson batches adds to delta: (1 + e^epsilon) p.

  The truncated sampler M' equals the accounted one M except on an event of probability
  <= p, on either neighbouring dataset, so for every set S
  P[M'(D) in S] <= P[M(D) in S] + p <= e^eps P[M(D') in S] + delta + p
                <= e^eps P[M'(D') in S] + delta + (1 + e^eps) p.
  """
  p = float(overflow_probability)
  if p == 0.0:
    return 0.0
  if epsilon >= 700.0:  # e^eps overflows a double: no meaningful delta is left
    return math.inf
  return (1.0 + math.exp(float(epsilon))) * p


def overflow_budget(epsilon: float, delta: float) -> float:
  """The largest run overflow probability p with truncation_delta(epsilon, p) <=
  OVERFLOW_DELTA_FRACTION delta (0 when epsilon is too large for any p)."""
  check_delta(delta)
  if epsilon >= 700.0:
    return 0.0
  return OVERFLOW_DELTA_FRACTION * float(delta) / (1.0 + math.exp(float(epsilon)))


def poisson_capacity_for_run(batch_size: int, client_sizes: Sequence[int],
                             client_steps: Sequence[int], max_overflow: float) -> int:
  """Smallest static batch capacity whose run overflow probability
  (`poisson_overflow_probability`) is <= max_overflow, at most the largest client (whose
  batch then never overflows). Exact binomial tails per client size."""
  sizes = [int(n) for n in client_sizes]
  cap_max = max(sizes) if sizes else 0
  if cap_max <= 0:
    raise ValueError("no client holds an example")
  if max_overflow <= 0.0:
    return cap_max
  cap = 1
  need: dict[int, int] = {}  # client size -> most steps of a client of that size
  for n, t in zip(sizes, client_steps):
    if n > 0 and int(t) > 0:
      need[n] = max(need.get(n, 0), int(t))
  for n, t in need.items():
    per_step = max_overflow / t
    if per_step <= 0.0:  # underflow: only the whole client never overflows
      return cap_max
    if per_step < 1.0:
      cap = max(cap, poisson_capacity(batch_size, per_step, client_size=n))
  return min(cap, cap_max)


# ----------------------------------------------------------------------------- calibration

def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               steps: int, accountant: str = "rdp", *,
                               max_noise_multiplier: float = 100.0,
                               tol: float = CALIBRATION_TOL) -> float:
  """Smallest noise multiplier (within `tol`) whose epsilon after `steps` subsampled
  Gaussian steps at rate q is <= target_epsilon at `delta`.

  For DP-FedAvg pass q = clients_per_round / num_clients and steps = rounds; for
  DP-SGD pass the worst client's q and its planned number of local steps.

  The search is dp_accounting.calibrate_dp_mechanism with its LowerEndpointAndGuess
  bracket, which expands *upward* from a lower endpoint. Epsilon falls as z grows, so
  we search over t = 1 / z: from t = 1 / max_noise_multiplier (checked first, so an
  unreachable target is a clear PrivacyBudgetError, not a failed root search) towards
  less noise. Small z is only tried when the target needs it (the PLD accountant's
  cost grows as z shrinks); a target that even MIN_NOISE_MULTIPLIER meets returns it.
  """
  check_epsilon(target_epsilon, "target_epsilon")
  check_delta(delta)
  q = _check_rate(sampling_rate)
  s = _check_steps(steps)
  _check_accountant(accountant)
  if s == 0 or q == 0.0:
    raise ValueError("nothing to calibrate: with 0 steps or sampling rate 0 no data is used")
  if not max_noise_multiplier > MIN_NOISE_MULTIPLIER:
    raise ValueError(f"max_noise_multiplier must be > {MIN_NOISE_MULTIPLIER}, "
                     f"got {max_noise_multiplier}")
  eps_max = dp_sgd_epsilon(q, max_noise_multiplier, s, delta, accountant)
  if eps_max > target_epsilon:
    raise PrivacyBudgetError(
        f"target epsilon {target_epsilon} at delta {delta} is unreachable in {s} steps at "
        f"sampling rate {q:.6g}: even noise_multiplier={max_noise_multiplier} gives epsilon "
        f"{eps_max:.4g}; train for fewer rounds/steps, sample less, or raise the target")
  t_min = 1.0 / max_noise_multiplier
  bracket = dp_accounting.LowerEndpointAndGuess(t_min, max(1.0, 2.0 * t_min))
  try:
    t = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant), lambda t: sampled_gaussian_event(q, 1.0 / t, s),
        float(target_epsilon), float(delta), bracket,
        # |dz| = |dt| z^2 <= |dt| max^2: the tolerance `tol` on z
        tol=tol / max_noise_multiplier ** 2)
  except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
    return MIN_NOISE_MULTIPLIER  # met even with ~2^30 times less noise than the guess
  return max(1.0 / float(t), MIN_NOISE_MULTIPLIER)


def check_budget(epsilon: float, max_epsilon: Optional[float], what: str = "this run") -> None:
  """PrivacyBudgetError when `epsilon` exceeds `max_epsilon` (None: no budget)."""
  if max_epsilon is not None and epsilon > max_epsilon:
    raise PrivacyBudgetError(f"{what} would spend epsilon {epsilon:.4g} > privacy.max_epsilon "
                             f"{max_epsilon}")


# ----------------------------------------------------------------------------- ledger

def _as_list(x: Union[float, int, Sequence[Any], np.ndarray], n: int, name: str) -> list:
  if np.ndim(x) == 0:
    return [x] * n
  xs = list(np.asarray(x).tolist())
  if len(xs) != n:
    raise ValueError(f"{name}: expected {n} values (one per client), got {len(xs)}")
  return xs


def _add(entries: list[list], q: float, z: float, steps: int) -> None:
  """Merge `steps` into the (q, z) entry: composition is commutative."""
  for e in entries:
    if e[0] == q and e[1] == z:
      e[2] += steps
      return
  entries.append([q, z, steps])


def _event(entries: Sequence[Sequence[Any]]) -> dp_accounting.DpEvent:
  events = [sampled_gaussian_event(q, z, s) for q, z, s in entries if s > 0 and q > 0]
  if not events:
    return dp_accounting.NoOpDpEvent()
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


class PrivacyLedger:
  """What a run has spent: per-client DP-SGD or paper_gaussian steps, or per-round
  DP-FedAvg events.

  Record each round after it ran (`record_dp_sgd_round`, `record_paper_gaussian_round`,
  `record_dp_fedavg_round`; `record_round` for 'none'), read `report()` for metrics,
  `preview_*` to check a budget before running a round, and checkpoint with
  `to_dict()` / `from_dict()` (plain JSON types only). Epsilons are cached per
  client and recomputed only for clients whose events changed.

  paper_gaussian keeps two step counts per client, as [1.0, z, count] entries (q = 1:
  no sampling): `clients`, every local step (the per-client unit), and `examples`, the
  steps that can use one given example (`example_uses_per_round`, the per-example unit).
  """

  VERSION = 2  # 2: paper_gaussian records steps (version 1 ledgers of it counted rounds only)

  def __init__(self, mechanism: str, delta: float, accountant: str = "rdp",
               sampling: str = "poisson", num_clients: Optional[int] = None):
    if mechanism not in MECHANISMS:
      raise ValueError(f"privacy.mechanism: unknown mechanism {mechanism!r}; "
                       f"allowed: {', '.join(MECHANISMS)}")
    if sampling not in SAMPLINGS:
      raise ValueError(f"privacy.sampling: unknown sampling {sampling!r}; "
                       f"allowed: {', '.join(SAMPLINGS)}")
    check_delta(delta)
    if num_clients is not None and int(num_clients) <= 0:
      raise ValueError(f"num_clients must be > 0, got {num_clients}")
    self.mechanism = mechanism
    self.delta = float(delta)
    self.accountant = _check_accountant(accountant)
    self.sampling = sampling
    self.num_clients = None if num_clients is None else int(num_clients)
    self.rounds = 0
    self.clients: dict[int, list[list]] = {}  # dp_sgd, paper_gaussian: client -> [[q, z, steps]]
    self.examples: dict[int, list[list]] = {}  # paper_gaussian: client -> [[1.0, z, uses]]
    self.server: list[list] = []  # dp_fedavg: [[q, z, rounds], ...]
    self._cache: dict[Any, tuple[tuple, float]] = {}

  # -- recording

  def _require(self, mechanism: str) -> None:
    if self.mechanism != mechanism:
      raise ValueError(f"this ledger accounts for {self.mechanism!r}, not {mechanism!r}")

  def _check_ids(self, ids: Sequence[int]) -> None:
    if self.num_clients is not None:
      bad = [c for c in ids if not 0 <= c < self.num_clients]
      if bad:
        raise ValueError(f"client ids {bad[:5]} outside [0, {self.num_clients})")

  def record_client(self, client_id: int, sampling_rate: float, noise_multiplier: float,
                    steps: int) -> None:
    """DP-SGD steps of one client (does not count a round; see record_dp_sgd_round)."""
    self._require("dp_sgd")
    c, q, s = int(client_id), _check_rate(sampling_rate), _check_steps(steps)
    check_noise(noise_multiplier)
    self._check_ids([c])
    if s > 0:
      _add(self.clients.setdefault(c, []), q, float(noise_multiplier), s)

  def record_dp_sgd_round(self, client_ids: Iterable[int],
                          sampling_rates: Union[float, Sequence[float]],
                          noise_multiplier: float, steps: Union[int, Sequence[int]]) -> None:
    """One round of local DP-SGD: client k ran steps[k] steps at Poisson rate q[k]
    (batch / n_k) with noise multiplier z. Pass the *real* (unpadded) step counts."""
    self._require("dp_sgd")
    ids = [int(c) for c in client_ids]
    qs = [_check_rate(q) for q in _as_list(sampling_rates, len(ids), "sampling_rates")]
    ss = [_check_steps(s) for s in _as_list(steps, len(ids), "steps")]
    check_noise(noise_multiplier)
    self._check_ids(ids)
    for c, q, s in zip(ids, qs, ss):
      self.record_client(c, q, noise_multiplier, s)
    self.rounds += 1

  def record_paper_gaussian_round(self, client_ids: Iterable[int], noise_multiplier: float,
                                  steps: Union[int, Sequence[int]],
                                  example_uses: Union[int, Sequence[int]]) -> None:
    """One round of the study's mechanism: client k ran steps[k] local steps, of which
    example_uses[k] can touch one given example (`example_uses_per_round`), each a
    Gaussian mechanism with multiplier z (`paper_gaussian_noise_multiplier`)."""
    self._require("paper_gaussian")
    ids = [int(c) for c in client_ids]
    ss = [_check_steps(s) for s in _as_list(steps, len(ids), "steps")]
    us = [_check_steps(u, "example_uses") for u in _as_list(example_uses, len(ids),
                                                            "example_uses")]
    check_noise(noise_multiplier)
    self._check_ids(ids)
    bad = [c for c, s, u in zip(ids, ss, us) if u > s]
    if bad:
      raise ValueError(f"example_uses exceed steps for clients {bad[:5]}")
    z = float(noise_multiplier)
    for c, s, u in zip(ids, ss, us):
      if s > 0:
        _add(self.clients.setdefault(c, []), 1.0, z, s)
      if u > 0:
        _add(self.examples.setdefault(c, []), 1.0, z, u)
    self.rounds += 1

  def record_dp_fedavg_round(self, sampling_rate: float, noise_multiplier: float) -> None:
    """One DP-FedAvg round: q = clients_per_round / num_clients, multiplier z (the
    effective one; with adaptive clipping that is the configured z, see
    mechanisms.value_noise_multiplier)."""
    self._require("dp_fedavg")
    check_noise(noise_multiplier)
    _add(self.server, _check_rate(sampling_rate), float(noise_multiplier), 1)
    self.rounds += 1

  def record_round(self, sampling_rate: Optional[float] = None,
                   noise_multiplier: Optional[float] = None) -> None:
    """Count a round. dp_fedavg: needs (q, z) and records its event (same as
    record_dp_fedavg_round); dp_sgd: call after the round's record_client calls;
    none: takes no arguments; paper_gaussian: use record_paper_gaussian_round."""
    if self.mechanism == "dp_fedavg":
      if sampling_rate is None or noise_multiplier is None:
        raise ValueError("dp_fedavg: record_round needs sampling_rate and noise_multiplier")
      self.record_dp_fedavg_round(sampling_rate, noise_multiplier)
      return
    if self.mechanism == "paper_gaussian":
      raise ValueError("paper_gaussian: record rounds with record_paper_gaussian_round "
                       "(its steps are accounted)")
    if sampling_rate is not None or noise_multiplier is not None:
      raise ValueError(f"{self.mechanism}: record_round takes no sampling_rate/noise_multiplier "
                       "(dp_sgd: record them per client with record_client)")
    self.rounds += 1

  # -- events and epsilons

  def client_event(self, client_id: int) -> dp_accounting.DpEvent:
    """The DpEvent this ledger accounts for one client (DP-SGD; paper_gaussian: all of
    the client's steps, the per-client unit)."""
    entries = self.clients.get(int(client_id), [])
    if self.mechanism == "paper_gaussian":
      return _gaussian_entries_event(entries)
    return _event(entries)

  def example_event(self, client_id: int) -> dp_accounting.DpEvent:
    """paper_gaussian: the DpEvent of one example of this client (the per-example unit)."""
    self._require("paper_gaussian")
    return _gaussian_entries_event(self.examples.get(int(client_id), []))

  def server_event(self) -> dp_accounting.DpEvent:
    """The DpEvent this ledger accounts for the population (DP-FedAvg)."""
    return _event(self.server)

  def _eps(self, key: Any, entries: list[list]) -> float:
    sig = tuple(tuple(e) for e in entries)
    hit = self._cache.get(key)
    if hit is not None and hit[0] == sig:
      return hit[1]
    if self.mechanism == "paper_gaussian":
      eps = _gaussian_entries_epsilon(entries, self.delta)
    else:
      eps = epsilon_of(_event(entries), self.delta, self.accountant)
    self._cache[key] = (sig, eps)
    return eps

  def client_epsilons(self) -> dict[int, float]:
    """Epsilon of every client that has run at least one DP-SGD step."""
    self._require("dp_sgd")
    return {c: self._eps(c, e) for c, e in sorted(self.clients.items())}

  def _worst_gaussian(self, table: dict[int, list[list]], unit: str) -> tuple[int, float, int]:
    """(client, epsilon, steps) of the client with the largest epsilon. Composed Gaussians
    are ordered by mu alone, so only that client's epsilon is computed."""
    if not table:
      return -1, 0.0, 0
    worst = max(sorted(table), key=lambda c: _gaussian_mu(table[c]))
    entries = table[worst]
    return worst, self._eps((unit, worst), entries), int(sum(e[2] for e in entries))

  def epsilon(self) -> Optional[float]:
    """The run's epsilon at `delta`: worst client (DP-SGD; paper_gaussian per example),
    population (DP-FedAvg), None for 'none'."""
    if self.mechanism == "dp_sgd":
      eps = self.client_epsilons()
      return max(eps.values()) if eps else 0.0
    if self.mechanism == "dp_fedavg":
      return self._eps("server", self.server)
    if self.mechanism == "paper_gaussian":
      return self._worst_gaussian(self.examples, "example")[1]
    return None

  def client_epsilon(self) -> float:
    """paper_gaussian: the worst client's per-client epsilon (all of its steps)."""
    self._require("paper_gaussian")
    return self._worst_gaussian(self.clients, "client")[1]

  def report(self) -> dict[str, Any]:
    """Metrics for this round / the run summary (JSON types only)."""
    out: dict[str, Any] = {"mechanism": self.mechanism, "rounds": self.rounds}
    if self.mechanism == "none":
      out["formal_guarantee"] = False
      return out
    if self.mechanism == "paper_gaussian":
      ex_client, ex_eps, ex_steps = self._worst_gaussian(self.examples, "example")
      cl_client, cl_eps, cl_steps = self._worst_gaussian(self.clients, "client")
      out.update(accountant="pld", delta=self.delta, formal_guarantee=True,
                 note=PAPER_GAUSSIAN_NOTE, epsilon=ex_eps, epsilon_client=cl_eps,
                 worst_client=int(ex_client), example_steps=ex_steps,
                 worst_client_per_client=int(cl_client), client_steps=cl_steps,
                 clients_accounted=len(self.clients))
      return out
    out.update(accountant=self.accountant, delta=self.delta, sampling=self.sampling,
               formal_guarantee=self.sampling == "poisson")
    if self.sampling != "poisson":
      out["note"] = SHUFFLE_NOTE
    if self.mechanism == "dp_fedavg":
      out["epsilon"] = self.epsilon()
      return out
    eps = self.client_epsilons()
    values = list(eps.values())
    if self.num_clients is not None:  # clients that never trained have spent nothing
      values += [0.0] * (self.num_clients - len(values))
    worst = max(eps, key=eps.get) if eps else -1
    out.update(
        epsilon=max(values) if values else 0.0,
        epsilon_min=min(values) if values else 0.0,
        epsilon_median=float(np.median(values)) if values else 0.0,
        epsilon_max=max(values) if values else 0.0,
        worst_client=int(worst),
        clients_accounted=len(eps),
    )
    return out

  # -- budget checks

  def preview_dp_sgd_round(self, client_ids: Iterable[int],
                           sampling_rates: Union[float, Sequence[float]],
                           noise_multiplier: float, steps: Union[int, Sequence[int]]) -> float:
    """The run's epsilon if this DP-SGD round were recorded (nothing is recorded)."""
    ids = [int(c) for c in client_ids]
    trial = self.copy()
    trial.record_dp_sgd_round(ids, sampling_rates, noise_multiplier, steps)
    # only the round's clients can change the max; reuse cached epsilons of the rest
    return float(trial.epsilon())

  def preview_paper_gaussian_round(self, client_ids: Iterable[int], noise_multiplier: float,
                                   steps: Union[int, Sequence[int]],
                                   example_uses: Union[int, Sequence[int]]) -> float:
    """The run's per-example epsilon if this paper_gaussian round were recorded."""
    trial = self.copy()
    trial.record_paper_gaussian_round(client_ids, noise_multiplier, steps, example_uses)
    return float(trial.epsilon())

  def preview_dp_fedavg_round(self, sampling_rate: float, noise_multiplier: float) -> float:
    trial = self.copy()
    trial.record_dp_fedavg_round(sampling_rate, noise_multiplier)
    return float(trial.epsilon())

  # -- (de)serialisation

  def copy(self) -> "PrivacyLedger":
    new = PrivacyLedger.from_dict(self.to_dict())
    new._cache = dict(self._cache)
    return new

  def to_dict(self) -> dict[str, Any]:
    """Plain dict of JSON types (client ids become strings)."""
    return {
        "version": self.VERSION,
        "mechanism": self.mechanism,
        "delta": self.delta,
        "accountant": self.accountant,
        "sampling": self.sampling,
        "num_clients": self.num_clients,
        "rounds": self.rounds,
        "clients": {str(c): _copy.deepcopy(e) for c, e in sorted(self.clients.items())},
        "examples": {str(c): _copy.deepcopy(e) for c, e in sorted(self.examples.items())},
        "server": _copy.deepcopy(self.server),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
    version = int(d.get("version", -1))
    if version not in (1, cls.VERSION):
      raise ValueError(f"PrivacyLedger state version {d.get('version')!r}; expected {cls.VERSION}")
    if version == 1 and d["mechanism"] == "paper_gaussian" and int(d["rounds"]) > 0:
      raise ValueError("this paper_gaussian ledger (version 1) counted rounds but not the "
                       "steps its epsilon needs; start the run afresh in a new workdir")
    led = cls(d["mechanism"], float(d["delta"]), d["accountant"], d["sampling"],
              d.get("num_clients"))
    led.rounds = int(d["rounds"])

    def table(key: str) -> dict[int, list[list]]:
      return {int(c): [[float(q), float(z), int(s)] for q, z, s in e]
              for c, e in d.get(key, {}).items()}

    led.clients = table("clients")
    led.examples = table("examples")
    led.server = [[float(q), float(z), int(s)] for q, z, s in d.get("server", [])]
    return led

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "PrivacyLedger":
    return cls.from_dict(json.loads(s))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, PrivacyLedger) and self.to_dict() == other.to_dict()

  def __repr__(self) -> str:
    return (f"PrivacyLedger(mechanism={self.mechanism!r}, accountant={self.accountant!r}, "
            f"delta={self.delta}, rounds={self.rounds}, clients={len(self.clients)})")
