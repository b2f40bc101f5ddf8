"""Named random streams: every consumer of randomness gets its own, split once from the seed.

A run's randomness has six independent uses: parameter `init`, `data` (subsampling and
the client partition), client `sampling`, client `train`ing (shuffles, augmentation,
dropout), `dp` (noise and the Poisson sampling of clients and examples) and `personal`
(per-client test sets and FedBABU's fine-tuning before personalised evaluation). Each is
derived from (seed, stream name), so changing one (e.g. the init) never shifts another.

The `dp` stream is the exception: its key must not be derivable from anything published
(config.json holds the seed), or anyone could regenerate and subtract the noise. A run
with a privacy mechanism draws it from the OS (`secret_key_data`; process 0's, broadcast
to the others) and keeps it only in its checkpointed server state, which must therefore
stay as private as the training data; `stream_key_data(seed, "dp")` is for runs without
privacy (where it is unused), tests and debugging (privacy.reproducible_noise).
"""

from __future__ import annotations

import secrets

import jax
import numpy as np

STREAMS = ("init", "data", "sampling", "train", "dp", "personal")


def _key_shape() -> tuple[int, ...]:
  """Shape of raw key data of the default PRNG implementation (threefry: (2,))."""
  return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.PRNGKey(0))).shape)


def stream_key_data(seed: int, stream: str) -> np.ndarray:
  """Raw key data (uint32) of stream `stream` of `seed`, usable as a legacy PRNG key."""
  if stream not in STREAMS:
    raise ValueError(f"unknown random stream {stream!r}; streams: {', '.join(STREAMS)}")
  shape = _key_shape()
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
  """Raw key data from the OS's entropy (`secrets`): for the DP stream."""
  shape = _key_shape()
  words = [secrets.randbits(32) for _ in range(int(np.prod(shape)))]
  return np.asarray(words, np.uint32).reshape(shape)
