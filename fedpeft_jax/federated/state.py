"""The server's state across rounds, and how the averaged client update moves it.

The server treats the negated mean client update as a pseudo-gradient and hands it to
an optax optimizer (`server.make_server_optimizer`); FedAvg is SGD with learning rate 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class ServerState:
  """Everything that changes across rounds; one pytree, ready for checkpointing."""
  trainable: PyTree
  opt_state: PyTree
  round: jax.Array  # int32: rounds completed
  rng: jax.Array  # uint32 raw key data of the `train` stream (serialises as a plain array)
  # uint32 raw key data of the `dp` stream: the noise and the Poisson sampling of clients and
  # examples. Under a privacy mechanism drawn from the OS and kept only here (checkpointed,
  # never logged), so resume is exact while nobody holding the config can regenerate the
  # noise (see fedpeft_jax.rng); without one, the seed's unused dp stream.
  dp_rng: jax.Array
  clip_norm: jax.Array  # float32: current client-update clip norm (adaptive DP-FedAvg)
  # Per-client persistent state (`engine.ClientStateSpec`): a pytree whose leaves lead with
  # [num_clients], carried from round to round (personal heads, error-feedback residuals);
  # None when the client rule keeps none.
  clients: PyTree | None = None
  # FedEx-LoRA / FLoRA (`lora_aggregation.LoraRound`): {<target>/kernel: float32 [in, out]}
  # added to the frozen target kernels (`lora_aggregation.fold_into`): the part of the
  # global model that left the LoRA factors. None under rules that fold nothing.
  folded: PyTree | None = None


def init_server_state(trainable: PyTree, server_tx: optax.GradientTransformation,
                      rng: np.ndarray, dp_rng: np.ndarray, clip_norm: float = 0.0,
                      clients: PyTree | None = None,
                      folded: PyTree | None = None) -> ServerState:
  """Round 0's state; `rng` and `dp_rng` are raw key data of the train and dp streams,
  `clients` the per-client state (leaves [num_clients, ...]) or None, `folded` the zero
  deltas of a folding LoRA rule or None."""
  return ServerState(
      trainable=trainable,
      opt_state=server_tx.init(trainable),
      round=jnp.zeros((), jnp.int32),
      rng=jnp.asarray(rng, jnp.uint32),
      dp_rng=jnp.asarray(dp_rng, jnp.uint32),
      clip_norm=jnp.asarray(clip_norm, jnp.float32),
      clients=clients,
      folded=folded,
  )


def apply_server_update(state: ServerState, mean_update: PyTree,
                        server_tx: optax.GradientTransformation) -> tuple[PyTree, PyTree]:
  """New (trainable, opt_state) from the clients' mean update (new - old params)."""
  pseudo_grad = optax.tree.scale(-1.0, mean_update)
  updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.trainable)
  return optax.apply_updates(state.trainable, updates), opt_state
