"""peft.last_blocks (tune only the last k encoder blocks + the top) and the split forward
(`stop_block`, `start_block`, `from_features`) that lets an engine cache the frozen prefix.

Counts are computed here from the tiny model's shapes, not taken from the library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedpeft_jax import peft
from fedpeft_jax.models import ViT
from fedpeft_jax.config_files import repo_config
from tests.test_peft import _block_inputs
from fedpeft_jax.runner.validate import ConfigError, validate_config

D, DEPTH, MLP, HEADS, PATCH, IMAGE, CLASSES = 32, 3, 64, 4, 4, 16, 5
TINY = dict(variant=None, hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
            patch_size=PATCH, image_size=IMAGE, num_classes=CLASSES)
PATCHES = (IMAGE // PATCH) ** 2
HEAD = D * CLASSES + CLASSES


@pytest.fixture(scope="module")
def images() -> jax.Array:
  return jax.random.uniform(jax.random.PRNGKey(1), (4, IMAGE, IMAGE, 3), minval=-1, maxval=1)


def _perturbed(params: dict, scale: float = 0.05) -> dict:
  """Every leaf moved off its init (LoRA B, adapter up and the head start at zero)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(42), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _model(cfg: Any, images: jax.Array, **kw) -> tuple[ViT, dict]:
  model = ViT(**{**TINY, **kw}, peft=cfg)
  return model, model.init(jax.random.PRNGKey(0), images)["params"]


def _cfg(method: str, k: int, **overrides) -> Any:
  return peft.method_config(method, last_blocks=k, **overrides)


# -- split forward ---------------------------------------------------------------------------

SPLIT_CASES = {
    "plain": ("full", {}),
    "lora_all": ("lora", dict(rank=2, targets="query,key,value,out,mlp_fc1,mlp_fc2")),
    "houlsby": ("adapter", dict(kind="houlsby", bottleneck=4)),
    "parallel": ("adapter", dict(kind="parallel", bottleneck=4)),
    "shared_zero_init": ("adapter", dict(kind="shared_zero_init", bottleneck=4)),
    "ssf": ("ssf", {}),
    "prompt_deep": ("prompt", dict(kind="deep", num_tokens=3, dropout=0.0)),
    "prompt_shallow": ("prompt", dict(kind="shallow", num_tokens=3, dropout=0.0)),
    "combo": ("prompt+lora+ssf+adapter", dict(prompt_num_tokens=2, prompt_dropout=0.0,
                                               adapter_bottleneck=4)),
}


# Every case once, prompts (whose insertion point moves with k) at both k.
SPLIT_RUNS = [("plain", 0), ("lora_all", 2), ("houlsby", 2), ("parallel", 0),
              ("shared_zero_init", 2), ("ssf", 0), ("prompt_deep", 0), ("prompt_deep", 2),
              ("prompt_shallow", 2), ("combo", 2)]


@pytest.mark.parametrize("case, k", SPLIT_RUNS, ids=[f"{c}-{k}" for c, k in SPLIT_RUNS])
def test_split_forward_equals_full_forward(case, k, images):
  method, overrides = SPLIT_CASES[case]
  model, params = _model(_cfg(method, k, **overrides), images)
  v = {"params": _perturbed(params)}
  for train in (False, True):
    rngs = {"dropout": jax.random.PRNGKey(3)} if train else None
    full = model.apply(v, images, train=train, rngs=rngs)
    assert full.dtype == jnp.float32 and full.shape == (4, CLASSES)
    assert float(jnp.abs(full).max()) > 1e-3  # a real function of the input, not zeros
    for s in range(DEPTH + 1):
      tokens = model.apply(v, images, train=train, rngs=rngs, stop_block=s)
      assert tokens.ndim == 3 and tokens.shape[-1] == D and tokens.dtype == jnp.float32
      got = model.apply(v, tokens, train=train, rngs=rngs, start_block=s)
      np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=0, atol=1e-6,
                                 err_msg=f"s={s} train={train}")
    feats = model.apply(v, images, train=train, rngs=rngs, return_features=True)
    got = model.apply(v, feats, train=train, rngs=rngs, from_features=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(pool="gap"), dict(representation_size=16)],
                         ids=["gap", "pre_logits"])
def test_split_forward_gap_and_pre_logits(kw, images):
  cfg = _cfg("prompt+lora", 2, prompt_num_tokens=3, prompt_dropout=0.0)
  model, params = _model(cfg, images, **kw)
  v = {"params": _perturbed(params)}
  full = model.apply(v, images)
  for s in range(DEPTH + 1):
    got = model.apply(v, model.apply(v, images, stop_block=s), start_block=s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=0, atol=1e-6)
  feats = model.apply(v, images, return_features=True)
  assert feats.shape == (4, kw.get("representation_size", D))
  np.testing.assert_allclose(np.asarray(model.apply(v, feats, from_features=True)),
                             np.asarray(full), rtol=0, atol=1e-6)


def test_split_forward_draws_the_same_dropout_masks(images):
  # With dropout on, the split forward under the same rng is the very same function.
  cfg = _cfg("prompt+lora", 2, prompt_dropout=0.3, lora_dropout=0.2, prompt_num_tokens=2)
  model, params = _model(cfg, images, dropout=0.1, attention_dropout=0.1)
  v, rngs = {"params": _perturbed(params)}, {"dropout": jax.random.PRNGKey(5)}
  full = model.apply(v, images, train=True, rngs=rngs)
  assert not np.allclose(np.asarray(full), np.asarray(model.apply(v, images)))  # dropout acts
  for s in range(DEPTH + 1):
    tokens = model.apply(v, images, train=True, rngs=rngs, stop_block=s)
    got = model.apply(v, tokens, train=True, rngs=rngs, start_block=s)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(full))


def test_stop_block_tokens(images):
  cfg = _cfg("prompt", 0, kind="deep", num_tokens=3)
  model, params = _model(cfg, images)
  v = {"params": params}
  t0 = model.apply(v, images, stop_block=0)
  # Block 0's input before its prompts: embedding + class token + position embedding.
  x = jax.lax.conv_general_dilated(images, params["embedding"]["kernel"], (PATCH, PATCH), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = (x + params["embedding"]["bias"]).reshape(4, PATCHES, D)
  x = jnp.concatenate([jnp.broadcast_to(params["cls"], (4, 1, D)), x], axis=1)
  x = x + params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(np.asarray(t0), np.asarray(x), rtol=1e-5, atol=1e-5)
  # Later blocks: the prompts inserted before the earlier blocks are part of the tokens.
  assert model.apply(v, images, stop_block=1).shape == (4, 1 + 3 + PATCHES, D)
  assert model.apply(v, images, stop_block=DEPTH).shape == (4, 1 + 3 + PATCHES, D)
  # Tuning the last 2 blocks: nothing is inserted before block 1 (the first tuned block).
  m2, p2 = _model(_cfg("prompt", 2, num_tokens=3), images)
  assert m2.apply({"params": p2}, images, stop_block=1).shape == (4, 1 + PATCHES, D)
  assert m2.apply({"params": p2}, images, stop_block=2).shape == (4, 1 + 3 + PATCHES, D)


def test_split_forward_bfloat16_dtype(images):
  model, params = _model(_cfg("lora", 2), images, dtype=jnp.bfloat16)
  v = {"params": _perturbed(params)}
  tokens = model.apply(v, images, stop_block=1)
  assert tokens.dtype == jnp.bfloat16
  got = model.apply(v, tokens, start_block=1)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(model.apply(v, images)))


@pytest.mark.parametrize("kw, pattern", [
    (dict(stop_block=DEPTH + 1), r"stop_block must be in \[start_block=0, 3\]"),
    (dict(start_block=DEPTH + 1), r"start_block must be in \[0, 3\]"),
    (dict(start_block=2, stop_block=1), r"stop_block must be in \[start_block=2, 3\]"),
    (dict(start_block=1), r"start_block=1 expects the tokens entering that block"),
    (dict(from_features=True), r"from_features=True expects pooled features \[batch, 32\]"),
    (dict(from_features=True, start_block=1), r"does not combine with start_block"),
], ids=["stop_big", "start_big", "stop_lt_start", "images_to_start", "images_to_head", "both"])
def test_split_forward_bad_arguments(kw, pattern, images):
  model, params = _model(None, images)
  with pytest.raises(ValueError, match=pattern):
    model.apply({"params": params}, images, **kw)


# -- the param tree ----------------------------------------------------------------------------

def _shapes(tree: dict) -> dict:
  return {k: np.shape(v) for k, v in peft.flatten(tree).items()}


@pytest.mark.parametrize("method, overrides", [
    ("full", {}), ("prompt", dict(kind="deep", num_tokens=3)),
    ("prompt", dict(kind="shallow", num_tokens=3)), ("ssf", {}),
    ("bias+lora+adapter", dict(adapter_kind="houlsby")),
    ("adapter", dict(kind="shared_zero_init")),
], ids=["full", "deep", "shallow", "ssf", "combo", "shared"])
def test_last_blocks_zero_is_the_default_model(method, overrides, images):
  explicit = _cfg(method, 0, **overrides)
  default = peft.method_config(method, **overrides)
  assert peft.to_spec(default).last_blocks == 0 and peft.to_spec(explicit) == peft.to_spec(default)
  m0, p0 = _model(explicit, images)
  md, pd = _model(default, images)
  assert _shapes(p0) == _shapes(pd)
  np.testing.assert_array_equal(np.asarray(m0.apply({"params": _perturbed(p0)}, images)),
                                np.asarray(md.apply({"params": _perturbed(pd)}, images)))
  # k = depth: the same blocks are tuned; only SSF on the embedding is dropped (not a block).
  mk, pk = _model(_cfg(method, DEPTH, **overrides), images)
  want = {k: v for k, v in _shapes(p0).items() if not k.startswith("embedding_ssf/")}
  assert _shapes(pk) == want
  if method != "ssf":
    np.testing.assert_array_equal(np.asarray(mk.apply({"params": _perturbed(pk)}, images)),
                                  np.asarray(m0.apply({"params": _perturbed(p0)}, images)))


@pytest.mark.parametrize("kind", ["deep", "shallow"])
def test_prompts_with_last_blocks(kind, images):
  model, params = _model(_cfg("prompt", 2, kind=kind, num_tokens=3), images)
  prompts = np.asarray(params["Transformer"]["vpt_prompts"])
  assert prompts.shape == ((2 if kind == "deep" else 1), 3, D)
  seen = _block_inputs(model, params, images)
  assert [x.shape[1] for x in seen] == [1 + PATCHES, 1 + 3 + PATCHES, 1 + 3 + PATCHES]
  # The first tuned block (1) inserts prompt 0 after the class token.
  np.testing.assert_array_equal(np.asarray(seen[1])[:, 1:4], np.broadcast_to(prompts[0], (4, 3, D)))
  before = np.asarray(model.apply({"params": params}, images, stop_block=1))
  np.testing.assert_array_equal(np.asarray(seen[1])[:, :1], before[:, :1])
  np.testing.assert_array_equal(np.asarray(seen[1])[:, 4:], before[:, 1:])
  later = np.asarray(seen[2])[:, 1:4]
  if kind == "deep":  # block 2 replaces them with prompt 1
    np.testing.assert_array_equal(later, np.broadcast_to(prompts[1], (4, 3, D)))
  else:
    assert not np.allclose(later, np.broadcast_to(prompts[0], (4, 3, D)))


def test_peft_modules_only_in_tuned_blocks(images):
  cfg = _cfg("lora+adapter+ssf", 2, adapter_kind="houlsby")
  _, params = _model(cfg, images)
  paths = peft.flatten(params)
  added = [p for p in paths if "_lora/" in p or "adapter_" in p or "_ssf/" in p]
  assert added and not any(p.startswith(("Transformer/encoderblock_0/", "embedding")) for p in added)
  assert {p.split("/")[1] for p in added} == {"encoderblock_1", "encoderblock_2", "encoder_norm_ssf"}
  _, plain = _model(None, images)
  assert {p for p in paths if p.startswith("Transformer/encoderblock_0/")} == {
      p for p in peft.flatten(plain) if p.startswith("Transformer/encoderblock_0/")}


# -- trainable masks and counts (hand count from shapes) ---------------------------------------

# Per encoder block of the tiny model (width D, MLP width MLP):
BLOCK_BIASES = 3 * D + D + 2 * D + MLP + D  # q, k, v (heads x head_dim = D), out, 2 LN, 2 Dense
BLOCK_ALL = (2 * D + 4 * (D * D + D) + 2 * D  # 2 LayerNorms, q/k/v/out kernels + biases
             + D * MLP + MLP + MLP * D + D)   # MLP Dense_0, Dense_1
BLOCK_SSF = 2 * (D + 3 * D + D + D + MLP + D)  # LN_0, q/k/v, out, LN_1, Dense_0, Dense_1
ENCODER_NORM = 2 * D


@pytest.mark.parametrize("method, overrides, k, want", [
    ("head", {}, 2, HEAD),
    ("bias", {}, 2, 2 * BLOCK_BIASES + D + HEAD),  # + encoder_norm bias; not the embedding bias
    ("bias", {}, 1, BLOCK_BIASES + D + HEAD),
    ("lora", dict(rank=4, targets="query,value"), 2, 2 * 2 * (D * 4 + 4 * D) + HEAD),
    ("lora", dict(rank=4, freeze_a=True), 2, 2 * 2 * (4 * D) + HEAD),
    ("adapter", dict(kind="sequential", bottleneck=8), 2, 2 * (D * 8 + 8 + 8 * D + D) + HEAD),
    ("adapter", dict(kind="houlsby", bottleneck=8), 1, 2 * (D * 8 + 8 + 8 * D + D) + HEAD),
    ("prompt", dict(kind="deep", num_tokens=3), 2, 2 * 3 * D + HEAD),
    ("prompt", dict(kind="shallow", num_tokens=3), 2, 3 * D + HEAD),
    ("ssf", {}, 2, 2 * BLOCK_SSF + ENCODER_NORM + HEAD),
    ("full", {}, 2, 2 * BLOCK_ALL + ENCODER_NORM + HEAD),
    ("full", {}, DEPTH, DEPTH * BLOCK_ALL + ENCODER_NORM + HEAD),  # not embedding/cls/posemb
    ("bias+lora", dict(lora_rank=4), 2, 2 * BLOCK_BIASES + D + 2 * 2 * 8 * D + HEAD),
], ids=["head", "bias2", "bias1", "lora2", "ffa_lora2", "sequential2", "houlsby1", "deep2",
        "shallow2", "ssf2", "full2", "full3", "bias+lora2"])
def test_trainable_counts_with_last_blocks(method, overrides, k, want, images):
  cfg = _cfg(method, k, **overrides)
  _, params = _model(cfg, images)
  mask = peft.trainable_mask(params, cfg)
  trainable, _ = peft.split(params, mask)
  assert peft.count(trainable) == want
  first = DEPTH - k
  for path, on in peft.flatten(mask).items():
    if on:
      assert not path.startswith(("embedding", "cls", "Transformer/posembed_input")), path
      assert not any(path.startswith(f"Transformer/encoderblock_{i}/") for i in range(first)), path


def test_full_with_last_blocks_plus_pre_logits(images):
  cfg = _cfg("full", 1)
  _, params = _model(cfg, images, representation_size=16)
  trainable, _ = peft.split(params, peft.trainable_mask(params, cfg))
  assert peft.count(trainable) == BLOCK_ALL + ENCODER_NORM + (D * 16 + 16) + (16 * CLASSES + CLASSES)


@pytest.mark.parametrize("method, overrides, k, want", [
    ("full", {}, 0, 0), ("full", {}, 2, 1), ("full", {}, DEPTH, 0),
    ("bias", {}, 0, 0),  # the embedding bias trains
    ("bias", {}, 2, 1), ("lora", {}, 0, 0), ("lora", {}, 1, 2), ("ssf", {}, 0, 0), ("ssf", {}, 2, 1),
    ("prompt", dict(kind="deep"), 0, 0), ("prompt", dict(kind="deep"), 2, 1),
    ("prompt", dict(kind="shallow"), 1, 2), ("adapter", dict(kind="shared_zero_init"), 2, 1),
    ("head", {}, 0, DEPTH), ("head", {}, 2, DEPTH),
], ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(map(str, x.values())) or "_")
def test_first_trainable_block(method, overrides, k, want, images):
  cfg = _cfg(method, k, **overrides)
  model, params = _model(cfg, images)
  mask = peft.trainable_mask(params, cfg)
  assert peft.first_trainable_block(mask, DEPTH, last_blocks=k) == want
  assert peft.first_trainable_block(mask, last_blocks=k) == want  # depth from the mask
  assert peft.only_head_trainable(mask) == (method == "head")
  if method in ("prompt", "adapter"):  # without last_blocks: conservatively block 0
    assert peft.first_trainable_block(mask, DEPTH) == 0


def test_first_trainable_block_top_only_and_custom(images):
  _, params = _model(None, images, representation_size=16)
  norm = peft.mask_from_patterns(params, [r"^Transformer/encoder_norm/", r"^head/"])
  assert peft.first_trainable_block(norm, DEPTH) == DEPTH and not peft.only_head_trainable(norm)
  pre = peft.mask_from_patterns(params, [r"^pre_logits/", r"^head/"])
  assert peft.first_trainable_block(pre, DEPTH) == DEPTH and not peft.only_head_trainable(pre)
  cls = peft.mask_from_patterns(params, [r"^cls$", r"encoderblock_2/"])
  assert peft.first_trainable_block(cls, DEPTH) == 0
  mid = peft.mask_from_patterns(params, [r"encoderblock_1/MlpBlock_0/Dense_1/bias$"])
  assert peft.first_trainable_block(mid, DEPTH) == 1
  with pytest.raises(ValueError, match="takes a bool mask"):
    peft.first_trainable_block(params, DEPTH)


@pytest.mark.parametrize("method, overrides, k", [
    ("prompt", dict(kind="deep", dropout=0.0), 2),
    ("prompt", dict(kind="shallow", dropout=0.0), 1), ("head", {}, 0),
], ids=["deep", "shallow", "head"])  # bias and LoRA: tests/test_feature_cache.py, through the engine
def test_cached_prefix_gives_the_same_gradients(method, overrides, k, images):
  """What the engine will do: cache the frozen prefix once, train on the rest."""
  cfg = _cfg(method, k, **overrides)
  model, params = _model(cfg, images)
  params = _perturbed(params)
  mask = peft.trainable_mask(params, cfg)
  trainable, frozen = peft.split(params, mask)
  labels = jnp.arange(4) % CLASSES
  s = peft.first_trainable_block(mask, DEPTH, last_blocks=k)

  def loss(t, x, **kw):
    logits = model.apply({"params": peft.merge(t, frozen)}, x, **kw)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  want = jax.grad(loss)(trainable, images)
  if peft.only_head_trainable(mask):
    feats = model.apply({"params": params}, images, return_features=True)
    got = jax.grad(loss)(trainable, feats, from_features=True)
  else:
    tokens = model.apply({"params": params}, images, stop_block=s)
    got = jax.grad(loss)(trainable, tokens, start_block=s)
  for key, g in peft.flatten(want).items():
    assert float(jnp.abs(g).max()) > 0, key
    np.testing.assert_allclose(np.asarray(peft.flatten(got)[key]), np.asarray(g), rtol=1e-5,
                               atol=1e-7, err_msg=key)


# -- bad values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, 2.0, "2", True])
def test_bad_last_blocks_in_the_peft_config(value):
  # A fresh ConfigDict: setting the field of a typed one would already fail for 2.0 or "2".
  cfg = ml_collections.ConfigDict({**peft.method_config("lora").to_dict(), "last_blocks": value})
  with pytest.raises(ValueError, match=r"^peft\.last_blocks must be an integer >= 0"):
    peft.to_spec(cfg)


def test_last_blocks_beyond_the_depth(images):
  cfg = _cfg("lora", DEPTH + 1)
  with pytest.raises(ValueError, match=r"peft\.last_blocks \(4\) exceeds the number of encoder "
                                       r"blocks \(3\)"):
    _model(cfg, images)
  _, params = _model(_cfg("lora", 1), images)
  with pytest.raises(ValueError, match=r"peft\.last_blocks \(4\) exceeds"):
    peft.trainable_mask(params, cfg)


def test_mask_and_model_built_with_different_last_blocks(images):
  _, params = _model(_cfg("lora", 0), images)
  with pytest.raises(ValueError, match=r"peft\.last_blocks=2 but the params hold the PEFT leaf "
                                       r"'Transformer/encoderblock_0/.*lora.*same peft config"):
    peft.trainable_mask(params, _cfg("lora", 2))


def _tiny_config(k: Any) -> Any:
  c = repo_config("tiny").get_config("lora")
  c.model.dtype = "float32"
  c.peft.last_blocks = k
  return c


def test_runner_validation_names_the_field():
  validate_config(_tiny_config(2))  # the tiny preset has depth 2
  with pytest.raises(ConfigError, match=r"^config\.peft\.last_blocks \(3\) exceeds the number of "
                                        r"encoder blocks of the model \(2\); set it to at most 2, "
                                        r"or 0 to tune all blocks$") as e:
    validate_config(_tiny_config(3))
  assert e.value.field == "config.peft.last_blocks"
  with pytest.raises(ConfigError, match=r"^config\.peft\.last_blocks must be an integer >= 0") as e:
    validate_config(_tiny_config(-1))
  assert e.value.field == "config.peft.last_blocks"
