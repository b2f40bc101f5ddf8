"""PrivacyPlan and the accounting behind it, against outside references: the analytic
Gaussian mechanism (Balle & Wang 2018) solved with scipy, dp_accounting events built
here, scipy.stats tails, and the engine's own local schedule."""

import importlib.util
import math
import os
import re

import dp_accounting
import jax
import ml_collections
import numpy as np
import pytest
from scipy import optimize, stats

from fedpeft_jax import peft
from fedpeft_jax import privacy as P
from fedpeft_jax.data import local_schedule, num_local_steps
from fedpeft_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study_dp():
  spec = importlib.util.spec_from_file_location("study_dp_for_tests",
                                                os.path.join(ROOT, "configs", "study_dp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
  """Exact epsilon of a Gaussian mechanism with sensitivity / std = mu at `delta`
  (Balle & Wang 2018, Thm. 8): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
  def excess(eps):
    first = stats.norm.cdf(-eps / mu + mu / 2)
    second = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
    return first - second - delta

  if excess(0.0) <= 0:
    return 0.0
  hi = 1.0
  while excess(hi) > 0:
    hi *= 2
  return optimize.brentq(excess, 0.0, hi, xtol=1e-12, rtol=1e-12)


def _config(mechanism="none", clients=8, rounds=3, batch=16, epochs=2, local_steps=0, **privacy):
  c = ml_collections.ConfigDict()
  c.federated = ml_collections.ConfigDict(dict(num_clients=clients, rounds=rounds,
                                               batch_size=batch, local_epochs=epochs,
                                               local_steps=local_steps))
  c.privacy = P.default_privacy_config()
  c.privacy.mechanism = mechanism
  for k, v in privacy.items():
    c.privacy[k] = v
  return c


def _steps_of(c):
  f = c.federated
  return lambda n: int(num_local_steps(n, f.batch_size, f.local_epochs, f.local_steps))


# ----------------------------------------------------------------------------- Gaussian composition

@pytest.mark.parametrize("z,count", [(1.0, 1), (2.0, 10), (0.5, 4), (5.0, 100), (0.3, 40)])
def test_gaussian_composition_matches_analytic_gaussian(z, count):
  """T Gaussians with multiplier z are one Gaussian with z / sqrt(T): the PLD epsilon
  must equal the exact analytic one (pessimistic, so never below it)."""
  delta = 1e-5
  ours = P.gaussian_epsilon(z, count, delta)
  exact = _analytic_gaussian_epsilon(math.sqrt(count) / z, delta)
  assert ours == pytest.approx(exact, rel=1e-4, abs=1e-4)
  assert ours >= exact - 1e-9


def test_gaussian_epsilon_equals_an_independent_dp_accounting_event():
  """A small case through dp_accounting's PLD convolution of separate events (not the
  self-composition shortcut the code's accountant takes), and through RDP as a bound."""
  z, count, delta = 1.5, 6, 1e-5
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z)] * count))
  assert P.gaussian_epsilon(z, count, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-3)
  rdp = dp_accounting.rdp.RdpAccountant()
  rdp.compose(dp_accounting.GaussianDpEvent(z), count)
  assert P.gaussian_epsilon(z, count, delta) <= rdp.get_epsilon(delta)
  assert P.gaussian_epsilon(z, 0, delta) == 0.0
  assert math.isinf(P.gaussian_epsilon(0.0, 3, delta))


def test_paper_gaussian_multiplier_and_example_uses_against_the_schedule():
  sigma = P.paper_sigma(5.0, 1e-3, 1.0)
  assert P.paper_gaussian_noise_multiplier(sigma, 1.0, 100) == pytest.approx(sigma / 20)
  assert P.paper_gaussian_noise_multiplier(2.0, 0.5, 4) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="num_tensors"):
    P.paper_gaussian_noise_multiplier(1.0, 1.0, 0)
  # The engine's schedule: how often can one example be in a step of a round?
  max_n, batch = 40, 8
  for size, epochs, cap in [(40, 3, 0), (37, 3, 0), (5, 4, 0), (37, 3, 7), (37, 3, 3),
                            (17, 2, 4)]:
    steps = int(num_local_steps(size, batch, epochs, cap))
    uses = P.example_uses_per_round(size, batch, steps)
    worst = 0
    for seed in range(5):
      positions, mask, _ = local_schedule(jax.random.PRNGKey(seed), size, max_n, batch, epochs)
      positions, mask = np.asarray(positions)[:steps], np.asarray(mask)[:steps]
      counts = np.bincount(positions[mask], minlength=size)
      worst = max(worst, int(counts.max()))
    assert uses == worst, (size, epochs, cap, uses, worst)
  assert P.example_uses_per_round(0, 8, 0) == 0


# ----------------------------------------------------------------------------- ledger

def test_paper_gaussian_ledger_epsilons_and_resume():
  z, delta = 0.8, 1e-3
  led = P.PrivacyLedger("paper_gaussian", delta, num_clients=4)
  rounds = [([0, 1], [20, 6], [10, 2]), ([1, 3], [6, 40], [2, 10]), ([0, 1], [20, 6], [10, 2])]
  steps, uses = {}, {}
  for ids, s, u in rounds:
    led.record_paper_gaussian_round(ids, z, s, u)
    for c, si, ui in zip(ids, s, u):
      steps[c] = steps.get(c, 0) + si
      uses[c] = uses.get(c, 0) + ui
  rep = led.report()
  per_example = {c: _analytic_gaussian_epsilon(math.sqrt(u) / z, delta) for c, u in uses.items()}
  per_client = {c: _analytic_gaussian_epsilon(math.sqrt(s) / z, delta) for c, s in steps.items()}
  assert rep["epsilon"] == pytest.approx(max(per_example.values()), rel=1e-4)
  assert rep["epsilon_client"] == pytest.approx(max(per_client.values()), rel=1e-4)
  assert rep["worst_client"] == 0 and rep["example_steps"] == 20
  assert rep["worst_client_per_client"] == 0 and rep["client_steps"] == 40
  assert rep["formal_guarantee"] is True and "nominal_epsilon" in rep["note"]
  back = P.PrivacyLedger.from_json(led.to_json())
  assert back == led and back.report() == rep
  preview = led.preview_paper_gaussian_round([3], z, 40, 10)
  assert led.rounds == 3 and preview == pytest.approx(
      _analytic_gaussian_epsilon(math.sqrt(20) / z, delta), rel=1e-4)
  with pytest.raises(ValueError, match="record_paper_gaussian_round"):
    led.record_round()
  with pytest.raises(ValueError, match="exceed steps"):
    led.record_paper_gaussian_round([0], z, 2, 3)
  old = led.to_dict() | {"version": 1}
  with pytest.raises(ValueError, match="afresh"):
    P.PrivacyLedger.from_dict(old)
  dp = P.PrivacyLedger("dp_fedavg", 1e-5)
  dp.record_dp_fedavg_round(0.1, 1.0)
  v1 = dp.to_dict() | {"version": 1}
  v1.pop("examples")
  assert P.PrivacyLedger.from_dict(v1) == dp  # version 1 of the other mechanisms still loads


# ----------------------------------------------------------------------------- the plan

def test_study_bias_paper_gaussian_real_epsilon():
  """The study_dp preset (bias, nominal epsilon 5, delta 1e-3, 50 rounds x 10 epochs):
  k = 12 blocks x 8 biases + 2 (embedding, final norm) + 2 (head) = 100 trainable
  tensors, counted from the model; the real per-example epsilon is ~9e3."""
  c = _study_dp().get_config("cifar100,bias")
  model = build_model(c, 100)
  size = c.model.image_size
  shapes = jax.eval_shape(lambda k: model.init(k, np.zeros((1, size, size, 3), np.float32)),
                          jax.random.PRNGKey(0))["params"]
  trainable, _ = peft.split(shapes, peft.trainable_mask(shapes, c.peft))
  k = len(jax.tree_util.tree_leaves(trainable))
  assert k == 12 * 8 + 2 + 2
  sizes = np.full(64, 781)  # 50,000 / 64
  sizes[0] = 1042
  plan = P.PrivacyPlan(c, sizes, 8, _steps_of(c), k)
  sigma = 2 * math.sqrt(2 * math.log(1.25 / 1e-3) / 5.0)
  z = sigma / (2 * math.sqrt(k))
  assert plan.noise == pytest.approx(z)
  # dp_accounting's PLD is pessimistic by about +1 at these epsilons
  exact = _analytic_gaussian_epsilon(math.sqrt(50 * 10) / z, 1e-3)
  assert exact <= plan.planned_epsilon <= exact + 1.5
  assert 1e3 < plan.planned_epsilon < 1e4
  steps_max = 50 * 10 * math.ceil(1042 / 64)
  assert plan.planned_epsilon_client == pytest.approx(
      _analytic_gaussian_epsilon(math.sqrt(steps_max) / z, 1e-3), abs=1.5)
  summary = plan.summary()
  assert summary["formal_guarantee"] is True and summary["nominal_epsilon"] == 5.0
  assert summary["non_private"] == list(P.NON_PRIVATE_METRICS["paper_gaussian"])
  plan.record(np.arange(8))
  m = plan.metrics()
  assert m["epsilon"] == pytest.approx(_analytic_gaussian_epsilon(math.sqrt(10) / z, 1e-3),
                                       abs=1.5)
  assert m["epsilon_client"] == pytest.approx(
      _analytic_gaussian_epsilon(math.sqrt(10 * math.ceil(1042 / 64)) / z, 1e-3), abs=1.5)


def test_plan_reproduces_dp_sgd_and_dp_fedavg():
  sizes = np.asarray([40, 100, 250, 60, 0, 500, 90, 75])
  c = _config("dp_sgd", calibrate=True, epsilon=3.0, delta=1e-5, sampling="shuffle")
  steps_of = _steps_of(c)
  plan = P.PrivacyPlan(c, sizes, 4, steps_of, 3)
  q, steps = 16 / 40, 3 * steps_of(40)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(plan.noise)),
              steps)
  assert acc.get_epsilon(1e-5) == pytest.approx(plan.planned_epsilon, abs=1e-9)
  assert plan.planned_epsilon <= 3.0 + 1e-9
  assert not plan.client.poisson and plan.client.mechanism == "dp_sgd"
  plan.record(np.asarray([0, 2]))
  assert plan.ledger.clients[0] == [[q, plan.noise, steps_of(40)]]
  c = _config("dp_fedavg", noise_multiplier=1.0, delta=1e-3, max_epsilon=1.0,
              budget_action="stop", rounds=50)
  plan = P.PrivacyPlan(c, sizes, 4, steps_of, 3)
  assert plan.clip_norm == 1.0 and plan.server.enabled and plan.server.expected_clients == 4
  assert plan.poisson_clients
  rounds = 0
  while not plan.would_exceed(np.arange(4)):
    plan.record(np.arange(4))
    rounds += 1
  assert P.dp_fedavg_epsilon(4, 8, 1.0, rounds, 1e-3) <= 1.0 < P.dp_fedavg_epsilon(
      4, 8, 1.0, rounds + 1, 1e-3)
  c.privacy.budget_action = "refuse"
  with pytest.raises(P.PrivacyBudgetError, match="max_epsilon"):
    P.PrivacyPlan(c, sizes, 4, steps_of, 3)
  with pytest.raises(ValueError, match="sizes"):
    P.PrivacyPlan(_config("none"), sizes[:3], 4, steps_of, 3)


# ----------------------------------------------------------------------------- truncated Poisson

def test_poisson_overflow_union_bound_against_scipy():
  sizes, steps, batch = [50, 200, 1000, 3000, 0], [30, 40, 500, 900, 0], 32
  for cap in (40, 60, 80, 100):
    ref = max(t * stats.binom.sf(cap, n, min(1.0, batch / n)) for n, t in zip(sizes, steps) if n)
    p, worst = P.poisson_overflow_probability(cap, batch, sizes, steps)
    assert p == pytest.approx(min(1.0, ref), rel=1e-9) and worst in (2, 3)
  assert 0 < P.poisson_overflow_probability(80, batch, sizes, steps)[0] < 1e-3  # not capped
  # the run capacity: smallest with the worst client's union bound under the budget
  budget = 1e-9
  cap = P.poisson_capacity_for_run(batch, sizes, steps, budget)

  def run_tail(k):
    return max(t * stats.binom.sf(k, n, min(1.0, batch / n)) for n, t in zip(sizes, steps) if n)

  assert run_tail(cap) <= budget < run_tail(cap - 1)
  assert P.truncation_delta(2.0, 1e-8) == pytest.approx((1 + math.e ** 2) * 1e-8)
  assert P.overflow_budget(2.0, 1e-5) == pytest.approx(1e-6 / (1 + math.e ** 2))


def test_plan_sizes_poisson_capacity_and_refuses_a_pinned_tail():
  sizes = np.asarray([300, 1200, 800, 500, 2000, 640, 900, 350])
  c = _config("dp_sgd", noise_multiplier=1.2, delta=1e-5, rounds=20, batch=32, epochs=3)
  steps_of = _steps_of(c)
  plan = P.PrivacyPlan(c, sizes, 4, steps_of, 3)
  run_steps = [20 * steps_of(n) for n in sizes]

  def run_tail(k):
    return max(t * stats.binom.sf(k, n, 32 / n) for n, t in zip(sizes, run_steps))

  allowed = 0.1 * 1e-5 / (1 + math.exp(plan.planned_epsilon))
  assert run_tail(plan.capacity) <= allowed < run_tail(plan.capacity - 1)
  assert plan.client.poisson and plan.client.capacity == plan.capacity
  assert plan.overflow_probability == pytest.approx(run_tail(plan.capacity), rel=1e-9)
  assert plan.delta_total == pytest.approx(
      1e-5 + (1 + math.exp(plan.planned_epsilon)) * run_tail(plan.capacity), rel=1e-9)
  assert plan.metrics()["delta_total"] == plan.delta_total
  assert plan.summary()["poisson_capacity"] == plan.capacity
  c.privacy.poisson_overflow_prob = 1e-6
  with pytest.raises(P.PrivacyBudgetError, match=r"privacy\.poisson_overflow_prob") as err:
    P.PrivacyPlan(c, sizes, 4, steps_of, 3)
  message = str(err.value)
  assert "\n" not in message
  suggested = float(re.search(r"poisson_overflow_prob <= ([0-9.e+-]+)", message).group(1))
  c.privacy.poisson_overflow_prob = suggested
  pinned = P.PrivacyPlan(c, sizes, 4, steps_of, 3)
  assert run_tail(pinned.capacity) <= allowed
  assert pinned.capacity == int(re.search(r"\(capacity (\d+)\)", message).group(1))


# ----------------------------------------------------------------------------- adaptive clipping

def _feasible(study_config, clients):
  """Adaptive clipping runs iff the calibrated z < 2 x count std = 0.1 m x cnm."""
  p = study_config.privacy
  try:
    z = P.calibrate_noise_multiplier(p.epsilon, p.delta, clients / 64, 50, p.accountant)
  except P.PrivacyBudgetError:
    return False
  return z < 0.1 * clients * p.count_noise_multiplier


@pytest.mark.slow
def test_adaptive_clipping_error_names_what_works():
  study_dp = _study_dp()
  c = study_dp.get_config("cifar100,bias,mechanism=dp_fedavg,adaptive=1")
  sizes = np.full(64, 781)
  steps_of = _steps_of(c)
  with pytest.raises(P.PrivacyBudgetError) as err:
    P.PrivacyPlan(c, sizes, 8, steps_of, 100)
  message = str(err.value)
  assert "\n" not in message and "privacy.adaptive_clip" in message
  eps_ok = float(re.search(r"privacy\.epsilon >= ([0-9.e+-]+)", message).group(1))
  m_ok = int(re.search(r"federated\.clients_per_round >= (\d+)", message).group(1))
  cnm_ok = float(re.search(r"count_noise_multiplier >= ([0-9.e+-]+)", message).group(1))
  assert _feasible(c, m_ok) and not _feasible(c, m_ok - 1) and not _feasible(c, 8)
  c.privacy.epsilon = eps_ok
  assert P.PrivacyPlan(c, sizes, 8, steps_of, 100).server.adaptive
  c.privacy.epsilon = 5.0
  c.privacy.count_noise_multiplier = cnm_ok
  plan = P.PrivacyPlan(c, sizes, 8, steps_of, 100)
  z = plan.noise
  assert (plan.server.noise_multiplier ** -2 + (2 * plan.server.count_noise_std) ** -2) ** -0.5 \
      == pytest.approx(z)
  # a fixed multiplier: its bound, and the clients per round that would carry it
  c = study_dp.get_config("cifar100,bias,mechanism=dp_fedavg,adaptive=1,noise=1.2")
  with pytest.raises(P.PrivacyBudgetError, match=r"noise_multiplier <= 0\.799.*"
                     r"clients_per_round >= 13"):
    P.PrivacyPlan(c, sizes, 8, steps_of, 100)
  # without adaptive the preset runs with fixed clipping
  fixed = study_dp.get_config("cifar100,bias,mechanism=dp_fedavg")
  assert not fixed.privacy.adaptive_clip
  assert not P.PrivacyPlan(fixed, sizes, 8, steps_of, 100).server.adaptive


# ----------------------------------------------------------------------------- what epsilon covers

def test_non_private_metrics_and_flags():
  sizes = np.full(8, 64)
  for mech, extra in [("none", {}), ("paper_gaussian", {"delta": 1e-3}),
                      ("dp_sgd", {"delta": 1e-5}), ("dp_fedavg", {"delta": 1e-3})]:
    c = _config(mech, **extra)
    plan = P.PrivacyPlan(c, sizes, 4, _steps_of(c), 3)
    assert plan.non_private_metrics == P.NON_PRIVATE_METRICS[mech]
    assert plan.log_non_private is (mech == "none")
    row = {"round": 1, "test_accuracy": 0.5, "train_loss": 1.0, "clients_sampled": 4,
           "bytes_up": 10, "poisson_dropped": 0, "clip_norm": 1.0}
    kept = plan.filter_metrics(row)
    assert "test_accuracy" in kept and "clip_norm" in kept
    assert ("train_loss" in kept) is (mech == "none")
    assert ("clients_sampled" in kept) is (mech != "dp_fedavg")
    assert ("poisson_dropped" in kept) is (mech != "dp_sgd")
    c.privacy.log_non_private_metrics = True
    assert P.PrivacyPlan(c, sizes, 4, _steps_of(c), 3).filter_metrics(row) == row
  for mech in ("paper_gaussian", "dp_sgd", "dp_fedavg"):
    assert {"train_loss", "clients_nonfinite", "partition"} <= set(P.NON_PRIVATE_METRICS[mech])
  assert {"clients_sampled", "clients_reporting", "bytes_up", "total_bytes",
          "unclipped_fraction"} <= set(P.NON_PRIVATE_METRICS["dp_fedavg"])
  for field, bad in [("log_non_private_metrics", "no"), ("reproducible_noise", None),
                     ("reproducible_noise", 1)]:
    # a hand-built config (the ConfigDict defaults already refuse other types)
    c = ml_collections.ConfigDict({**P.default_privacy_config().to_dict(), field: bad})
    with pytest.raises(ValueError, match=f"privacy.{field}"):
      P.validate_privacy(c)


def test_reproducible_noise_voids_the_guarantee():
  sizes = np.full(8, 64)
  for mech in ("paper_gaussian", "dp_sgd", "dp_fedavg"):
    c = _config(mech, delta=1e-3, reproducible_noise=True)
    plan = P.PrivacyPlan(c, sizes, 4, _steps_of(c), 3)
    plan.record(np.arange(4))
    for out in (plan.metrics(), plan.summary()):
      assert out["formal_guarantee"] is False
      assert "published seed" in out["note"] and "config.json" in out["note"]
    c.privacy.reproducible_noise = False
    plan = P.PrivacyPlan(c, sizes, 4, _steps_of(c), 3)
    assert plan.summary()["formal_guarantee"] is True and not plan.reproducible_noise


def test_secure_noise_reaches_every_mechanism_from_the_config():
  sizes = np.asarray([40, 100, 250, 60, 90, 75, 80, 50])
  for mechanism, side in (("dp_fedavg", "server"), ("dp_sgd", "client"),
                          ("paper_gaussian", "client")):
    for secure in (False, True):
      c = _config(mechanism, noise_multiplier=1.0, secure_noise=secure)
      plan = P.PrivacyPlan(c, sizes, 4, _steps_of(c), 3)
      assert getattr(plan, side).secure_noise is secure, (mechanism, secure)
      assert plan.summary()["secure_noise"] is secure
