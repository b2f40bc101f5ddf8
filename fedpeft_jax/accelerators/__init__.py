"""Compiling for accelerators that are not here: named targets (`targets`) and ahead-of-time
lowering from shapes with XLA's memory, custom-call and FLOP figures (`aot`)."""

from fedpeft_jax.accelerators.aot import (CompiledStats, abstract, attention_flops,
                                          compiled_stats, hlo_flops, like)
from fedpeft_jax.accelerators.targets import (ALL_TARGETS, JAX_PREALLOCATE_FRACTION, TARGETS,
                                              TPU_TARGETS, GpuTarget, Target, TpuTarget,
                                              compiler_missing, cuda_compiler_missing,
                                              get_target, topology, tpu_compiler_missing)

__all__ = ["CompiledStats", "abstract", "attention_flops", "compiled_stats", "hlo_flops", "like",
           "ALL_TARGETS", "JAX_PREALLOCATE_FRACTION", "TARGETS", "TPU_TARGETS", "GpuTarget",
           "Target", "TpuTarget", "compiler_missing", "cuda_compiler_missing", "get_target",
           "topology", "tpu_compiler_missing"]
