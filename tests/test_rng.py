"""Named random streams: independent per use, stable per seed, and a DP key nobody can derive."""

from __future__ import annotations

import itertools

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


def test_key_seed_uses_every_bit():
  a = np.array([1, 2], np.uint32)
  b = np.array([1, 3], np.uint32)
  c = np.array([2, 2], np.uint32)
  seeds = [rng.key_seed(x) for x in (a, b, c)]
  assert len(set(seeds)) == 3
  assert rng.key_seed(np.array([0xFFFFFFFF, 0xFFFFFFFF], np.uint32)) == 2 ** 64 - 1
  for x, y in itertools.combinations(rng.STREAMS, 2):
    assert rng.stream_seed(0, x) != rng.stream_seed(0, y)
