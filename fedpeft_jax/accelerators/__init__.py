"""Compiling for accelerators that are not here: named targets (`targets`) and ahead-of-time
lowering from shapes with XLA's memory, custom-call and FLOP figures (`aot`)."""

from fedpeft_jax.accelerators.aot import (CompiledStats, abstract, attention_flops,
                                          compiled_stats, hlo_flops, like)
from fedpeft_jax.accelerators.targets import (JAX_PREALLOCATE_FRACTION, TARGETS, GpuTarget,
                                              cuda_compiler_missing, get_target, topology)

__all__ = ["CompiledStats", "abstract", "attention_flops", "compiled_stats", "hlo_flops", "like",
           "JAX_PREALLOCATE_FRACTION", "TARGETS", "GpuTarget", "cuda_compiler_missing",
           "get_target", "topology"]
