"""PEFT methods as parameter masks, and the partitioned-parameter utilities.

Outside references: the published/derived ViT-B/16 trainable-parameter counts
(from shapes only, via jax.eval_shape), function preservation at init against
the plain ViT with the same backbone weights, and LoRA against an independent
NumPy computation of W x + b + s B A x.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax import peft
from fedpeft_jax.models import ViT
from fedpeft_jax.models.vit import Encoder1DBlock

TINY = dict(variant=None, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4,
            image_size=16, num_classes=5)
TOKENS = (16 // 4) ** 2  # patch tokens of the tiny model


@pytest.fixture(scope="module")
def images() -> jax.Array:
  return jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def base_params(images) -> dict:
  return ViT(**TINY).init(jax.random.PRNGKey(0), images)["params"]


def _init(cfg: Any, images: jax.Array, base: dict | None = None, **kw) -> tuple[ViT, dict]:
  """A tiny PEFT ViT; its backbone leaves are overwritten with `base`'s (pre-trained stand-in)."""
  model = ViT(**{**TINY, **kw}, peft=cfg)
  params = model.init(jax.random.PRNGKey(7), images)["params"]
  if base is not None:
    flat, fb = peft.flatten(params), peft.flatten(base)
    assert set(fb) <= set(flat), "a PEFT method renamed a backbone parameter"
    params = peft.unflatten({**flat, **fb})
  return model, params


def _bits(x: Any) -> np.ndarray:
  return np.asarray(x).view(np.uint32)


# -- ViT-B/16 counts (shapes only) ---------------------------------------------------------

BACKBONE_B16 = 85_798_656
HEAD_B16_100 = 76_900


def _b16_shapes(cfg: Any) -> dict:
  model = ViT(variant="B/16", num_classes=100, image_size=224, peft=cfg)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]


def test_vit_b16_backbone_and_head_counts():
  shapes = _b16_shapes(None)
  assert peft.count(shapes["head"]) == HEAD_B16_100
  assert peft.count(shapes) - HEAD_B16_100 == BACKBONE_B16
  assert peft.count(peft.split(shapes, peft.trainable_mask(shapes, "head"))[0]) == HEAD_B16_100
  assert peft.count(peft.split(shapes, peft.trainable_mask(shapes, "full"))[0]) == (
      BACKBONE_B16 + HEAD_B16_100)


@pytest.mark.parametrize("cfg, expected", [
    (peft.method_config("bias"), 102_912),
    (peft.method_config("prompt", kind="deep", num_tokens=10), 92_160),
    (peft.method_config("lora", rank=8, targets="query,value"), 294_912),
    (peft.method_config("ssf"), 205_824),
    (peft.method_config("adapter", kind="parallel", bottleneck=64), 1_189_632),
    (peft.method_config("adapter", kind="sequential", bottleneck=96), 1_779_840),
], ids=["bias", "vpt_deep10", "lora_r8_qv", "ssf", "adaptformer64", "sequential96"])
def test_vit_b16_trainable_counts(cfg, expected):
  shapes = _b16_shapes(cfg)
  trainable, frozen = peft.split(shapes, peft.trainable_mask(shapes, cfg))
  assert peft.count(trainable) == expected + HEAD_B16_100
  # The method adds parameters but never changes the pre-trained backbone.
  added = 0 if peft.parse_methods(cfg.method) == ("bias",) else expected
  assert peft.count(frozen) == BACKBONE_B16 + added - expected
  assert peft.count(shapes) == BACKBONE_B16 + HEAD_B16_100 + added


def test_paper_transfer_sizes_fp32():
  # docs/study.md: bias 179,812 params ~ 0.69 MB per one-way transfer, prompt 169,060 ~ 0.65 MB.
  for cfg, n in ((peft.method_config("bias"), 179_812), (peft.method_config("prompt"), 169_060)):
    shapes = _b16_shapes(cfg)
    trainable, _ = peft.split(shapes, peft.trainable_mask(shapes, cfg))
    assert peft.count(trainable) == n
    assert peft.nbytes(trainable) == 4 * n
    assert peft.nbytes(trainable, jnp.bfloat16) == 2 * n


# -- function preservation at init ---------------------------------------------------------

@pytest.mark.parametrize("method, overrides", [
    ("adapter", dict(kind="sequential", bottleneck=8)),
    ("adapter", dict(kind="houlsby", bottleneck=8)),
    ("adapter", dict(kind="parallel", bottleneck=8, scale=0.5)),
    ("adapter", dict(kind="shared_zero_init", bottleneck=8)),
    ("adapter", dict(kind="sequential", bottleneck=0, reduction=4, activation="relu")),
    ("lora", dict(rank=4, targets="query,key,value,out,mlp_fc1,mlp_fc2")),
    ("ssf", dict(init_std=0.0)),
    ("bias+lora+ssf+adapter", dict(ssf_init_std=0.0, adapter_kind="houlsby")),
], ids=["sequential", "houlsby", "parallel", "shared_zero_init", "reduction_relu", "lora_all",
        "ssf_identity", "combo"])
def test_function_preserved_at_init(method, overrides, images, base_params):
  cfg = peft.method_config(method, **overrides)
  model, params = _init(cfg, images, base_params)
  assert peft.count(params) > peft.count(base_params)
  # Compare the pooled features: the fresh head is zero, so logits alone would prove nothing.
  got = model.apply({"params": params}, images, return_features=True)
  want = ViT(**TINY).apply({"params": base_params}, images, return_features=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def test_ssf_default_init_is_near_identity_not_identity(images, base_params):
  model, params = _init(peft.method_config("ssf"), images, base_params)
  scales = [v for k, v in peft.flatten(params).items() if k.endswith("_ssf/scale")]
  shifts = [v for k, v in peft.flatten(params).items() if k.endswith("_ssf/shift")]
  s, b = np.concatenate([np.ravel(v) for v in scales]), np.concatenate([np.ravel(v) for v in shifts])
  assert abs(s.mean() - 1) < 0.01 and 0.01 < s.std() < 0.03
  assert abs(b.mean()) < 0.01 and 0.01 < b.std() < 0.03


def test_adapter_and_lora_inits(images):
  _, params = _init(peft.method_config("adapter+lora", adapter_kind="sequential",
                                       adapter_bottleneck=8, lora_rank=4), images)
  f = peft.flatten(params)
  down = f["Transformer/encoderblock_0/adapter_mlp/down/kernel"]
  assert np.all(np.asarray(f["Transformer/encoderblock_0/adapter_mlp/up/kernel"]) == 0)
  assert np.abs(down).max() <= 1 / math.sqrt(32) and np.abs(down).max() > 0.5 / math.sqrt(32)
  a = f["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query_lora/lora_a"]
  b = f["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query_lora/lora_b"]
  assert a.shape == (32, 4) and b.shape == (4, 32)
  # kaiming_uniform(a=sqrt(5)) of a (rank, in) torch weight: U(-1/sqrt(in), 1/sqrt(in)).
  assert np.abs(a).max() <= 1 / math.sqrt(32) and np.abs(a).max() > 0.5 / math.sqrt(32)
  assert np.all(np.asarray(b) == 0)
  _, shared = _init(peft.method_config("adapter", kind="shared_zero_init", bottleneck=8), images)
  sf = peft.flatten(shared)
  assert [k for k in sf if "adapter" in k] == [k for k in sf if k.startswith("Transformer/shared_adapter/")]
  assert len([k for k in sf if "adapter" in k]) == 4  # one adapter for all blocks
  assert all(np.all(np.asarray(v) == 0) for k, v in sf.items() if "shared_adapter" in k)


# -- LoRA against NumPy ----------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_lora_projection_matches_numpy(rslora, images, base_params):
  rank, alpha = 4, 16.0
  cfg = peft.method_config("lora", rank=rank, alpha=alpha, targets="query,value", rslora=rslora)
  model, params = _init(cfg, images, base_params)
  flat = peft.flatten(params)
  pre = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/"
  rng = np.random.default_rng(0)
  for t in ("query", "value"):  # B is zero at init: give it values so the delta is visible.
    flat[pre + f"{t}_lora/lora_b"] = jnp.asarray(rng.normal(0, 0.1, (rank, 32)), jnp.float32)
  params = peft.unflatten(flat)
  _, state = model.apply({"params": params}, images, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = peft.flatten(state["intermediates"])
  x = np.asarray(inter["Transformer/encoderblock_1/LayerNorm_0/__call__"][0], np.float64)
  dense = np.asarray(inter[pre + "query/__call__"][0], np.float64)
  delta = np.asarray(inter[pre + "query_lora/__call__"][0], np.float64)
  w = np.asarray(flat[pre + "query/kernel"], np.float64).reshape(32, 32)
  b = np.asarray(flat[pre + "query/bias"], np.float64).reshape(32)
  a_ = np.asarray(flat[pre + "query_lora/lora_a"], np.float64)
  b_ = np.asarray(flat[pre + "query_lora/lora_b"], np.float64)
  s = alpha / (math.sqrt(rank) if rslora else rank)
  want = x @ w + b + s * (x @ a_) @ b_  # row-vector form of W x + b + s B A x
  got = (dense + delta).reshape(want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(s * (x @ a_) @ b_).max() > 1e-2  # the LoRA term is not negligible

  # Wiring through the whole model: LoRA equals the plain ViT with merged W + s A B.
  merged = peft.flatten(base_params)
  for t in ("query", "value"):
    for blk in ("encoderblock_0", "encoderblock_1"):
      p = f"Transformer/{blk}/MultiHeadDotProductAttention_0/"
      dw = s * np.asarray(flat[p + f"{t}_lora/lora_a"]) @ np.asarray(flat[p + f"{t}_lora/lora_b"])
      merged[p + f"{t}/kernel"] = merged[p + f"{t}/kernel"] + dw.reshape(32, 4, 8)
  got = model.apply({"params": params}, images, return_features=True)
  want = ViT(**TINY).apply({"params": peft.unflatten(merged)}, images, return_features=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_lora_targets_as_list():
  cfg = peft.method_config("lora", targets=["query", "mlp_fc1"])
  assert cfg.lora.targets == "query,mlp_fc1"
  assert peft.to_spec(cfg).lora_targets == ("query", "mlp_fc1")


def test_lora_scaling_in_spec():
  assert peft.to_spec(peft.method_config("lora", rank=4, alpha=16.0)).lora_scaling == 4.0
  assert peft.to_spec(peft.method_config("lora", rank=4, alpha=16.0, rslora=True)).lora_scaling == 8.0


# -- VPT -------------------------------------------------------------------------------------

def _block_inputs(model: ViT, params: dict, images: jax.Array) -> list[jax.Array]:
  """The token sequences entering each Encoder1DBlock."""
  seen: list[jax.Array] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Encoder1DBlock) and context.method_name == "__call__":
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, images)
  return seen


@pytest.mark.parametrize("kind", ["deep", "shallow"])
def test_vpt_prompts_between_class_token_and_patches(kind, images, base_params):
  n_p = 3
  model, params = _init(peft.method_config("prompt", kind=kind, num_tokens=n_p), images, base_params)
  prompts = np.asarray(params["Transformer"]["vpt_prompts"])
  assert prompts.shape == ((2 if kind == "deep" else 1), n_p, 32)
  bound = math.sqrt(6 / (3 * 4 * 4 + 32))
  assert np.abs(prompts).max() <= bound and np.abs(prompts).max() > 0.5 * bound
  ins = _block_inputs(model, params, images)
  assert [x.shape for x in ins] == [(4, 1 + n_p + TOKENS, 32)] * 2
  # Block 0: [cls + pos0, prompts (no position embedding), patches + pos].
  base_ins = _block_inputs(ViT(**TINY), base_params, images)
  x0, b0 = np.asarray(ins[0]), np.asarray(base_ins[0])
  np.testing.assert_array_equal(x0[:, :1], b0[:, :1])
  np.testing.assert_array_equal(x0[:, 1:1 + n_p], np.broadcast_to(prompts[0], (4, n_p, 32)))
  np.testing.assert_array_equal(x0[:, 1 + n_p:], b0[:, 1:])
  x1 = np.asarray(ins[1])[:, 1:1 + n_p]
  if kind == "deep":  # the previous block's prompt outputs are replaced by a new set
    np.testing.assert_array_equal(x1, np.broadcast_to(prompts[1], (4, n_p, 32)))
  else:  # shallow: the prompts travel on through the blocks like any token
    assert not np.allclose(x1, np.broadcast_to(prompts[0], (4, n_p, 32)))


def test_vpt_gap_pooling_skips_prompts(images):
  n_p = 3
  model, params = _init(peft.method_config("prompt", num_tokens=n_p), images, pool="gap")
  feats, state = model.apply({"params": params}, images, return_features=True,
                             capture_intermediates=True, mutable=["intermediates"])
  enc = np.asarray(state["intermediates"]["Transformer"]["__call__"][0])
  assert enc.shape == (4, n_p + TOKENS, 32)  # no class token with gap pooling
  np.testing.assert_allclose(np.asarray(feats), enc[:, n_p:].mean(axis=1), rtol=1e-6, atol=1e-6)


def test_vpt_prompt_dropout_only_in_training(images):
  model, params = _init(peft.method_config("prompt", num_tokens=3, dropout=0.5), images)
  params = dict(params, head={"kernel": jnp.ones((32, 5)), "bias": jnp.zeros(5)})
  a = model.apply({"params": params}, images)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(model.apply({"params": params}, images)))
  b = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(np.asarray(a), np.asarray(b))


# -- masks, split/merge, counts ----------------------------------------------------------------

def _trainable_paths(params: dict, cfg: Any) -> set[str]:
  return {k for k, v in peft.flatten(peft.trainable_mask(params, cfg)).items() if v}


def test_masks_per_method(images, base_params):
  flat = peft.flatten(base_params)
  assert _trainable_paths(base_params, "full") == set(flat)
  assert _trainable_paths(base_params, "head") == {"head/kernel", "head/bias"}
  bias = _trainable_paths(base_params, "bias")
  # 2 blocks x (q, k, v, out, 2 LayerNorms, 2 Dense) + embedding + encoder_norm, + the head.
  assert len(bias) == 2 * 8 + 2 + 2
  assert all(k.endswith("/bias") for k in bias - {"head/kernel"})
  assert not any("LayerNorm" in k and k.endswith("scale") for k in bias)

  _, p = _init(peft.method_config("bias+lora", lora_targets="query,mlp_fc2"), images)
  combo = _trainable_paths(p, peft.method_config("bias+lora", lora_targets="query,mlp_fc2"))
  lora = {k for k in peft.flatten(p) if "_lora/" in k}
  assert len(lora) == 2 * 2 * 2 and lora <= combo
  assert combo == lora | bias
  # The list form and the '+' form are the same method.
  assert peft.parse_methods(["bias", "lora"]) == peft.parse_methods("bias + lora") == ("bias", "lora")

  ffa = peft.method_config("lora", freeze_a=True)
  _, p = _init(ffa, images)
  t = _trainable_paths(p, ffa)
  assert t and not any(k.endswith("lora_a") for k in t)
  assert {k for k in t if "_lora/" in k} == {k for k in peft.flatten(p) if k.endswith("lora_b")}

  _, p = _init(peft.method_config("prompt"), images)
  assert _trainable_paths(p, "prompt") == {"Transformer/vpt_prompts", "head/kernel", "head/bias"}


def test_mask_for_a_method_the_model_lacks_is_an_error(base_params):
  with pytest.raises(ValueError, match=r"'lora' selects no parameter"):
    peft.trainable_mask(base_params, "lora")


def test_mask_from_patterns_include_exclude(base_params):
  m = peft.mask_from_patterns(base_params, include=[r"encoderblock_1/", r"^head/"],
                              exclude=[r"/bias$", r"LayerNorm"])
  t = {k for k, v in peft.flatten(m).items() if v}
  assert "head/kernel" in t and "head/bias" not in t
  assert "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in t
  assert not any(k.startswith("Transformer/encoderblock_0/") for k in t)
  assert not any("LayerNorm" in k for k in t)
  assert jax.tree_util.tree_structure(m) == jax.tree_util.tree_structure(base_params)
  none = peft.mask_from_patterns(base_params, include=[])
  assert not any(jax.tree_util.tree_leaves(none))


def test_split_merge_exact_inverse(images):
  cfg = peft.method_config("bias+lora+prompt")
  _, params = _init(cfg, images)
  mask = peft.trainable_mask(params, cfg)
  trainable, frozen = peft.split(params, mask)
  assert peft.count(trainable) + peft.count(frozen) == peft.count(params)
  assert set(peft.flatten(trainable)).isdisjoint(peft.flatten(frozen))
  back = peft.merge(trainable, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  fb = peft.flatten(back)
  for k, v in peft.flatten(params).items():
    assert v is fb[k]  # the very same arrays: no copy, no cast
  with pytest.raises(ValueError, match="present in both"):
    peft.merge(trainable, params)
  # split also works inside jit (the train step splits traced params).
  t2, f2 = jax.jit(lambda p: peft.split(p, mask))(params)
  assert jax.tree_util.tree_structure(t2) == jax.tree_util.tree_structure(trainable)


def test_count_nbytes_summary(images):
  cfg = peft.method_config("lora")
  _, params = _init(cfg, images)
  mask = peft.trainable_mask(params, cfg)
  trainable, _ = peft.split(params, mask)
  n_t, n = peft.count(trainable), peft.count(params)
  assert peft.nbytes(params) == 4 * n
  assert peft.nbytes(trainable, jnp.float16) == 2 * n_t
  assert peft.nbytes(trainable, "bfloat16") == 2 * n_t
  assert peft.nbytes(jax.tree.map(lambda x: x.astype(jnp.bfloat16), trainable)) == 2 * n_t
  text = peft.summary(params, mask)
  total = [line for line in text.splitlines() if line.startswith("total")]
  assert len(total) == 1 and f"{n_t:,}" in total[0] and f"{n:,}" in total[0]
  for module in ("embedding", "head", "Transformer/encoderblock_*", "Transformer/encoder_norm"):
    assert any(line.startswith(module + " ") for line in text.splitlines())
  assert f"{4 * n / 1e6:.3f}" in total[0]
  assert f"{2 * n / 1e6:.3f}" in peft.summary(params, mask, dtype=jnp.bfloat16)


# -- training: frozen leaves bitwise unchanged -------------------------------------------------

def _train(model: ViT, params: dict, mask: dict, tx: optax.GradientTransformation,
           images: jax.Array, steps: int = 3) -> dict:
  """`steps` SGD/AdamW steps, gradients only w.r.t. the trainable part."""
  labels = jnp.arange(images.shape[0]) % TINY["num_classes"]
  opt = peft.optimizer(tx, mask)
  state = opt.init(params)

  def loss_fn(trainable, frozen, rng):
    logits = model.apply({"params": peft.merge(trainable, frozen)}, images, train=True,
                         rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, state, rng):
    trainable, frozen = peft.split(params, mask)
    grads = jax.grad(loss_fn)(trainable, frozen, rng)
    grads = peft.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, jax.random.PRNGKey(100 + i))
  # Frozen leaves carry no optimizer state (momentum/Adam moments).
  n_state = peft.count(state)
  n_trainable = peft.count(peft.split(params, mask)[0])
  assert n_state <= 2 * n_trainable + 8, (n_state, n_trainable)
  return params


@pytest.mark.parametrize("method, overrides, tx", [
    ("full", {}, "sgd"),
    ("head", {}, "adamw"),
    ("bias", {}, "sgd"),
    ("prompt", dict(num_tokens=2), "adamw"),
    ("adapter", dict(kind="houlsby", bottleneck=4), "sgd"),
    ("lora", dict(rank=2, dropout=0.1), "sgd"),
    ("lora", dict(rank=2, freeze_a=True), "adamw"),
    ("ssf", {}, "adamw"),
    ("bias+lora", {}, "sgd"),
], ids=["full", "head", "bias", "prompt", "houlsby", "lora", "ffa_lora", "ssf", "bias+lora"])
def test_frozen_leaves_bitwise_unchanged(method, overrides, tx, images):
  cfg = peft.method_config(method, **overrides)
  model, params = _init(cfg, images)
  # A non-zero head, so that every trainable leaf gets a gradient from the first steps.
  params = dict(params, head={"kernel": jax.random.normal(jax.random.PRNGKey(5), (32, 5)),
                              "bias": jnp.zeros(5)})
  mask = peft.trainable_mask(params, cfg)
  opt = (optax.sgd(0.5, momentum=0.9, nesterov=True) if tx == "sgd"
         else optax.adamw(1e-2, weight_decay=1e-2))
  new = _train(model, params, mask, opt, images)
  before, after, fm = peft.flatten(params), peft.flatten(new), peft.flatten(mask)
  for k, trainable in fm.items():
    if trainable:
      assert not np.array_equal(before[k], after[k]), f"trainable leaf {k} did not change"
    else:
      np.testing.assert_array_equal(_bits(before[k]), _bits(after[k]), err_msg=k)


def test_shared_zero_init_only_trains_the_up_bias(images):
  # The study authors' degenerate adapter: both projections zero, so only up/bias moves.
  cfg = peft.method_config("adapter", kind="shared_zero_init", bottleneck=4)
  model, params = _init(cfg, images)
  params = dict(params, head={"kernel": jax.random.normal(jax.random.PRNGKey(5), (32, 5)),
                              "bias": jnp.zeros(5)})
  mask = peft.trainable_mask(params, cfg)
  new = _train(model, params, mask, optax.sgd(0.5, momentum=0.9), images)
  before, after = peft.flatten(params), peft.flatten(new)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed == {"Transformer/shared_adapter/up/bias", "head/kernel", "head/bias"}


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call, pattern", [
    (lambda: peft.method_config("lorra"), r"peft.method: unknown method 'lorra'; allowed: full, head"),
    (lambda: peft.method_config(""), r"peft.method must name at least one"),
    (lambda: peft.method_config("lora", targets="query,qkv"),
     r"peft.lora.targets: unknown target 'qkv'; allowed: query, key, value, out, mlp_fc1, mlp_fc2"),
    (lambda: peft.method_config("lora", targets=""), r"peft.lora.targets is empty; choose from query"),
    (lambda: peft.method_config("lora", rank=0), r"peft.lora.rank must be > 0, got 0"),
    (lambda: peft.method_config("lora", rank=-2), r"peft.lora.rank must be > 0"),
    (lambda: peft.method_config("lora", rnak=4), r"peft.lora has no field 'rnak'; allowed: .*'rank'"),
    (lambda: peft.method_config("prompt", num_tokens=0), r"peft.prompt.num_tokens must be > 0"),
    (lambda: peft.method_config("prompt", kind="middle"), r"peft.prompt.kind: 'middle'; allowed: deep, shallow"),
    (lambda: peft.method_config("adapter", kind="lora"),
     r"peft.adapter.kind: 'lora'; allowed: sequential, houlsby, parallel, shared_zero_init"),
    (lambda: peft.method_config("adapter", bottleneck=0), r"peft.adapter.bottleneck"),
    (lambda: peft.method_config("adapter", activation="swish"), r"peft.adapter.activation.*gelu"),
    (lambda: peft.method_config("prompt+lora", rank=4), r"ambiguous.*lora_rank"),
    (lambda: peft.method_config("ssf", init_std=-1.0), r"peft.ssf.init_std must be >= 0"),
], ids=["method", "empty", "target", "no_target", "rank0", "rank_neg", "field", "tokens", "prompt_kind",
        "adapter_kind", "bottleneck", "activation", "ambiguous", "ssf_std"])
def test_bad_config_errors(call, pattern):
  with pytest.raises(ValueError, match=pattern):
    call()


def test_bad_config_set_after_creation_is_caught():
  # Command-line overrides change the ConfigDict after method_config validated it.
  cfg = peft.method_config("lora")
  cfg.lora.rank = 0
  with pytest.raises(ValueError, match=r"peft.lora.rank must be > 0"):
    peft.to_spec(cfg)
  cfg = peft.method_config("prompt")
  cfg.prompt.num_tokens = -1
  with pytest.raises(ValueError, match=r"peft.prompt.num_tokens"):
    ViT(**TINY, peft=cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(TypeError, match="peft must be a ConfigDict"):
    peft.to_spec(42)


def test_mismatched_mask_errors(images, base_params):
  mask = peft.trainable_mask(base_params, "bias")
  short = dict(mask)
  del short["head"]
  for fn in (lambda m: peft.split(base_params, m), lambda m: peft.summary(base_params, m),
             lambda m: peft.optimizer(optax.sgd(0.1), m).init(base_params)):
    with pytest.raises(ValueError, match=r"mask structure does not match params.*head/kernel"):
      fn(short)
  _, lora_params = _init(peft.method_config("lora"), images)
  with pytest.raises(ValueError, match=r"mask structure does not match params.*lora"):
    peft.split(lora_params, mask)
  not_bool = jax.tree.map(lambda x: jnp.ones(x.shape, bool), base_params)
  with pytest.raises(ValueError, match=r"must be a Python bool"):
    peft.split(base_params, not_bool)
