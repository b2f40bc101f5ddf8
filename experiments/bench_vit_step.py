"""ViT forward and forward+backward (bias tuning) time: JAX vs timm, plus compiled-HLO facts.

Times, in one process and interleaved round by round (the CPU may be shared), the
forward and the forward+backward of our ViT (gradient w.r.t. the bias-tuning
trainable subtree only, frozen weights as traced arguments) and of timm's
VisionTransformer of the same shape with only biases and head requiring grad.
Reports median ms, the JAX/PyTorch ratio, transpose/copy op counts and FLOPs of the
compiled XLA programs; `--memory` adds the compiled train step's temp memory
(float32 vs bfloat16) of a bigger model, compiled only, never run.

  python -m experiments.bench_vit_step [--variant Ti/4 --image_size 32 --batch 16]
      [--memory --memory_variant B/16 --memory_image_size 224 --memory_batch 64]
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Any, Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from timm.models.vision_transformer import VisionTransformer
import torch

from fedpeft_jax import peft
from fedpeft_jax.models import ViT

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "Ti/4", "ViT variant timed.")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_integer("batch", 16, "Batch size.")
flags.DEFINE_integer("num_classes", 100, "Head width.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds; the median over rounds is reported.")
flags.DEFINE_integer("iters", 5, "Calls per round and function.")
flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads (XLA uses all cores).")
flags.DEFINE_bool("memory", False, "Also report the train step's temp memory, f32 vs bf16.")
flags.DEFINE_string("memory_variant", "B/16", "Variant for --memory.")
flags.DEFINE_integer("memory_image_size", 224, "Image side for --memory.")
flags.DEFINE_integer("memory_batch", 64, "Batch for --memory.")


def jax_fns(model: ViT, batch: int, size: int) -> tuple[dict[str, Callable[[], Any]], dict]:
  """Jitted forward / loss+grad closures over fixed inputs, and their HLO facts."""
  key = jax.random.PRNGKey(0)
  images = jax.random.uniform(key, (batch, size, size, 3), minval=-1, maxval=1)
  labels = jnp.arange(batch) % model.num_classes
  params = jax.jit(model.init)(key, images)["params"]
  trainable, frozen = peft.split(params, peft.trainable_mask(params, "bias"))

  def forward(trainable, frozen, images):
    return model.apply({"params": peft.merge(trainable, frozen)}, images)

  def loss(trainable, frozen, images, labels):
    logits = forward(trainable, frozen, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  fns, facts = {}, {}
  for name, f, args in (("fwd", forward, (trainable, frozen, images)),
                        ("fwd+bwd", jax.value_and_grad(loss), (trainable, frozen, images, labels))):
    compiled = jax.jit(f).lower(*args).compile()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    facts[name] = dict(transpose=len(re.findall(r"= \S+ transpose\(", text)),
                       copy=len(re.findall(r"= \S+ copy\(", text)),
                       gflops=cost.get("flops", float("nan")) / 1e9)
    fns[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
  return fns, facts


def torch_fns(model: ViT, batch: int, size: int) -> dict[str, Callable[[], Any]]:
  """timm forward / forward+backward with only biases and head trainable."""
  a = model.arch()
  net = VisionTransformer(img_size=size, patch_size=a["patch_size"], embed_dim=a["hidden_size"],
                          depth=a["depth"], num_heads=a["num_heads"],
                          mlp_ratio=a["mlp_dim"] / a["hidden_size"],
                          num_classes=model.num_classes).eval()
  for name, p in net.named_parameters():
    p.requires_grad_(name.endswith("bias") or name.startswith("head."))
  images = torch.rand(batch, 3, size, size) * 2 - 1
  labels = torch.arange(batch) % model.num_classes

  def fwd():
    with torch.no_grad():
      return net(images)

  def fwd_bwd():
    for p in net.parameters():
      p.grad = None
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    return loss

  return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def temp_memory(variant: str, size: int, batch: int, dtype: Any) -> int:
  """Temp bytes of the compiled bias-tuning loss+grad (compiled, not run)."""
  model = ViT(variant=variant, num_classes=FLAGS.num_classes, image_size=size, dtype=dtype)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  trainable, frozen = peft.split(params, peft.trainable_mask(params, "bias"))

  def loss(trainable, frozen, images, labels):
    logits = model.apply({"params": peft.merge(trainable, frozen)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, images, labels).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv: list[str]) -> None:
  del argv
  torch.set_num_threads(FLAGS.threads)
  model = ViT(variant=FLAGS.variant, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size)
  fns, facts = jax_fns(model, FLAGS.batch, FLAGS.image_size)
  tfns = torch_fns(model, FLAGS.batch, FLAGS.image_size)
  timed = {("jax", k): f for k, f in fns.items()} | {("torch", k): f for k, f in tfns.items()}
  samples: dict[tuple[str, str], list[float]] = {k: [] for k in timed}
  cpu: dict[tuple[str, str], list[float]] = {k: [] for k in timed}  # process CPU time
  for f in timed.values():  # warm-up
    f(), f()
  for _ in range(FLAGS.rounds):
    for k, f in timed.items():
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(FLAGS.iters):
        f()
      samples[k].append((time.perf_counter() - t0) / FLAGS.iters * 1e3)
      cpu[k].append((time.process_time() - c0) / FLAGS.iters * 1e3)

  print(f"ViT {FLAGS.variant} @ {FLAGS.image_size}px, batch {FLAGS.batch}, bias tuning, f32, "
        f"{FLAGS.threads} threads, jax {jax.__version__} / torch {torch.__version__}; "
        f"median of {FLAGS.rounds} rounds x {FLAGS.iters} calls")
  for name in ("fwd", "fwd+bwd"):
    j, t = (statistics.median(samples[(lib, name)]) for lib in ("jax", "torch"))
    jc, tc = (statistics.median(cpu[(lib, name)]) for lib in ("jax", "torch"))
    f = facts[name]
    print(f"{name:8s} jax {j:7.1f} ms  torch {t:7.1f} ms  ratio {j / t:4.2f}  (CPU time: jax "
          f"{jc:6.1f} torch {tc:6.1f} ratio {jc / tc:4.2f})  | HLO "
          f"transpose {f['transpose']:4d} copy {f['copy']:4d}  {f['gflops']:.2f} GFLOP")

  if FLAGS.memory:
    mem = {str(np.dtype(d)): temp_memory(FLAGS.memory_variant, FLAGS.memory_image_size,
                                         FLAGS.memory_batch, d)
           for d in (jnp.float32, jnp.bfloat16)}
    print(f"temp memory, bias-tuning grad of {FLAGS.memory_variant} @ {FLAGS.memory_image_size}px "
          f"batch {FLAGS.memory_batch}: " + ", ".join(f"{k} {v / 2**30:.2f} GiB"
                                                     for k, v in mem.items())
          + f"  (bf16/f32 {mem['bfloat16'] / mem['float32']:.2f})")


if __name__ == "__main__":
  app.run(main)
