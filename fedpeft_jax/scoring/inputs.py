"""What a stored example is, and how the model turns it into logits: raw uint8 images,
preprocessed on device each step, or a cached frozen prefix (`federated.feature_cache`
builds it). Central and federated training and every evaluator read examples through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax

import fedpeft_jax.data as fdata

PyTree = Any
KINDS = ("images", "tokens", "features")


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """`images`: uint8 images, preprocessed on device each step. `tokens`: activations
  entering encoder block `start_block` [N, T, D]. `features`: pooled features entering the
  head [N, D]."""
  kind: str = "images"
  image_size: int = 0
  start_block: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"InputSpec.kind {self.kind!r}; allowed: {', '.join(KINDS)}")
    if self.kind == "tokens" and self.start_block < 1:
      raise ValueError("InputSpec(kind='tokens') needs start_block >= 1")

  def prepare(self, stored: jax.Array, key: Optional[jax.Array], augment: str,
              train: bool) -> jax.Array:
    """A batch of stored examples -> the model's input."""
    if self.kind == "images":
      return fdata.preprocess(stored, key, image_size=self.image_size, augment=augment,
                              train=train)
    return stored

  def logits(self, model: nn.Module, params: PyTree, x: jax.Array, train: bool,
             rngs: Optional[dict] = None) -> jax.Array:
    kw: dict[str, Any] = {}
    if self.kind == "tokens":
      kw["start_block"] = self.start_block
    elif self.kind == "features":
      kw["from_features"] = True
    return model.apply({"params": params}, x, train=train, rngs=rngs, **kw)


def images_input(image_size: int) -> InputSpec:
  return InputSpec("images", image_size)
