"""On-device preprocessing: augmentation at native resolution, resize, scale to [-1, 1].

Why on device: the engine gathers uint8 batches inside its jitted round; keeping the
224x224 float images out of memory until the batch is used is what lets the whole training
set stay resident (CIFAR-100 at 224x224 float32 would be 30 GB).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from fedpeft_jax.data.datasets import AUGMENTS


@functools.partial(jax.jit, static_argnames=("image_size", "augment", "train", "pad", "pad_mode",
                                             "method"))
def preprocess(images: Any, key: Optional[jax.Array] = None, *, image_size: int,
               augment: str = "none", train: bool = False, pad: int = 4,
               pad_mode: str = "constant", method: str = "bilinear") -> jax.Array:
  """uint8 [B,H,W,C] (C = 1 or 3) -> float32 [B, image_size, image_size, 3] in [-1, 1].

  Training (`train=True`) augmentation, deterministic from `key`, one draw per example:
    crop_flip: pad `pad` pixels (`pad_mode` "constant" = zeros as torchvision's RandomCrop,
      or "reflect"), random crop back to HxW, random horizontal flip; all at native resolution
      before the resize (CIFAR: 32 -> crop -> 224).
    flip: random horizontal flip (resize + flip datasets).
    none: nothing.
  Then resize (jax.image.resize, antialiased when shrinking), x / 127.5 - 1, grayscale
  replicated to 3 channels (as the ViT expects RGB). Jittable and vmappable.
  """
  if augment not in AUGMENTS:
    raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
  if pad_mode not in ("constant", "reflect"):
    raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B,H,W,1|3], got shape {x.shape}")
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  b, h, w, c = x.shape
  x = x.astype(jnp.float32)
  if train and augment != "none":
    if key is None:
      raise ValueError(f"preprocess(train=True, augment={augment!r}) needs a PRNG key")
    k_crop, k_flip = jax.random.split(key)
    if augment == "crop_flip" and pad > 0:
      xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
      off = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
      x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(xp, off)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
  if (h, w) != (image_size, image_size):
    x = jax.image.resize(x, (b, image_size, image_size, c), method=method)
  x = jnp.clip(x / 127.5 - 1.0, -1.0, 1.0)  # clip: cubic/lanczos kernels overshoot
  if c == 1:
    x = jnp.broadcast_to(x, (b, image_size, image_size, 3))
  return x
