"""Server optimizers against NumPy transcriptions of the published algorithms.

The reference is Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2,
written out in float64 on the client update Delta (not the pseudo-gradient), so a sign,
a moment rule, tau's place or the initialisation that differs from the paper fails here.
The optimizers are driven as the engine drives them (federated.state.apply_server_update):
update(g = -Delta), then optax.apply_updates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax.federated.server import (FEDOPT_KINDS, SERVER_OPTIMIZERS, make_server_optimizer,
                                          scale_by_fedopt, server_learning_rate)

ROUNDS = 5
ETA, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"head": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
          "scale": rng.normal(size=(5,))}


def _deltas(seed: int = 1, scales=(1e-2, 3e-4, 5e-2, 1e-3, 2e-2)) -> list[dict]:
  """Client updates whose scale varies across rounds, around and far from tau, so that
  Yogi's sign(v - Delta^2) takes both signs and tau's placement matters."""
  rng = np.random.default_rng(seed)
  shapes = jax.tree.map(np.shape, _params())
  return [jax.tree.map(lambda s, sc=sc: sc * rng.normal(size=s), shapes,
                       is_leaf=lambda s: isinstance(s, tuple)) for sc in scales]


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _run(tx: optax.GradientTransformation, params: dict, deltas: list[dict]) -> list[dict]:
  """The params after each round of a jitted server step on the pseudo-gradient -Delta."""

  @jax.jit
  def step(x, opt_state, delta):
    updates, opt_state = tx.update(jax.tree.map(jnp.negative, delta), opt_state, x)
    return optax.apply_updates(x, updates), opt_state

  x = _f32(params)
  opt_state = tx.init(x)
  out = []
  for delta in deltas:
    x, opt_state = step(x, opt_state, _f32(delta))
    out.append(jax.tree.map(np.asarray, x))
  return out


def _fedopt_reference(kind: str, x: np.ndarray, deltas: list[np.ndarray], eta, b1: float,
                      b2: float, tau: float, bias_correction: bool) -> list[np.ndarray]:
  """Algorithm 2 of Reddi et al. on one array, in float64. `eta`: a number, or the round's
  step as a function of t = 0, 1, ... (a schedule).

  bias_correction=False: m_{-1} = 0, v_{-1} = tau^2, x += eta m / (sqrt(v) + tau).
  True: Adam's correction (Kingma & Ba, Algorithm 1): zero-started moments divided by
  1 - beta^t, t counting from 1.
  """
  x = np.array(x, np.float64)
  m = np.zeros_like(x)
  v = np.zeros_like(x) if bias_correction else np.full_like(x, tau * tau)
  xs = []
  for t, d in enumerate(deltas, start=1):
    d = np.asarray(d, np.float64)
    m = b1 * m + (1 - b1) * d
    if kind == "adagrad":
      v = v + d * d
    elif kind == "adam":
      v = b2 * v + (1 - b2) * d * d
    elif kind == "yogi":
      v = v - (1 - b2) * d * d * np.sign(v - d * d)
    else:
      raise AssertionError(kind)
    if bias_correction:
      m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    else:
      m_hat, v_hat = m, v
    step = eta(t - 1) if callable(eta) else eta
    x = x + step * m_hat / (np.sqrt(v_hat) + tau)
    xs.append(x.copy())
  return xs


def _reference(kind, params, deltas, **kw):
  """Per-leaf reference: a list (one per round) of trees."""
  leaves, treedef = jax.tree.flatten(params)
  per_leaf = [_fedopt_reference(kind, x, [jax.tree.leaves(d)[i] for d in deltas], **kw)
              for i, x in enumerate(leaves)]
  return [jax.tree.unflatten(treedef, [p[r] for p in per_leaf]) for r in range(len(deltas))]


def _assert_rounds_close(got, want, rtol=1e-5, atol=1e-6):
  for r, (g, w) in enumerate(zip(got, want)):
    for (path, gl), wl in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(gl, wl, rtol=rtol, atol=atol,
                                 err_msg=f"round {r} {jax.tree_util.keystr(path)}")


def _max_rel_diff(got, want) -> float:
  return max(float(np.max(np.abs(g - w) / (np.abs(w) + 1e-6)))
             for gr, wr in zip(got, want) for g, w in zip(jax.tree.leaves(gr), jax.tree.leaves(wr)))


@pytest.mark.parametrize("name,bias_correction", [
    ("fedadagrad", False), ("fedadam", False), ("fedadam", True),
    ("fedyogi", False), ("fedyogi", True)])
def test_fedopt_matches_algorithm_2(name, bias_correction):
  params, deltas = _params(), _deltas()
  tx = make_server_optimizer(name, ETA, b1=B1, b2=B2, eps=TAU, bias_correction=bias_correction)
  want = _reference(name[3:], params, deltas, eta=ETA, b1=B1, b2=B2, tau=TAU,
                    bias_correction=bias_correction)
  _assert_rounds_close(_run(tx, params, deltas), want)


def test_default_is_the_papers_uncorrected_algorithm():
  params, deltas = _params(), _deltas()
  got = _run(make_server_optimizer("fedadam", ETA), params, deltas)
  paper = _reference("adam", params, deltas, eta=ETA, b1=B1, b2=B2, tau=TAU, bias_correction=False)
  corrected = _reference("adam", params, deltas, eta=ETA, b1=B1, b2=B2, tau=TAU,
                         bias_correction=True)
  _assert_rounds_close(got, paper)
  assert _max_rel_diff(corrected, paper) > 1e-3  # the two settings are distinguishable


def test_fedyogi_reference_takes_both_signs():
  """Guards the test data: Yogi's sign(v - Delta^2) must be +1 and -1 over the rounds."""
  d = [np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]) for t in _deltas()]
  v, signs = np.full_like(d[0], TAU * TAU), set()
  for dt in d:
    s = np.sign(v - dt * dt)
    signs |= set(np.unique(s).tolist())
    v = v - (1 - B2) * dt * dt * s
  assert {-1.0, 1.0} <= signs


@pytest.mark.parametrize("b1", [0.0, B1])
def test_optax_adagrad_is_not_fedadagrad(b1):
  """optax.adagrad (today's form before FedOpt was written out: no momentum, eps inside
  the square root) does not follow Algorithm 2, even with the momentum switched off;
  the Algorithm 2 reference above would fail on it."""
  params, deltas = _params(), _deltas()
  want = _reference("adagrad", params, deltas, eta=ETA, b1=b1, b2=B2, tau=TAU,
                    bias_correction=False)
  _assert_rounds_close(_run(make_server_optimizer("fedadagrad", ETA, b1=b1, eps=TAU), params,
                            deltas), want)
  old = _run(optax.adagrad(ETA, initial_accumulator_value=TAU**2, eps=TAU), params, deltas)
  assert _max_rel_diff(old, want) > 1e-2
  with pytest.raises(AssertionError):
    _assert_rounds_close(old, want)


def test_bias_corrected_fedadam_is_optax_adam():
  """server_bias_correction=True keeps the library's earlier FedAdam (optax.adam)."""
  params, deltas = _params(), _deltas()
  got = _run(make_server_optimizer("fedadam", ETA, bias_correction=True), params, deltas)
  _assert_rounds_close(got, _run(optax.adam(ETA, b1=B1, b2=B2, eps=TAU), params, deltas))


def test_fedadagrad_ignores_bias_correction_but_the_transform_rejects_it():
  params, deltas = _params(), _deltas()
  a = _run(make_server_optimizer("fedadagrad", ETA, bias_correction=True), params, deltas)
  b = _run(make_server_optimizer("fedadagrad", ETA, bias_correction=False), params, deltas)
  _assert_rounds_close(a, b, rtol=0, atol=0)
  with pytest.raises(ValueError, match="no bias correction"):
    scale_by_fedopt("adagrad", bias_correction=True)


def test_fedavg_and_fedavgm():
  params, deltas = _params(), _deltas()
  leaves = jax.tree.leaves(params)
  got_avg = _run(make_server_optimizer("fedavg", 0.7), params, deltas)
  got_avgm = _run(make_server_optimizer("fedavgm", 0.7, momentum=0.8), params, deltas)
  x_avg = [np.array(x) for x in leaves]
  x_avgm = [np.array(x) for x in leaves]
  buf = [np.zeros_like(x) for x in leaves]
  want_avg, want_avgm = [], []
  for d in deltas:
    dl = jax.tree.leaves(d)
    x_avg = [x + 0.7 * di for x, di in zip(x_avg, dl)]  # FedAvg: x + eta Delta
    buf = [0.8 * b + di for b, di in zip(buf, dl)]  # Hsu et al.: v = beta v + Delta
    x_avgm = [x + 0.7 * b for x, b in zip(x_avgm, buf)]
    want_avg.append(jax.tree.unflatten(jax.tree.structure(params), x_avg))
    want_avgm.append(jax.tree.unflatten(jax.tree.structure(params), x_avgm))
  _assert_rounds_close(got_avg, want_avg)
  _assert_rounds_close(got_avgm, want_avgm)


def _cosine(eta: float, rounds: int):
  """SGDR's cosine (Loshchilov & Hutter, 2017, eq. 5, one cycle, eta_min 0), written out."""
  return lambda t: 0.5 * eta * (1.0 + math.cos(math.pi * t / rounds))


def test_cosine_schedule_steps_every_server_optimizer_like_the_formula():
  """Round t (from 0) steps by eta (1 + cos(pi t / R)) / 2: the first round the full eta,
  the steps shrinking to ~0 at R; the constant schedule keeps eta."""
  params, deltas = _params(), _deltas()
  rounds = len(deltas)
  eta = _cosine(0.7, rounds)
  leaves, treedef = jax.tree.flatten(params)
  x_avg, x_avgm = [np.array(x) for x in leaves], [np.array(x) for x in leaves]
  buf = [np.zeros_like(x) for x in leaves]
  want_avg, want_avgm = [], []
  for t, d in enumerate(deltas):
    dl = jax.tree.leaves(d)
    x_avg = [x + eta(t) * di for x, di in zip(x_avg, dl)]
    buf = [0.8 * b + di for b, di in zip(buf, dl)]
    x_avgm = [x + eta(t) * b for x, b in zip(x_avgm, buf)]
    want_avg.append(jax.tree.unflatten(treedef, x_avg))
    want_avgm.append(jax.tree.unflatten(treedef, x_avgm))
  cosine = {"schedule": "cosine", "rounds": rounds}
  _assert_rounds_close(_run(make_server_optimizer("fedavg", 0.7, **cosine), params, deltas),
                       want_avg)
  _assert_rounds_close(_run(make_server_optimizer("fedavgm", 0.7, momentum=0.8, **cosine),
                            params, deltas), want_avgm)
  tx = make_server_optimizer("fedadam", ETA, b1=B1, b2=B2, eps=TAU, **cosine)
  _assert_rounds_close(_run(tx, params, deltas), _reference(
      "adam", params, deltas, eta=_cosine(ETA, rounds), b1=B1, b2=B2, tau=TAU,
      bias_correction=False))
  assert server_learning_rate(0.7) == 0.7
  assert float(server_learning_rate(0.7, "cosine", 4)(4)) == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(ValueError, match="federated.server_lr_schedule: 'step'; allowed: "):
    make_server_optimizer("fedavg", 1.0, schedule="step", rounds=4)
  with pytest.raises(ValueError, match="federated.rounds must be >= 1"):
    make_server_optimizer("fedavg", 1.0, schedule="cosine", rounds=0)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_is_a_pytree_of_arrays(name):
  """Checkpointed by orbax and replicated on the mesh: every leaf must be an array."""
  tx = make_server_optimizer(name, ETA)
  state = tx.init(_f32(_params()))
  _, new = jax.jit(tx.update)(_f32(_deltas()[0]), state, _f32(_params()))
  for leaf in jax.tree.leaves(state) + jax.tree.leaves(new):
    assert isinstance(leaf, jax.Array)
  assert jax.tree.structure(state) == jax.tree.structure(new)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="server_lr"):
    make_server_optimizer("fedadam", 0.0)
  with pytest.raises(ValueError, match="federated.server_optimizer: 'fedsgd'; allowed: fedavg, "):
    make_server_optimizer("fedsgd")
  with pytest.raises(ValueError, match="unknown kind"):
    scale_by_fedopt("rmsprop")
  with pytest.raises(ValueError, match="tau"):
    scale_by_fedopt("adam", tau=0.0)
  with pytest.raises(ValueError, match="b1 and b2"):
    scale_by_fedopt("yogi", b2=1.0)
  assert set(FEDOPT_KINDS) == {"adagrad", "adam", "yogi"}
