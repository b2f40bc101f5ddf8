"""Privacy mechanisms and accounting against NumPy, statistics and dp_accounting itself."""

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedpeft_jax import privacy as P
from fedpeft_jax.federated import ServerDP, dp_fedavg

MNIST_Q = 256 / 60000
MNIST_STEPS_PER_EPOCH = 60000 // 256  # 234, as in the TF Privacy tutorial


def _per_example_tree(rng, b=12):
  """Random per-example gradients, two leaves, norms spread around C=1."""
  tree = {"w": rng.normal(size=(b, 3, 4)).astype(np.float32),
          "blk": {"b": rng.normal(size=(b, 5)).astype(np.float32)}}
  scale = np.geomspace(0.05, 5.0, b).astype(np.float32)  # some far below C, some far above
  norms = np.sqrt((tree["w"] ** 2).sum((1, 2)) + (tree["blk"]["b"] ** 2).sum(1))
  tree["w"] *= (scale / norms)[:, None, None]
  tree["blk"]["b"] *= (scale / norms)[:, None]
  return tree


def _np_clip(tree, c):
  w, b = tree["w"].astype(np.float64), tree["blk"]["b"].astype(np.float64)
  n = np.sqrt((w ** 2).sum((1, 2)) + (b ** 2).sum(1))
  s = np.minimum(1.0, c / n)
  return w * s[:, None, None], b * s[:, None], n


def _linear_loss(params, example):
  """<params, example> summed over the leaves: its gradient w.r.t. params is exactly the
  example's data, so dp_sgd_grad's per-example gradients are known in closed form (the
  rows of the batch, NaN rows included)."""
  return sum(jnp.sum(p * x) for p, x in zip(jax.tree.leaves(params), jax.tree.leaves(example)))


def _zeros_params(tree):
  """Parameters shaped like one row of a per-example tree."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.float32), tree)


def _dp_fedavg_round(updates, ok, key, clip_norm, noise_multiplier, expected_clients):
  """(mean update, pre-clip norms) of one DP-FedAvg round through the engine's aggregator:
  contribute on the stacked updates, the coefficient-weighted sum the engine forms for a
  chunk, then finalize."""
  agg = dp_fedavg(ServerDP(True, noise_multiplier=noise_multiplier,
                           expected_clients=expected_clients))
  c = agg.contribute(updates, jnp.ones(ok.shape), ok, jnp.float32(clip_norm))
  coeff = jnp.where(ok, c.coefficients, 0.0)
  total = jax.tree.map(lambda u: jnp.tensordot(coeff, u, 1), c.updates)
  mean, _, _, _ = agg.finalize(total, jnp.sum(c.weights), c.norms, ok, jnp.float32(clip_norm), key)
  return mean, c.norms


# ----------------------------------------------------------------------------- the study's sigma

def test_paper_sigma():
  assert P.paper_sigma(5.0, 1e-3, 1.0) == pytest.approx(3.38, abs=5e-3)
  assert P.paper_sigma(5.0, 1e-3, 1.0) == pytest.approx(2 * math.sqrt(2 * math.log(1250) / 5))
  assert P.paper_sigma(10.0, 1e-3, 2.0) == pytest.approx(2 * 2 * math.sqrt(2 * math.log(1250) / 10))
  for bad in [dict(epsilon=0.0), dict(epsilon=-1.0), dict(delta=0.0), dict(delta=1.0),
              dict(delta=1.5), dict(clip_norm=0.0), dict(clip_norm=-1.0)]:
    kw = dict(epsilon=5.0, delta=1e-3, clip_norm=1.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
      P.paper_sigma(**kw)


def test_paper_gaussian_clips_each_tensor():
  g = {"a": jnp.full((10,), 3.0), "b": jnp.full((4,), 0.1)}
  out = P.paper_gaussian(g, jax.random.PRNGKey(0), 1.0, 0.0)
  assert float(jnp.linalg.norm(out["a"])) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(g["b"]))  # below C: unchanged
  with pytest.raises(ValueError, match="sigma"):
    P.paper_gaussian(g, jax.random.PRNGKey(0), 1.0, -1.0)


# ----------------------------------------------------------------------------- clipping

def test_clip_per_example_against_numpy():
  rng = np.random.default_rng(0)
  tree = _per_example_tree(rng)
  c = 1.0
  clipped, norms = P.clip_per_example(jax.tree.map(jnp.asarray, tree), c)
  w_ref, b_ref, n_ref = _np_clip(tree, c)
  np.testing.assert_allclose(np.asarray(norms), n_ref, rtol=1e-5)
  new_norms = np.sqrt((np.asarray(clipped["w"], np.float64) ** 2).sum((1, 2))
                      + (np.asarray(clipped["blk"]["b"], np.float64) ** 2).sum(1))
  assert np.all(new_norms <= c + 1e-6)
  below = n_ref < c
  assert below.any() and (~below).any()
  np.testing.assert_array_equal(np.asarray(clipped["w"])[below], tree["w"][below])  # bit-exact
  np.testing.assert_array_equal(np.asarray(clipped["blk"]["b"])[below], tree["blk"]["b"][below])


def test_dp_sgd_grad_clips_sums_and_divides_like_numpy():
  """dp_sgd_grad with noise off on a loss whose per-example gradients are the batch rows:
  NumPy's clip, masked sum and division by the expected batch; padded rows carrying NaN
  gradients must not leak, chunked or not."""
  rng = np.random.default_rng(0)
  tree = _per_example_tree(rng)
  c = 1.0
  w_ref, b_ref, n_ref = _np_clip(tree, c)
  mask = np.arange(len(n_ref)) % 3 != 0
  tree_nan = jax.tree.map(lambda x: x.copy(), tree)
  tree_nan["w"][~mask] = np.nan
  params = _zeros_params(tree)
  for data, chunk, denom in [(tree_nan, 0, 1.0), (tree_nan, 4, 1.0), (tree, 0, 4.0),
                             (tree, 3, 4.0)]:
    out, st = P.dp_sgd_grad(_linear_loss, params, jax.tree.map(jnp.asarray, data),
                            jnp.asarray(mask), jax.random.PRNGKey(1), c, 0.0, denom,
                            chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(out["w"]), w_ref[mask].sum(0) / denom, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["blk"]["b"]), b_ref[mask].sum(0) / denom,
                               rtol=1e-5, atol=1e-6)
    assert float(st["clipped_fraction"]) == pytest.approx((n_ref[mask] > c).mean())
    assert float(st["num_examples"]) == mask.sum()
    assert float(st["norm_mean"]) == pytest.approx(n_ref[mask].mean(), rel=1e-5)
    assert float(st["norm_max"]) == pytest.approx(n_ref[mask].max(), rel=1e-5)


def test_dp_sgd_grad_per_example_gradients_and_chunking():
  """Squared error, whose per-example gradients are 2 r x and 2 r (r = x.w + b - y):
  dp_sgd_grad equals NumPy's clipped sum of those over the expected batch, chunked
  (under jit) equals unchunked with the same key, noise included, and the losses are r^2."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  y = rng.normal(size=(8,)).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}

  def loss_fn(p, batch):
    pred = batch["x"] @ p["w"] + p["b"]
    return jnp.mean((pred - batch["y"]) ** 2)

  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  r = x.astype(np.float64) @ np.asarray(params["w"], np.float64) - y
  gw, gb = 2 * r[:, None] * x, 2 * r
  norms = np.sqrt((gw ** 2).sum(1) + gb ** 2)
  scale = np.minimum(1.0, 0.5 / norms)
  m = np.array([True] * 6 + [False] * 2)
  assert (norms[m] > 0.5).any() and (norms[m] < 0.5).any()  # both sides of C
  mask = jnp.asarray(m)
  exact, st = P.dp_sgd_grad(loss_fn, params, batch, mask, jax.random.PRNGKey(0), 0.5, 0.0, 6.0)
  np.testing.assert_allclose(np.asarray(exact["w"]), (gw * scale[:, None])[m].sum(0) / 6,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(exact["b"]), (gb * scale)[m].sum() / 6, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(st["losses"]), r ** 2, rtol=1e-4, atol=1e-6)
  assert float(st["num_examples"]) == 6
  assert float(st["clipped_fraction"]) == pytest.approx((norms[m] > 0.5).mean())
  key = jax.random.PRNGKey(3)
  full, s1 = P.dp_sgd_grad(loss_fn, params, batch, mask, key, 0.5, 1.1, 6.0)
  for chunk in (2, 4):
    chunked, s2 = jax.jit(lambda p, bt, k, ch=chunk: P.dp_sgd_grad(
        loss_fn, p, bt, mask, k, 0.5, 1.1, 6.0, chunk_size=ch))(params, batch, key)
    for k in ("w", "b"):
      np.testing.assert_allclose(np.asarray(full[k]), np.asarray(chunked[k]), rtol=1e-5,
                                 atol=1e-6)
    for k in s1:
      np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s2[k]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(full["w"]), np.asarray(exact["w"]))  # the noise is there
  with pytest.raises(ValueError, match="chunk_size"):
    P.dp_sgd_grad(loss_fn, params, batch, mask, key, 0.5, 1.1, 6.0, chunk_size=3)


# ----------------------------------------------------------------------------- noise

def _std_ok(x, expected, n):
  # sample std of n normals: relative s.e. ~ 1/sqrt(2n); allow 5 s.e.
  tol = 5 / math.sqrt(2 * n)
  assert abs(float(np.std(x)) / expected - 1) < tol, (float(np.std(x)), expected)
  assert abs(float(np.mean(x))) < 5 * expected / math.sqrt(n)


def test_noise_std_matches_sigma_c():
  n = 200_000
  zeros = {"big": jnp.zeros((3, n)), "small": jnp.zeros((3, 7))}  # zero per-example gradients
  params = _zeros_params(zeros)
  mask = jnp.ones((3,), bool)
  z, c = 1.3, 0.7
  out, _ = P.dp_sgd_grad(_linear_loss, params, zeros, mask, jax.random.PRNGKey(0), c, z, 1.0)
  _std_ok(np.asarray(out["big"]), z * c, n)
  # the denominator scales the noise: std sigma C / B
  out, _ = P.dp_sgd_grad(_linear_loss, params, zeros, mask, jax.random.PRNGKey(0), c, z, 4.0)
  _std_ok(np.asarray(out["big"]), z * c / 4, n)
  # paper_gaussian: sigma absolute
  sigma = P.paper_sigma(5.0, 1e-3, 1.0)
  pg = P.paper_gaussian({"g": jnp.zeros((n,))}, jax.random.PRNGKey(1), 1.0, sigma)
  _std_ok(np.asarray(pg["g"]), sigma, n)
  # DP-FedAvg through the engine's aggregator: sum noise z C, divided by expected clients
  upd = {"u": jnp.zeros((4, n))}
  mean, norms = _dp_fedavg_round(upd, jnp.ones((4,), bool), jax.random.PRNGKey(2), 2.0, 0.8, 5)
  _std_ok(np.asarray(mean["u"]), 0.8 * 2.0 / 5.0, n)
  assert np.all(np.asarray(norms) == 0)


def test_dp_fedavg_aggregator_against_numpy():
  """The engine's DP-FedAvg aggregator with noise off: each reporting client's update
  clipped to global norm C, summed, divided by the expected clients (not the realised
  count); clients that did not report (ok False) add nothing."""
  rng = np.random.default_rng(4)
  tree = _per_example_tree(rng, b=7)  # 7 clients' updates, norms 0.05 .. 5
  ok = np.array([True, True, False, True, True, False, True])
  c, m = 1.0, 10
  w_ref, b_ref, n_ref = _np_clip(tree, c)
  mean, norms = _dp_fedavg_round(jax.tree.map(jnp.asarray, tree), jnp.asarray(ok),
                                 jax.random.PRNGKey(0), c, 0.0, m)
  np.testing.assert_allclose(np.asarray(norms), n_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mean["w"]), w_ref[ok].sum(0) / m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(mean["blk"]["b"]), b_ref[ok].sum(0) / m, rtol=1e-5,
                             atol=1e-7)


def test_keys_are_fresh():
  g = {"a": jnp.zeros((1000,)), "b": jnp.zeros((1000,))}
  k1, k2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  x1 = P.paper_gaussian(g, k1, 1.0, 1.0)
  x2 = P.paper_gaussian(g, k2, 1.0, 1.0)
  x1b = P.paper_gaussian(g, k1, 1.0, 1.0)
  np.testing.assert_array_equal(np.asarray(x1["a"]), np.asarray(x1b["a"]))  # reproducible
  assert not np.allclose(np.asarray(x1["a"]), np.asarray(x2["a"]))  # different key, different noise
  # leaves of one call draw independent noise (no shared key between tensors)
  assert abs(np.corrcoef(np.asarray(x1["a"]), np.asarray(x1["b"]))[0, 1]) < 0.15
  # vmapped over clients x steps with split keys: every (client, step) draw differs
  keys = jax.random.split(jax.random.PRNGKey(5), 6).reshape(2, 3, -1)
  per_ex = {"w": jnp.zeros((2, 3, 4, 50))}  # [client, step, example, dim]: zero gradients
  params = {"w": jnp.zeros((50,))}
  f = jax.jit(jax.vmap(jax.vmap(
      lambda pe, k, c: P.dp_sgd_grad(_linear_loss, params, pe, jnp.ones((4,), bool), k, c, 1.0,
                                     4.0)[0],
      in_axes=(0, 0, None)), in_axes=(0, 0, 0)))
  out = np.asarray(f(per_ex, keys, jnp.asarray([1.0, 2.0]))["w"]).reshape(6, 50)
  assert len({tuple(np.round(r, 6)) for r in out}) == 6
  # client 1 (C = 2, traced) has twice the noise scale of client 0 in expectation
  assert np.std(out[3:]) > np.std(out[:3])


# ----------------------------------------------------------------------------- sampling

def test_poisson_batch():
  f = jax.jit(jax.vmap(lambda k: P.poisson_batch(k, 300, 0.1, 64, pool_size=400)))
  idx, mask, dropped = (np.asarray(a) for a in f(jax.random.split(jax.random.PRNGKey(0), 400)))
  for i, m in zip(idx, mask):
    real = i[m]
    assert np.all(real < 300) and len(set(real.tolist())) == len(real)
  assert int(dropped.sum()) == 0
  counts = mask.sum(1)
  # the count is Binomial(n, q): mean n q = 30 (s.e. of the mean ~ 0.26), variance
  # n q (1 - q) = 27 (s.e. of the sample variance ~ 1.9)
  assert abs(counts.mean() - 30) < 1.5
  assert abs(counts.var() - 27) < 8
  # every one of the client's examples is equally likely (q each), none beyond n
  hits = np.bincount(idx[mask], minlength=400)
  assert hits[300:].sum() == 0 and abs(hits[:300].mean() / 400 - 0.1) < 0.005
  idx, mask, dropped = P.poisson_batch(jax.random.PRNGKey(0), 100, 1.0, 16, pool_size=128)
  assert bool(np.all(mask)) and int(dropped) == 84  # truncation is reported
  cap = P.poisson_capacity(30, 1e-6, client_size=300)
  assert stats.binom.sf(cap, 300, 0.1) <= 1e-6 < stats.binom.sf(cap - 1, 300, 0.1)
  assert P.poisson_capacity(32, 1e-6) == 62  # Poisson bound, valid for any client size
  assert P.poisson_capacity(32, 1e-6) >= P.poisson_capacity(32, 1e-6, client_size=500)
  # far tails (run-level capacities), where scipy's isf is no longer accurate
  for p in (1e-12, 1e-17, 1e-40):
    cap = P.poisson_capacity(32, p)
    assert stats.poisson.sf(cap, 32) <= p < stats.poisson.sf(cap - 1, 32)
    cap = P.poisson_capacity(32, p, client_size=2000)
    assert stats.binom.sf(cap, 2000, 0.016) <= p < stats.binom.sf(cap - 1, 2000, 0.016)
  pos, m, d = P.poisson_schedule(jax.random.PRNGKey(2), 50, 0.2, 7, 24, pool_size=64)
  assert pos.shape == m.shape == (7, 24) and d.shape == (7,)
  assert np.all(np.asarray(pos)[np.asarray(m)] < 50)
  with pytest.raises(ValueError, match="max_batch"):
    P.poisson_batch(jax.random.PRNGKey(0), 10, 0.1, 20, pool_size=16)


# ----------------------------------------------------------------------------- DP-FedAvg

def test_clip_update_and_adaptive_clipping():
  upd = {"a": jnp.full((4,), 2.0), "b": {"c": jnp.full((9,), 2.0)}}  # norm 2 * sqrt(13)
  clipped, norm = P.clip_update(upd, 1.0)
  assert float(norm) == pytest.approx(2 * math.sqrt(13), rel=1e-6)
  clipped_norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                               for x in jax.tree.leaves(clipped)))
  assert clipped_norm == pytest.approx(1.0, rel=1e-6)
  same, _ = P.clip_update(upd, 100.0)
  np.testing.assert_array_equal(np.asarray(same["a"]), np.asarray(upd["a"]))
  # bfloat16 leaves: the norm is taken in float32 (a bfloat16 norm is ~0.3% off), the
  # clipped leaves keep their dtype
  rng = np.random.default_rng(2)
  bf = {"a": jnp.asarray(rng.normal(size=(4096,)), jnp.bfloat16),
        "b": jnp.asarray(3 * rng.normal(size=(64, 64)), jnp.bfloat16)}
  ref = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(bf)))
  clipped, norm = P.clip_update(bf, 1.0)
  assert norm.dtype == jnp.float32 and float(norm) == pytest.approx(ref, rel=1e-6)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(clipped))
  # Andrew et al.: combined multiplier (z_v^-2 + (2 s)^-2)^-1/2 equals the target z
  assert P.default_count_stddev(100) == pytest.approx(5.0)
  assert P.default_count_stddev(8, 2.0) == pytest.approx(0.8)
  z, s = 1.0, P.default_count_stddev(100)
  zv = P.value_noise_multiplier(z, s)
  assert zv > z and (zv ** -2 + (2 * s) ** -2) ** -0.5 == pytest.approx(z)
  with pytest.raises(ValueError, match="count_stddev"):
    P.value_noise_multiplier(1.0, 0.4)
  # geometric update: too many unclipped -> C shrinks, exactly C exp(-lr (b - gamma))
  assert float(P.adaptive_clip_update(1.0, 0.9, 0.5, 0.2)) == pytest.approx(math.exp(-0.08))
  assert float(P.adaptive_clip_update(1.0, 0.1, 0.5, 0.2)) > 1.0
  norms = jnp.asarray([0.5, 1.5, 0.2, 3.0, 0.9, 7.0])
  mask = jnp.asarray([True, True, True, True, False, False])
  b = P.noisy_unclipped_fraction(norms, mask, jax.random.PRNGKey(0), 1.0, 1e-6, 4.0)
  assert float(b) == pytest.approx(0.5, abs=1e-4)  # 2 of the 4 real clients are under C


# ----------------------------------------------------------------------------- accounting

def _direct(events, delta, accountant):
  acc = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
         else dp_accounting.pld.PLDAccountant())
  for e in events:
    acc.compose(e)
  return acc.get_epsilon(delta)


def _step(q, z, n=1):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting(accountant):
  eps = P.dp_sgd_epsilon(0.05, 2.0, 300, 1e-5, accountant)
  assert eps == pytest.approx(_direct([_step(0.05, 2.0, 300)], 1e-5, accountant), abs=1e-6)
  # DP-FedAvg ledger: one event per round, here 4 rounds with a changing multiplier
  # (PLD is slow for small multipliers, so the tests use z >= 2)
  led = P.PrivacyLedger("dp_fedavg", 1e-5, accountant)
  zs = [2.0, 2.5, 2.0, 2.5]
  for z in zs:
    led.record_dp_fedavg_round(8 / 64, z)
  direct = _direct([_step(8 / 64, z) for z in zs], 1e-5, accountant)
  assert led.report()["epsilon"] == pytest.approx(direct, abs=1e-6)
  assert P.dp_fedavg_epsilon(8, 64, 2.0, 3, 1e-5, accountant) == pytest.approx(
      _direct([_step(8 / 64, 2.0)] * 3, 1e-5, accountant), abs=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_dp_sgd_ledger_equals_dp_accounting(accountant):
  led = P.PrivacyLedger("dp_sgd", 1e-5, accountant, num_clients=5)
  sizes = {0: 100, 1: 400, 2: 50, 3: 200, 4: 300}
  batch, z = 10, 2.0
  rounds = [[0, 1], [2, 0], [0, 3], [2, 1]]
  steps = lambda c: math.ceil(sizes[c] / batch) // 5  # noqa: E731
  seq = {c: [] for c in sizes}
  for ids in rounds:
    led.record_dp_sgd_round(ids, [batch / sizes[c] for c in ids], z, [steps(c) for c in ids])
    for c in ids:
      seq[c].append(_step(batch / sizes[c], z, steps(c)))
  rep = led.report()
  eps = led.client_epsilons()
  assert set(eps) == {0, 1, 2, 3}
  for c, events in seq.items():
    if events:  # per-round sequence composed directly == ledger's merged event
      assert eps[c] == pytest.approx(_direct(events, 1e-5, accountant), abs=1e-6)
  assert rep["epsilon"] == max(eps.values()) == rep["epsilon_max"]
  assert rep["worst_client"] == max(eps, key=eps.get)
  assert rep["epsilon_min"] == 0.0  # client 4 never trained
  assert rep["epsilon_median"] == pytest.approx(np.median(list(eps.values()) + [0.0]))
  assert rep["formal_guarantee"] is True and rep["clients_accounted"] == 4
  # the same round through the per-client primitive
  alt = P.PrivacyLedger("dp_sgd", 1e-5, accountant, num_clients=5)
  for ids in rounds:
    for c in ids:
      alt.record_client(c, batch / sizes[c], z, steps(c))
    alt.record_round()
  assert alt == led


def test_published_tf_privacy_mnist_epsilon():
  """TF Privacy MNIST tutorial (tutorials/README.md, default row): q = 256/60000,
  noise 1.12, 60 epochs (14040 steps), delta 1e-5 -> epsilon 2.92; and the
  10-epoch, noise 1.2 row -> 1.20. Those used the RDP->(eps, delta) conversion of
  Mironov 2017 (Prop. 3) over orders 1.1..10.9, 12..63; dp_accounting's accountant
  uses the tighter conversion of Canonne et al./Asoodeh et al., so ours must be
  lower, and the old conversion on dp_accounting's RDP curve gives the published value."""
  orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
  for z, epochs, published in [(1.12, 60, 2.92), (1.2, 10, 1.20)]:
    steps = epochs * MNIST_STEPS_PER_EPOCH
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(_step(MNIST_Q, z, steps))
    classic = min(r - math.log(1e-5) / (a - 1) for a, r in zip(acc.orders, acc.rdp))
    assert round(classic, 2) == published
    ours = P.dp_sgd_epsilon(MNIST_Q, z, steps, 1e-5, "rdp")
    assert ours < published
  assert P.dp_sgd_epsilon(MNIST_Q, 1.12, 14040, 1e-5) == pytest.approx(2.516, abs=1e-3)


def test_calibration_round_trip():
  q, steps, delta, target = 0.01, 1000, 1e-5, 2.0
  z = P.calibrate_noise_multiplier(target, delta, q, steps, "rdp")
  assert P.dp_sgd_epsilon(q, z, steps, delta) <= target
  assert P.dp_sgd_epsilon(q, z, steps, delta) == pytest.approx(target, abs=5e-3)
  assert P.dp_sgd_epsilon(q, z - 1e-2, steps, delta) > target  # (nearly) the smallest such z
  # q = 1, one step: the plain Gaussian mechanism, whose exact (analytic) sigma
  # dp_accounting computes independently of any accountant
  z_pld = P.calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1, "pld", tol=1e-4)
  assert P.dp_sgd_epsilon(1.0, z_pld, 1, 1e-5, "pld") <= 1.0 + 1e-9
  assert z_pld == pytest.approx(dp_accounting.get_sigma_gaussian(1.0, 1e-5), rel=2e-3)
  # Poisson truncated to a too-small capacity costs privacy (PLD, exact for poisson_batch)
  assert P.dp_sgd_epsilon_truncated(100, 0.1, 12, 3.0, 5, 1e-5) > P.dp_sgd_epsilon(
      0.1, 3.0, 5, 1e-5, "pld") + 0.1
  with pytest.raises(P.PrivacyBudgetError, match="unreachable"):
    P.calibrate_noise_multiplier(0.01, 1e-5, 1.0, 10000, "rdp", max_noise_multiplier=20.0)
  # a tiny sampling rate meets a loose target with almost no noise
  z_low = P.calibrate_noise_multiplier(50.0, 1e-5, 1e-4, 10, "rdp")
  assert P.dp_sgd_epsilon(1e-4, z_low, 10, 1e-5) <= 50.0
  assert z_low == P.accounting.MIN_NOISE_MULTIPLIER or P.dp_sgd_epsilon(
      1e-4, z_low - 1e-3, 10, 1e-5) > 50.0


def test_ledger_serialisation_and_budget():
  led = P.PrivacyLedger("dp_sgd", 1e-5, "rdp", num_clients=3)
  led.record_dp_sgd_round([0, 2], [0.1, 0.2], 1.1, [10, 5])
  blob = json.dumps(led.to_dict())
  back = P.PrivacyLedger.from_dict(json.loads(blob))
  assert back == led and back.to_json() == led.to_json()
  assert back.epsilon() == led.epsilon()
  preview = led.preview_dp_sgd_round([2], 0.2, 1.1, 5)
  assert led.rounds == 1  # preview records nothing
  for x in (led, back):
    x.record_dp_sgd_round([2], 0.2, 1.1, 5)
  assert back.epsilon() == led.epsilon() == preview
  assert led.clients[2] == [[0.2, 1.1, 10]]  # merged per (q, z)
  P.check_budget(led.epsilon(), None)
  with pytest.raises(P.PrivacyBudgetError, match="max_epsilon"):
    P.check_budget(led.epsilon(), led.epsilon() / 2)
  pg = P.PrivacyLedger("paper_gaussian", 1e-3)
  pg.record_paper_gaussian_round([0], 0.5, 4, 2)
  rep = pg.report()
  # accounted without amplification: two Gaussian steps of multiplier 0.5 for an example
  assert rep["formal_guarantee"] is True and "not a guarantee" in rep["note"]
  assert pg.epsilon() == rep["epsilon"] == P.gaussian_epsilon(0.5 / math.sqrt(2), 1, 1e-3)
  with pytest.raises(ValueError, match="dp_sgd"):
    pg.record_dp_sgd_round([0], 0.1, 1.0, 1)
  none = P.PrivacyLedger("none", 1e-3)
  none.record_round()
  assert none.epsilon() is None and none.report()["formal_guarantee"] is False
  shuffled = P.PrivacyLedger("dp_fedavg", 1e-5, sampling="shuffle")
  shuffled.record_round(0.1, 1.0)  # == record_dp_fedavg_round
  assert shuffled.server == [[0.1, 1.0, 1]] and shuffled.rounds == 1
  with pytest.raises(ValueError, match="sampling_rate"):
    shuffled.record_round()
  assert shuffled.report()["formal_guarantee"] is False


# ----------------------------------------------------------------------------- config and bad input

def test_config_validation():
  cfg = P.default_privacy_config()
  assert P.validate_privacy(cfg) == "none"
  cfg.mechanism = "paper_gaussian"
  cfg.delta = 1e-3
  meta = P.privacy_metadata(cfg)
  assert meta["sigma"] == pytest.approx(3.378, abs=1e-3) and meta["nominal_epsilon"] == 5.0
  assert meta["formal_guarantee"] is True and meta["reproducible_noise"] is False
  cfg.reproducible_noise = True
  meta = P.privacy_metadata(cfg)
  assert meta["formal_guarantee"] is False and "published seed" in meta["note"]
  cfg.poisson_overflow_prob = 1e-9  # a placeholder: None (automatic) or a probability
  assert P.validate_privacy(cfg) == "paper_gaussian"
  bad = [("mechanism", "dp", "privacy.mechanism.*allowed: none, paper_gaussian, dp_sgd, dp_fedavg"),
         ("accountant", "moments", "privacy.accountant.*allowed: rdp, pld"),
         ("sampling", "random", "privacy.sampling"),
         ("noise_multiplier", -0.1, "privacy.noise_multiplier"),
         ("clip_norm", 0.0, "privacy.clip_norm"),
         ("clip_norm", -1.0, "privacy.clip_norm"),
         ("delta", 0.0, "privacy.delta"),
         ("delta", 1.0, "privacy.delta"),
         ("delta", 2.0, "privacy.delta"),
         ("epsilon", 0.0, "privacy.epsilon"),
         ("budget_action", "warn", "privacy.budget_action"),
         ("max_epsilon", -1.0, "privacy.max_epsilon"),
         ("poisson_overflow_prob", 1.0, "privacy.poisson_overflow_prob"),
         ("poisson_overflow_prob", 0.0, "privacy.poisson_overflow_prob")]
  for field, value, msg in bad:
    c = P.default_privacy_config()
    c[field] = value
    with pytest.raises(ValueError, match=msg):
      P.validate_privacy(c)
  c = P.default_privacy_config()
  c.mechanism, c.noise_multiplier = "dp_sgd", 0.0
  with pytest.raises(ValueError, match="noise_multiplier is 0"):
    P.validate_privacy(c)
  c.noise_multiplier, c.adaptive_clip = 1.0, True
  with pytest.raises(ValueError, match="adaptive_clip"):
    P.validate_privacy(c)
  c = P.default_privacy_config()
  c.mechanism, c.calibrate, c.epsilon = "dp_fedavg", True, 2.0
  z = P.resolve_noise_multiplier(c, 0.01, 1000)
  assert P.dp_fedavg_epsilon(10, 1000, z, 1000, 1e-5) <= 2.0
  c.max_epsilon = 8.0  # a placeholder accepts a float from the command line
  assert P.validate_privacy(c) == "dp_fedavg"


def test_bad_inputs_in_mechanisms_and_accounting():
  g = {"a": jnp.ones((2, 3))}
  params = _zeros_params(g)
  key, ones = jax.random.PRNGKey(0), jnp.ones((2,), bool)
  with pytest.raises(ValueError, match="clip_norm"):
    P.clip_per_example(g, 0.0)
  with pytest.raises(ValueError, match="clip_norm"):
    P.dp_sgd_grad(_linear_loss, params, g, ones, key, 0.0, 1.0, 2.0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    P.dp_sgd_grad(_linear_loss, params, g, ones, key, 1.0, -1.0, 2.0)
  with pytest.raises(ValueError, match="expected_batch_size"):
    P.dp_sgd_grad(_linear_loss, params, g, ones, key, 1.0, 1.0, 0.0)
  with pytest.raises(ValueError, match="delta"):
    P.dp_sgd_epsilon(0.1, 1.0, 10, 1.0)
  with pytest.raises(ValueError, match="sampling_rate"):
    P.dp_sgd_epsilon(1.5, 1.0, 10, 1e-5)
  with pytest.raises(ValueError, match="noise_multiplier"):
    P.dp_sgd_epsilon(0.1, -1.0, 10, 1e-5)
  with pytest.raises(ValueError, match="privacy.accountant"):
    P.dp_sgd_epsilon(0.1, 1.0, 10, 1e-5, "moments")
  with pytest.raises(ValueError, match="target_epsilon"):
    P.calibrate_noise_multiplier(0.0, 1e-5, 0.1, 10)
  with pytest.raises(ValueError, match="privacy.mechanism"):
    P.PrivacyLedger("dpsgd", 1e-5)
  assert P.dp_sgd_epsilon(0.1, 1.0, 0, 1e-5) == 0.0
  assert math.isinf(P.dp_sgd_epsilon(0.1, 0.0, 10, 1e-5))
  # traced clip norm / noise pass through jit without host checks
  f = jax.jit(lambda c, z, b: P.dp_sgd_grad(_linear_loss, params, g, ones, key, c, z, b)[0])
  out = f(0.5, 0.0, 2.0)["a"]  # each row [1, 1, 1] (norm sqrt 3) clipped to 0.5, sum / 2
  assert out.shape == (3,)
  np.testing.assert_allclose(np.asarray(out), np.full(3, 2 * 0.5 / math.sqrt(3) / 2), rtol=1e-6)


# ----------------------------------------------------------------------------- secure noise

def test_secure_noise_is_standard_normal_and_not_the_plain_draw():
  # (z1 + z2 + z3 + z4) / 2 is exactly N(0, 1): mean 0, variance 1, kurtosis 3 (5 standard
  # errors each) and a Kolmogorov-Smirnov test against scipy's normal; it is not the plain
  # single draw of the same key, and add_gaussian_noise scales it to the asked std.
  key = jax.random.PRNGKey(3)
  n = 400_000
  z = np.asarray(P.standard_normal(key, (n,), secure=True), np.float64)
  assert abs(z.mean()) < 5 / math.sqrt(n)
  assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / n)
  assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3.0) < 5 * math.sqrt(24.0 / n)
  assert stats.kstest(z, "norm").pvalue > 1e-3
  assert not np.allclose(z, np.asarray(P.standard_normal(key, (n,))))
  noisy = P.add_gaussian_noise({"w": jnp.zeros((n,))}, key, 2.5, secure=True)["w"]
  assert float(jnp.std(noisy)) == pytest.approx(2.5, rel=5 * math.sqrt(0.5 / n))

