"""Named random streams: independent per use, stable per seed, and a DP key nobody can derive."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax import rng


def test_streams_are_distinct_and_stable():
  keys = {(seed, s): rng.stream_key_data(seed, s) for seed in range(20) for s in rng.STREAMS}
  raw = [tuple(k.tolist()) for k in keys.values()]
  assert len(set(raw)) == len(raw)  # no two (seed, stream) pairs share a key
  for (seed, s), k in keys.items():
    assert np.array_equal(k, rng.stream_key_data(seed, s))
  # Model init and the clients' training randomness no longer share PRNGKey(seed).
  for seed in range(20):
    assert not np.array_equal(keys[seed, "init"], keys[seed, "train"])


def test_secret_key_is_fresh_and_not_a_seed_stream():
  secrets = [tuple(rng.secret_key_data().tolist()) for _ in range(8)]
  assert len(set(secrets)) == 8
  derived = {tuple(rng.stream_key_data(seed, "dp").tolist()) for seed in range(1000)}
  assert not derived & set(secrets)


def test_secret_key_has_128_independent_bits():
  # 4,000 keys: every one of the 128 bit positions is set half the time (5 standard errors),
  # and the upper 64 bits are not a copy or function of the lower ones (bit i vs bit i + 64
  # uncorrelated): a 64-bit source padded or repeated to 128 bits fails here.
  n = 4000
  keys = np.stack([rng.secret_key_data() for _ in range(n)])
  assert keys.shape == (n, 4) and keys.dtype == np.uint32
  bits = np.unpackbits(keys.astype("<u4").view(np.uint8), axis=1, bitorder="little")
  assert bits.shape == (n, 128)
  assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 5 * np.sqrt(0.25 / n))
  lo, hi = bits[:, :64].astype(float), bits[:, 64:].astype(float)
  corr = ((lo - lo.mean(0)) * (hi - hi.mean(0))).mean(0) / (lo.std(0) * hi.std(0))
  assert np.all(np.abs(corr) < 5 / np.sqrt(n))
  assert len({tuple(k) for k in keys[:, :2].tolist()}) == n


def test_dp_key_uses_all_128_bits_and_vmaps_like_single_draws():
  base = np.asarray([11, 22, 33, 44], np.uint32)
  draw = lambda words: np.asarray(jax.random.normal(rng.dp_key(jnp.asarray(words)), (6,)))
  reference = draw(base)
  for word in range(4):  # flipping one bit of any word changes every draw
    flipped = base.copy()
    flipped[word] ^= 1
    assert not np.any(np.isclose(draw(flipped), reference)), word
  # The construction: the XOR of two threefry streams, one per 64-bit half (the second
  # with a constant folded in, so a key of equal halves does not draw zeros).
  key = rng.dp_key(jnp.asarray(base))
  first = jax.random.wrap_key_data(jnp.asarray(base[:2]))
  second = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(base[2:])), 0x5EC2E7)
  assert np.array_equal(jax.random.bits(key, (5,)),
                        jax.random.bits(first, (5,)) ^ jax.random.bits(second, (5,)))
  equal = rng.dp_key(jnp.asarray([5, 6, 5, 6], np.uint32))
  assert np.count_nonzero(np.asarray(jax.random.bits(equal, (64,)))) > 60
  assert jax.random.key_data(jax.random.key(3, impl=rng.DP_KEY_IMPL)).shape == (4,)
  # vmapped draws over split keys equal one-by-one draws: chunking cannot change the noise.
  keys = jax.random.split(jax.random.fold_in(key, 7), 5)
  batched = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys)
  assert np.array_equal(batched, np.stack([jax.random.normal(k, (3,)) for k in keys]))
  assert rng.stream_key_data(0, "dp").shape == (4,)


def test_key_seed_uses_every_bit():
  a = np.array([1, 2], np.uint32)
  b = np.array([1, 3], np.uint32)
  c = np.array([2, 2], np.uint32)
  seeds = [rng.key_seed(x) for x in (a, b, c)]
  assert len(set(seeds)) == 3
  assert rng.key_seed(np.array([0xFFFFFFFF, 0xFFFFFFFF], np.uint32)) == 2 ** 64 - 1
  for x, y in itertools.combinations(rng.STREAMS, 2):
    assert rng.stream_seed(0, x) != rng.stream_seed(0, y)
