"""The client update: local training of the trainable subtree inside one `lax.scan`.

Gradients are taken only with respect to the trainable subtree; the frozen backbone is
an argument (never a closed-over constant), so XLA can drop the weight-gradient matmuls
of frozen layers and every client shares the one copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fedpeft_jax.data as fdata
from fedpeft_jax.choices import one_of
from fedpeft_jax.peft.partition import merge
from fedpeft_jax.privacy import mechanisms
from fedpeft_jax.privacy.dp_specs import ClientDP
from fedpeft_jax.scoring import InputSpec, images_input, masked_cross_entropy

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """Static description of local training (hashable; part of the jit cache key)."""
  batch_size: int
  local_epochs: int
  max_examples: int  # the largest client's size (rows of ClientData.indices)
  image_size: int
  augment: str
  local_steps: int = 0  # > 0: stop after this many real steps
  label_smoothing: float = 0.0
  fedprox_mu: float = 0.0
  dp: ClientDP = ClientDP()
  # What ClientData.images holds: raw images (None) or a cached frozen prefix.
  inputs: Optional[InputSpec] = None

  @property
  def input_spec(self) -> InputSpec:
    return self.inputs or images_input(self.image_size)

  def real_steps(self, size: Any) -> Any:
    """Local steps a client of `size` examples really runs (NumPy or JAX, any shape)."""
    return fdata.num_local_steps(size, self.batch_size, self.local_epochs, self.local_steps)


def make_client_update(model: nn.Module, client_tx: optax.GradientTransformation,
                       spec: ClientSpec, num_classes: int) -> Callable[..., dict]:
  """Returns client_update(trainable, frozen, data, client_id, key, active=True) -> dict.

  The dict holds `update` (new - old trainable params), `num_examples`, `loss`
  (mean training loss over the client's real steps) and `steps` (the real steps run).
  This is the engine's extension point for custom client rules: an inactive slot
  (`active=False`, a padding slot of the round's layout) must run no steps and report
  zero steps and examples.
  """
  dp = spec.dp

  def loss_fn(trainable, frozen, images, labels, mask, key, anchor):
    params = merge(trainable, frozen)
    logits = spec.input_spec.logits(model, params, images, True, {"dropout": key})
    loss = masked_cross_entropy(logits, labels, mask, num_classes, spec.label_smoothing)
    if spec.fedprox_mu:
      sq = sum(jnp.sum(jnp.square(p - a)) for p, a in zip(
          jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(anchor)))
      loss = loss + 0.5 * spec.fedprox_mu * sq
    return loss

  def example_loss(trainable, batch, frozen, key, anchor):
    # One example (a batch of one) with its own dropout key: its position in the batch is
    # folded in, so every example of a DP-SGD batch draws its own masks, as in a batch step.
    images, labels, position = batch
    return loss_fn(trainable, frozen, images, labels, jnp.ones(labels.shape, bool),
                   jax.random.fold_in(key, position[0]), anchor)

  def gradients(trainable, frozen, images, labels, mask, key, anchor, size):
    k_model, k_noise = jax.random.split(key)
    if dp.mechanism == "dp_sgd":
      # The sum is divided by the expected batch: q * n_i = min(B, n_i) under Poisson.
      expected = (jnp.minimum(spec.batch_size, size).astype(jnp.float32) if dp.poisson
                  else float(spec.batch_size))
      batch = (images, labels, jnp.arange(labels.shape[0]))
      grads, stats = mechanisms.dp_sgd_grad(example_loss, trainable, batch, mask,
                                            k_noise, dp.clip_norm, dp.noise_std, expected,
                                            frozen, k_model, anchor,
                                            chunk_size=dp.per_example_chunk,
                                            secure=dp.secure_noise)
      m = mask.astype(jnp.float32)
      return jnp.sum(stats["losses"] * m) / jnp.maximum(jnp.sum(m), 1.0), grads
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images, labels, mask, k_model,
                                              anchor)
    if dp.mechanism == "paper_gaussian":
      grads = mechanisms.paper_gaussian(grads, k_noise, dp.clip_norm, dp.noise_std,
                                        dp.secure_noise)
    return loss, grads

  def client_update(trainable, frozen, data, client_id, key, active=True):
    row = data.indices[client_id]
    size = data.sizes[client_id]
    k_sched, k_steps = jax.random.split(key)
    # A third, independent key (split(key, n)[i] is fold_in(key, i)): folding into k_sched
    # would reuse the key local_schedule shuffles epoch 1 with.
    k_poisson = jax.random.fold_in(key, 2)
    positions, example_mask, step_mask = fdata.local_schedule(
        k_sched, size, spec.max_examples, spec.batch_size, spec.local_epochs)
    # The real steps come first in the schedule; only they run (an inactive slot runs none).
    real_steps = jnp.where(active, spec.real_steps(jnp.clip(size, 0, spec.max_examples)), 0)
    dropped = jnp.zeros((), jnp.int32)
    if dp.mechanism == "dp_sgd" and dp.poisson:
      # Each step takes every example independently with rate q = B / n_i (the
      # accountant's assumption) into a batch of static capacity; the real step count
      # stays local_epochs * ceil(n_i / B).
      rate = jnp.minimum(1.0, spec.batch_size / jnp.maximum(size, 1).astype(jnp.float32))
      positions, example_mask, drops = mechanisms.poisson_schedule(
          k_poisson, size, rate, positions.shape[0], dp.capacity,
          spec.max_examples)
      live = jnp.arange(positions.shape[0]) < real_steps
      dropped = jnp.sum(jnp.where(live, drops, 0))
    step_keys = jax.random.split(k_steps, positions.shape[0])

    def train_step(t, params, opt_state):
      k_aug, k_grad = jax.random.split(step_keys[t])
      idx = row[positions[t]]
      images = spec.input_spec.prepare(data.images[idx], k_aug, spec.augment, train=True)
      loss, grads = gradients(params, frozen, images, data.labels[idx], example_mask[t], k_grad,
                              trainable, size)
      updates, new_opt_state = client_tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_opt_state, loss.astype(jnp.float32)

    def body(carry):
      t, params, opt_state, loss_sum = carry
      params, opt_state, loss = train_step(t, params, opt_state)
      return t + 1, params, opt_state, loss_sum + loss

    # A data-dependent trip count: exactly the client's real steps. Under vmap (several
    # clients per chunk) the loop runs until the chunk's longest client is done and the
    # finished clients' carries are held by a select, so a chunk of similar clients (the
    # engine sorts them) wastes little and a chunk of padding slots runs nothing.
    init = (jnp.zeros((), jnp.int32), trainable, client_tx.init(trainable),
            jnp.zeros((), jnp.float32))
    _, final, _, loss_sum = jax.lax.while_loop(lambda c: c[0] < real_steps, body, init)
    update = optax.tree.sub(final, trainable)
    return {
        "update": update,
        "num_examples": jnp.where(active, size, 0).astype(jnp.float32),
        "loss": loss_sum / jnp.maximum(real_steps, 1),
        "steps": real_steps,
        "poisson_dropped": dropped,
    }

  return client_update


def make_client_optimizer(name: str, learning_rate: float, momentum: float = 0.9,
                          nesterov: bool = True, weight_decay: float = 1e-4
                          ) -> optax.GradientTransformation:
  """The study's default: SGD, momentum 0.9, Nesterov, weight decay 1e-4 (PyTorch-style
  L2 added to the gradient before momentum), constant learning rate."""
  check_client_optimizer(name)
  if learning_rate <= 0:
    raise ValueError(f"federated.client_lr must be > 0, got {learning_rate}")
  if name == "sgd":
    tx = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov and bool(momentum))
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate)) \
        if weight_decay else optax.adam(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise AssertionError(name)  # check_client_optimizer admits no other name


CLIENT_OPTIMIZERS = ("sgd", "adam", "adamw")


def check_client_optimizer(name: str) -> str:
  """federated.client_optimizer: one of CLIENT_OPTIMIZERS."""
  return one_of("federated.client_optimizer", name, CLIENT_OPTIMIZERS)
