"""What a stored example is, and how it becomes logits: raw images or a cached frozen prefix.

Why: when nothing before encoder block s can change during federated training (the
trainable leaves all sit in blocks >= s or the head) and nothing random happens there
(augmentation and dropout off), the activations entering block s are a fixed function of
the example. Computing them once, on device, batched, turns every later local step and
evaluation into a run of only the top of the network: for head tuning a single Dense
layer. `InputSpec` tells the client loop and the evaluation which form the stored
examples take; `build_cache` computes the stored form.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fedpeft_jax.data as fdata
from fedpeft_jax.choices import one_of
from fedpeft_jax.scoring.inputs import InputSpec, images_input

PyTree = Any
FEATURE_CACHE_MODES = ("auto", "off")


def check_feature_cache(mode: str) -> str:
  """federated.feature_cache: one of FEATURE_CACHE_MODES."""
  return one_of("federated.feature_cache", mode, FEATURE_CACHE_MODES)


def choose_input(mode: str, only_head: bool, first_trainable_block: int, depth: int,
                 augment: str, dropout_free: bool, image_size: int) -> tuple[InputSpec, str]:
  """The cheapest valid input form, and a one-line reason for the log and summary.

  `only_head`: every trainable leaf is in the head. `first_trainable_block`: the first
  encoder block with a trainable leaf (depth when none; 0 when the embedding trains).
  Valid only with augmentation and dropout off, since the cached prefix must be a fixed
  function of the example.
  """
  check_feature_cache(mode)
  if mode == "off":
    return images_input(image_size), "off (federated.feature_cache='off')"
  if augment != "none":
    return images_input(image_size), (f"off: augmentation '{augment}' changes the input every "
                                       "step (set data.augment='none' to cache)")
  if not dropout_free:
    return images_input(image_size), "off: dropout in the frozen prefix is random every step"
  if only_head:
    return InputSpec("features", image_size), "on: pooled features entering the head"
  if first_trainable_block >= 1:
    return (InputSpec("tokens", image_size, first_trainable_block),
            f"on: activations entering encoder block {first_trainable_block} of {depth}")
  return images_input(image_size), ("off: the embedding or first block trains (set "
                                    "peft.last_blocks to freeze a prefix)")


def cache_builder(model: nn.Module, spec: InputSpec, batch_size: int = 256
                  ) -> Callable[[PyTree, jax.Array], jax.Array]:
  """The jitted frozen-prefix run: (params, uint8 images [N,H,W,C]) -> the stored form of
  the images under `spec` [N, ...], in the model's dtype.

  Batched by a scan inside one jit whose batch count follows from the images' shape, so it
  lowers from abstract values (`cache_builder(...).lower(params_shapes, images_shape)`), as
  the planner does for a device that is not here. It reads only frozen leaves, so `params`
  may be the pre-training values.
  """
  if spec.kind == "images":
    raise ValueError("InputSpec(kind='images') stores the images themselves: no cache to build")
  kw = ({"stop_block": spec.start_block} if spec.kind == "tokens"
        else {"return_features": True})

  @jax.jit
  def run(params: PyTree, images: jax.Array) -> jax.Array:
    n = int(images.shape[0])
    index, _ = fdata.eval_schedule(n, batch_size)  # the last batch's padding rows are sliced off

    def body(_, idx):
      x = fdata.preprocess(images[idx], None, image_size=spec.image_size, augment="none",
                           train=False)
      return None, model.apply({"params": params}, x, train=False, **kw)

    _, out = jax.lax.scan(body, None, jnp.asarray(index))
    return out.reshape((-1,) + out.shape[2:])[:n]

  return run


def build_cache(model: nn.Module, params: PyTree, images: np.ndarray, spec: InputSpec,
                batch_size: int = 256) -> jax.Array:
  """The stored form of `images` (uint8 [N,H,W,C]) under `spec`: the images themselves, or
  `cache_builder`'s run over them."""
  if spec.kind == "images":
    return jnp.asarray(images)
  return cache_builder(model, spec, batch_size)(params, jnp.asarray(images))
