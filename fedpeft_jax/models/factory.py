"""A ViT and its initial parameters from an experiment config (`config.model`, `config.peft`).

Shared by federated runs (`fedpeft_jax.runner`) and central pre-training
(`fedpeft_jax.pretrain`), so both build the same architecture from the same fields.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedpeft_jax.choices import one_of
from fedpeft_jax.models.checkpoint_files import CheckpointError
from fedpeft_jax.models.checkpoint_registry import load_pretrained
from fedpeft_jax.models.vit import ViT, choose_attention

# config.model.dtype -> the compute dtype ("auto" is resolved by `compute_dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODEL_DTYPES = ("auto",) + tuple(DTYPES)


def check_model_dtype(name: str) -> str:
  """model.dtype: one of MODEL_DTYPES."""
  return one_of("model.dtype", name, MODEL_DTYPES)


def compute_dtype(name: str, backend: Optional[str] = None) -> Any:
  """config.model.dtype -> a JAX dtype; 'auto' is bfloat16 on GPU/TPU and float32 on the CPU
  (whose XLA bf16 kernels are slower than its f32 ones)."""
  if check_model_dtype(name) == "auto":
    name = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
  return DTYPES[name]


def device_capability(device: Any) -> Optional[tuple[int, int]]:
  """An NVIDIA GPU's compute capability ((9, 0) for an H100); None for any other device."""
  text = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or not text or "cuda" not in str(
      getattr(device.client, "platform_version", "")).lower():
    return None
  major, minor = str(text).split(".")[:2]
  return int(major), int(minor)


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                with_peft: bool = True, platform: Optional[str] = None,
                compute_capability: Optional[tuple[int, int]] = None) -> ViT:
  """The ViT of `config.model` with the PEFT modules of `config.peft` (none with
  `with_peft=False`: the backbone and head that full fine-tuning trains), built for
  `platform` ('cpu', 'gpu', 'tpu') and `compute_capability` (an NVIDIA GPU's; default for
  both: JAX's first device), which fix the compute dtype of 'auto' and the attention
  implementation (`attention_choice` says why)."""
  m = config.model
  if platform is None:
    platform, compute_capability = jax.default_backend(), device_capability(jax.devices()[0])
  model = ViT(
      variant=None if m.hidden_size else m.variant,
      num_classes=num_classes,
      image_size=m.image_size,
      hidden_size=m.hidden_size or None,
      depth=m.depth or None,
      num_heads=m.num_heads or None,
      mlp_dim=m.mlp_dim or None,
      patch_size=m.patch_size or None,
      pool=m.pool,
      representation_size=m.representation_size or None,
      dropout=m.dropout,
      attention_dropout=m.attention_dropout,
      dtype=compute_dtype(m.dtype, platform),
      peft=config.peft if with_peft else None,
  )
  attention, _ = attention_choice(config, model, platform, compute_capability)
  return model.clone(attention=attention)


def attention_choice(config: ml_collections.ConfigDict, model: ViT, platform: str,
                     compute_capability: Optional[tuple[int, int]] = None) -> tuple[str, str]:
  """(attention implementation, why) of `config.model.attention` for `model` on `platform`."""
  arch = model.arch()
  return choose_attention(config.model.attention, platform, model.dtype,
                          arch["hidden_size"] // arch["num_heads"], config.model.attention_dropout,
                          compute_capability)


def init_params(config: ml_collections.ConfigDict, model: ViT, key: jax.Array) -> dict:
  """Random init (from scratch) or the pre-trained backbone with fresh PEFT leaves and head;
  `key` draws every freshly initialised leaf."""
  size = config.model.image_size
  if config.model.pretrained:
    try:
      return load_pretrained(config.model.pretrained, model, rng=key,
                             cache_dir=config.model.cache_dir or None)
    except CheckpointError as e:  # a download, a file or a fit: the message says which
      raise CheckpointError(f"config.model.pretrained ({config.model.pretrained!r}): {e}") from e
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3))))(key)["params"]
  return jax.tree_util.tree_map(np.asarray, params)


def base_param_shapes(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """Shapes of the same model without PEFT modules (backbone + head): what one transfer
  of full fine-tuning moves, the study's communication baseline."""
  model = build_model(config, num_classes, with_peft=False)
  size = config.model.image_size
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                        jax.random.PRNGKey(0))["params"]
