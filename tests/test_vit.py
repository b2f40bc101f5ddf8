"""Basic checks of the ViT module: parameter layout, sizes, options, errors (cheap: eval_shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax.models import ViT, parse_variant
from fedpeft_jax.peft import count, flatten


def _shapes(model: ViT, size: int) -> dict:
  return flatten(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, size, size, 3)))["params"])


def test_b16_layout_and_size() -> None:
  shapes = _shapes(ViT(variant="B/16", num_classes=1000, image_size=224), 224)
  # The published ViT-B/16 size (timm vit_base_patch16_224: 86,567,656 with a 1000-way head).
  assert count(shapes) == 86_567_656
  want = {
      "cls": (1, 1, 768),
      "embedding/kernel": (16, 16, 3, 768),
      "Transformer/posembed_input/pos_embedding": (1, 197, 768),
      "Transformer/encoderblock_11/MultiHeadDotProductAttention_0/query/kernel": (768, 12, 64),
      "Transformer/encoderblock_11/MultiHeadDotProductAttention_0/out/kernel": (12, 64, 768),
      "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": (768, 3072),
      "Transformer/encoderblock_0/LayerNorm_1/scale": (768,),
      "Transformer/encoder_norm/scale": (768,),
      "head/kernel": (768, 1000),
  }
  for k, shape in want.items():
    assert shapes[k].shape == shape, k
  assert all(v.dtype == jnp.float32 for v in shapes.values())


def test_options_and_outputs() -> None:
  tiny = dict(variant=None, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8,
              image_size=32, num_classes=3)
  gap = _shapes(ViT(**tiny, pool="gap"), 32)
  assert "cls" not in gap and gap["Transformer/posembed_input/pos_embedding"].shape == (1, 16, 32)
  rep = _shapes(ViT(**tiny, representation_size=16), 32)
  assert rep["pre_logits/kernel"].shape == (32, 16) and rep["head/kernel"].shape == (16, 3)

  model = ViT(**tiny, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(shapes))  # f32 params
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  feats = model.apply({"params": params}, x, return_features=True)
  assert feats.shape == (2, 32)


def test_variants_and_errors() -> None:
  assert parse_variant("Ti/4") == ("Ti", 4) and parse_variant("H/14") == ("H", 14)
  assert ViT(variant="S/32").arch() == {"hidden_size": 384, "depth": 12, "num_heads": 6,
                                        "mlp_dim": 1536, "patch_size": 32}
  assert ViT(variant="B/16", depth=2).arch()["depth"] == 2
  with pytest.raises(ValueError, match="variant"):
    ViT(variant="X/16").arch()
  with pytest.raises(ValueError, match="multiple of patch_size"):
    ViT(variant="B/16", image_size=100).arch()
  with pytest.raises(ValueError, match="set hidden_size"):
    ViT(variant=None, depth=2, num_heads=2, mlp_dim=8, patch_size=4).arch()
  with pytest.raises(ValueError, match="pool"):
    ViT(variant="Ti/16", pool="max").arch()
