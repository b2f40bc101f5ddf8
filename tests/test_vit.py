"""Basic checks of the ViT module: parameter layout, sizes, options, errors (cheap: eval_shape)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax.models import ViT, parse_variant
from fedpeft_jax.models.vit import MultiHeadDotProductAttention, choose_attention, padded_attention
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
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32  # float32 out of bf16 compute
  feats = model.apply({"params": params}, x, return_features=True)
  assert feats.shape == (2, 32)
  # The logits are the head applied to those features: NumPy float64 from the bf16 features and
  # bf16-rounded head weights, within two bf16 steps (2 * 2^-8) of the largest logit.
  head = params["head"]
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  want = bf(feats) @ bf(head["kernel"]) + bf(head["bias"])
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=2 ** -7 * np.abs(want).max())
  # ... and within 5% of the largest float32 logit of the same params (bf16 rounding through
  # two blocks; measured 1.5%).
  f32 = np.asarray(ViT(**tiny).apply({"params": params}, x))
  np.testing.assert_allclose(np.asarray(logits), f32, rtol=0, atol=0.05 * np.abs(f32).max())


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


# -- attention against NumPy, code paths, bfloat16 --------------------------------------------

def _attention_inputs(heads: int = 4, width: int = 32, tokens: int = 7):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0, 1, (2, tokens, width)), jnp.float32)
  mha = MultiHeadDotProductAttention(heads)
  shapes = jax.eval_shape(mha.init, jax.random.PRNGKey(0), x)["params"]
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
  return x, params


def _numpy_attention(x, params, drop: Optional[np.ndarray] = None) -> tuple[np.ndarray, ...]:
  """Multi-head attention in float64 NumPy -> (output, probabilities [b, n, t, t]).

  `drop`: a multiplier on the probabilities (inverted dropout: 0 or 1 / keep_rate)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x64 = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dnh->bnth", x64, p[n]["kernel"]) + p[n]["bias"][:, None]
             for n in ("query", "key", "value"))
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ctx = (w if drop is None else w * drop) @ v  # [b, n, t, h]
  return np.einsum("bnth,nhd->btd", ctx, p["out"]["kernel"]) + p["out"]["bias"], w


def test_attention_matches_numpy() -> None:
  x, params = _attention_inputs()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(MultiHeadDotProductAttention(4).apply({"params": params}, x))
  np.testing.assert_allclose(got, _numpy_attention(x, params)[0], rtol=0, atol=1e-5)


def test_attention_paths_and_gradients_agree() -> None:
  # "xla": jax.nn.dot_product_attention; "explicit": the einsum form (the dropout path).
  x, params = _attention_inputs()

  def loss(params, x, implementation):
    y = MultiHeadDotProductAttention(4, implementation=implementation).apply({"params": params},
                                                                             x)
    return jnp.sum(jnp.sin(y)), y

  with jax.default_matmul_precision("highest"):
    (_, y1), g1 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, "xla")
    (_, y0), g0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, "explicit")
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=0, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
  # Attention dropout: deterministic is the plain function; training drops probabilities.
  drop = MultiHeadDotProductAttention(4, dropout=0.5, implementation="xla")
  np.testing.assert_allclose(np.asarray(drop.apply({"params": params}, x)), np.asarray(y0),
                             rtol=0, atol=1e-5)
  # Training: NumPy attention with the dropout mask flax drew (read at nn.Dropout's output)
  # applied to the NumPy probabilities, scaled by 1 / keep = 2.
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout):
      seen["probs"], seen["dropped"] = np.asarray(args[0]), np.asarray(out)
    return out

  with jax.default_matmul_precision("highest"), nn.intercept_methods(record):
    y_train = np.asarray(drop.apply({"params": params}, x, deterministic=False,
                                    rngs={"dropout": jax.random.PRNGKey(3)}))
  _, probs = _numpy_attention(x, params)
  np.testing.assert_allclose(seen["probs"], probs, rtol=0, atol=1e-6)
  kept = seen["dropped"] != 0
  assert 0.35 < kept.mean() < 0.65, kept.mean()  # 392 draws of p = 0.5: 6 sigma
  np.testing.assert_allclose(seen["dropped"][kept], 2 * seen["probs"][kept], rtol=1e-6)
  want, _ = _numpy_attention(x, params, drop=2.0 * kept)
  np.testing.assert_allclose(y_train, want, rtol=0, atol=1e-5)
  assert np.abs(y_train - np.asarray(y0)).max() > 1e-2  # dropout changed the output


def test_bfloat16_forward_close_to_float32() -> None:
  # Tolerance: bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.004); through two blocks the
  # features (unit scale after the final LayerNorm) stay within 0.1 of float32.
  tiny = dict(variant=None, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8,
              image_size=32, num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  shapes = jax.eval_shape(ViT(**tiny).init, jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
  f32 = ViT(**tiny).apply({"params": params}, x, return_features=True)
  got = ViT(**tiny, dtype=jnp.bfloat16).apply({"params": params}, x, return_features=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(f32), rtol=0, atol=0.1)
  # The attention alone, both paths: within 2% of the largest float32 output.
  xa, pa = _attention_inputs()
  want = np.asarray(MultiHeadDotProductAttention(4).apply({"params": pa}, xa))
  for implementation in ("explicit", "xla"):
    mha = MultiHeadDotProductAttention(4, dtype=jnp.bfloat16, implementation=implementation)
    got = mha.apply({"params": pa}, xa)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0,
                               atol=0.02 * np.abs(want).max())


def test_padded_attention_equals_numpy_attention_for_odd_tokens() -> None:
  # The cuDNN path pads 7 tokens to 8 and masks by length; run through XLA here, its output
  # and gradients must equal float64 NumPy attention and the explicit form's gradients.
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(0, 1, (2, 3, 7, 4, 8)), jnp.float32) for _ in range(3))

  def numpy_attention(q, k, v):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("...qnd,...knd->...nqk", q, k)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("...nqk,...knd->...qnd", p, v)

  with jax.default_matmul_precision("highest"):
    got = padded_attention(q, k, v, implementation="xla")
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v), rtol=0, atol=1e-5)
    # Gradients: equal to the plain (unpadded) fused call's.
    f = lambda *t: jnp.sum(jnp.sin(padded_attention(*t, implementation="xla")))
    g = lambda *t: jnp.sum(jnp.sin(jax.nn.dot_product_attention(
        *(s.reshape((-1,) + s.shape[-3:]) for s in t), scale=1.0)))
    for a, b in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_attention_choice_rules() -> None:
  bf16, f32, h100 = jnp.bfloat16, jnp.float32, (9, 0)
  assert choose_attention("auto", "gpu", bf16, 64, 0.0, h100)[0] == "cudnn"
  assert choose_attention("auto", "gpu", jnp.float16, 128, 0.0, (8, 0))[0] == "cudnn"
  # Each blocker alone sends "auto" to the explicit form, and the reason names it.
  for args, word in [(("cpu", bf16, 64, 0.0, None), "cpu"), (("tpu", bf16, 64, 0.0, None), "tpu"),
                     (("gpu", f32, 64, 0.0, h100), "float32"),
                     (("gpu", bf16, 60, 0.0, h100), "60"), (("gpu", bf16, 136, 0.0, h100), "136"),
                     (("gpu", bf16, 64, 0.1, h100), "dropout"),
                     (("gpu", bf16, 64, 0.0, (7, 5)), "(7, 5)"),  # a T4: before Ampere
                     (("gpu", bf16, 64, 0.0, None), "None")]:  # not NVIDIA (e.g. ROCm)
    impl, why = choose_attention("auto", *args)
    assert impl == "explicit" and word in why, (args, why)
  assert choose_attention("xla", "cpu", f32, 60, 0.1) == ("xla", "model.attention")
  with pytest.raises(ValueError, match="model.attention='cudnn'.*float32"):
    choose_attention("cudnn", "gpu", f32, 64, 0.0, h100)
  with pytest.raises(ValueError, match="model.attention: 'flash'; allowed: auto, explicit, xla, cudnn"):
    choose_attention("flash", "gpu", bf16, 64, 0.0)
