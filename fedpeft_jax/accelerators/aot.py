"""Ahead-of-time compilation from shapes: abstract arguments on a mesh, and what XLA's
compiled executable says about memory, custom calls and FLOPs.

The same functions serve a real device (the runner's automatic chunk size) and a
device-less target topology (`experiments/plan.py`): arguments are `ShapeDtypeStruct`s with
shardings, so nothing is allocated or transferred to lower and compile a round.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Optional

import jax
import numpy as np
from jax._src.lib import xla_client  # HLO cost analysis: see `hlo_flops`
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

# cuDNN's fused-attention custom calls (forward and backward; the dropout variants share the
# prefix) as XLA names them in the compiled HLO.
CUDNN_ATTENTION_FORWARD = "__cudnn$fmhaSoftmax"
CUDNN_ATTENTION_BACKWARD = "__cudnn$fmhaSoftmaxBackward"
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def abstract(tree: PyTree, mesh: Mesh, spec: P = P()) -> PyTree:
  """`tree`'s leaves (arrays or shapes) as ShapeDtypeStructs placed by `spec` on `mesh`."""
  sharding = NamedSharding(mesh, spec)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def like(tree: PyTree) -> PyTree:
  """Placed arrays -> ShapeDtypeStructs with the same shapes, dtypes and shardings."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


@dataclasses.dataclass(frozen=True)
class CompiledStats:
  """XLA's memory plan of one compiled executable (bytes, per device) and its custom calls."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  custom_calls: dict[str, int]

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, less donated (aliased) buffers: what the
    executable needs resident at once by XLA's plan."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def cudnn_attention(self) -> tuple[int, int]:
    """(forward, backward) cuDNN fused-attention calls in the executable."""
    fwd = sum(n for k, n in self.custom_calls.items()
              if k.startswith(CUDNN_ATTENTION_FORWARD) and not k.endswith("Backward"))
    return fwd, self.custom_calls.get(CUDNN_ATTENTION_BACKWARD, 0)


# XLA's answer when its Triton GEMM emitter has no tiling for a dot. Seen in device-less
# compiles of vmapped chunks (e.g. bf16[100864,768] x [768,3072] at 8 clients per chunk),
# where no autotuner is there to fall back to cuBLAS; whether a GPU's autotuned compile hits
# it is not known from here.
TRITON_TILING_ERROR = "Couldn't find output tile sizes"
WITHOUT_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def compile_with_fallback(lowered: Any) -> tuple[Any, str]:
  """(compiled, flags) with XLA's default flags, or, where the Triton GEMM emitter finds no
  tiling (`TRITON_TILING_ERROR`), with Triton GEMMs off; `flags` says which."""
  try:
    return lowered.compile(), "default"
  except jax.errors.JaxRuntimeError as e:
    if TRITON_TILING_ERROR not in str(e):
      raise
    first = str(e).splitlines()[0]
    return (lowered.compile(compiler_options=WITHOUT_TRITON_GEMM),
            f"xla_gpu_enable_triton_gemm=false (defaults failed: {first[:160]})")


def compiled_stats(compiled: Any, custom_calls: bool = True) -> Optional[CompiledStats]:
  """Memory plan and (unless `custom_calls=False`, which skips printing the module) custom
  calls of a `jax.stages.Compiled`; None where the backend gives no memory analysis."""
  try:
    mem = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if mem is None:
    return None
  calls = collections.Counter(_CUSTOM_CALL.findall(compiled.as_text()) if custom_calls else ())
  return CompiledStats(int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                       int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes), dict(calls))


def _hlo_cost(module: Any) -> dict[str, float]:
  """XLA's HLO cost analysis of an HloModule, run by the CPU client (any target's module).

  Reached through jaxlib's `hlo_module_cost_analysis`, a private binding (a device-less
  compile gives no `cost_analysis()`): this is its only use, and tests/test_accelerators.py
  fails if it moves."""
  cpu = jax.local_devices(backend="cpu")[0].client
  return xla_client._xla.hlo_module_cost_analysis(cpu, module)  # pylint: disable=protected-access


def hlo_flops(lowered: Any) -> float:
  """FLOPs of a lowered computation by XLA's HLO cost analysis of its unoptimized module.

  Why the unoptimized module: the program as written, before the GPU compiler turns dots
  into library calls. Caveats: a while loop's body counts once (a round's loops count one
  local step of one chunk), and custom calls (cuDNN attention) count zero:
  `attention_flops` adds them."""
  return float(_hlo_cost(lowered.compiler_ir("hlo").get_hlo_module())["flops"])


def optimized_bytes(compiled: Any) -> float:
  """Bytes accessed by XLA's cost analysis of a compiled (optimized, fused) module: the
  memory traffic a roofline bound divides by bandwidth (loops count one body, as above)."""
  return float(_hlo_cost(compiled.runtime_executable().hlo_modules()[0])["bytes accessed"])


_FMHA_OPERANDS = re.compile(
    r'custom_call_target="(__cudnn\$fmha\w*)".*?operand_layout_constraints=\{(\w+)\[([\d,]+)\]'
    r'\{[^}]*\}, \w+\[([\d,]+)\]')


def attention_flops(compiled_text: str) -> float:
  """FLOPs of the cuDNN fused-attention calls in a compiled module's text, by hand: a
  forward call with q [B, T, N, H] and k [B, S, N, H] does two matmuls (4 B N T S H); a
  backward call four (8 B N T S H; the recomputation of Q K^T inside flash attention's
  backward is not counted, as for the XLA path's saved probabilities)."""
  total = 0.0
  for target, _, q, k in _FMHA_OPERANDS.findall(compiled_text):
    b, t, n, h = (int(x) for x in q.split(","))
    s = int(k.split(",")[1])
    total += (8 if target.endswith("Backward") else 4) * b * n * t * s * h
  return total
