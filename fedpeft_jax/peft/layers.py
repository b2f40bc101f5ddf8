"""The extra modules PEFT methods add to the ViT.

Each returns a *delta* or a scale-and-shift so that the host layer stays the
pre-trained computation and the method is purely additive in parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}


def kaiming_uniform_a_sqrt5(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32,
                            fan_in: int | None = None) -> jax.Array:
  """PyTorch's default Linear init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).

  This is the init of LoRA's A in the reference implementations (loralib, HF peft)
  and of AdaptFormer's down projection.
  """
  fan_in = shape[0] if fan_in is None else fan_in
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRA(nn.Module):
  """Low-rank delta s * B(A(dropout(x))) for a projection with output `out_shape`."""
  rank: int
  out_shape: tuple[int, ...]
  scaling: float
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    features = x.shape[-1]
    out = math.prod(self.out_shape)
    a = self.param("lora_a", lambda k, s: kaiming_uniform_a_sqrt5(k, s), (features, self.rank))
    b = self.param("lora_b", nn.initializers.zeros, (self.rank, out))
    x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    y = (x.astype(self.dtype) @ a.astype(self.dtype)) @ b.astype(self.dtype)
    return (self.scaling * y).reshape(*x.shape[:-1], *self.out_shape)


class Adapter(nn.Module):
  """Bottleneck adapter returning up(act(down(x))); up is zero so it starts as a no-op."""
  bottleneck: int
  activation: str = "gelu"
  zero_init_down: bool = False  # the study authors' degenerate init (docs/study.md, Adapter)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    down_init = (nn.initializers.zeros if self.zero_init_down
                 else (lambda k, s, d=jnp.float32: kaiming_uniform_a_sqrt5(k, s, d)))
    h = nn.Dense(self.bottleneck, dtype=self.dtype, kernel_init=down_init,
                 bias_init=nn.initializers.zeros, name="down")(x)
    h = ACTIVATION_FNS[self.activation](h)
    return nn.Dense(features, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name="up")(h)


class SSF(nn.Module):
  """Scale-and-shift (SSF, Lian et al. 2022): y = gamma * x + beta over the trailing dims."""
  num_trailing: int = 1
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape[-self.num_trailing:]
    std = self.init_std
    gamma = self.param("scale", lambda k, s: 1.0 + std * jax.random.normal(k, s), shape)
    beta = self.param("shift", lambda k, s: std * jax.random.normal(k, s), shape)
    return x * gamma.astype(x.dtype) + beta.astype(x.dtype)
