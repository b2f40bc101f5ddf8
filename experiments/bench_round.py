"""Round benchmark that tells the truth: time, FLOPs, MFU, memory, and a PyTorch reference.

  python -m experiments.bench_round                    # --preset=cpu: the study code's round
  python -m experiments.bench_round --preset=study     # ViT-B/16 224, batch 64, bf16 (GPU/TPU MFU)
  python -m experiments.bench_round --preset=head_cache
  python -m experiments.bench_round --methods=bias,full --clients_per_chunk=1,4 --out=r.json

Per configuration (each in a fresh process, so its peak memory is its own) it reports
seconds per round (training through `algo.apply` + evaluation through `make_evaluate`),
training images/s, the useful local steps (real batches) and the steps the compiled round
executed (padded steps under vmap run too), the XLA FLOPs of ONE local train step
(`jit(step).lower(...).compile().cost_analysis()`, preprocessing + forward + backward +
optimizer) times the executed steps plus the evaluation's FLOPs, the achieved FLOP/s and the
MFU against the matmul peak measured in the same run (the best of several large matmuls),
XLA's memory analysis of the compiled round (arguments + temporaries) and the process peak
RSS (CPU) or the device's peak bytes in use (GPU/TPU).

Beside it, whenever torch is importable, the SAME round as a plain sequential PyTorch
simulator: a timm VisionTransformer of the same shape loaded with the same weights, the same
optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4 as L2 on the trainable params'
gradients), only the method's trainable params requiring grad, clients one after another
each from the global weights, FedAvg weighted by examples, then the same evaluation. The
speed-up is torch_seconds / jax_seconds. torch and timm are imported only inside the
PyTorch functions below: they are a reference, never a dependency of fedpeft_jax.

When JAX is slower than PyTorch (or with --profile=on) the local step is broken down: time of
measured variants (data gather + preprocessing, forward, forward + backward, optimizer update,
whole step, one eval batch) and FLOPs by op class from the compiled step's HLO (dense
matmuls and the attention dots, forward and backward; the rest is elementwise/reduce work:
norms, GELU, softmax, preprocessing, optimizer).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.federated import (ClientSpec, RoundSpec, auto_clients_per_chunk, build_algorithm,
                                   compiled_round_bytes, device_bytes_limit,
                                   make_client_optimizer, make_evaluate, make_server_optimizer,
                                   masked_cross_entropy, plan_round)
from fedpeft_jax.models import DTYPES, ViT
from fedpeft_jax.runner import train as runner_train
from fedpeft_jax.runner.config_files import repo_config

PyTree = Any
PRESETS = ("cpu", "study", "head_cache")
STUDY_COMMAND = "python -m experiments.bench_round --preset=study"

_PRESET = flags.DEFINE_enum("preset", "cpu", PRESETS, "Which benchmark (module docstring).")
_METHODS = flags.DEFINE_list("methods", ["bias"], "PEFT methods (PyTorch reference: full, head, "
                             "bias).")
_CHUNKS = flags.DEFINE_list("clients_per_chunk", ["auto"], "clients_per_chunk values ('auto': "
                            "the engine's choice for the backend).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per configuration (after one warm-up "
                               "round); the best is reported.")
_TORCH = flags.DEFINE_bool("torch", True, "Run the PyTorch reference when torch is importable.")
_PROFILE = flags.DEFINE_enum("profile", "auto", ["auto", "on", "off"], "Step breakdown: 'auto' "
                             "when JAX is slower than PyTorch.")
_UNEVEN = flags.DEFINE_bool("uneven", True, "cpu preset: also the uneven-clients rows.")
_HEAD_ROUNDS = flags.DEFINE_integer("head_rounds", 6, "head_cache preset: rounds per run.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path.")
_SINGLE = flags.DEFINE_string("single", "", "Internal: run one job (JSON) in this process and "
                              "print its result as the last line.")


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
  """One round's shape. Images are synthetic uint8 at `native_size`, resized on device."""
  name: str
  variant: str
  image_size: int
  native_size: int
  num_classes: int
  batch_size: int
  client_sizes: tuple
  method: str = "bias"
  local_epochs: int = 1
  eval_examples: int = 500
  eval_batch_size: int = 250
  dtype: str = "float32"
  augment: str = "none"
  lr: float = 0.01
  arch: Optional[dict] = None  # hidden_size, depth, num_heads, mlp_dim, patch_size overrides

  def replace(self, **kw) -> "Workload":
    return dataclasses.replace(self, **kw)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["client_sizes"] = [int(s) for s in self.client_sizes]
    return d

  @staticmethod
  def from_json(d: dict) -> "Workload":
    return Workload(**{**d, "client_sizes": tuple(d["client_sizes"])})

  @property
  def max_examples(self) -> int:
    return max(int(s) for s in self.client_sizes)

  def steps_of(self, size: int) -> int:
    return self.local_epochs * math.ceil(size / self.batch_size)

  @property
  def useful_steps(self) -> int:
    return sum(self.steps_of(int(s)) for s in self.client_sizes)

  @property
  def train_images(self) -> int:
    return self.local_epochs * sum(int(s) for s in self.client_sizes)

  @property
  def eval_batches(self) -> int:
    return math.ceil(self.eval_examples / self.eval_batch_size) if self.eval_examples else 0


def cpu_workload(method: str = "bias") -> Workload:
  """The study code's round: 8 clients x 320 images (20 steps of 16), ViT-Ti/4 at 32x32."""
  return Workload(name="cpu", variant="Ti/4", image_size=32, native_size=32, num_classes=10,
                  batch_size=16, client_sizes=(320,) * 8, method=method, eval_examples=500,
                  eval_batch_size=250)


def uneven_workloads(method: str = "bias") -> tuple[Workload, Workload]:
  """8 clients of 1,1,2,2,6,6,7,7 batches vs 8 of 4 each: the same 32 real steps."""
  base = cpu_workload(method)
  b = base.batch_size
  even = base.replace(name="even 8x4 batches", client_sizes=(4 * b,) * 8)
  uneven = base.replace(name="uneven 1,1,2,2,6,6,7,7 batches",
                        client_sizes=tuple(n * b for n in (1, 1, 2, 2, 6, 6, 7, 7)))
  return even, uneven


def study_client_sizes(seed: int = 1, clients: int = 64, per_round: int = 8) -> tuple:
  """Client sizes of the study's first round: CIFAR-100's 50,000 labels (500 per class)
  split Dirichlet(0.1) over 64 clients (min 10, the study config's seed 1), 8 sampled."""
  labels = np.repeat(np.arange(100), 500)
  part = fdata.partition(labels, clients, method="dirichlet", alpha=0.1, min_size=10, seed=seed)
  plan = plan_round(seed, 0, clients, per_round)
  return tuple(int(part.sizes[c]) for c in plan.reporting)


def study_workload(method: str = "bias") -> Workload:
  """The study's row: ViT-B/16 at 224 (CIFAR's 32 px resized on device), batch 64, bf16."""
  return Workload(name="study", variant="B/16", image_size=224, native_size=32,
                  num_classes=100, batch_size=64, client_sizes=study_client_sizes(),
                  method=method, eval_examples=10_000, eval_batch_size=256, dtype="bfloat16",
                  augment="crop_flip")


def study_cpu_workload(method: str = "bias") -> Workload:
  """The study's round scaled down for a CPU: ViT-Ti/16 at 64 px, batch 16, sizes / 16."""
  sizes = tuple(max(16, s // 16) for s in study_client_sizes())
  return Workload(name="study (CPU-scaled)", variant="Ti/16", image_size=64, native_size=32,
                  num_classes=100, batch_size=16, client_sizes=sizes, method=method,
                  eval_examples=500, eval_batch_size=250, augment="crop_flip")


# ------------------------------------------------------------------------------------------------
# Model, data, the local step
# ------------------------------------------------------------------------------------------------

def make_model(w: Workload) -> ViT:
  a = w.arch or {}
  return ViT(variant=None if a else w.variant, num_classes=w.num_classes,
             image_size=w.image_size, dtype=DTYPES[w.dtype], peft=peft.method_config(w.method),
             **a)


def init_split(w: Workload, model: ViT, abstract: bool = False) -> tuple[PyTree, PyTree, PyTree]:
  """(trainable, frozen, mask) from a seeded init (abstract: ShapeDtypeStructs only)."""
  x = jnp.zeros((1, w.image_size, w.image_size, 3))
  init = lambda: model.init(jax.random.PRNGKey(0), x)["params"]  # noqa: E731
  params = jax.eval_shape(init) if abstract else jax.jit(init)()
  mask = peft.trainable_mask(params, peft.method_config(w.method))
  trainable, frozen = peft.split(params, mask)
  return trainable, frozen, mask


def cast_frozen(frozen: PyTree, w: Workload) -> PyTree:
  """The frozen backbone in the compute dtype, as the runner stores it (bf16 on GPU/TPU)."""
  dt = DTYPES[w.dtype]
  cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  return jax.tree_util.tree_map(cast, frozen)


def make_images(w: Workload, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, w.native_size, w.native_size, 3), dtype=np.uint8)
  return images, rng.integers(0, w.num_classes, n).astype(np.int32)


def make_data(w: Workload) -> tuple[fdata.ClientData, np.ndarray, np.ndarray, tuple]:
  """Client data (client c holds a contiguous block of the synthetic training set) and the
  test set, both deterministic from the workload; also the host copies for PyTorch."""
  sizes = np.array(w.client_sizes, np.int64)
  images, labels = make_images(w, int(sizes.sum()), seed=0)
  indices = np.zeros((len(sizes), int(sizes.max())), np.int32)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  for c, (s, n) in enumerate(zip(starts, sizes)):
    indices[c, :n] = np.arange(s, s + n)
  data = fdata.ClientData(images=jnp.asarray(images), labels=jnp.asarray(labels),
                          indices=jnp.asarray(indices), sizes=jnp.asarray(sizes, jnp.int32))
  test_x, test_y = make_images(w, max(w.eval_examples, 1), seed=1)
  clients = tuple((images[s:s + n], labels[s:s + n]) for s, n in zip(starts, sizes))
  return data, test_x, test_y, clients


def client_tx_of(w: Workload) -> optax.GradientTransformation:
  return make_client_optimizer("sgd", w.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def client_spec_of(w: Workload) -> ClientSpec:
  return ClientSpec(batch_size=w.batch_size, local_epochs=w.local_epochs,
                    max_examples=w.max_examples, image_size=w.image_size, augment=w.augment)


def make_local_step(model: ViT, tx: optax.GradientTransformation, w: Workload):
  """One local train step exactly as the engine's scan body runs it (gather excluded):
  preprocess, forward, gradients w.r.t. the trainable subtree, optimizer, update."""

  def step(trainable, opt_state, frozen, images_u8, labels, mask, key):
    k_aug, k_grad = jax.random.split(key)
    x = fdata.preprocess(images_u8, k_aug, image_size=w.image_size, augment=w.augment,
                         train=True)

    def loss_fn(t):
      logits = model.apply({"params": peft.merge(t, frozen)}, x, train=True,
                           rngs={"dropout": k_grad})
      return masked_cross_entropy(logits, labels, mask, w.num_classes)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def _batch_specs(w: Workload, batch: int) -> tuple:
  return (jax.ShapeDtypeStruct((batch, w.native_size, w.native_size, 3), jnp.uint8),
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.bool_))


def cost_of(compiled: Any) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return dict(cost or {})


def step_cost(w: Workload, with_hlo: bool = True) -> dict:
  """XLA's FLOPs of ONE local train step and of one evaluation batch (abstract shapes:
  nothing is allocated, so the study's ViT-B/16 compiles on any host)."""
  model = make_model(w)
  trainable, frozen, _ = init_split(w, model, abstract=True)
  frozen = jax.eval_shape(lambda f: cast_frozen(f, w), frozen)
  tx = client_tx_of(w)
  opt = jax.eval_shape(tx.init, trainable)
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = jax.jit(make_local_step(model, tx, w)).lower(
      trainable, opt, frozen, *_batch_specs(w, w.batch_size), key).compile()
  out = {"step_flops": float(cost_of(compiled).get("flops", float("nan"))),
         "step_compile_s": time.perf_counter() - t0}
  if with_hlo:
    out["step_hlo"] = hlo_op_flops(compiled.as_text())
  params = peft.merge(trainable, frozen)
  out["eval_batch_flops"] = 0.0
  if w.eval_examples:
    compiled_eval = jax.jit(make_eval_batch(model, w)).lower(
        params, _batch_specs(w, w.eval_batch_size)[0]).compile()
    out["eval_batch_flops"] = float(cost_of(compiled_eval).get("flops", float("nan")))
  return out


def make_eval_batch(model: ViT, w: Workload):
  """One batch of `make_evaluate`'s scan body (preprocess + forward)."""

  def f(params, images_u8):
    x = fdata.preprocess(images_u8, jax.random.PRNGKey(0), image_size=w.image_size,
                         augment="none", train=False)
    return model.apply({"params": params}, x, train=False)

  return f


# ------------------------------------------------------------------------------------------------
# FLOPs by hand and from the HLO
# ------------------------------------------------------------------------------------------------

def resolved_arch(w: Workload) -> dict:
  return make_model(w).arch()


def vit_matmul_flops(w: Workload, batch: Optional[int] = None) -> dict:
  """Matmul FLOPs (2*M*N*K per dense, QK^T and AV per head) of one train step, by hand.

  Backward: every dense layer needs its activation gradient (dX = dY W^T) wherever something
  below it trains; weight gradients (dW = X^T dY) only for trainable weights: none of the
  frozen backbone's under bias tuning, only the head's. Attention backward is two matmuls
  per forward matmul (dQ, dK from dS; dP, dV from the context gradient). The patch
  embedding needs no input gradient (the image is not trained) and, with a frozen kernel,
  no weight gradient either.
  """
  a = resolved_arch(w)
  d, depth, mlp, p = a["hidden_size"], a["depth"], a["mlp_dim"], a["patch_size"]
  patches = (w.image_size // p) ** 2
  t = patches + 1  # class token
  b = batch or w.batch_size
  dense = 2 * t * (4 * d * d + 2 * d * mlp)  # q, k, v, out; fc1, fc2 (per image and block)
  attn = 2 * 2 * t * t * d  # QK^T and AV over all heads
  patch = 2 * patches * p * p * 3 * d
  head = 2 * d * w.num_classes  # the class token only
  fwd = depth * (dense + attn) + patch + head
  method = w.method
  if method == "full":
    bwd = depth * (2 * dense + 2 * attn) + patch + 2 * head
  elif method == "head":
    bwd = head  # dW of the head only; nothing below it trains
  elif method == "bias":
    bwd = depth * (dense + 2 * attn) + 2 * head
  else:
    raise ValueError(f"no hand formula for method {method!r}")
  return {"forward": b * fwd, "backward": b * bwd, "total": b * (fwd + bwd),
          "attention_forward": b * depth * attn}


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_DIMS = re.compile(r"(lhs_contracting_dims|lhs_batch_dims)=\{([\d,]*)\}")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_ATTN = re.compile(r"hqk|qhd|khd")  # Google-layout einsums ('...qhd,...khd->...hqk')


def _is_attention(op_name: str) -> bool:
  """The attention einsums (QK^T, PV), not the q/k/v/out projections: an einsum ('->')
  inside the attention module, or the Google-layout einsum letters."""
  if "lora" in op_name:
    return False
  return bool(_ATTN.search(op_name)) or ("MultiHeadDotProductAttention" in op_name
                                         and "->" in op_name)


def _operands(line: str, op: str) -> list[str]:
  m = re.search(rf" {op}\(([^)]*)\)", line)
  if not m:
    return []
  return [o.strip().split(" ")[-1].lstrip("%") for o in m.group(1).split(", ")]


def hlo_op_flops(hlo: str) -> dict:
  """FLOPs of the dots and convolutions of a compiled HLO module, by class.

  'attention' = the dots of the attention einsums (QK^T, AV and their gradients, told by
  their op_name); 'matmul' = every other dot and convolution (dense layers, patch
  embedding, head; the q/k/v/out projections included). '_bwd' = under a transpose (the backward pass). Loops are counted
  once, as XLA's cost analysis does.
  """
  shapes: dict[str, list[int]] = {}
  lines = hlo.splitlines()
  for line in lines:
    m = _INSTR.match(line)
    if m:
      shapes[m.group(1)] = [int(x) for x in m.group(3).split(",") if x]
  out = {"matmul_fwd": 0.0, "matmul_bwd": 0.0, "attention_fwd": 0.0, "attention_bwd": 0.0,
         "dots": 0, "convolutions": 0}
  for line in lines:
    m = _INSTR.match(line)
    if not m:
      continue
    is_dot, is_conv = " dot(" in line, " convolution(" in line
    if not (is_dot or is_conv):
      continue
    result = [int(x) for x in m.group(3).split(",") if x]
    ops = _operands(line, "dot" if is_dot else "convolution")
    if len(ops) != 2 or ops[0] not in shapes or ops[1] not in shapes:
      continue
    lhs, rhs = shapes[ops[0]], shapes[ops[1]]
    if is_dot:
      dims = dict(_DIMS.findall(line))
      contract = [int(x) for x in dims.get("lhs_contracting_dims", "").split(",") if x]
      flops = 2.0 * math.prod(result) * math.prod(lhs[i] for i in contract)
      out["dots"] += 1
    else:
      labels = re.search(r"dim_labels=\w+_(\w+)->", line)
      o = labels.group(1).index("o") if labels else len(rhs) - 1
      flops = 2.0 * math.prod(result) * math.prod(rhs) / max(rhs[o], 1)
      out["convolutions"] += 1
    name = _OPNAME.search(line)
    name = name.group(1) if name else ""
    cls = "attention" if _is_attention(name) else "matmul"
    out[f"{cls}_{'bwd' if 'transpose(' in name else 'fwd'}"] += flops
  return out


# ------------------------------------------------------------------------------------------------
# Executed steps
# ------------------------------------------------------------------------------------------------

def executed_steps_fallback(w: Workload, client_ids: np.ndarray, clients_per_chunk: int,
                            num_devices: int = 1) -> int:
  """Steps the engine before 'executed_steps' existed executes: one client per chunk runs
  only its real steps (`lax.cond` skips padding and empty slots); under vmap every slot of
  every chunk, padded ones included, runs local_epochs * ceil(max_n / B)."""
  ids = np.asarray(client_ids)
  if clients_per_chunk == 1:
    sizes = np.asarray(w.client_sizes)
    return int(sum(w.steps_of(int(sizes[c])) for c in ids))
  per_step = num_devices * clients_per_chunk
  slots = max(1, math.ceil(len(ids) / per_step)) * per_step
  return int(slots * w.steps_of(w.max_examples))


def executed_steps_sorted(w: Workload, clients_per_chunk: int) -> int:
  """Hand count for an engine that sorts clients by real steps into chunks and loops each
  chunk only while its longest client still has real steps (every slot of the chunk runs
  each iteration)."""
  steps = sorted((w.steps_of(int(s)) for s in w.client_sizes), reverse=True)
  return int(sum(clients_per_chunk * max(steps[i:i + clients_per_chunk])
                 for i in range(0, len(steps), clients_per_chunk)))


# ------------------------------------------------------------------------------------------------
# Peak matmul throughput and memory
# ------------------------------------------------------------------------------------------------

def matmul_peak(dtype: Any, n: int, reps: int = 5, inner: int = 1) -> float:
  """Best FLOP/s of `inner` chained n^3 matmuls in one jit, over `reps` runs."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = (jax.random.normal(k2, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)
  f = jax.jit(lambda a, b: jax.lax.fori_loop(0, inner, lambda i, x: x @ b, a))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 * inner / best


def device_peaks() -> dict:
  backend = jax.default_backend()
  dev = jax.devices()[0]
  out = {"backend": backend, "device_kind": dev.device_kind, "num_devices": len(jax.devices()),
         "cpu_threads": len(os.sched_getaffinity(0))}
  if backend == "cpu":
    out["peak_float32"] = matmul_peak(jnp.float32, 2048, reps=10)
  else:
    out["peak_float32"] = matmul_peak(jnp.float32, 8192, reps=5, inner=10)
    out["peak_bfloat16"] = matmul_peak(jnp.bfloat16, 8192, reps=5, inner=10)
  return out


def peak_memory_mb() -> dict:
  out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  if jax.default_backend() != "cpu":
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
  return out


def round_memory(algo: Any, state: Any, frozen: PyTree, data: Any, plan: Any) -> dict:
  """XLA's memory analysis of the compiled round (`algo.lower`, or algo.apply under one
  outer jit with only the client sizes, which the engine reads on the host, concrete)."""
  def round_fn(s, f, images, labels, indices):
    return algo.apply(s, f, fdata.ClientData(images, labels, indices, data.sizes), plan)

  try:
    if getattr(algo, "lower", None) is not None:
      lowered = algo.lower(state, frozen, data, plan.num_reporting)
    else:
      lowered = jax.jit(round_fn).lower(state, frozen, data.images, data.labels, data.indices)
    ma = lowered.compile().memory_analysis()
    return {"xla_argument_mb": ma.argument_size_in_bytes / 2 ** 20,
            "xla_temp_mb": ma.temp_size_in_bytes / 2 ** 20,
            "xla_output_mb": ma.output_size_in_bytes / 2 ** 20}
  except Exception as e:  # noqa: BLE001 -- the analysis is a report, not a requirement
    return {"xla_memory_error": f"{type(e).__name__}: {e}"[:200]}


# ------------------------------------------------------------------------------------------------
# The JAX engine round
# ------------------------------------------------------------------------------------------------

def resolve_chunk(chunk: Any, w: Workload, backend: str) -> Any:
  """An integer, or 'auto' (resolved by the engine's rule where the device is: 1 on CPU)."""
  if str(chunk) == "auto":
    return 1 if backend == "cpu" else "auto"
  return int(chunk)


def measure_engine(w: Workload, chunk: Any, rounds: int, memory: bool = True,
                   flops: bool = True) -> dict:
  """One warm-up round (compile) and `rounds` timed rounds of training + evaluation.
  `chunk` 'auto': the engine's rule (XLA's memory estimate on accelerators), as the runner."""
  model = make_model(w)
  trainable, frozen, _ = init_split(w, model)
  frozen = cast_frozen(frozen, w)
  data, test_x, test_y, _ = make_data(w)
  k = len(w.client_sizes)

  def build(c: int) -> Any:
    return build_algorithm(model, client_tx_of(w), make_server_optimizer("fedavg"),
                           client_spec_of(w), RoundSpec(c, 1), w.num_classes)

  chunk_note = ""
  if str(chunk) == "auto":
    def round_bytes(c: int) -> Optional[int]:
      trial = build(c)
      return compiled_round_bytes(trial.lower(trial.state_shapes(trainable), frozen, data, k))

    chunk, chunk_note = auto_clients_per_chunk(k, 1, w.batch_size, memory_of=round_bytes,
                                               bytes_limit=device_bytes_limit())
  algo = build(int(chunk))
  evaluate = make_evaluate(model, w.eval_batch_size, w.image_size)
  test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
  state = algo.init(trainable, seed=0)
  row: dict[str, Any] = {"chunk_note": chunk_note}
  if memory:
    row.update(round_memory(algo, state, frozen, data, plan_round(0, 0, k, k)))

  def one_round(r: int, state: Any) -> tuple[Any, dict, float, float, dict]:
    t0 = time.perf_counter()
    state, m = algo.apply(state, frozen, data, plan_round(0, r, k, k))
    jax.block_until_ready((state.trainable, m))
    t1 = time.perf_counter()
    ev = {}
    if w.eval_examples:
      ev = evaluate(peft.merge(state.trainable, frozen), test_x, test_y)
      jax.block_until_ready(ev)
    return state, m, t1 - t0, time.perf_counter() - t1, ev

  state, m, train0, eval0, ev = one_round(0, state)
  times = []
  for r in range(rounds):
    state, m, tr, te, ev = one_round(r + 1, state)
    times.append((tr + te, tr, te))
  best = min(times) if times else (train0 + eval0, train0, eval0)
  useful = float(m["local_steps"])
  if "executed_steps" in m:
    executed, source = float(m["executed_steps"]), "engine metrics"
  else:
    executed = float(executed_steps_fallback(w, plan_round(0, 0, k, k).reporting, int(chunk)))
    source = "analytic (rule of an engine without executed_steps)"
  row.update({"impl": "jax", "workload": w.name, "method": w.method,
              "clients_per_chunk": int(chunk),
              "seconds_per_round": best[0], "train_seconds": best[1], "eval_seconds": best[2],
              "first_round_seconds": train0 + eval0, "timed_rounds": len(times),
              "all_round_seconds": [t[0] for t in times],
              "train_images_per_s": w.train_images / best[1],
              "useful_steps": useful, "executed_steps": executed, "executed_source": source,
              "expected_useful_steps": w.useful_steps,
              "train_loss": float(m["train_loss"])})
  if ev:
    row["eval_accuracy"] = float(ev["accuracy"])
  if flops:
    row.update(step_cost(w, with_hlo=False))
  return row


def add_flop_rates(row: dict, w: Workload, peaks: dict, cost: dict) -> None:
  """Achieved FLOP/s and MFU: XLA FLOPs of one step x steps (+ eval) over the round's time."""
  step, evalb = cost["step_flops"], cost["eval_batch_flops"]
  eval_flops = evalb * w.eval_batches
  executed = row.get("executed_steps", row["useful_steps"])
  row["step_gflop"] = step / 1e9
  row["eval_batch_gflop"] = evalb / 1e9
  row["workload_json"] = w.to_json()
  row["round_gflop_executed"] = (step * executed + eval_flops) / 1e9
  row["round_gflop_useful"] = (step * row["useful_steps"] + eval_flops) / 1e9
  row["achieved_gflops"] = row["round_gflop_executed"] / row["seconds_per_round"]
  row["useful_gflops"] = row["round_gflop_useful"] / row["seconds_per_round"]
  peak = peaks.get("peak_bfloat16" if w.dtype == "bfloat16" else "peak_float32")
  if peak:
    row["mfu"] = row["achieved_gflops"] * 1e9 / peak
    row["mfu_useful"] = row["useful_gflops"] * 1e9 / peak


# ------------------------------------------------------------------------------------------------
# The PyTorch reference (torch and timm are imported here only)
# ------------------------------------------------------------------------------------------------

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
  import torch
  from timm.models.vision_transformer import VisionTransformer
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
  import torch
  import torch.nn.functional as F
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
  import torch
  import torch.nn.functional as F
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
  import torch
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
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  jmodel = make_model(w)
  trainable, frozen, _ = init_split(w, jmodel)
  model = timm_model(w, peft.merge(trainable, frozen), device)
  names = sorted({timm_name(p)[0] for p in _flat(trainable)})
  for n, p in model.named_parameters():
    p.requires_grad_(n in names)
  return model, names, trainable, frozen


def torch_device(backend: str) -> Optional[str]:
  import torch
  if backend == "cpu":
    return "cpu"
  return "cuda" if torch.cuda.is_available() else None


def measure_torch(w: Workload, rounds: int, backend: str) -> dict:
  import torch
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


# ------------------------------------------------------------------------------------------------
# Step breakdown (profile)
# ------------------------------------------------------------------------------------------------

def _best_ms(fn: Any, *args: Any, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return 1e3 * best


def measure_profile(w: Workload, with_torch: bool) -> dict:
  """Time variants of one local step side by side; FLOPs by op class from its HLO."""
  model = make_model(w)
  trainable, frozen, _ = init_split(w, model)
  tx = client_tx_of(w)
  opt = tx.init(trainable)
  data, test_x, _, _ = make_data(w)
  b = w.batch_size
  idx = jnp.arange(b, dtype=jnp.int32)
  labels, mask = data.labels[:b], jnp.ones((b,), bool)
  key = jax.random.PRNGKey(0)

  frozen = cast_frozen(frozen, w)

  # Every variant takes the frozen weights as an argument, as the engine's round does.
  def loss_fn(t, f, x):
    logits = model.apply({"params": peft.merge(t, f)}, x, train=True, rngs={"dropout": key})
    return masked_cross_entropy(logits, labels, mask, w.num_classes)

  prep = jax.jit(lambda images, i: fdata.preprocess(images[i], key, image_size=w.image_size,
                                                    augment=w.augment, train=True))
  fwd = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
  opt_only = jax.jit(lambda g, o, t: (lambda u: (optax.apply_updates(t, u[0]), u[1]))(
      tx.update(g, o, t)))
  step_fn = make_local_step(model, tx, w)
  step = jax.jit(lambda t, o, f, images, i: step_fn(t, o, f, images[i], labels, mask, key))
  evalb = jax.jit(make_eval_batch(model, w))
  x = prep(data.images, idx)
  grads = fwd_bwd(trainable, frozen, x)[1]
  eval_x = jnp.asarray(test_x[:w.eval_batch_size])
  rows = [
      ("data: gather + preprocess", _best_ms(prep, data.images, idx)),
      ("forward (loss)", _best_ms(fwd, trainable, frozen, x)),
      ("forward + backward", _best_ms(fwd_bwd, trainable, frozen, x)),
      ("optimizer update only", _best_ms(opt_only, grads, opt, trainable)),
      ("whole local step", _best_ms(step, trainable, opt, frozen, data.images, idx)),
      (f"eval batch ({w.eval_batch_size} images)",
       _best_ms(evalb, peft.merge(trainable, frozen), eval_x) if w.eval_examples else 0.0),
  ]
  out = {"impl": "jax", "workload": w.name, "method": w.method,
         "jax_ms": {k: v for k, v in rows}}
  out.update(step_cost(w, with_hlo=True))
  if with_torch:
    try:
      out["torch_ms"] = torch_profile(w, test_x)
    except ImportError as e:
      out["torch_ms"] = {"skipped": str(e)}
  return out


def torch_profile(w: Workload, test_x: np.ndarray) -> dict:
  import torch
  import torch.nn.functional as F
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


# ------------------------------------------------------------------------------------------------
# head_cache preset: head tuning through the runner, feature cache on vs off
# ------------------------------------------------------------------------------------------------

def feature_cache_available() -> bool:
  return "feature_cache" in repo_config("default").get_config().federated


def measure_runner(mode: str, rounds: int) -> dict:
  """Head tuning on digits (offline) through fedpeft_jax.runner.train.run."""
  c = repo_config("quickstart").get_config("head")
  c.model.pretrained = ""  # a seeded random backbone: offline, same for both modes
  c.federated.rounds = rounds
  c.federated.feature_cache = mode
  c.checkpoint_every = 0
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    summary = runner_train.run(c, d, progress=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(d, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  secs = [r["seconds"] for r in rows]
  steady = secs[1:] or secs
  return {"impl": "runner", "feature_cache": mode, "rounds": len(rows),
          "first_round_seconds": secs[0], "seconds_per_round": statistics.median(steady),
          "rounds_per_s": 1.0 / statistics.median(steady), "run_wall_seconds": wall,
          "final_accuracy": summary.get("final_accuracy"),
          "best_accuracy": summary.get("best_accuracy")}


# ------------------------------------------------------------------------------------------------
# Jobs (each in a fresh process) and the report
# ------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(job: dict) -> dict:
  kind = job["kind"]
  w = Workload.from_json(job["workload"]) if "workload" in job else None
  if kind == "peak":
    return device_peaks()
  if kind == "cost":
    return step_cost(w, with_hlo=True)
  if kind == "engine":
    out = measure_engine(w, job["chunk"], job["rounds"])
  elif kind == "torch":
    out = measure_torch(w, job["rounds"], job["backend"])
  elif kind == "profile":
    out = measure_profile(w, job["torch"])
  elif kind == "runner":
    out = measure_runner(job["mode"], job["rounds"])
  else:
    raise ValueError(f"unknown job {kind!r}")
  if kind != "torch":
    out.update(peak_memory_mb())
  else:
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def child(job: dict, env: Optional[dict] = None) -> dict:
  """`job` in a fresh Python process (its own peak RSS / device memory); stderr passes through."""
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_round",
                         f"--single={json.dumps(job)}"], stdout=subprocess.PIPE, text=True,
                        cwd=ROOT, env={**os.environ, **(env or {})})
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    out = {"error": f"job {job['kind']} exited with {proc.returncode}",
           "stdout_tail": "\n".join(lines[-5:])}
  else:
    out = json.loads(lines[-1])
  out["job_seconds"] = time.perf_counter() - t
  return out


def _f(x: Any, spec: str = ".2f", none: str = "-") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return none
  return format(x, spec)


def _steps(x: Any) -> str:
  return _f(x, ".0f")


def rounds_table(rows: list[dict]) -> str:
  head = ("| workload | impl | method | chunk | s/round (train + eval) | train img/s | steps useful "
          "/ executed | GFLOP/step (XLA) | achieved GFLOP/s | MFU executed / useful | XLA round "
          "args + temp MB | peak MB (RSS; device) | speed-up (PyTorch s / JAX s) |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in rows:
    if "error" in r or "skipped" in r:
      lines.append(f"| {r.get('workload', '?')} | {r.get('impl', '?')} | "
                   f"{r.get('method', '')} | | {r.get('error') or r.get('skipped')} |"
                   + " |" * 8)
      continue
    impl = "JAX engine" if r["impl"] == "jax" else (
        f"PyTorch sequential (timm, {r.get('device')}, {r.get('torch_threads')} threads)")
    mem = ""
    if "xla_temp_mb" in r:
      mem = f"{r['xla_argument_mb']:.0f} + {r['xla_temp_mb']:.0f}"
    peak = _f(r.get("peak_rss_mb"), ".0f")
    if r.get("device_peak_mb") is not None:
      peak += f"; {r['device_peak_mb']:.0f}"
    mfu = f"{_f(r.get('mfu'), '.1%')} / {_f(r.get('mfu_useful'), '.1%')}"
    lines.append(
        f"| {r['workload']} | {impl} | {r['method']} | {r.get('clients_per_chunk', '-')} | "
        f"{r['seconds_per_round']:.2f} ({r['train_seconds']:.2f} + {r['eval_seconds']:.2f}) | "
        f"{r['train_images_per_s']:.1f} | {_steps(r['useful_steps'])} / "
        f"{_steps(r['executed_steps'])} | {_f(r.get('step_gflop'))} | "
        f"{_f(r.get('achieved_gflops'), '.1f')} | {mfu} | {mem} | {peak} | "
        f"{_f(r.get('speedup_vs_torch'), '.2f')}{'x' if r.get('speedup_vs_torch') else ''} |")
  return "\n".join(lines)


def profile_tables(p: dict, w: Workload) -> str:
  jms, tms = p["jax_ms"], p.get("torch_ms") or {}
  step = jms["whole local step"]
  out = [f"Step breakdown, {w.name} / {w.method}, batch {w.batch_size} (time: best of 5 of "
         "separately jitted variants, so parts need not add up to the step; backward = "
         "(forward + backward) - forward):", "",
         "| part | JAX ms | share of JAX step | PyTorch ms |", "|---|---|---|---|"]
  derived = dict(jms)
  derived["backward (derived)"] = jms["forward + backward"] - jms["forward (loss)"]
  tder = dict(tms) if "skipped" not in tms else {}
  if tder:
    tder["backward (derived)"] = tms["forward + backward"] - tms["forward (loss)"]
  order = ["data: gather + preprocess", "forward (loss)", "backward (derived)",
           "forward + backward", "optimizer update only", "whole local step"]
  order += [k for k in jms if k.startswith("eval batch")]
  for k in order:
    out.append(f"| {k} | {derived[k]:.1f} | {derived[k] / step:.0%} | "
               f"{_f(tder.get(k), '.1f')} |")
  hlo = p["step_hlo"]
  total = p["step_flops"]
  dots = sum(hlo[k] for k in ("matmul_fwd", "matmul_bwd", "attention_fwd", "attention_bwd"))
  hand = vit_matmul_flops(w) if w.method in ("full", "head", "bias") else None
  out += ["", f"FLOPs by op class of the compiled step (XLA HLO: {hlo['dots']} dots, "
          f"{hlo['convolutions']} convolutions; 'other' = cost analysis total - dot FLOPs: "
          "norms, GELU, softmax, preprocessing, loss, optimizer):", "",
          "| op class | GFLOP | share |", "|---|---|---|"]
  for k, label in (("matmul_fwd", "dense matmuls, forward"), ("matmul_bwd",
                   "dense matmuls, backward"), ("attention_fwd", "attention dots, forward"),
                   ("attention_bwd", "attention dots, backward")):
    out.append(f"| {label} | {hlo[k] / 1e9:.2f} | {hlo[k] / total:.0%} |")
  out.append(f"| other (elementwise / reduce) | {(total - dots) / 1e9:.2f} | "
             f"{(total - dots) / total:.0%} |")
  out.append(f"| total (cost analysis) | {total / 1e9:.2f} | 100% |")
  if hand:
    out.append(f"| hand formula, matmuls only (2MNK) | {hand['total'] / 1e9:.2f} | "
               f"{hand['total'] / total:.0%} |")
  return "\n".join(out)


def study_flops_text(cost: dict, w: Workload) -> str:
  step, evalb = cost["step_flops"], cost["eval_batch_flops"]
  useful = w.useful_steps
  executed = {c: executed_steps_sorted(w, c) for c in (1, 2, 4, 8)}
  train = step * useful
  ev = evalb * w.eval_batches
  hand = vit_matmul_flops(w)["total"]
  return (
      f"Full study round (XLA cost analysis, compiled on this host): ViT-{w.variant} at "
      f"{w.image_size} px ({w.dtype}), batch {w.batch_size}, {w.method} tuning, 8 clients of "
      f"{', '.join(map(str, w.client_sizes))} examples (CIFAR-100 Dirichlet 0.1 over 64 clients,"
      f" seed 1, round 0), {w.local_epochs} local epoch:\n"
      f"  one local step {step / 1e12:.3f} TFLOP (hand matmul formula {hand / 1e12:.3f}); "
      f"useful steps {useful}; executed steps (clients sorted into chunks, each chunk runs "
      f"its longest client's steps) by clients_per_chunk: "
      + ", ".join(f"{c}: {n}" for c, n in executed.items()) + "\n"
      f"  training {train / 1e12:.1f} TFLOP useful + evaluation of {w.eval_examples:,} images "
      f"{ev / 1e12:.1f} TFLOP = {(train + ev) / 1e12:.1f} TFLOP per round (training x10 for "
      f"the study's 10 local epochs)\n"
      f"  On a GPU/TPU (MFU against the bf16 matmul peak measured there): {STUDY_COMMAND}")


def run_head_cache(rounds: int) -> dict:
  if not feature_cache_available():
    msg = ("feature_cache not available: this checkout's config has no "
           "config.federated.feature_cache yet, so the head_cache preset has nothing to compare")
    print(msg)
    return {"preset": "head_cache", "note": msg}
  rows = [child({"kind": "runner", "mode": m, "rounds": rounds}) for m in ("auto", "off")]
  print("\n| feature_cache | s/round (runner's 'seconds', median after round 1) | rounds/s | "
        "first round s | whole run wall s (setup, cache, compile, rounds) | final acc | best acc |"
        "\n|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r.get('feature_cache', '?')} | {r['error']} | | | | | |")
      continue
    print(f"| {r['feature_cache']} | {r['seconds_per_round']:.3f} | {r['rounds_per_s']:.2f} | "
          f"{r['first_round_seconds']:.1f} | {r['run_wall_seconds']:.1f} | "
          f"{_f(r['final_accuracy'], '.4f')} | "
          f"{_f(r['best_accuracy'], '.4f')} |")
  out = {"preset": "head_cache", "rows": rows}
  if all("error" not in r for r in rows):
    out["rounds_per_s_ratio_auto_over_off"] = rows[0]["rounds_per_s"] / rows[1]["rounds_per_s"]
    out["wall_ratio_off_over_auto"] = rows[1]["run_wall_seconds"] / rows[0]["run_wall_seconds"]
    print(f"\nhead tuning on digits, {rounds} rounds: feature_cache auto / off = "
          f"{out['rounds_per_s_ratio_auto_over_off']:.2f}x rounds/s by the runner's per-round "
          f"'seconds' (host time per round: device work may run asynchronously), "
          f"{out['wall_ratio_off_over_auto']:.2f}x by whole-run wall time")
  return out


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None and \
      importlib.util.find_spec("timm") is not None


def main(argv: list[str]) -> None:
  del argv
  if _SINGLE.value:
    print(json.dumps(run_job(json.loads(_SINGLE.value))))
    return
  preset = _PRESET.value
  if preset == "head_cache":
    result = run_head_cache(_HEAD_ROUNDS.value)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
    return
  peaks = child({"kind": "peak"})
  if "error" in peaks:
    raise SystemExit(f"peak job failed: {peaks}")
  backend = peaks["backend"]
  print(f"backend {backend} ({peaks['device_kind']}, {peaks['num_devices']} device(s), "
        f"{peaks['cpu_threads']} CPU threads); matmul peak f32 "
        f"{peaks['peak_float32'] / 1e9:.1f} GFLOP/s"
        + (f", bf16 {peaks['peak_bfloat16'] / 1e9:.1f} GFLOP/s" if "peak_bfloat16" in peaks
           else ""), flush=True)
  use_torch = _TORCH.value and torch_available()
  if _TORCH.value and not use_torch:
    print("torch/timm not importable: no PyTorch reference")
  torch_env = {"JAX_PLATFORMS": "cpu"}  # its JAX (weights init only) must not take the GPU
  rows: list[dict] = []
  result: dict[str, Any] = {"preset": preset, "peaks": peaks, "rows": rows, "profiles": [],
                            "command_accelerator": STUDY_COMMAND}
  workloads = {}
  for method in _METHODS.value:
    if preset == "cpu":
      w = cpu_workload(method)
    else:
      w = study_workload(method) if backend != "cpu" else study_cpu_workload(method)
    workloads[method] = w
    jax_rows = []
    for chunk in _CHUNKS.value:
      c = resolve_chunk(chunk, w, backend)
      row = child({"kind": "engine", "workload": w.to_json(), "chunk": c,
                   "rounds": _ROUNDS.value})
      row.setdefault("workload", w.name)
      row.setdefault("impl", "jax")
      row.setdefault("method", method)
      if "error" not in row:
        add_flop_rates(row, w, peaks, row)
      print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}),
            flush=True)
      jax_rows.append(row)
      rows.append(row)
    if use_torch and method in ("full", "head", "bias"):
      trow = child({"kind": "torch", "workload": w.to_json(), "rounds": _ROUNDS.value,
                    "backend": backend}, torch_env)
      trow.setdefault("workload", w.name)
      trow.setdefault("impl", "torch")
      trow.setdefault("method", method)
      ok = [r for r in jax_rows if "error" not in r]
      if "error" not in trow and "skipped" not in trow and ok:
        add_flop_rates(trow, w, peaks, ok[0])
        for r in ok:
          r["speedup_vs_torch"] = trow["seconds_per_round"] / r["seconds_per_round"]
      print(json.dumps({k: v for k, v in trow.items() if not isinstance(v, (dict, list))}),
            flush=True)
      rows.append(trow)
  if preset == "cpu" and _UNEVEN.value:
    even, uneven = uneven_workloads(_METHODS.value[0])
    pair = []
    for w in (even, uneven):
      row = child({"kind": "engine", "workload": w.to_json(), "chunk": 4,
                   "rounds": _ROUNDS.value})
      row.setdefault("workload", w.name)
      row.setdefault("impl", "jax")
      row.setdefault("method", w.method)
      if "error" not in row:
        add_flop_rates(row, w, peaks, row)
      rows.append(row)
      pair.append(row)
    if all("error" not in r for r in pair):
      result["uneven"] = {
          "train_time_ratio_uneven_over_even": pair[1]["train_seconds"] / pair[0]["train_seconds"],
          "executed": [pair[0]["executed_steps"], pair[1]["executed_steps"]],
          "useful": [pair[0]["useful_steps"], pair[1]["useful_steps"]],
          "executed_source": pair[1]["executed_source"]}
  # Step breakdown where JAX is slower than PyTorch (or when asked).
  for method, w in workloads.items():
    slow = any(r.get("speedup_vs_torch", 2.0) < 1.0 for r in rows
               if r.get("method") == method and r.get("impl") == "jax" and r["workload"] == w.name)
    if _PROFILE.value == "on" or (_PROFILE.value == "auto" and slow):
      p = child({"kind": "profile", "workload": w.to_json(),
                 "torch": bool(use_torch and backend == "cpu")},
                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
      p["method"] = method
      result["profiles"].append(p)
  # The peak again at the end (a shared machine's load changes): the best of both counts.
  again = child({"kind": "peak"})
  for k in ("peak_float32", "peak_bfloat16"):
    if k in again and again[k] > peaks.get(k, 0.0):
      peaks[k] = again[k]
  for r in rows:
    if "error" not in r and "skipped" not in r and "step_gflop" in r:
      add_flop_rates(r, Workload.from_json(r["workload_json"]), peaks,
                     {"step_flops": r["step_gflop"] * 1e9,
                      "eval_batch_flops": r["eval_batch_gflop"] * 1e9})
  study_cost = None
  if preset == "study":
    sw = study_workload(_METHODS.value[0])
    study_cost = child({"kind": "cost", "workload": sw.to_json()}, torch_env)
    result["study_flops"] = study_cost

  # The report.
  w0 = next(iter(workloads.values()))
  print(f"\n## bench_round --preset={preset}: backend {backend} ({peaks['device_kind']}), "
        f"{peaks['cpu_threads']} CPU threads\n")
  print(f"Round: {len(w0.client_sizes)} clients of {', '.join(map(str, w0.client_sizes))} "
        f"examples, batch {w0.batch_size}, {w0.local_epochs} local epoch, ViT-{w0.variant} at "
        f"{w0.image_size} px ({w0.dtype}), {w0.num_classes} classes, SGD lr {w0.lr} Nesterov "
        f"momentum 0.9 wd 1e-4, FedAvg by examples, then evaluation of {w0.eval_examples} "
        f"test images (batch {w0.eval_batch_size}). Times: best of {_ROUNDS.value} rounds after "
        f"a warm-up round. Matmul peak measured in this run: f32 "
        f"{peaks['peak_float32'] / 1e9:.1f} GFLOP/s"
        + (f", bf16 {peaks['peak_bfloat16'] / 1e9:.1f} GFLOP/s" if "peak_bfloat16" in peaks
           else "") + ". FLOPs = XLA cost analysis of one local step x steps + eval batches; "
        "MFU executed counts every step the compiled round ran, MFU useful only real steps; "
        "PyTorch runs only real steps (its FLOPs: the same XLA count).\n")
  print(rounds_table(rows))
  if "uneven" in result:
    u = result["uneven"]
    print(f"\nUneven clients (chunks of 4): uneven / even training time = "
          f"{u['train_time_ratio_uneven_over_even']:.2f}x; executed steps {_steps(u['executed'][1])}"
          f" vs {_steps(u['executed'][0])} ({u['executed_source']}), useful "
          f"{_steps(u['useful'][1])} vs {_steps(u['useful'][0])}.")
  for p in result["profiles"]:
    if "error" in p:
      print(f"\nprofile failed: {p['error']}")
    else:
      print("\n" + profile_tables(p, workloads[p["method"]]))
  if preset == "study" and study_cost and "error" not in study_cost:
    sw = study_workload(_METHODS.value[0])
    print("\n" + study_flops_text(study_cost, sw))
  else:
    print(f"\nFor the study's MFU on a GPU/TPU: {STUDY_COMMAND}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
