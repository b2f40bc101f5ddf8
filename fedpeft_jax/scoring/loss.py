"""The loss both trainings minimise: cross-entropy over the real examples of a padded batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                         num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy over the real (mask=True) examples of a padded batch."""
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, onehot)
  m = mask.astype(per_example.dtype)
  return jnp.sum(per_example * m) / jnp.maximum(jnp.sum(m), 1.0)
