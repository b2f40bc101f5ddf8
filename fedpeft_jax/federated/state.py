"""The server's state across rounds, and how the averaged client update moves it.

The server treats the negated mean client update as a pseudo-gradient and hands it to
an optax optimizer (`server.make_server_optimizer`); FedAvg is SGD with learning rate 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class ServerState:
  """Everything that changes across rounds; one pytree, ready for checkpointing."""
  trainable: PyTree
  opt_state: PyTree
  round: jax.Array  # int32: rounds completed
  rng: jax.Array  # uint32[2] raw PRNG key data, so it serialises as a plain array
  clip_norm: jax.Array  # float32: current client-update clip norm (adaptive DP-FedAvg)


def init_server_state(trainable: PyTree, server_tx: optax.GradientTransformation, seed: int,
                      clip_norm: float = 0.0) -> ServerState:
  return ServerState(
      trainable=trainable,
      opt_state=server_tx.init(trainable),
      round=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.PRNGKey(seed)),
      clip_norm=jnp.asarray(clip_norm, jnp.float32),
  )


def apply_server_update(state: ServerState, mean_update: PyTree,
                        server_tx: optax.GradientTransformation) -> tuple[PyTree, PyTree]:
  """New (trainable, opt_state) from the clients' mean update (new - old params)."""
  pseudo_grad = jax.tree_util.tree_map(lambda u: -u, mean_update)
  updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.trainable)
  return optax.apply_updates(state.trainable, updates), opt_state
