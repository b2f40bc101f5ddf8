"""Partitioned-parameter utilities: masks, split/merge, counts and masked optimizers.

These work on any nested-dict pytree (Flax Linen params), not only on our ViT, and
import nothing from the model, so other projects can use them on their own.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util

from fedpeft_jax.peft.spec import to_spec

PyTree = Any
SEP = "/"

# Trainable-leaf patterns per method (regexes over '/'-joined param paths).
_HEAD = [r"^head/"]
_ORIGINAL_BIAS = (r"^(embedding|Transformer/encoder_norm|pre_logits|"
                  r"Transformer/encoderblock_\d+/(LayerNorm_\d+|"
                  r"MultiHeadDotProductAttention_0/(query|key|value|out)|MlpBlock_0/Dense_\d+))/bias$")
# Method-specific patterns; every method but `full` also trains the head (`_HEAD`).
METHOD_PATTERNS: dict[str, list[str]] = {
    "full": [r".*"],
    "head": _HEAD,
    "bias": [_ORIGINAL_BIAS],
    "prompt": [r"(^|/)vpt_prompts$"],
    "adapter": [r"(^|/)(adapter_\w+|shared_adapter)/"],
    "lora": [r"_lora/lora_[ab]$"],
    "ssf": [r"_ssf/(scale|shift)$"],
}
# Where a leaf sits relative to the encoder blocks (peft.last_blocks).
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
_TOP = re.compile(r"^(Transformer/encoder_norm(_ssf)?|pre_logits|head)/")
# PEFT leaves outside the blocks that only the tuned blocks use.
_TUNED_SHARED = re.compile(r"^Transformer/(vpt_prompts$|shared_adapter/)")
_ADDED = ("prompt", "adapter", "lora", "ssf")  # methods that add modules to the model


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(_as_dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def _as_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def mask_from_patterns(params: PyTree, include: Sequence[str] = (r".*",),
                       exclude: Sequence[str] = ()) -> PyTree:
  """Bool pytree: True where a leaf's '/'-joined path matches any `include` regex
  (re.search) and no `exclude` regex."""
  inc = [re.compile(p) for p in include]
  exc = [re.compile(p) for p in exclude]
  flat = flatten(params)
  return unflatten({
      path: any(r.search(path) for r in inc) and not any(r.search(path) for r in exc)
      for path in flat
  })


def trainable_mask(params: PyTree, method_cfg: Any) -> PyTree:
  """Bool pytree of the leaves `method_cfg` (peft config, spec or method name) trains.

  Every listed method must select at least one leaf of its own: a mask for 'lora'
  on a model built without LoRA would otherwise silently train only the head.
  With `last_blocks=k > 0` only leaves in the last k encoder blocks, the top
  (Transformer/encoder_norm, pre_logits, head) and the prompts / shared adapter
  that feed those blocks are trainable ('full' included).
  """
  spec = to_spec(method_cfg)
  paths = list(flatten(params))
  include: list[str] = []
  for m in spec.methods:
    own = [re.compile(p) for p in METHOD_PATTERNS[m]]
    if not any(r.search(path) for r in own for path in paths):
      raise ValueError(f"peft.method {m!r} selects no parameter of this model (method "
                       f"{'+'.join(spec.methods)!r}); was the model built with the same peft config?")
    include += METHOD_PATTERNS[m]
  if not spec.has("full"):
    include += _HEAD
  exclude = [r"_lora/lora_a$"] if spec.has("lora") and spec.lora_freeze_a else []
  if spec.has("full"):
    exclude = []
  mask = mask_from_patterns(params, include, exclude)
  if spec.last_blocks:
    mask = _restrict_to_last_blocks(params, mask, spec)
  return mask


def num_blocks(tree: PyTree) -> int:
  """Encoder depth of a ViT param (or mask) tree: the highest encoderblock_i index + 1."""
  idx = [int(m.group(1)) for m in map(_BLOCK.match, flatten(tree)) if m]
  return max(idx) + 1 if idx else 0


def _restrict_to_last_blocks(params: PyTree, mask: PyTree, spec: Any) -> PyTree:
  k, depth = spec.last_blocks, num_blocks(params)
  if k > depth:
    raise ValueError(f"peft.last_blocks ({k}) exceeds the number of encoder blocks of the "
                     f"model ({depth}); set it to at most {depth}, or 0 to tune all blocks")
  first = depth - k
  added = [re.compile(p) for m in _ADDED if spec.has(m) for p in METHOD_PATTERNS[m]]

  def tuned(path: str) -> bool:
    m = _BLOCK.match(path)
    if m:
      return int(m.group(1)) >= first
    return bool(_TOP.match(path) or _TUNED_SHARED.match(path))

  out = {}
  for path, on in flatten(mask).items():
    if not tuned(path):
      if any(r.search(path) for r in added):
        raise ValueError(f"peft.last_blocks={k} but the params hold the PEFT leaf {path!r} "
                         f"outside the last {k} blocks; was the model built with the same "
                         "peft config?")
      on = False
    out[path] = on
  return unflatten(out)


def first_trainable_block(mask: PyTree, depth: Optional[int] = None,
                          last_blocks: int = 0) -> int:
  """The smallest block index s such that nothing the model computes before encoder
  block s is trainable under `mask`: the activations entering block s
  (`model.apply(..., stop_block=s)`) can be computed once and cached, and training
  can run `model.apply(..., start_block=s)`. `depth` when nothing is trainable in
  the encoder (a head-only or top-only mask).

  Trainable embedding, cls or position embedding give 0. Trainable VPT prompts or a
  shared adapter feed the tuned blocks: pass the config's `peft.last_blocks` so they
  count at block depth - last_blocks (with the default 0 they count at block 0).
  """
  fm = flatten(mask)
  for path, v in fm.items():
    if not isinstance(v, (bool, np.bool_)):
      raise ValueError(f"first_trainable_block takes a bool mask (peft.trainable_mask); leaf "
                       f"{path!r} is a {type(v).__name__}")
  depth = num_blocks(mask) if depth is None else int(depth)
  if not 0 <= last_blocks <= depth:
    raise ValueError(f"peft.last_blocks ({last_blocks}) must be in [0, {depth}] (the depth)")
  s = depth
  for path, on in fm.items():
    if not on:
      continue
    m = _BLOCK.match(path)
    if m:
      s = min(s, int(m.group(1)))
    elif _TUNED_SHARED.match(path):
      s = min(s, depth - last_blocks if last_blocks else 0)
    elif not _TOP.match(path):
      return 0  # embedding, cls, posembed_input (or a leaf of unknown place): no cache
  return s


def only_head_trainable(mask: PyTree) -> bool:
  """True when every trainable leaf of `mask` is under head/ (nothing that feeds the head
  trains), so the pooled features (`return_features=True`) can be cached and training
  can run `model.apply(..., from_features=True)`. Also True for a mask with no True leaf."""
  return all(path.startswith("head/") for path, on in flatten(mask).items() if on)


def _check_mask(params: PyTree, mask: PyTree) -> tuple[dict, dict]:
  fp, fm = flatten(params), flatten(mask)
  if fp.keys() != fm.keys():
    only_p = sorted(fp.keys() - fm.keys())[:5]
    only_m = sorted(fm.keys() - fp.keys())[:5]
    raise ValueError("mask structure does not match params: "
                     f"paths only in params {only_p}, only in mask {only_m}")
  for k, v in fm.items():
    if not isinstance(v, (bool, np.bool_)):
      raise ValueError(f"mask leaf {k!r} must be a Python bool, got {type(v).__name__}")
  return fp, fm


def split(params: PyTree, mask: PyTree) -> tuple[dict, dict]:
  """(trainable, frozen): two pruned nested dicts holding only their own leaves.

  The trainable part is exactly what a client trains and sends; `merge` inverts.
  """
  fp, fm = _check_mask(params, mask)
  trainable = {k: v for k, v in fp.items() if fm[k]}
  frozen = {k: v for k, v in fp.items() if not fm[k]}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: PyTree, frozen: PyTree) -> dict:
  """Inverse of `split`; an error if a path appears in both."""
  ft, ff = flatten(trainable), flatten(frozen)
  both = sorted(ft.keys() & ff.keys())
  if both:
    raise ValueError(f"merge: paths present in both trainable and frozen parts: {both[:5]}")
  return unflatten({**ff, **ft})


def count(tree: PyTree) -> int:
  """Number of scalars in a pytree (works on arrays and ShapeDtypeStructs)."""
  return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree)))


def nbytes(tree: PyTree, dtype: Optional[Any] = None) -> int:
  """Bytes to transmit `tree`, in its own dtypes or all cast to `dtype`."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    item = np.dtype(dtype if dtype is not None else x.dtype).itemsize
    total += int(np.prod(np.shape(x))) * item
  return int(total)


def summary(params: PyTree, mask: PyTree, dtype: Optional[Any] = None) -> str:
  """A table of trainable/total parameters and bytes per top-level module."""
  fp, fm = _check_mask(params, mask)
  rows: dict[str, list[int]] = {}
  for path, leaf in fp.items():
    top = path.split(SEP)[0]
    if top == "Transformer" and len(path.split(SEP)) > 2:
      top = SEP.join(path.split(SEP)[:2])
      top = re.sub(r"encoderblock_\d+", "encoderblock_*", top)
    n = int(np.prod(np.shape(leaf)))
    b = n * np.dtype(dtype if dtype is not None else leaf.dtype).itemsize
    r = rows.setdefault(top, [0, 0, 0, 0])
    r[1] += n
    r[3] += b
    if fm[path]:
      r[0] += n
      r[2] += b
  header = f"{'module':<40} {'trainable':>12} {'total':>12} {'%':>7} {'train MB':>10} {'total MB':>10}"
  lines = [header, "-" * len(header)]
  tot = [0, 0, 0, 0]
  for name, (t, n, tb, nb) in rows.items():
    lines.append(f"{name:<40} {t:>12,} {n:>12,} {100 * t / max(n, 1):>6.2f}% "
                 f"{tb / 1e6:>10.3f} {nb / 1e6:>10.3f}")
    tot = [a + b for a, b in zip(tot, (t, n, tb, nb))]
  lines.append("-" * len(header))
  lines.append(f"{'total':<40} {tot[0]:>12,} {tot[1]:>12,} {100 * tot[0] / max(tot[1], 1):>6.2f}% "
               f"{tot[2] / 1e6:>10.3f} {tot[3] / 1e6:>10.3f}")
  return "\n".join(lines)


def optimizer(tx: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
  """`tx` on the True leaves of `mask`; exact zero updates and no state on the rest.

  Built on optax.partition + set_to_zero rather than gradient filtering, so any
  optax chain (weight decay, momentum) never touches a frozen leaf. The gradient
  passed to `update` must have the full param structure; its frozen leaves are
  ignored (e.g. `merge(trainable_grads, jax.tree.map(jnp.zeros_like, frozen))`).
  """
  labels = jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask)
  inner = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)

  def init(params: PyTree) -> optax.OptState:
    _check_mask(params, mask)  # a clear error instead of a tree-structure mismatch deep in optax
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init, inner.update)


def tree_paths(tree: PyTree) -> list[str]:
  return list(flatten(tree).keys())


def select(tree: PyTree, paths: Iterable[str]) -> dict:
  """The pruned subtree of `tree` at `paths`."""
  f = flatten(tree)
  return unflatten({p: f[p] for p in paths})
