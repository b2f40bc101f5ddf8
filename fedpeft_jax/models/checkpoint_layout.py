"""Checkpoint layouts -> our Linen `ViT`: Google/big_vision, timm and Hugging Face names onto
the '/'-joined names of our params, and those fitted to one model (position-embedding
resampling, a fresh head, PEFT parameters from the model's init).

Layouts handled (told from the keys):

* Google `.npz`: the original ImageNet-21k release (pre-Linen names `MultiHeadDotProductAttention_1`,
  `LayerNorm_2`, `MlpBlock_3`, `pre_logits`, 21843-way head), the AugReg releases, Linen-converted
  files, and the big_vision layout (`params/` prefix, top-level `pos_embedding` without the class
  slot, optionally a stacked `Transformer/encoderblock`).
* timm (`blocks.{i}.attn.qkv`, `pos_embed`, `cls_token`, ...).
* Hugging Face ViT, with the Hub's names (`encoder.layer.{i}.attention.attention.query`, ...) or
  the transformers-5 in-memory names (`layers.{i}.attention.q_proj`, `mlp.fc1`, ...), with or
  without the `vit.` prefix.

Every model leaf is either taken from the checkpoint or, for PEFT parameters no checkpoint has,
from the model's own init; anything else is an error that names the keys and shapes.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax.models.checkpoint_files import CheckpointError
from fedpeft_jax.peft.partition import SEP, flatten, unflatten

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Layouts -> canonical Linen names
# ----------------------------------------------------------------------------------------------
# Canonical: '/'-joined names of our ViT; pos_embedding always carries the class slot when the
# checkpoint has a class token (zeros where the source had none: such models add no position
# embedding to the class token, which is the same function).

_POS = "Transformer/posembed_input/pos_embedding"
_BLOCK = "Transformer/encoderblock_{}"
_HEAD_KEYS = ("head/kernel", "head/bias")


def _is_square(n: int) -> bool:
  return n >= 0 and math.isqrt(n) ** 2 == n


def _pos_has_class_slot(n_tokens: int, has_cls: bool, key: str) -> bool:
  if has_cls and n_tokens > 1 and _is_square(n_tokens - 1):
    return True
  if _is_square(n_tokens):
    return False
  raise CheckpointError(f"position embedding {key!r} has {n_tokens} tokens: neither a square "
                        "patch grid nor a class slot plus a square grid (register tokens and "
                        "non-square grids are not supported)")


def _normalise_pos(ckpt: dict[str, np.ndarray], key: str) -> None:
  """Reshape the stored position embedding to (1, tokens, D) with a class slot iff `cls`."""
  pos = ckpt[_POS]
  if pos.ndim == 2:
    pos = pos[None]
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise CheckpointError(f"position embedding {key!r} has shape {pos.shape}, expected "
                          "(1, tokens, hidden)")
  has_cls = "cls" in ckpt
  if has_cls and not _pos_has_class_slot(pos.shape[1], True, key):
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  elif not has_cls:
    _pos_has_class_slot(pos.shape[1], False, key)
  ckpt[_POS] = pos


def _renumber_linen(names: list[str]) -> dict[str, str]:
  """Pre-Linen -> Linen submodule names inside one scope.

  Pre-Linen Flax numbered children across types (LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3); Linen numbers per type. Renumbering each type by order maps both
  conventions onto Linen names (and leaves Linen names unchanged).
  """
  by_type: dict[str, list[tuple[int, str]]] = {}
  for name in names:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if m:
      by_type.setdefault(m.group(1), []).append((int(m.group(2)), name))
  mapping = {}
  for base, items in by_type.items():
    for new_index, (_, old) in enumerate(sorted(items)):
      mapping[old] = f"{base}_{new_index}"
  return mapping


def _from_google(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  anchors = [k for k in raw if k == "embedding/kernel" or k.endswith("/embedding/kernel")]
  prefix = min(anchors, key=len)[: -len("embedding/kernel")]
  flat = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
  ignored = len(raw) - len(flat)
  if ignored:
    log.info("ignoring %d checkpoint entries outside %r (optimizer state etc.)", ignored, prefix)

  if "pos_embedding" in flat:  # big_vision: top level, no class slot
    if _POS in flat:
      raise CheckpointError(f"checkpoint has both {prefix}pos_embedding and {prefix}{_POS}")
    flat[_POS] = flat.pop("pos_embedding")

  stacked = "Transformer/encoderblock/"
  if any(k.startswith(stacked) for k in flat):  # big_vision scan layout: leading depth axis
    depths = {v.shape[0] for k, v in flat.items() if k.startswith(stacked)}
    if len(depths) != 1:
      raise CheckpointError(f"stacked encoderblock leaves disagree on depth: {sorted(depths)}")
    depth = depths.pop()
    for key in [k for k in flat if k.startswith(stacked)]:
      value = flat.pop(key)
      rest = key[len(stacked):]
      for i in range(depth):
        flat[f"{_BLOCK.format(i)}/{rest}"] = value[i]

  out: dict[str, np.ndarray] = {}
  blocks: dict[str, dict[str, np.ndarray]] = {}
  for key, value in flat.items():
    m = re.match(r"^(Transformer/encoderblock_\d+)/(.*)$", key)
    if m:
      blocks.setdefault(m.group(1), {})[m.group(2)] = value
    else:
      out[key] = value
  for block, leaves in blocks.items():
    mapping = _renumber_linen(sorted({k.split(SEP)[0] for k in leaves}))
    for key, value in leaves.items():
      first, _, rest = key.partition(SEP)
      out[f"{block}/{mapping.get(first, first)}/{rest}" if rest else key] = value
  if _POS in out:
    _normalise_pos(out, "position embedding")
  return out


# Torch-style state dicts: (regex over the key without .weight/.bias, target module, kind).
_BLK = r"(?:encoder\.layer|layers)\.(\d+)\."
_HF_RULES: list[tuple[str, str, str]] = [
    (r"embeddings\.patch_embeddings\.projection", "embedding", "conv"),
    (_BLK + r"attention\.(?:attention\.query|q_proj)", "{b}/MultiHeadDotProductAttention_0/query", "heads_in"),
    (_BLK + r"attention\.(?:attention\.key|k_proj)", "{b}/MultiHeadDotProductAttention_0/key", "heads_in"),
    (_BLK + r"attention\.(?:attention\.value|v_proj)", "{b}/MultiHeadDotProductAttention_0/value", "heads_in"),
    (_BLK + r"attention\.(?:output\.dense|o_proj)", "{b}/MultiHeadDotProductAttention_0/out", "heads_out"),
    (_BLK + r"(?:intermediate\.dense|mlp\.fc1)", "{b}/MlpBlock_0/Dense_0", "dense"),
    (_BLK + r"(?:output\.dense|mlp\.fc2)", "{b}/MlpBlock_0/Dense_1", "dense"),
    (_BLK + r"layernorm_before", "{b}/LayerNorm_0", "norm"),
    (_BLK + r"layernorm_after", "{b}/LayerNorm_1", "norm"),
    (r"layernorm", "Transformer/encoder_norm", "norm"),
    (r"pooler\.dense", "pre_logits", "dense"),
    (r"classifier", "head", "dense"),
]
_HF_PARAMS = {"embeddings.cls_token": "cls", "embeddings.position_embeddings": _POS}
_HF_IGNORED = {"embeddings.mask_token"}  # only used by masked-image modelling

_TIMM_RULES: list[tuple[str, str, str]] = [
    (r"patch_embed\.proj", "embedding", "conv"),
    (r"blocks\.(\d+)\.norm1", "{b}/LayerNorm_0", "norm"),
    (r"blocks\.(\d+)\.attn\.qkv", "{b}/MultiHeadDotProductAttention_0", "qkv"),
    (r"blocks\.(\d+)\.attn\.proj", "{b}/MultiHeadDotProductAttention_0/out", "heads_out"),
    (r"blocks\.(\d+)\.norm2", "{b}/LayerNorm_1", "norm"),
    (r"blocks\.(\d+)\.mlp\.fc1", "{b}/MlpBlock_0/Dense_0", "dense"),
    (r"blocks\.(\d+)\.mlp\.fc2", "{b}/MlpBlock_0/Dense_1", "dense"),
    (r"norm", "Transformer/encoder_norm", "norm"),
    (r"pre_logits\.fc", "pre_logits", "dense"),
    (r"head", "head", "dense"),
]
_TIMM_PARAMS = {"cls_token": "cls", "pos_embed": _POS}
_TIMM_HINTS = {
    "fc_norm": "timm's fc_norm (LayerNorm after pooling) has no counterpart here; "
               "this ViT applies encoder_norm before pooling (timm fc_norm=False)",
    "reg_token": "register tokens are not supported",
    "ls1": "LayerScale (init_values) is not supported",
    "norm_pre": "pre-norm (CLIP-style norm_pre) is not supported",
    "attn_pool": "attention-pool (MAP) heads are not supported",
}


def _convert_torch(raw: dict[str, np.ndarray], rules: list[tuple[str, str, str]],
                   params: dict[str, str], ignored: set[str], num_heads: int,
                   hints: Mapping[str, str]) -> dict[str, np.ndarray]:
  """Map a PyTorch-style state dict onto canonical names, transposing to Flax layouts."""
  compiled = [(re.compile(f"^{pattern}$"), target, kind) for pattern, target, kind in rules]
  out: dict[str, np.ndarray] = {}
  unknown = []

  def put(key: str, value: np.ndarray, source: str) -> None:
    if key in out:
      raise CheckpointError(f"checkpoint maps two tensors onto {key!r} (second: {source!r})")
    out[key] = value

  def split_heads(key: str, w: np.ndarray) -> tuple[int, int]:
    width = w.shape[0]
    if width % num_heads:
      raise CheckpointError(f"{key!r} with shape {w.shape}: output width {width} is not "
                            f"divisible by the model's num_heads={num_heads}")
    return num_heads, width // num_heads

  for key, w in raw.items():
    if key in params:
      put(params[key], w, key)
      continue
    if key in ignored:
      continue
    stem, _, leaf = key.rpartition(".")
    for rx, target, kind in compiled:
      m = rx.match(stem) if leaf in ("weight", "bias") else None
      if m:
        break
    else:
      unknown.append(key)
      continue
    mod = target.format(b=_BLOCK.format(m.group(1))) if m.groups() else target
    is_w = leaf == "weight"
    if kind == "norm":
      put(f"{mod}/{'scale' if is_w else 'bias'}", w, key)
    elif kind == "conv":
      if is_w and w.ndim != 4:
        raise CheckpointError(f"{key!r} has shape {w.shape}, expected (hidden, channels, p, p)")
      put(f"{mod}/{'kernel' if is_w else 'bias'}", w.transpose(2, 3, 1, 0) if is_w else w, key)
    elif kind == "dense":
      put(f"{mod}/{'kernel' if is_w else 'bias'}", w.T if is_w else w, key)
    elif kind in ("heads_in", "qkv"):
      parts = [(mod, w)]
      if kind == "qkv":
        if w.shape[0] % 3:
          raise CheckpointError(f"fused {key!r} has shape {w.shape}; first dim not divisible by 3")
        parts = [(f"{mod}/{n}", p) for n, p in zip(("query", "key", "value"),
                                                     np.split(w, 3, axis=0))]
      for name, p in parts:
        heads, head_dim = split_heads(key, p)
        if is_w:
          put(f"{name}/kernel", p.T.reshape(p.shape[1], heads, head_dim), key)
        else:
          put(f"{name}/bias", p.reshape(heads, head_dim), key)
    elif kind == "heads_out":
      if is_w:
        heads, head_dim = split_heads(key, w.T)
        put(f"{mod}/kernel", w.T.reshape(heads, head_dim, w.shape[0]), key)
      else:
        put(f"{mod}/bias", w, key)
  if unknown:
    notes = sorted({v for k, v in hints.items() for u in unknown if re.search(rf"(^|\.){k}(\.|$)", u)})
    raise CheckpointError(f"unexpected checkpoint keys with no place in this ViT: {unknown[:10]}"
                          + (f" ({len(unknown)} in all)" if len(unknown) > 10 else "")
                          + (f"; {'; '.join(notes)}" if notes else ""))
  if _POS in out:
    _normalise_pos(out, next(k for k, v in params.items() if v == _POS))
  return out


def _layout(raw: Mapping[str, np.ndarray]) -> str:
  keys = set(raw)
  if any(k == "embedding/kernel" or k.endswith("/embedding/kernel") for k in keys):
    return "google"
  if "patch_embed.proj.weight" in keys:
    return "timm"
  if {"embeddings.patch_embeddings.projection.weight",
      "vit.embeddings.patch_embeddings.projection.weight"} & keys:
    return "hf"
  raise CheckpointError("checkpoint layout not recognised (expected Google/big_vision "
                        "'embedding/kernel', timm 'patch_embed.proj.weight' or Hugging Face "
                        f"'embeddings.patch_embeddings.projection.weight'); keys: {sorted(keys)[:8]}")


def convert_checkpoint(raw: Mapping[str, np.ndarray], num_heads: int) -> tuple[dict, str]:
  """Raw checkpoint -> ({canonical '/'-joined name: array}, layout name).

  `num_heads` splits the fused projections of PyTorch layouts into (heads, head_dim).
  """
  raw = dict(raw)
  layout = _layout(raw)
  if layout == "google":
    return _from_google(raw), layout
  if layout == "timm":
    return _convert_torch(raw, _TIMM_RULES, _TIMM_PARAMS, set(), num_heads, _TIMM_HINTS), layout
  if any(k.startswith("vit.") for k in raw):
    outside = [k for k in raw if not k.startswith("vit.") and not k.startswith("classifier.")]
    if outside:
      raise CheckpointError(f"unexpected checkpoint keys beside the 'vit.' model: {outside[:10]}")
    raw = {k[4:] if k.startswith("vit.") else k: v for k, v in raw.items()}
  return _convert_torch(raw, _HF_RULES, _HF_PARAMS, _HF_IGNORED, num_heads, {}), "hf"


# ----------------------------------------------------------------------------------------------
# Fitting a checkpoint to a model
# ----------------------------------------------------------------------------------------------

def resample_posemb(posemb: np.ndarray, grid: int, num_prefix: int) -> np.ndarray:
  """(1, prefix + g*g, D) -> (1, prefix + grid*grid, D); prefix (class) slots kept as they are.

  Bilinear interpolation with half-pixel centres (`jax.image.resize`): each embedding is taken
  to sit at the centre of its patch, which is where it sits when the image is resized, so
  upsampling equals torch's `F.interpolate(mode='bilinear', align_corners=False)` (what timm's
  loader of the Google .npz files does). Bilinear never overshoots the learned values, unlike
  bicubic; when shrinking, the triangle kernel is widened (antialiasing) so every old position
  contributes instead of a few being sampled.
  """
  posemb = np.asarray(posemb, np.float32)
  prefix, tokens = posemb[:, :num_prefix], posemb[:, num_prefix:]
  old = math.isqrt(tokens.shape[1])
  if old * old != tokens.shape[1]:
    raise CheckpointError(f"position embedding grid of {tokens.shape[1]} tokens is not square")
  if old == grid:
    return posemb
  width = tokens.shape[-1]
  with jax.default_matmul_precision("highest"):
    resized = jax.image.resize(jnp.asarray(tokens.reshape(old, old, width)), (grid, grid, width),
                               method="bilinear", antialias=True)
  resized = np.asarray(resized, np.float32).reshape(1, grid * grid, width)
  return np.concatenate([prefix, resized], axis=1)


def _shape_str(shape: Any) -> str:
  return str(tuple(int(d) for d in shape))


def fit_checkpoint(ckpt: Mapping[str, np.ndarray], model: Any, keep_head: bool, rng: jax.Array,
                   where: str) -> dict:
  """Canonical checkpoint leaves (`convert_checkpoint`) -> the params pytree of `model`.

  The model's structure (`jax.eval_shape` of `model.init`) is the target, leaf for leaf: the
  position embedding is resampled when the grid differs, the head is a fresh zero one unless
  `keep_head`, PEFT parameters come from `model.init(rng, ...)`, and any other difference is a
  CheckpointError naming the keys and both shapes (`where` names the checkpoint in it).
  """
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  target = flatten(jax.eval_shape(model.init, rng, dummy)["params"])
  backbone = flatten(jax.eval_shape(model.clone(peft=None).init, rng, dummy)["params"])
  extras = [k for k in target if k not in backbone]
  ckpt = dict(ckpt)
  out: dict[str, np.ndarray] = {}

  # Class token: the model and the checkpoint must agree (no silent dropping).
  if ("cls" in target) != ("cls" in ckpt):
    if "cls" in ckpt:
      raise CheckpointError(f"{where}: the checkpoint has a class token ('cls', shape "
                            f"{_shape_str(ckpt['cls'].shape)}) but the model has none; build the "
                            "ViT with class_token=True (pool='gap' may still be used)")
    raise CheckpointError(f"{where}: the model needs a class token ('cls', shape "
                          f"{_shape_str(target['cls'].shape)}) but the checkpoint has none; build "
                          "the ViT with pool='gap', class_token=False")

  # Position embedding: resample the grid when it differs.
  if _POS in ckpt and _POS in target:
    want = tuple(target[_POS].shape)
    have = ckpt[_POS].shape
    prefix = 1 if "cls" in target else 0
    if have[-1] == want[-1] and have[1] != want[1]:
      grid = math.isqrt(want[1] - prefix)
      ckpt[_POS] = resample_posemb(ckpt[_POS], grid, prefix)
      log.info("resampled %s from %s to %s", _POS, have, want)

  # Head: a fresh zero head unless keep_head.
  has_head = all(k in ckpt for k in _HEAD_KEYS)
  if keep_head:
    if not has_head:
      raise CheckpointError(f"{where}: keep_head=True but the checkpoint has no head "
                            "(head/kernel, head/bias)")
    have, want = ckpt["head/kernel"].shape, target["head/kernel"].shape
    if tuple(have) != tuple(want):
      raise CheckpointError(f"{where}: keep_head=True but the checkpoint head 'head/kernel' has "
                            f"shape {_shape_str(have)} ({have[-1]} classes) and the model's has "
                            f"{_shape_str(want)} (num_classes={want[-1]})")
    if "pre_logits/kernel" in ckpt and "pre_logits/kernel" not in target:
      raise CheckpointError(f"{where}: keep_head=True but the model drops the checkpoint's "
                            "pre_logits layer that the head was trained on; build the ViT with "
                            f"representation_size={ckpt['pre_logits/kernel'].shape[-1]}")
  else:
    for k in _HEAD_KEYS:
      ckpt.pop(k, None)
      out[k] = np.zeros(target[k].shape, np.float32)

  # pre_logits: kept when the model has representation_size, dropped otherwise.
  if "pre_logits/kernel" not in target:
    for k in ("pre_logits/kernel", "pre_logits/bias"):
      if ckpt.pop(k, None) is not None:
        log.info("dropping %s: the model has representation_size=None", k)

  missing = [k for k in backbone if k not in out and k not in ckpt]
  unexpected = [k for k in ckpt if k not in backbone]
  if missing or unexpected:
    msg = [f"{where}: checkpoint does not fit the model"]
    if missing:
      msg.append("missing keys (model shapes): "
                 + ", ".join(f"{k} {_shape_str(target[k].shape)}" for k in missing[:10])
                 + (f" ... ({len(missing)} in all)" if len(missing) > 10 else ""))
    if unexpected:
      msg.append("unexpected keys (checkpoint shapes): "
                 + ", ".join(f"{k} {_shape_str(ckpt[k].shape)}" for k in unexpected[:10])
                 + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 10 else ""))
      if any(k.startswith("MAPHead") for k in unexpected):
        msg.append("MAP (attention-pool) heads are not supported")
    raise CheckpointError("; ".join(msg))
  mismatched = [k for k in backbone if k not in out
                and tuple(ckpt[k].shape) != tuple(target[k].shape)]
  if mismatched:
    raise CheckpointError(
        f"{where}: shape mismatch (checkpoint vs model): "
        + ", ".join(f"{k}: {_shape_str(ckpt[k].shape)} vs {_shape_str(target[k].shape)}"
                    for k in mismatched[:10])
        + (f" ... ({len(mismatched)} in all)" if len(mismatched) > 10 else ""))
  for k in backbone:
    if k not in out:
      out[k] = np.ascontiguousarray(ckpt[k], dtype=np.float32)

  if extras:  # PEFT parameters: from the model's own initialiser, same rng as training would use
    init = flatten(model.init(rng, dummy)["params"])
    for k in extras:
      out[k] = np.asarray(init[k], np.float32)
  return unflatten({k: out[k] for k in target})


