"""Named random streams: every consumer of randomness gets its own, split once from the seed.

A run's randomness has six independent uses: parameter `init`, `data` (subsampling and
the client partition), client `sampling`, client `train`ing (shuffles, augmentation,
dropout), `dp` (noise and the Poisson sampling of clients and examples) and `personal`
(per-client test sets and FedBABU's fine-tuning before personalised evaluation). Each is
derived from (seed, stream name), so changing one (e.g. the init) never shifts another.

The `dp` stream is the exception: its key must not be derivable from anything published
(config.json holds the seed), or anyone could regenerate and subtract the noise. A run
with a privacy mechanism draws it from the OS (`secret_key_data`; process 0's, broadcast
to the others); the runner keeps it in memory and in one private file beside the
checkpoints, which it erases when the run finishes (`runner.checkpointing`).
`stream_key_data(seed, "dp")` is for runs without privacy (where it is unused), tests and
debugging (privacy.reproducible_noise).

The dp key has 128 bits (`DP_KEY_WORDS` uint32 words), more than one threefry key's 64: its
implementation, `DP_KEY_IMPL`, is a pair of independent threefry keys whose random bits are
XORed (split and fold_in act on both halves; the second half folds in a constant before it
draws, so equal halves do not cancel). Predicting its output needs both halves:
2^128 guesses by brute force, or about 2^64 work and 2^64 stored streams by meeting in the
middle, against 2^64 guesses for a single threefry key. Built from threefry's own
functions, it keeps threefry's guarantee that a vmapped draw equals the per-key draw, so
noise does not depend on how clients are chunked over devices.
"""

from __future__ import annotations

import secrets

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

STREAMS = ("init", "data", "sampling", "train", "dp", "personal", "validation")
DP_KEY_WORDS = 4  # 128 bits
_THREEFRY = jex_random.threefry_prng_impl


def _halves(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  return key[..., :2], key[..., 2:]


def _pair_seed(seed: jax.Array) -> jax.Array:
  # Only for completeness (jax.random.key(seed, impl=...)): the runner never seeds the dp
  # stream from an integer.
  return jnp.concatenate([_THREEFRY.seed(seed),
                          _THREEFRY.fold_in(_THREEFRY.seed(seed), jnp.uint32(1))])


def _pair_split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  a, b = _halves(key)
  return jnp.concatenate([_THREEFRY.split(a, shape), _THREEFRY.split(b, shape)], axis=-1)


def _pair_fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
  a, b = _halves(key)
  return jnp.concatenate([_THREEFRY.fold_in(a, data), _THREEFRY.fold_in(b, data)])


# Folded into the second half before it draws bits: a key whose halves are equal (split and
# fold_in keep them so) must not XOR two equal streams into zeros.
_SECOND_HALF = 0x5EC2E7


def _pair_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  a, b = _halves(key)
  b = _THREEFRY.fold_in(b, jnp.uint32(_SECOND_HALF))
  return _THREEFRY.random_bits(a, bit_width, shape) ^ _THREEFRY.random_bits(b, bit_width, shape)


DP_KEY_IMPL = jex_random.define_prng_impl(
    key_shape=(DP_KEY_WORDS,), seed=_pair_seed, split=_pair_split, random_bits=_pair_bits,
    fold_in=_pair_fold_in, name="threefry2x32_pair", tag="fry2")


def _key_shape(stream: str = "train") -> tuple[int, ...]:
  """Shape of raw key data of a stream: the dp stream's `DP_KEY_IMPL` (4,), the others the
  default PRNG implementation's (threefry: (2,))."""
  if stream == "dp":
    return (DP_KEY_WORDS,)
  return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.PRNGKey(0))).shape)


def dp_key(key_data: jax.Array) -> jax.Array:
  """A typed key of the dp stream from its raw data (uint32 [4])."""
  return jax.random.wrap_key_data(key_data, impl=DP_KEY_IMPL)


def stream_key_data(seed: int, stream: str) -> np.ndarray:
  """Raw key data (uint32) of stream `stream` of `seed`: a legacy PRNG key, or for the dp
  stream `DP_KEY_IMPL`'s (`dp_key`)."""
  if stream not in STREAMS:
    raise ValueError(f"unknown random stream {stream!r}; streams: {', '.join(STREAMS)}")
  shape = _key_shape(stream)
  words = np.random.SeedSequence([int(seed), STREAMS.index(stream)]).generate_state(
      int(np.prod(shape)), np.uint32)
  return words.reshape(shape)


def stream_seed(seed: int, stream: str) -> int:
  """An integer seed of stream `stream` for NumPy generators (host-side sampling)."""
  return key_seed(stream_key_data(seed, stream))


def key_seed(key_data: np.ndarray) -> int:
  """An integer seed for NumPy generators holding all the entropy of `key_data`."""
  return int.from_bytes(np.asarray(key_data, np.uint32).tobytes(), "little")


def secret_key_data() -> np.ndarray:
  """128 bits of the OS's entropy (`secrets`) as the dp stream's raw key data (uint32 [4])."""
  value = secrets.randbits(32 * DP_KEY_WORDS)
  return np.frombuffer(value.to_bytes(4 * DP_KEY_WORDS, "little"), np.uint32).copy()
