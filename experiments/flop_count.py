"""Counting the work of a round: FLOPs of one local step by hand (2MNK per matmul) and from
XLA (cost analysis, and the dots of the compiled HLO by op class), and the local steps a
compiled round executes against the useful ones. Abstract shapes only: nothing here runs a
model, so the study's ViT-B/16 is counted on any host.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_workload import (Workload, cast_frozen, client_tx_of, init_split,
                                        make_eval_batch, make_local_step, make_model,
                                        resolved_arch)
from fedpeft_jax import peft

def batch_specs(w: Workload, batch: int) -> tuple:
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
      trainable, opt, frozen, *batch_specs(w, w.batch_size), key).compile()
  out = {"step_flops": float(cost_of(compiled).get("flops", float("nan"))),
         "step_compile_s": time.perf_counter() - t0}
  if with_hlo:
    out["step_hlo"] = hlo_op_flops(compiled.as_text())
  params = peft.merge(trainable, frozen)
  out["eval_batch_flops"] = 0.0
  if w.eval_examples:
    compiled_eval = jax.jit(make_eval_batch(model, w)).lower(
        params, batch_specs(w, w.eval_batch_size)[0]).compile()
    out["eval_batch_flops"] = float(cost_of(compiled_eval).get("flops", float("nan")))
  return out


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
