"""The PyTorch reference the round benchmark times JAX against: the SAME round as a plain
sequential simulator. A timm VisionTransformer of the workload's shape loaded with the same
weights, the same optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4 as L2 on the
trainable params' gradients), only the method's trainable params requiring grad, clients one
after another each from the global weights, FedAvg weighted by examples, then the same
evaluation; and the same local step broken into timed parts.

torch and timm are dev-only references (requirements-dev.txt), never a dependency of
fedpeft_jax: `bench_round` loads this module only in the child processes of the PyTorch jobs
and of the step-breakdown job (which times both sides), so no round or FLOP job's peak memory
counts them.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

import jax
import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from experiments.bench_workload import (Workload, init_split, make_data, make_model,
                                        resolved_arch)
from fedpeft_jax import peft

PyTree = Any

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.*)")
_BLOCK_NAMES = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2",
                "MultiHeadDotProductAttention_0/out": "attn.proj",
                "MlpBlock_0/Dense_0": "mlp.fc1", "MlpBlock_0/Dense_1": "mlp.fc2"}
_QKV = ("query", "key", "value")


def timm_name(path: str) -> tuple[str, Optional[int]]:
  """JAX leaf path 'a/b/c' -> (timm state_dict name, q/k/v part of the fused qkv or None)."""
  top = {"embedding/kernel": "patch_embed.proj.weight", "embedding/bias": "patch_embed.proj.bias",
         "cls": "cls_token", "Transformer/posembed_input/pos_embedding": "pos_embed",
         "Transformer/encoder_norm/scale": "norm.weight",
         "Transformer/encoder_norm/bias": "norm.bias", "head/kernel": "head.weight",
         "head/bias": "head.bias"}
  if path in top:
    return top[path], None
  m = _BLOCK.fullmatch(path)
  if m:
    i, rest = m.group(1), m.group(2)
    module, leaf = rest.rsplit("/", 1)
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    for j, qkv in enumerate(_QKV):
      if module == f"MultiHeadDotProductAttention_0/{qkv}":
        return f"blocks.{i}.attn.qkv.{suffix}", j
    if module in _BLOCK_NAMES:
      return f"blocks.{i}.{_BLOCK_NAMES[module]}.{suffix}", None
  raise ValueError(f"no timm counterpart for {path!r} (PyTorch reference: full, head, bias)")


def to_timm_layout(path: str, x: np.ndarray) -> np.ndarray:
  x = np.array(x, np.float32)  # a writable copy (torch.from_numpy)
  module = path.split("/")[-2] if "/" in path else ""
  if path == "embedding/kernel":
    return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if path.endswith("/kernel"):
    if module == "out":
      return x.reshape(-1, x.shape[-1]).T  # (H, hd, D) -> (D, H*hd)
    return x.reshape(x.shape[0], -1).T  # (D, ...) -> (out, D)
  if module in _QKV:
    return x.reshape(-1)  # (H, hd) -> (H*hd,)
  return x


def from_timm_layout(path: str, t: np.ndarray, shape: tuple) -> np.ndarray:
  if path == "embedding/kernel":
    return t.transpose(2, 3, 1, 0)
  if path.endswith("/kernel"):
    return t.T.reshape(shape)
  return t.reshape(shape)


def _flat(tree: PyTree) -> dict[str, Any]:
  return {"/".join(str(k.key) for k in kp): v
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def timm_state_dict(params: PyTree) -> dict[str, np.ndarray]:
  """The JAX ViT's params as a timm VisionTransformer state dict (fused qkv)."""
  out: dict[str, Any] = {}
  parts: dict[str, dict[int, np.ndarray]] = {}
  for path, x in _flat(params).items():
    name, part = timm_name(path)
    y = to_timm_layout(path, np.asarray(x))
    if part is None:
      out[name] = y
    else:
      parts.setdefault(name, {})[part] = y
  for name, p in parts.items():
    out[name] = np.concatenate([p[0], p[1], p[2]], axis=0)
  return out


def read_timm_params(model: Any, like: PyTree) -> PyTree:
  """The leaves of `like` (a JAX subtree) read back from a timm model's state dict."""
  sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  flat = _flat(like)
  values = []
  for path, ref in flat.items():
    name, part = timm_name(path)
    t = sd[name]
    if part is not None:
      t = np.split(t, 3, axis=0)[part]
    values.append(from_timm_layout(path, t, tuple(ref.shape)))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), values)


def timm_model(w: Workload, params: PyTree, device: str = "cpu") -> Any:
  """A timm VisionTransformer of the workload's shape holding `params` (merged JAX params)."""
  a = resolved_arch(w)
  model = VisionTransformer(img_size=w.image_size, patch_size=a["patch_size"],
                            num_classes=w.num_classes, global_pool="token",
                            embed_dim=a["hidden_size"], depth=a["depth"],
                            num_heads=a["num_heads"], mlp_ratio=a["mlp_dim"] / a["hidden_size"],
                            qkv_bias=True, class_token=True)
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in timm_state_dict(params).items()}
  model.load_state_dict(sd, strict=True)
  return model.to(device)


def torch_preprocess(x_u8: Any, w: Workload, gen: Any, train: bool) -> Any:
  """uint8 NHWC -> float NCHW in [-1, 1]: fdata.preprocess's steps in torch."""
  x = x_u8.permute(0, 3, 1, 2).float()
  b, _, h, wd = x.shape
  if train and w.augment in ("crop_flip", "flip"):
    if w.augment == "crop_flip":
      xp = F.pad(x, (4, 4, 4, 4))
      off = torch.randint(0, 9, (b, 2), generator=gen)
      x = torch.stack([xp[i, :, o[0]:o[0] + h, o[1]:o[1] + wd] for i, o in enumerate(off.tolist())])
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
  if (h, wd) != (w.image_size, w.image_size):
    x = F.interpolate(x, size=(w.image_size, w.image_size), mode="bilinear",
                      align_corners=False, antialias=w.image_size < h)
  return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


def torch_round(model: Any, trainable_names: list[str], clients: tuple, w: Workload,
                gen: Any, device: str = "cpu", autocast: bool = False) -> dict:
  """One FedAvg round, clients one after another, each from the global weights; the model
  ends holding the new global weights. Returns the real steps and mean loss."""
  named = dict(model.named_parameters())
  train_params = [named[n] for n in trainable_names]
  global_w = [p.detach().clone() for p in train_params]
  acc = [torch.zeros_like(p) for p in train_params]
  total, steps, loss_sum = 0, 0, 0.0
  for images, labels in clients:
    n = len(labels)
    if n == 0:
      continue
    with torch.no_grad():
      for p, g in zip(train_params, global_w):
        p.copy_(g)
    opt = torch.optim.SGD(train_params, lr=w.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(labels).long().to(device)
    for _ in range(w.local_epochs):
      perm = torch.randperm(n, generator=gen)
      for s in range(0, n, w.batch_size):
        idx = perm[s:s + w.batch_size].to(device)
        x = torch_preprocess(x_all[idx], w, gen, train=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=autocast):
          loss = F.cross_entropy(model(x).float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        loss_sum += float(loss.detach())
    with torch.no_grad():
      for a, p, g in zip(acc, train_params, global_w):
        a.add_(p - g, alpha=float(n))
    total += n
  with torch.no_grad():
    for p, g, a in zip(train_params, global_w, acc):
      p.copy_(g + a / max(total, 1))
  return {"steps": steps, "loss": loss_sum / max(steps, 1)}


def torch_evaluate(model: Any, images: np.ndarray, labels: np.ndarray, w: Workload,
                   device: str = "cpu", autocast: bool = False) -> float:
  correct = 0
  with torch.no_grad():
    for s in range(0, len(labels), w.eval_batch_size):
      x = torch_preprocess(torch.from_numpy(images[s:s + w.eval_batch_size]).to(device), w,
                           None, train=False)
      with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                          enabled=autocast):
        logits = model(x)
      y = torch.from_numpy(labels[s:s + w.eval_batch_size]).to(device)
      correct += int((logits.argmax(-1) == y).sum())
  return correct / max(len(labels), 1)


def torch_setup(w: Workload, device: str = "cpu") -> tuple[Any, list[str], PyTree, PyTree]:
  """(timm model with the JAX init's weights, trainable torch names, trainable, frozen)."""
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  jmodel = make_model(w)
  trainable, frozen, _ = init_split(w, jmodel)
  model = timm_model(w, peft.merge(trainable, frozen), device)
  names = sorted({timm_name(p)[0] for p in _flat(trainable)})
  for n, p in model.named_parameters():
    p.requires_grad_(n in names)
  return model, names, trainable, frozen


def torch_device(backend: str) -> Optional[str]:
  if backend == "cpu":
    return "cpu"
  return "cuda" if torch.cuda.is_available() else None


def measure_torch(w: Workload, rounds: int, backend: str) -> dict:
  device = torch_device(backend)
  if device is None:
    return {"impl": "torch", "skipped": "torch has no CUDA device here"}
  autocast = w.dtype == "bfloat16" and device != "cpu"
  model, names, _, _ = torch_setup(w, device)
  model.train()
  _, test_x, test_y, clients = make_data(w)
  gen = torch.Generator().manual_seed(0)
  sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
  # Warm-up: two steps of the first client (allocator, kernels), not a whole round.
  warm = clients[0][0][:2 * w.batch_size], clients[0][1][:2 * w.batch_size]
  state = {k: v.clone() for k, v in model.state_dict().items()}
  torch_round(model, names, (warm,), w, gen, device, autocast)
  model.load_state_dict(state)
  times = []
  for _ in range(max(rounds, 1)):
    sync()
    t0 = time.perf_counter()
    stats = torch_round(model, names, clients, w, gen, device, autocast)
    sync()
    t1 = time.perf_counter()
    acc = torch_evaluate(model, test_x, test_y, w, device, autocast) if w.eval_examples else None
    sync()
    times.append((time.perf_counter() - t0, t1 - t0, time.perf_counter() - t1))
  best = min(times)
  row = {"impl": "torch", "workload": w.name, "method": w.method, "device": device,
         "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
         "seconds_per_round": best[0], "train_seconds": best[1], "eval_seconds": best[2],
         "timed_rounds": len(times), "all_round_seconds": [t[0] for t in times],
         "train_images_per_s": w.train_images / best[1], "useful_steps": stats["steps"],
         "executed_steps": stats["steps"], "train_loss": stats["loss"], "eval_accuracy": acc}
  if device != "cpu":
    row["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
  return row


def torch_profile(w: Workload, test_x: np.ndarray) -> dict:
  model, names, _, _ = torch_setup(w, "cpu")
  _, _, _, clients = make_data(w)
  gen = torch.Generator().manual_seed(0)
  images = torch.from_numpy(clients[0][0][:w.batch_size])
  y = torch.from_numpy(clients[0][1][:w.batch_size]).long()
  named = dict(model.named_parameters())
  opt = torch.optim.SGD([named[n] for n in names], lr=w.lr, momentum=0.9, nesterov=True,
                        weight_decay=1e-4)
  x = torch_preprocess(images, w, gen, train=True)

  def fwd():
    with torch.no_grad():
      return F.cross_entropy(model(x), y)

  def fwd_bwd():
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()

  def opt_only():
    opt.step()

  def step():
    xx = torch_preprocess(images, w, gen, train=True)
    loss = F.cross_entropy(model(xx), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def evalb():
    with torch.no_grad():
      model(torch_preprocess(torch.from_numpy(test_x[:w.eval_batch_size]), w, None, False))

  def best(fn: Any, reps: int = 5) -> float:
    fn()
    t_best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      fn()
      t_best = min(t_best, time.perf_counter() - t)
    return 1e3 * t_best

  fwd_bwd()
  return {"data: gather + preprocess": best(lambda: torch_preprocess(images, w, gen, True)),
          "forward (loss)": best(fwd), "forward + backward": best(fwd_bwd),
          "optimizer update only": best(opt_only), "whole local step": best(step),
          f"eval batch ({w.eval_batch_size} images)": best(evalb)}
