"""Upload codecs against NumPy and exact identities: unbiased stochastic rounding, the error-
feedback invariant of top-k, payload bytes counted by hand, and jit / vmap over clients."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy import stats

from fedpeft_jax.federated import compression as C

DRAWS = 2000


def _odd_tree(rng):
  """Leaves of odd sizes (15, 7, 18), none a multiple of the block sizes used."""
  return {"a": rng.normal(size=(3, 5)).astype(np.float32),
          "b": rng.normal(size=(7,)).astype(np.float32),
          "c": {"d": rng.normal(size=(2, 3, 3)).astype(np.float32)}}


def _at(tree, path):
  """The leaf of `tree` at a `tree_leaves_with_path` path."""
  for entry in path:
    tree = tree[entry.key]
  return tree


def _np_steps(x, bits, block):
  """NumPy's step of each element: absmax / L of its tensor or of its block."""
  levels = 2 ** (bits - 1) - 1
  flat = np.asarray(x, np.float64).reshape(-1)
  size = flat.size if block == 0 else block
  nb = -(-flat.size // size)
  rows = np.pad(np.abs(flat), (0, nb * size - flat.size)).reshape(nb, size)
  return np.repeat(rows.max(1) / levels, size)[:flat.size].reshape(np.shape(x))


def _roundtrip_draws(x, bits, block, n=DRAWS, seed=0):
  """n independent dequantize(quantize(x)) draws, [n, *x.shape], as float64."""
  keys = jax.random.split(jax.random.key(seed), n)
  one = lambda k: C.dequantize(C.quantize(jnp.asarray(x), k, bits, block))
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def _unbiased(mean, se, x, z):
  """Elementwise |mean - x| <= z * se (plus float32 slack where every draw was equal)."""
  atol = 1e-6 * np.abs(x).max()
  return np.abs(mean - np.asarray(x, np.float64)) <= z * se + atol


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [0, 5])
def test_stochastic_rounding_unbiased(bits, block):
  """The mean of 2,000 draws is within z standard errors of x for every element, z the
  3-sigma level Bonferroni-corrected over the tensor's elements (familywise 0.1%), so the
  test does not fail by chance on one of 24 elements; round-to-nearest, on values 0.3 of a
  step off the grid, is dozens of standard errors off and fails the same check."""
  x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
  draws = _roundtrip_draws(x, bits, block)
  mean = draws.mean(0)
  se = draws.std(0, ddof=1) / math.sqrt(DRAWS)
  z = stats.norm.ppf(1 - 0.001 / (2 * x.size))
  assert z < 4.2
  assert _unbiased(mean, se, x, z).all(), np.abs(mean - x) / np.maximum(se, 1e-12)
  # The draws really vary wherever x is off the grid (else se = 0 would pass vacuously):
  # everywhere but each block's absmax, which sits on the grid at +-L steps.
  off_grid = np.abs(x) < _np_steps(x, bits, block) * (2 ** (bits - 1) - 1) * (1 - 1e-6)
  assert off_grid.sum() >= x.size - (1 if block == 0 else 5) and (se[off_grid] > 0).all()

  # A biased rounding: values 0.3 of a step above the grid, each block holding its absmax
  # on the grid (+-L steps) so the step is known. Round-to-nearest sends k * step; the
  # stochastic draws of the same tensor stay unbiased.
  levels = 2 ** (bits - 1) - 1
  step = 0.25
  k = np.random.default_rng(2).integers(-levels + 1, levels - 1, size=24)
  y = (k + 0.3) * step
  y[0::6] = levels * step
  y = y.astype(np.float32).reshape(4, 6)
  draws_y = _roundtrip_draws(y, bits, 6, seed=3)
  se_y = draws_y.std(0, ddof=1) / math.sqrt(DRAWS)
  assert _unbiased(draws_y.mean(0), se_y, y, z).all()
  nearest = np.round(y.astype(np.float64) / step) * step  # what round-to-nearest decodes
  assert not _unbiased(nearest, se_y, y, z)[:, 1:].any()  # every off-grid element fails


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [0, 4, 5])
def test_within_one_step_and_exact_on_grid(bits, block):
  """|decoded - x| < step of its block (NumPy's absmax / L), the payload's scales are those
  steps, and inputs already on the grid come back exactly."""
  rng = np.random.default_rng(4)
  tree = _odd_tree(rng)
  payload = C.quantize(tree, jax.random.key(5), bits, block)
  decoded = C.dequantize(payload)
  for x, d, p in zip(jax.tree.leaves(tree), jax.tree.leaves(decoded),
                     jax.tree.leaves(payload, is_leaf=lambda v: isinstance(v, C.Quantized))):
    steps = _np_steps(x, bits, block)
    assert d.shape == x.shape and d.dtype == x.dtype
    assert (np.abs(np.asarray(d, np.float64) - x) < steps * (1 + 1e-6)).all()
    size = x.size if block == 0 else block
    np.testing.assert_allclose(p.scales, steps.reshape(-1)[::size], rtol=1e-6)

  # On the grid: integers in [-L, L] times a power of two, every block holding +-L.
  levels = 2 ** (bits - 1) - 1
  size = 18 if block == 0 else block
  q = rng.integers(-levels, levels + 1, size=18)
  q[0::size] = levels * rng.choice([-1, 1], size=len(q[0::size]))
  x = (q / 8.0).astype(np.float32).reshape(2, 3, 3)
  out = C.dequantize(C.quantize({"x": x}, jax.random.key(6), bits, block))["x"]
  np.testing.assert_array_equal(np.asarray(out), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_tensors_and_zero_blocks(bits):
  """A zero tensor, and a zero block inside a nonzero tensor, decode to exact zeros."""
  x = np.zeros(13, np.float32)
  x[8:] = [1.0, -2.0, 0.5, 3.0, -0.25]
  out = C.dequantize(C.quantize({"z": np.zeros((3, 3), np.float32), "x": x},
                                jax.random.key(0), bits, 4))
  assert np.isfinite(np.asarray(out["x"])).all()
  np.testing.assert_array_equal(np.asarray(out["z"]), 0.0)
  np.testing.assert_array_equal(np.asarray(out["x"][:8]), 0.0)


def test_int4_packing_layout():
  """Two values per byte, element 2i low nibble, 2i + 1 high, each q + 8; odd n pads."""
  q = np.array(list(range(-7, 8)) + [3, -7], np.int8)  # 17 values
  packed = np.asarray(C.pack_int4(jnp.asarray(q)))
  assert packed.dtype == np.uint8 and packed.shape == (9,)
  padded = np.append(q, 0).astype(np.int32) + 8
  np.testing.assert_array_equal(packed, padded[0::2] | (padded[1::2] << 4))
  np.testing.assert_array_equal(np.asarray(C.unpack_int4(jnp.asarray(packed), 17)), q)


def test_topk_error_feedback_invariant():
  """Over T rounds: sum_t sent_t + residual_T == sum_t u_t exactly (dyadic inputs, so every
  float32 sum is exact), each round sends exactly k nonzeros per tensor, and no entry left
  in the residual is larger in magnitude than one that was sent."""
  rng = np.random.default_rng(7)
  fraction, rounds = 0.25, 12
  shapes = {"w": (6, 7), "b": (5,)}
  ks = {name: C.topk_count(math.prod(s), fraction) for name, s in shapes.items()}
  assert ks == {"w": 11, "b": 2}
  residual = None
  total_u = {n: np.zeros(s) for n, s in shapes.items()}
  total_sent = {n: np.zeros(s) for n, s in shapes.items()}
  step = jax.jit(lambda u, r: C.topk_compress(u, r, fraction))
  for t in range(rounds):
    u = {n: (rng.integers(-64, 64, size=s) / 8).astype(np.float32) for n, s in shapes.items()}
    acc = u if residual is None else {n: u[n] + np.asarray(residual[n]) for n in shapes}
    payload, residual = (C.topk_compress(u, None, fraction) if t == 0 else step(u, residual))
    sent = C.topk_decompress(payload)
    for n in shapes:
      s, r = np.asarray(sent[n]), np.asarray(residual[n])
      np.testing.assert_array_equal(s + r, acc[n])
      assert np.count_nonzero(s) == ks[n]
      assert np.abs(s[s != 0]).min() >= np.abs(r).max()
      assert payload[n].values.shape == (ks[n],) and payload[n].indices.dtype == jnp.int32
      total_u[n] += u[n]
      total_sent[n] += s
  for n in shapes:
    np.testing.assert_array_equal(total_sent[n] + np.asarray(residual[n], np.float64), total_u[n])
    assert np.abs(np.asarray(residual[n])).max() > 0  # something was really held back


def test_topk_count():
  """ceil(fraction * n) without floating-point overshoot, at least 1, at most n."""
  assert C.topk_count(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004
  assert C.topk_count(7, 0.3) == 3
  assert C.topk_count(10, 0.01) == 1
  assert C.topk_count(10, 1.0) == 10


def test_bytes_by_hand():
  """Leaves of 15, 7 and 18 values: int8 n bytes, int4 ceil(n / 2), float32 scales per
  tensor or per block (ceil(n / block)), top-k k float32 values + k int32 indices."""
  tree = _odd_tree(np.random.default_rng(8))
  sizes = [15, 7, 18]
  key = jax.random.key(0)
  expected = {
      ("none", 0): 4 * sum(sizes),
      ("int8", 0): sum(sizes) + 4 * 3,
      ("int4", 0): sum(-(-n // 2) for n in sizes) + 4 * 3,  # 8 + 4 + 9 + 12
      ("int8", 4): sum(sizes) + 4 * sum(-(-n // 4) for n in sizes),  # 40 + 4 * 11
      ("int4", 4): 21 + 4 * 11,
      ("topk", 0): 8 * (5 + 3 + 6),  # ceil(0.3 n) = 5, 3, 6
  }
  assert expected[("int4", 0)] == 33 and expected[("int8", 4)] == 84
  for (method, block), want in expected.items():
    codec = C.upload_codec("float32", method, block, 0.3)
    payload, _, _ = codec.encode(tree, codec.init(tree), key)
    assert C.compressed_bytes(payload) == want, (method, block)
    assert C.encoded_bytes(tree, method, block, 0.3) == want, (method, block)
  # The count is the size of the arrays really encoded, and needs only shapes.
  for bits, block in [(8, 0), (4, 0), (8, 4), (4, 4)]:
    payload = C.quantize(tree, key, bits, block)
    real = sum(np.asarray(v).nbytes for v in jax.tree.leaves(payload))
    abstract = jax.eval_shape(lambda t, b=bits, n=block: C.quantize(t, key, b, n), tree)
    assert C.compressed_bytes(payload) == C.compressed_bytes(abstract) == real
    assert real == expected[("int8" if bits == 8 else "int4", block)]
  payload, _ = C.topk_compress(tree, None, 0.3)
  assert sum(np.asarray(v).nbytes for v in jax.tree.leaves(payload)) == expected[("topk", 0)]


@pytest.mark.parametrize("method", C.COMPRESSIONS)
def test_jit_and_vmap_over_clients(method):
  """The upload codec vmapped (and jitted) over a leading client axis equals a Python loop
  over the clients with the same keys and residuals; a payload inside vmap counts one
  client's bytes."""
  rng = np.random.default_rng(9)
  clients = 3
  trees = [_odd_tree(rng) for _ in range(clients)]
  residuals = [jax.tree.map(lambda x: (x * 0.1).astype(np.float32), _odd_tree(rng))
               for _ in range(clients)]
  keys = jax.random.split(jax.random.key(10), clients)
  stack = lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts)
  codec = C.upload_codec("float32", method, 4, 0.3)
  state = lambda r: r if codec.stateful else None

  def round_trip(t, r, k):
    payload, new_state, _ = codec.encode(t, state(r), k)
    return codec.decode(payload), new_state
  dec_v, res_v = jax.jit(jax.vmap(round_trip))(stack(trees), stack(residuals), keys)
  seen_bytes = []
  def counted(t, r, k):
    payload, _, _ = codec.encode(t, state(r), k)
    seen_bytes.append(C.compressed_bytes(payload))
    return codec.decode(payload)
  jax.vmap(counted)(stack(trees), stack(residuals), keys)
  for i in range(clients):
    payload, res, _ = codec.encode(trees[i], state(residuals[i]), keys[i])
    dec = codec.decode(payload)
    for a, b in zip(jax.tree.leaves((dec, res)), jax.tree.leaves((dec_v, res_v))):
      np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a))
    assert seen_bytes == [C.compressed_bytes(payload)]
  if method != "none":  # compression changed the values (the test compares something)
    assert any(not np.array_equal(np.asarray(a), b)
               for a, b in zip(jax.tree.leaves(dec_v), jax.tree.leaves(stack(trees))))
  # Against NumPy, client by client: top-k keeps the ceil(0.3 n) largest |update +
  # residual| and feeds back the rest; int8/int4 land within one step of the update.
  for i in range(clients):
    for path, x in jax.tree_util.tree_leaves_with_path(trees[i]):
      got = np.asarray(_at(dec_v, path)[i], np.float64)
      x = np.asarray(x, np.float64)
      if method == "topk":
        combined = x + np.asarray(_at(residuals[i], path), np.float64)
        keep = np.zeros(combined.size, bool)
        keep[np.argsort(-np.abs(combined).reshape(-1))[:math.ceil(0.3 * combined.size)]] = True
        want = np.where(keep.reshape(combined.shape), combined, 0.0)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(np.asarray(_at(res_v, path)[i]), combined - want, atol=1e-6)
      elif method in ("int8", "int4"):
        step = _np_steps(x, 8 if method == "int8" else 4, 4)
        assert (np.abs(got - x) <= step * (1 + 1e-5)).all()


def test_compress_is_one_upload_on_a_float32_wire():
  """The public one-call `compress`, against NumPy: 'none' returns the values, int8 lands
  within one absmax step, top-k sends the largest ceil(0.3 n) of update + residual and feeds
  back the rest; the residual passes through the stateless methods unchanged."""
  rng = np.random.default_rng(12)
  tree, residual = _odd_tree(rng), jax.tree.map(lambda x: 0.3 * x, _odd_tree(rng))
  key = jax.random.key(3)
  for method in C.COMPRESSIONS:
    dec, res, _ = C.compress(tree, key, method, 0, 0.3, residual)
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      got, x = np.asarray(_at(dec, path), np.float64), np.asarray(x, np.float64)
      if method == "none":
        np.testing.assert_array_equal(got, x)
      elif method == "int8":
        assert (np.abs(got - x) <= _np_steps(x, 8, 0) * (1 + 1e-5)).all()
      elif method == "topk":
        acc = (x + np.asarray(_at(residual, path), np.float64)).reshape(-1)
        keep = np.zeros(acc.size, bool)
        keep[np.argsort(-np.abs(acc))[:math.ceil(0.3 * acc.size)]] = True
        np.testing.assert_allclose(got.reshape(-1), np.where(keep, acc, 0.0), atol=1e-6)
        np.testing.assert_allclose(np.asarray(_at(res, path)).reshape(-1),
                                   np.where(keep, 0.0, acc), atol=1e-6)
    if method != "topk":
      assert res is residual
  # Without a residual, top-k keeps the update's dtype (no float32 zeros are added).
  half = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)
  dec, res, _ = C.compress(half, key, "topk", 0, 0.3)
  assert {x.dtype for x in jax.tree.leaves((dec, res))} == {jnp.dtype(jnp.bfloat16)}


def test_none_is_identity():
  tree = _odd_tree(np.random.default_rng(11))
  codec = C.upload_codec("float32", "none")
  payload, state, norm = codec.encode(tree, codec.init(tree), jax.random.key(0))
  assert state is None and norm is None and not codec.stateful
  for a, b in zip(jax.tree.leaves(codec.decode(payload)), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert C.compressed_bytes(payload) == 4 * 40


@pytest.mark.parametrize("kwargs, name", [
    ({"method": "int2"}, "federated.compression: 'int2'; allowed: "),
    ({"block": -1}, "federated.compression_block"),
    ({"fraction": 0.0}, "federated.compression_fraction"),
    ({"fraction": 1.5}, "federated.compression_fraction"),
])
def test_invalid_settings(kwargs, name):
  args = {"method": "int8", "block": 0, "fraction": 0.5, **kwargs}
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    C.upload_codec("float32", **args)
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    C.check_compression(**args)


def test_codec_clips_the_message_before_topk_for_a_server_bound():
  """With error feedback and a server clip C (DP-FedAvg, max_update_norm), the codec clips
  update + residual to C, sends top-k of the clipped message, keeps the rest, and reports
  the norm before its clip. NumPy re-derivation, float64; the update travels in bfloat16
  first (ml_dtypes' round-to-nearest-even)."""
  rng = np.random.default_rng(13)
  update, residual = _odd_tree(rng), jax.tree.map(lambda x: 0.5 * x, _odd_tree(rng))
  codec = C.upload_codec("bfloat16", "topk", 0, 0.3)
  assert codec.stateful
  bound = 1.5
  payload, new_residual, norm = codec.encode(update, residual, jax.random.key(0),
                                             jnp.float32(bound))
  received = codec.decode(payload)
  sent = jax.tree.map(lambda u: np.asarray(u).astype(ml_dtypes.bfloat16).astype(np.float64),
                      update)
  combined = jax.tree.map(lambda u, r: u + np.asarray(r, np.float64), sent, residual)
  total = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(combined)))
  assert total > bound  # the clip acts
  np.testing.assert_allclose(float(norm), total, rtol=1e-5)
  clipped = jax.tree.map(lambda x: x * bound / total, combined)
  for path, x in jax.tree_util.tree_leaves_with_path(clipped):
    flat = x.reshape(-1)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat))[:math.ceil(0.3 * flat.size)]] = True
    want = np.where(keep, flat, 0.0).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(_at(received, path)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_at(new_residual, path)), x - want, atol=1e-6)
  # Without a bound nothing is clipped and no norm is reported.
  _, _, none = codec.encode(update, residual, jax.random.key(0))
  assert none is None
