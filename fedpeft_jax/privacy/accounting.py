"""Host-side privacy accounting with Google's `dp_accounting` (RDP and PLD).

Every epsilon reported here is `dp_accounting`'s own answer for an explicit DpEvent
(`PoissonSampledDpEvent(q, GaussianDpEvent(z))` self-composed over steps), never a
formula of ours, so anyone can rebuild the event and check the number.

* DP-SGD (sample level): the unit is one example of one client. Client i's examples
  are touched only in the local steps of rounds it joins, each a Poisson-subsampled
  Gaussian with q_i = batch / n_i; its epsilon composes those steps (amplification by
  client sampling is ignored, which is conservative). The run's epsilon is the worst
  client's; the distribution is reported too.
* DP-FedAvg (client level): the unit is a whole client; every round is one
  subsampled Gaussian with q = clients_per_round / num_clients.
* paper_gaussian / none: nothing to account; the ledger says so in its report.

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

from fedpeft_jax.privacy.mechanisms import check_delta, check_epsilon, check_noise

ACCOUNTANTS = ("rdp", "pld")
MECHANISMS = ("none", "paper_gaussian", "dp_sgd", "dp_fedavg")
SAMPLINGS = ("poisson", "shuffle")
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value_discretization_interval

NO_ACCOUNTING_NOTE = ("no formal privacy accounting applies: paper_gaussian clips each "
                      "tensor's batch gradient, which does not bound one example's influence; "
                      "its epsilon/delta are only inputs to the noise formula")
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


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               steps: int, accountant: str = "rdp", *,
                               max_noise_multiplier: float = 100.0,
                               tol: float = 1e-4) -> float:
  """Smallest noise multiplier (within `tol`) whose epsilon after `steps` subsampled
  Gaussian steps at rate q is <= target_epsilon at `delta`.

  For DP-FedAvg pass q = clients_per_round / num_clients and steps = rounds; for
  DP-SGD pass the worst client's q and its planned number of local steps. Uses
  dp_accounting.calibrate_dp_mechanism on a bracket we find first, so an unreachable
  target is a clear PrivacyBudgetError instead of a failed root search.
  """
  check_epsilon(target_epsilon, "target_epsilon")
  check_delta(delta)
  q = _check_rate(sampling_rate)
  s = _check_steps(steps)
  _check_accountant(accountant)
  if s == 0 or q == 0.0:
    raise ValueError("nothing to calibrate: with 0 steps or sampling rate 0 no data is used")

  def eps(z: float) -> float:
    return dp_sgd_epsilon(q, z, s, delta, accountant)

  hi = 1.0
  while eps(hi) > target_epsilon:
    if hi >= max_noise_multiplier:
      raise PrivacyBudgetError(
          f"target epsilon {target_epsilon} at delta {delta} is unreachable in {s} steps at "
          f"sampling rate {q:.6g}: even noise_multiplier={max_noise_multiplier} gives epsilon "
          f"{eps(max_noise_multiplier):.4g}; train for fewer rounds/steps, sample less, or "
          "raise the target")
    hi = min(2.0 * hi, max_noise_multiplier)
  lo = hi / 2.0
  while eps(lo) <= target_epsilon:
    if lo < 1e-3:
      return lo  # practically no noise needed
    hi, lo = lo, lo / 2.0
  make_event = lambda z: sampled_gaussian_event(q, z, s)  # noqa: E731
  z = dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant), make_event, float(target_epsilon), float(delta),
      dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol)
  return float(z)


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
  """What a run has spent: per-client DP-SGD steps or per-round DP-FedAvg events.

  Record each round after it ran (`record_dp_sgd_round` / `record_dp_fedavg_round`;
  `record_round` for mechanisms without accounting), read `report()` for metrics,
  `preview_*` to check a budget before running a round, and checkpoint with
  `to_dict()` / `from_dict()` (plain JSON types only). Epsilons are cached per
  client and recomputed only for clients whose events changed.
  """

  VERSION = 1

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
    self.clients: dict[int, list[list]] = {}  # dp_sgd: client -> [[q, z, steps], ...]
    self.server: list[list] = []  # dp_fedavg: [[q, z, rounds], ...]
    self._cache: dict[Any, tuple[tuple, float]] = {}

  # -- recording

  def _require(self, mechanism: str) -> None:
    if self.mechanism != mechanism:
      raise ValueError(f"this ledger accounts for {self.mechanism!r}, not {mechanism!r}")

  def record_client(self, client_id: int, sampling_rate: float, noise_multiplier: float,
                    steps: int) -> None:
    """DP-SGD steps of one client (does not count a round; see record_dp_sgd_round)."""
    self._require("dp_sgd")
    c, q, s = int(client_id), _check_rate(sampling_rate), _check_steps(steps)
    check_noise(noise_multiplier)
    if self.num_clients is not None and not 0 <= c < self.num_clients:
      raise ValueError(f"client id {c} outside [0, {self.num_clients})")
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
    if self.num_clients is not None:
      bad = [c for c in ids if not 0 <= c < self.num_clients]
      if bad:
        raise ValueError(f"client ids {bad[:5]} outside [0, {self.num_clients})")
    for c, q, s in zip(ids, qs, ss):
      self.record_client(c, q, noise_multiplier, s)
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
    none / paper_gaussian: takes no arguments."""
    if self.mechanism == "dp_fedavg":
      if sampling_rate is None or noise_multiplier is None:
        raise ValueError("dp_fedavg: record_round needs sampling_rate and noise_multiplier")
      self.record_dp_fedavg_round(sampling_rate, noise_multiplier)
      return
    if sampling_rate is not None or noise_multiplier is not None:
      raise ValueError(f"{self.mechanism}: record_round takes no sampling_rate/noise_multiplier "
                       "(dp_sgd: record them per client with record_client)")
    self.rounds += 1

  # -- events and epsilons

  def client_event(self, client_id: int) -> dp_accounting.DpEvent:
    """The DpEvent this ledger accounts for one client (DP-SGD)."""
    return _event(self.clients.get(int(client_id), []))

  def server_event(self) -> dp_accounting.DpEvent:
    """The DpEvent this ledger accounts for the population (DP-FedAvg)."""
    return _event(self.server)

  def _eps(self, key: Any, entries: list[list]) -> float:
    sig = tuple(tuple(e) for e in entries)
    hit = self._cache.get(key)
    if hit is not None and hit[0] == sig:
      return hit[1]
    eps = epsilon_of(_event(entries), self.delta, self.accountant)
    self._cache[key] = (sig, eps)
    return eps

  def client_epsilons(self) -> dict[int, float]:
    """Epsilon of every client that has run at least one DP-SGD step."""
    self._require("dp_sgd")
    return {c: self._eps(c, e) for c, e in sorted(self.clients.items())}

  def epsilon(self) -> Optional[float]:
    """The run's epsilon at `delta`: worst client (DP-SGD), population (DP-FedAvg),
    None where no accounting applies."""
    if self.mechanism == "dp_sgd":
      eps = self.client_epsilons()
      return max(eps.values()) if eps else 0.0
    if self.mechanism == "dp_fedavg":
      return self._eps("server", self.server)
    return None

  def report(self) -> dict[str, Any]:
    """Metrics for this round / the run summary (JSON types only)."""
    out: dict[str, Any] = {"mechanism": self.mechanism, "rounds": self.rounds}
    if self.mechanism not in ("dp_sgd", "dp_fedavg"):
      out["formal_guarantee"] = False
      if self.mechanism == "paper_gaussian":
        out["note"] = NO_ACCOUNTING_NOTE
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
        "server": _copy.deepcopy(self.server),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
    if int(d.get("version", -1)) != cls.VERSION:
      raise ValueError(f"PrivacyLedger state version {d.get('version')!r}; expected {cls.VERSION}")
    led = cls(d["mechanism"], float(d["delta"]), d["accountant"], d["sampling"],
              d.get("num_clients"))
    led.rounds = int(d["rounds"])
    led.clients = {int(c): [[float(q), float(z), int(s)] for q, z, s in e]
                   for c, e in d.get("clients", {}).items()}
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
