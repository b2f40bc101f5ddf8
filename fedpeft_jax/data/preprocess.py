"""On-device preprocessing: augmentation at native resolution, resize, scale to [-1, 1].

Why on device: the engine gathers uint8 batches inside its jitted round; keeping the
224x224 float images out of memory until the batch is used is what lets the whole training
set stay resident (CIFAR-100 at 224x224 float32 would be 30 GB).

Why the resize is a banded gather, not `jax.image.resize`: that function applies its
[out, in] weight matrix as a float32 `precision=HIGHEST` dot per batch. On GPUs this is a
multi-pass float32 GEMM on tensor cores, and with XLA's default flags its Triton GEMM
emitter refused the CIFAR shape (f32[43008,224], "Couldn't find output tile sizes") in a
deviceless H100 compile. A separable resize only ever mixes a few neighbouring pixels
(2 taps for bilinear upsampling, 3 for 256 -> 224 antialiased), so `resize` gathers those
taps and sums them with float32 multiply-adds: no dot at all, the same weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax.data.datasets import check_augment


def _keys_cubic(x: np.ndarray) -> np.ndarray:  # Keys (1981) with a = -0.5, as jax.image
  return np.where(x < 1, ((1.5 * x - 2.5) * x) * x + 1,
                  np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))


def _lanczos(radius: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda x: np.where(x < radius, np.sinc(x) * np.sinc(x / radius), 0.0)


# Separable resize kernels (jax.image.ResizeMethod names), each a function of |distance|.
RESIZE_KERNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **dict.fromkeys(("linear", "bilinear", "trilinear", "triangle"),
                    lambda x: np.maximum(0.0, 1.0 - x)),
    **dict.fromkeys(("cubic", "bicubic", "tricubic"), _keys_cubic),
    "lanczos3": _lanczos(3),
    "lanczos5": _lanczos(5),
}


@functools.lru_cache(maxsize=64)
def resize_taps(in_size: int, out_size: int, method: str = "bilinear"
                ) -> tuple[np.ndarray, np.ndarray]:
  """The resize of one axis as taps: (indices int32 [out, K], weights float32 [out, K]) with
  out[o] = sum_k weights[o, k] * in[indices[o, k]].

  Half-pixel centres; when shrinking the kernel is stretched by in/out (antialiasing), and
  each output's weights are normalised to sum to 1: the rules of `jax.image.resize` with
  antialias=True (and of torch's `interpolate(..., antialias=True)` for bilinear),
  re-derived here in float64 NumPy. K is the widest support any output needs.
  """
  if method not in RESIZE_KERNELS:
    raise ValueError(f"resize method {method!r} is unknown; allowed: {', '.join(RESIZE_KERNELS)}")
  scale = out_size / in_size
  stretch = max(1.0 / scale, 1.0)
  centres = (np.arange(out_size) + 0.5) / scale - 0.5  # output pixel centres, input coords
  weights = RESIZE_KERNELS[method](np.abs(centres[:, None] - np.arange(in_size)[None, :]) / stretch)
  total = weights.sum(axis=1, keepdims=True)
  weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps,
                     weights / np.where(total != 0, total, 1), 0.0)
  nonzero = weights != 0
  first = np.where(nonzero.any(1), nonzero.argmax(1), 0)
  last = np.where(nonzero.any(1), in_size - 1 - nonzero[:, ::-1].argmax(1), 0)
  width = int((last - first).max()) + 1
  indices = np.minimum(first[:, None] + np.arange(width)[None, :], in_size - 1)
  taps = np.take_along_axis(weights, indices, axis=1)
  # A clamped index (past the last input pixel) repeats a tap already counted: weight 0.
  taps = np.where(first[:, None] + np.arange(width)[None, :] < in_size, taps, 0.0)
  return indices.astype(np.int32), taps.astype(np.float32)


def resize(x: jax.Array, size: int, method: str = "bilinear") -> jax.Array:
  """float [B, H, W, C] -> [B, size, size, C] with `resize_taps`' weights.

  Lowered per platform (`lax.platform_dependent`): on GPUs each axis gathers its taps and
  sums them (float32 multiply-adds, no dot; see the module docstring); elsewhere the same
  weights as a dense [out, in] matrix, one float32 dot per axis (on the CPU 4x faster than
  the gathers, measured side by side for 64 CIFAR images to 224 px; TPUs are untested)."""
  gathered = functools.partial(resize_gathered, size=size, method=method)
  return jax.lax.platform_dependent(
      x, cuda=gathered, rocm=gathered,
      default=functools.partial(resize_dense, size=size, method=method))


def resize_gathered(y: jax.Array, size: int, method: str = "bilinear") -> jax.Array:
  """`resize` on accelerators: per axis, gather the taps and sum them (no dot)."""
  def along(y: jax.Array, axis: int) -> jax.Array:
    if y.shape[axis] == size:
      return y
    indices, weights = resize_taps(y.shape[axis], size, method)
    taps = jnp.take(y, jnp.asarray(indices.reshape(-1)), axis=axis)
    taps = taps.reshape(y.shape[:axis] + indices.shape + y.shape[axis + 1:])
    shape = (1,) * axis + weights.shape + (1,) * (y.ndim - axis - 1)
    return jnp.sum(taps * jnp.asarray(weights).reshape(shape), axis=axis + 1)
  return along(along(y, 1), 2)


def resize_dense(y: jax.Array, size: int, method: str = "bilinear") -> jax.Array:
  """`resize` on the CPU: the taps as dense [out, in] matrices, one float32 dot per axis."""
  def matrix(n: int) -> np.ndarray:
    indices, weights = resize_taps(n, size, method)
    m = np.zeros((size, n), np.float32)
    np.add.at(m, (np.repeat(np.arange(size), indices.shape[1]), indices.reshape(-1)),
              weights.reshape(-1))
    return m
  if y.shape[1] != size:
    y = jnp.einsum("oh,bhwc->bowc", matrix(y.shape[1]), y, precision="highest")
  if y.shape[2] != size:
    y = jnp.einsum("ow,bhwc->bhoc", matrix(y.shape[2]), y, precision="highest")
  return y


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
  Then resize (`resize`: jax.image.resize's weights, antialiased when shrinking), x / 127.5 - 1, grayscale
  replicated to 3 channels (as the ViT expects RGB). Jittable and vmappable.
  """
  check_augment(augment)
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
    x = resize(x, image_size, method)
  x = jnp.clip(x / 127.5 - 1.0, -1.0, 1.0)  # clip: cubic/lanczos kernels overshoot
  if c == 1:
    x = jnp.broadcast_to(x, (b, image_size, image_size, 3))
  return x
