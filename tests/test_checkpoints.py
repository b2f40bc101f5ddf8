"""load_pretrained against the outside references: Hugging Face transformers, timm, Google .npz.

Every parity test builds a small randomly initialised reference model, writes its weights in
the reference's own file layout, loads them with `load_pretrained`, and compares outputs in
float32 with matmul precision "highest" (max abs difference <= 1e-5).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import threading
import urllib.parse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _load_weights

from fedpeft_jax.models import (REGISTRY, CheckpointError, CheckpointInfo, ViT, download,
                                load_pretrained, register_checkpoint, resample_posemb)
from fedpeft_jax.peft import flatten, method_config

TOL = 1e-5
torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _images(n: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random init leaves biases at 0 and LayerNorms at 1; perturb every tensor so each mapping
  (transposes, splits, norms, biases) is exercised."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return module.eval()


def _tiny(**kw) -> ViT:
  cfg = dict(variant=None, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8,
             image_size=32, num_classes=5)
  cfg.update(kw)
  return ViT(**cfg)


def _run(model: ViT, params: dict, x: np.ndarray, **kw) -> np.ndarray:
  return np.asarray(model.apply({"params": params}, jnp.asarray(x), **kw))


def _maxdiff(a: np.ndarray, b: torch.Tensor | np.ndarray) -> float:
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _report(name: str, diff: float) -> None:
  print(f"[parity] {name}: max abs diff {diff:.3e}")
  assert diff <= TOL, f"{name}: max abs diff {diff} > {TOL}"


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------

_HF_CONFIGS = {
    # name: (ViTConfig kwargs, ViT kwargs)
    "h32_d2_p8": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=32, patch_size=8),
                  dict(hidden_size=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8)),
    "h48_d3_p4": (dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                       intermediate_size=96, image_size=32, patch_size=4),
                  dict(hidden_size=48, depth=3, num_heads=3, mlp_dim=96, patch_size=4)),
}


def _hf_config(kw: dict, **extra) -> transformers.ViTConfig:
  # HF's default layer_norm_eps is 1e-12; ViT checkpoints (and our ViT) use 1e-6.
  return transformers.ViTConfig(layer_norm_eps=1e-6, hidden_act="gelu", **kw, **extra)


def _hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """transformers-5 in-memory names -> the names the Hub's files carry."""
  rules = [
      (r"layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
      (r"layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
      (r"layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
      (r"layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
      (r"layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
      (r"layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
      (r"layers\.(\d+)\.layernorm_", r"encoder.layer.\1.layernorm_"),
  ]
  out = {}
  for k, v in state.items():
    for pat, rep in rules:
      k = re.sub(pat, rep, k)
    out[k] = v.contiguous()
  return out


@pytest.mark.parametrize("name", sorted(_HF_CONFIGS))
def test_hf_vitmodel_parity(name: str, tmp_path: Path) -> None:
  hf_kw, our_kw = _HF_CONFIGS[name]
  ref = _perturb(transformers.ViTModel(_hf_config(hf_kw)), seed=1)
  x = _images(size=hf_kw["image_size"])
  with torch.no_grad():
    out = ref(_nchw(x))
  hub = _hub_names(ref.state_dict())
  assert "encoder.layer.0.attention.attention.query.weight" in hub
  assert "pooler.dense.weight" in hub and not any(k.startswith("layers.") for k in hub)
  safetensors.torch.save_file(hub, tmp_path / "hub.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
                              tmp_path / "memory.safetensors")

  # The pooler is Dense+tanh on the class token: our pre_logits.
  model = ViT(variant=None, image_size=hf_kw["image_size"], num_classes=3,
              representation_size=hf_kw["hidden_size"], **our_kw)
  params = load_pretrained(tmp_path / "hub.safetensors", model)
  _report(f"HF ViTModel {name} pooler_output (Hub names)",
          _maxdiff(_run(model, params, x, return_features=True), out.pooler_output))
  params_mem = load_pretrained(tmp_path / "memory.safetensors", model)
  for k, v in flatten(params).items():
    np.testing.assert_array_equal(v, flatten(params_mem)[k], err_msg=k)

  # Without representation_size the pooler is dropped: features = final-norm class token.
  plain = model.clone(representation_size=None)
  params = load_pretrained(tmp_path / "hub.safetensors", plain)
  assert "pre_logits" not in params
  _report(f"HF ViTModel {name} last_hidden_state[:, 0]",
          _maxdiff(_run(plain, params, x, return_features=True), out.last_hidden_state[:, 0]))


def test_hf_classifier_parity_save_pretrained(tmp_path: Path) -> None:
  hf_kw, our_kw = _HF_CONFIGS["h32_d2_p8"]
  ref = _perturb(transformers.ViTForImageClassification(_hf_config(hf_kw, num_labels=7)), seed=2)
  ref.save_pretrained(tmp_path / "snap")  # what the Hub serves: vit.-prefixed Hub names
  keys = safetensors.numpy.load_file(tmp_path / "snap" / "model.safetensors").keys()
  assert "vit.encoder.layer.1.intermediate.dense.weight" in keys and "classifier.weight" in keys
  x = _images(seed=3)
  with torch.no_grad():
    logits = ref(_nchw(x)).logits
  model = ViT(variant=None, image_size=32, num_classes=7, **our_kw)
  params = load_pretrained(tmp_path / "snap", model, keep_head=True)  # snapshot directory
  _report("HF ViTForImageClassification logits (save_pretrained)",
          _maxdiff(_run(model, params, x), logits))

  # Old-style pickled-zip weights (pytorch_model.bin) read through torch.load(weights_only=True).
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  params_bin = load_pretrained(tmp_path / "pytorch_model.bin", model, keep_head=True)
  for k, v in flatten(params).items():
    np.testing.assert_array_equal(v, flatten(params_bin)[k], err_msg=k)

  # Default: a fresh zero head of the model's own num_classes.
  fresh = load_pretrained(tmp_path / "snap", model.clone(num_classes=3))
  assert fresh["head"]["kernel"].shape == (32, 3) and not fresh["head"]["kernel"].any()
  with pytest.raises(CheckpointError, match=r"head/kernel.*\(32, 7\).*\(32, 3\)"):
    load_pretrained(tmp_path / "snap", model.clone(num_classes=3), keep_head=True)


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------

_TIMM = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
             num_classes=6)
_OURS = dict(variant=None, image_size=32, patch_size=8, hidden_size=48, depth=2, num_heads=3,
             mlp_dim=96, num_classes=6)
_POOLS = {
    "token": (dict(global_pool="token"), dict(pool="token")),
    "gap": (dict(global_pool="avg", class_token=False, fc_norm=False), dict(pool="gap")),
    "gap_with_cls": (dict(global_pool="avg", class_token=True, fc_norm=False),
                     dict(pool="gap", class_token=True)),
}


def _timm_model(seed: int, **kw) -> VisionTransformer:
  torch.manual_seed(seed)
  return _perturb(VisionTransformer(**{**_TIMM, **kw}), seed)


@pytest.mark.parametrize("pool", sorted(_POOLS))
def test_timm_parity(pool: str, tmp_path: Path) -> None:
  timm_kw, our_kw = _POOLS[pool]
  ref = _timm_model(4, **timm_kw)
  safetensors.torch.save_file(dict(ref.state_dict()), tmp_path / "timm.safetensors")
  x = _images(seed=5)
  with torch.no_grad():
    logits = ref(_nchw(x))
  model = ViT(**{**_OURS, **our_kw})
  params = load_pretrained(tmp_path / "timm.safetensors", model, keep_head=True)
  _report(f"timm VisionTransformer ({pool}) logits", _maxdiff(_run(model, params, x), logits))


def test_timm_fc_norm_is_refused(tmp_path: Path) -> None:
  ref = VisionTransformer(**{**_TIMM, "global_pool": "avg", "class_token": False})  # fc_norm on
  safetensors.torch.save_file(dict(ref.state_dict()), tmp_path / "m.safetensors")
  with pytest.raises(CheckpointError, match="fc_norm"):
    load_pretrained(tmp_path / "m.safetensors", ViT(**{**_OURS, "pool": "gap"}))


# ------------------------------------------------------------------------------------------------
# Google .npz layouts, written from a timm reference in the original key layout
# ------------------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().astype(np.float32)


def _google_blocks(ref: VisionTransformer, names: tuple[str, str, str, str]) -> list[dict]:
  """Per block {name: array} with Google shapes: query/key/value kernel (D, heads, head_dim),
  out kernel (heads, head_dim, D)."""
  ln0, mha, ln1, mlp = names
  d, h = ref.embed_dim, ref.blocks[0].attn.num_heads
  blocks = []
  for blk in ref.blocks:
    q, k, v = _np(blk.attn.qkv.weight).reshape(3, d, d)
    qb, kb, vb = _np(blk.attn.qkv.bias).reshape(3, d)
    b = {f"{ln0}/scale": _np(blk.norm1.weight), f"{ln0}/bias": _np(blk.norm1.bias),
         f"{ln1}/scale": _np(blk.norm2.weight), f"{ln1}/bias": _np(blk.norm2.bias),
         f"{mha}/out/kernel": _np(blk.attn.proj.weight).T.reshape(h, d // h, d),
         f"{mha}/out/bias": _np(blk.attn.proj.bias),
         f"{mlp}/Dense_0/kernel": _np(blk.mlp.fc1.weight).T, f"{mlp}/Dense_0/bias": _np(blk.mlp.fc1.bias),
         f"{mlp}/Dense_1/kernel": _np(blk.mlp.fc2.weight).T, f"{mlp}/Dense_1/bias": _np(blk.mlp.fc2.bias)}
    for n, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
      b[f"{mha}/{n}/kernel"] = w.T.reshape(d, h, d // h)
      b[f"{mha}/{n}/bias"] = bias.reshape(h, d // h)
    blocks.append(b)
  return blocks


def _google_common(ref: VisionTransformer) -> dict[str, np.ndarray]:
  return {"embedding/kernel": _np(ref.patch_embed.proj.weight).transpose(2, 3, 1, 0),
          "embedding/bias": _np(ref.patch_embed.proj.bias),
          "Transformer/encoder_norm/scale": _np(ref.norm.weight),
          "Transformer/encoder_norm/bias": _np(ref.norm.bias)}


def _timm_features(ref: VisionTransformer, x: np.ndarray) -> torch.Tensor:
  with torch.no_grad():
    return ref.forward_head(ref.forward_features(_nchw(x)), pre_logits=True)


def _assert_timm_reads_same(ref: VisionTransformer, path: Path, x: np.ndarray, **kw) -> None:
  """timm's own Google-npz reader must rebuild `ref` from the file: the layout is the real one."""
  other = VisionTransformer(**{**_TIMM, **kw}).eval()
  _load_weights(other, str(path))
  assert _maxdiff(_timm_features(other, x).numpy(), _timm_features(ref, x)) <= 1e-6


def test_google_original_in21k_layout(tmp_path: Path) -> None:
  ref = _timm_model(6)
  d = ref.embed_dim
  rng = np.random.default_rng(7)
  flat = {**_google_common(ref), "cls": _np(ref.cls_token),
          "Transformer/posembed_input/pos_embedding": _np(ref.pos_embed),
          "pre_logits/kernel": rng.normal(0, 0.2, (d, d)).astype(np.float32),
          "pre_logits/bias": rng.normal(0, 0.2, (d,)).astype(np.float32),
          "head/kernel": np.zeros((d, 21843), np.float32), "head/bias": np.zeros(21843, np.float32)}
  for i, b in enumerate(_google_blocks(ref, ("LayerNorm_0", "MultiHeadDotProductAttention_1",
                                             "LayerNorm_2", "MlpBlock_3"))):
    flat.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
  assert flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (48, 3, 16)
  assert flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (3, 16, 48)
  assert flat["embedding/kernel"].shape == (8, 8, 3, 48)
  path = tmp_path / "ViT-tiny_16.npz"
  np.savez(path, **flat)
  x = _images(seed=8)
  _assert_timm_reads_same(ref, path, x)
  feats = _timm_features(ref, x).numpy()

  # Representation dropped (the usual fine-tuning set-up): features = final-norm class token.
  model = ViT(**_OURS)
  params = load_pretrained(path, model)
  assert "pre_logits" not in params and not params["head"]["kernel"].any()
  _report("Google original .npz (pre-Linen) features", _maxdiff(_run(model, params, x,
                                                                      return_features=True), feats))

  # Representation kept: pre_logits = Dense+tanh on top, and the 21843-way head loads.
  rep = ViT(**{**_OURS, "representation_size": d, "num_classes": 21843})
  params = load_pretrained(path, rep, keep_head=True)
  want = np.tanh(feats @ flat["pre_logits/kernel"] + flat["pre_logits/bias"])
  _report("Google original .npz pre_logits", _maxdiff(_run(rep, params, x, return_features=True),
                                                       want))
  with pytest.raises(CheckpointError, match=r"21843 classes.*num_classes=6"):
    load_pretrained(path, rep.clone(num_classes=6), keep_head=True)
  with pytest.raises(CheckpointError, match="representation_size=48"):
    load_pretrained(path, ViT(**{**_OURS, "num_classes": 21843}), keep_head=True)


def test_big_vision_stacked_layout(tmp_path: Path) -> None:
  # big_vision adds the position embedding before the class token is prepended: timm's
  # no_embed_class=True is the same model.
  ref = _timm_model(9, no_embed_class=True)
  assert tuple(ref.pos_embed.shape) == (1, 16, 48)
  blocks = _google_blocks(ref, ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                                "MlpBlock_0"))
  flat = {**_google_common(ref), "cls": _np(ref.cls_token), "pos_embedding": _np(ref.pos_embed),
          "head/kernel": _np(ref.head.weight).T, "head/bias": _np(ref.head.bias)}
  flat.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
  path = tmp_path / "bv.npz"
  np.savez(path, **{f"params/{k}": v for k, v in flat.items()})
  x = _images(seed=10)
  _assert_timm_reads_same(ref, path, x, no_embed_class=True)
  model = ViT(**_OURS)
  params = load_pretrained(path, model, keep_head=True)
  np.testing.assert_array_equal(params["Transformer"]["posembed_input"]["pos_embedding"][:, 0], 0)
  with torch.no_grad():
    logits = ref(_nchw(x))
  _report("big_vision stacked .npz (params/, no class slot) logits",
          _maxdiff(_run(model, params, x), logits))


def test_big_vision_gap_and_linen_layouts(tmp_path: Path) -> None:
  ref = _timm_model(11, **_POOLS["gap"][0])
  flat = {**_google_common(ref), "pos_embedding": _np(ref.pos_embed),
          "head/kernel": _np(ref.head.weight).T, "head/bias": _np(ref.head.bias)}
  for i, b in enumerate(_google_blocks(ref, ("LayerNorm_0", "MultiHeadDotProductAttention_0",
                                             "LayerNorm_1", "MlpBlock_0"))):
    flat.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
  np.savez(tmp_path / "bv_gap.npz", **{f"params/{k}": v for k, v in flat.items()})
  x = _images(seed=12)
  model = ViT(**{**_OURS, "pool": "gap"})
  params = load_pretrained(tmp_path / "bv_gap.npz", model, keep_head=True)
  with torch.no_grad():
    logits = ref(_nchw(x))
  _report("big_vision gap .npz logits", _maxdiff(_run(model, params, x), logits))

  # Linen-converted layout (AugReg-style names as our ViT stores them), with an 'opt/target/'
  # prefix: a round trip of our own params is exact.
  ours = ViT(**_OURS)
  shapes = jax.eval_shape(ours.init, jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(3)
  theirs = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  np.savez(tmp_path / "linen.npz", **{f"opt/target/{k}": np.asarray(v)
                                      for k, v in flatten(theirs).items()})
  back = load_pretrained(tmp_path / "linen.npz", ours, keep_head=True)
  for k, v in flatten(theirs).items():
    np.testing.assert_array_equal(np.asarray(v), flatten(back)[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Position-embedding resampling
# ------------------------------------------------------------------------------------------------

def test_posemb_resampling(tmp_path: Path) -> None:
  ref = _timm_model(13)
  safetensors.torch.save_file(dict(ref.state_dict()), tmp_path / "t.safetensors")
  src = _np(ref.pos_embed)  # (1, 1 + 4*4, 48)

  same = load_pretrained(tmp_path / "t.safetensors", ViT(**_OURS))
  np.testing.assert_array_equal(same["Transformer"]["posembed_input"]["pos_embedding"], src)
  np.testing.assert_array_equal(resample_posemb(src, 4, num_prefix=1), src)  # same grid: identity

  big = ViT(**{**_OURS, "image_size": 64})  # grid 4 -> 8
  params = load_pretrained(tmp_path / "t.safetensors", big, keep_head=True)
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 65, 48)
  np.testing.assert_array_equal(pe[:, 0], src[:, 0])  # class slot untouched
  grid = torch.from_numpy(src[:, 1:].reshape(1, 4, 4, 48)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
  assert _maxdiff(pe[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 64, 48)) <= 1e-6
  # The whole model at 64 px: timm's ViT at img_size=64 with the same weights and timm's own
  # bilinear resampling of pos_embed gives the same logits.
  state = dict(ref.state_dict())
  state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [8, 8], num_prefix_tokens=1,
                                              interpolation="bilinear", antialias=True)
  big_ref = VisionTransformer(**{**_TIMM, "img_size": 64}).eval()
  big_ref.load_state_dict(state)
  x = _images(size=64, seed=16)
  with torch.no_grad():
    logits = big_ref(_nchw(x))
  _report("timm at 64 px, pos_embed resampled 4x4 -> 8x8, logits",
          _maxdiff(_run(big, params, x), logits))

  # Shrinking 8x8 -> 3x3 (antialiased: every old position contributes): timm's resampler,
  # bilinear with antialias, is the reference; the class slot is kept.
  rng = np.random.default_rng(17)
  wide = rng.normal(size=(1, 1 + 64, 4)).astype(np.float32)
  small = resample_posemb(wide, 3, num_prefix=1)
  want = resample_abs_pos_embed(torch.from_numpy(wide), [3, 3], num_prefix_tokens=1,
                                interpolation="bilinear", antialias=True)
  assert small.shape == (1, 10, 4)
  np.testing.assert_array_equal(small[:, 0], wide[:, 0])
  assert _maxdiff(small, want) <= 1e-6


# ------------------------------------------------------------------------------------------------
# PEFT parameters come from the model's init, backbone from the checkpoint
# ------------------------------------------------------------------------------------------------

def test_peft_extras_from_init(tmp_path: Path) -> None:
  ref = _timm_model(14)
  safetensors.torch.save_file(dict(ref.state_dict()), tmp_path / "t.safetensors")
  plain = load_pretrained(tmp_path / "t.safetensors", ViT(**_OURS))
  model = ViT(**_OURS, peft=method_config("lora+prompt", lora_rank=2))
  rng = jax.random.PRNGKey(21)
  params = load_pretrained(tmp_path / "t.safetensors", model, rng=rng)
  init = flatten(model.init(rng, jnp.zeros((1, 32, 32, 3)))["params"])
  flat, base = flatten(params), flatten(plain)
  assert flat.keys() == init.keys()
  extras = [k for k in flat if k not in base]
  assert any("_lora" in k for k in extras) and any("vpt_prompts" in k for k in extras)
  for k, v in flat.items():
    assert v.dtype == np.float32, k
    np.testing.assert_array_equal(v, np.asarray(init[k]) if k in extras else base[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear exception naming the key(s) and shapes
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
  return {k: v.contiguous() for k, v in _timm_model(15).state_dict().items()}


def _save(tmp_path: Path, state: dict, name: str = "m.safetensors") -> Path:
  safetensors.torch.save_file(state, tmp_path / name)
  return tmp_path / name


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    load_pretrained(tmp_path / "nope.npz", ViT(**_OURS))
  with pytest.raises(FileNotFoundError, match="registered names"):
    load_pretrained("vit_not_a_name", ViT(**_OURS))
  (tmp_path / "junk.npz").write_bytes(b"certainly not a checkpoint\n" * 4)  # name says npz
  with pytest.raises(CheckpointError, match="unknown checkpoint format"):
    load_pretrained(tmp_path / "junk.npz", ViT(**_OURS))
  safetensors.numpy.save_file({"foo.weight": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
  with pytest.raises(CheckpointError, match="layout not recognised.*foo.weight"):
    load_pretrained(tmp_path / "x.safetensors", ViT(**_OURS))


def test_pickles_are_refused(tmp_path: Path, timm_state, capfd) -> None:
  np.savez(tmp_path / "obj.npz", **{"embedding/kernel": np.array([{"x": 1}], dtype=object)})
  with pytest.raises(CheckpointError, match=r"'embedding/kernel' is an object.*allow_pickle"):
    load_pretrained(tmp_path / "obj.npz", ViT(**_OURS))

  class Evil:
    def __reduce__(self):
      return (print, ("PWNED",))
  torch.save({**timm_state, "evil": Evil()}, tmp_path / "evil.pth")
  with pytest.raises(CheckpointError, match="weights_only=True"):
    load_pretrained(tmp_path / "evil.pth", ViT(**_OURS))
  assert "PWNED" not in capfd.readouterr().out
  # A plain state dict in a .pth loads (and through the same reader as .bin), zip or legacy.
  torch.save({"state_dict": timm_state}, tmp_path / "ok.pth")
  want = load_pretrained(tmp_path / "ok.pth", ViT(**_OURS))
  torch.save(timm_state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  got = load_pretrained(tmp_path / "legacy.pth", ViT(**_OURS))
  np.testing.assert_array_equal(got["cls"], want["cls"])


def test_bfloat16_safetensors(tmp_path: Path, timm_state) -> None:
  half = {k: v.to(torch.bfloat16) for k, v in timm_state.items()}
  params = load_pretrained(_save(tmp_path, half), ViT(**_OURS))
  got = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, half["blocks.0.mlp.fc1.weight"].float().numpy().T)


def test_key_and_shape_errors(tmp_path: Path, timm_state) -> None:
  state = dict(timm_state)
  del state["blocks.1.mlp.fc2.bias"]
  with pytest.raises(CheckpointError,
                     match=r"missing keys.*Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias \(48,\)"):
    load_pretrained(_save(tmp_path, state), ViT(**_OURS))

  state = {**timm_state, "blocks.0.ls1.gamma": torch.ones(48)}
  with pytest.raises(CheckpointError, match=r"blocks\.0\.ls1\.gamma.*LayerScale"):
    load_pretrained(_save(tmp_path, state), ViT(**_OURS))

  with pytest.raises(CheckpointError, match=r"unexpected keys.*encoderblock_2"):
    load_pretrained(_save(tmp_path, {**timm_state, **{k.replace("blocks.1.", "blocks.2."): v.clone()
                                                       for k, v in timm_state.items()
                                                       if k.startswith("blocks.1.")}}),
                    ViT(**_OURS))

  wide = ViT(**{**_OURS, "mlp_dim": 128})
  with pytest.raises(CheckpointError,
                     match=r"shape mismatch.*MlpBlock_0/Dense_0/kernel: \(48, 96\) vs \(48, 128\)"):
    load_pretrained(_save(tmp_path, timm_state), wide)

  with pytest.raises(CheckpointError, match="has a class token.*class_token=True"):
    load_pretrained(_save(tmp_path, timm_state), ViT(**{**_OURS, "pool": "gap"}))

  with pytest.raises(CheckpointError, match="no head"):
    load_pretrained(_save(tmp_path, {k: v for k, v in timm_state.items()
                                     if not k.startswith("head.")}), ViT(**_OURS), keep_head=True)


# ------------------------------------------------------------------------------------------------
# Registry and download (file:// and a local HTTP server; never the internet)
# ------------------------------------------------------------------------------------------------

class _Server:
  """A quiet HTTP server on 127.0.0.1 that counts GET requests."""

  def __init__(self, root: Path):
    self.hits = 0
    outer = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        outer.hits += 1
        super().do_GET()

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()

  def url(self, name: str) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


def test_download_registry_and_cache(tmp_path: Path, timm_state) -> None:
  src = _save(tmp_path, timm_state, "served.safetensors")
  digest = hashlib.sha256(src.read_bytes()).hexdigest()
  size = src.stat().st_size
  cache = tmp_path / "cache"
  model = ViT(**_OURS)
  want = load_pretrained(src, model)

  with _Server(tmp_path) as server:
    url = server.url("served.safetensors")
    path = download(url, cache, sha256=digest, size=size, progress=False)
    assert path.parent == cache and path.read_bytes() == src.read_bytes()
    assert (cache / (path.name + ".sha256")).read_text().strip() == digest
    again = download(url, cache, progress=False)  # cached: no second request
    assert again == path and server.hits == 1

    # Wrong checksum: an error, and nothing (not even a temp file) left in the cache.
    with pytest.raises(CheckpointError, match="sha256"):
      download(server.url("served.safetensors?x"), tmp_path / "c2", sha256="0" * 64,
                           progress=False)
    assert list((tmp_path / "c2").iterdir()) == []

  # A registered name with a file:// URL goes through the same path.
  info = CheckpointInfo("tiny_test_ckpt", src.as_uri(), {"variant": None}, sha256=digest, size=size)
  register_checkpoint(info, overwrite=True)
  try:
    params = load_pretrained("tiny_test_ckpt", model, cache_dir=tmp_path / "c3", progress=False)
    for k, v in flatten(want).items():
      np.testing.assert_array_equal(v, flatten(params)[k], err_msg=k)
    # A corrupted cache entry is noticed (checksum) and fetched again.
    cached = next(p for p in (tmp_path / "c3").iterdir() if p.suffix == ".safetensors")
    cached.write_bytes(b"\0" * 10)
    load_pretrained("tiny_test_ckpt", model, cache_dir=tmp_path / "c3", progress=False)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest
  finally:
    REGISTRY.pop("tiny_test_ckpt")

  # Plain http to a non-loopback host is refused before any connection is made.
  with pytest.raises(CheckpointError, match="plain http"):
    download("http://example.com/ViT-B_16.npz", cache)
  for name in ("vit_b16_in21k", "vit_b16_augreg_in21k", "vit_ti16_augreg_in21k"):
    assert urllib.parse.urlparse(REGISTRY[name].url).scheme == "https"
  assert REGISTRY["vit_b16_in21k"].url.endswith("/imagenet21k/ViT-B_16.npz")


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
  message = str(exc.value)
  assert "\n" not in message and message.strip() == message and message, message
  return message


def _cache_files(cache: Path) -> list[str]:
  return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_failed_downloads_are_one_line_errors_and_leave_no_file(tmp_path: Path) -> None:
  """Refused connection, HTTP error, a body cut short, no answer: each a CheckpointError that
  names the URL and the way out (a local path), with nothing left in the cache."""
  cache = tmp_path / "cache"

  # Nobody listens on the port: connection refused.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]
  url = f"http://127.0.0.1:{closed_port}/x.npz"
  with pytest.raises(CheckpointError) as e:
    download(url, cache, progress=False)
  assert url in _one_line_error(e) and "local path" in str(e.value)
  assert _cache_files(cache) == []

  with _Server(tmp_path / "empty_root") as server:  # a real server: 404
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(CheckpointError, match="HTTP 404") as e:
      download(server.url("missing.npz"), cache, progress=False)
    assert server.url("missing.npz") in _one_line_error(e)
  assert _cache_files(cache) == []

  # Content-Length promises 1000 bytes, 10 arrive, then the connection closes.
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve_short() -> None:
      conn, _ = listener.accept()
      with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)

    thread = threading.Thread(target=serve_short, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/short.npz"
    with pytest.raises(CheckpointError) as e:
      download(url, cache, progress=False)
    thread.join(10)
  assert url in _one_line_error(e)
  assert _cache_files(cache) == []

  # The server accepts the connection (kernel backlog) but never answers.
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.npz"
    with pytest.raises(CheckpointError, match=r"no answer within 0\.5 s") as e:
      download(url, cache, progress=False, timeout=0.5)
  assert url in _one_line_error(e)
  assert _cache_files(cache) == []

  # A file:// URL to nothing.
  with pytest.raises(CheckpointError, match="No such file") as e:
    download((tmp_path / "absent.npz").as_uri(), cache, progress=False)
  _one_line_error(e)
  assert _cache_files(cache) == []
