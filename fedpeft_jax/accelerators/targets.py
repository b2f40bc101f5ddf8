"""Named accelerator targets: what XLA needs to compile for a card that is not here, and the
peak rates a roofline bound divides by.

Each `GpuTarget` holds the vendor's published figures for one card (NVIDIA data sheets and
the CUDA programming guide's per-architecture limits) and renders them as XLA's
`GpuTargetConfig` text proto, which `jax.experimental.topologies.get_topology_desc` turns
into a device-less topology: `jax.jit(...).lower(...).compile()` on its mesh produces a real
executable for that card (sm_90 for the H100) on a machine without one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Optional

from jax.experimental import topologies

# JAX's default GPU allocator preallocates this share of device memory and reports it as
# `device.memory_stats()["bytes_limit"]`, the figure the runner's chunk choice budgets from
# (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_PREALLOCATE_FRACTION = 0.75
MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """One NVIDIA card: its compile-relevant description and its roofline rates."""
  name: str
  description: str  # the device name CUDA reports
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_cores_per_sm: int
  boost_clock_ghz: float
  memory_mib: int  # device memory as the driver reports it (nvidia-smi "Total")
  memory_bandwidth: float  # bytes/s
  l2_cache_bytes: int
  shared_memory_per_sm: int  # bytes
  shared_memory_per_block_optin: int  # bytes
  threads_per_sm: int
  peak_flops: dict[str, float]  # dense tensor-core FLOP/s per compute dtype (float32: TF32)
  platform: str = "gpu"

  @property
  def memory_bytes(self) -> int:
    return self.memory_mib * MIB

  @property
  def bytes_limit(self) -> int:
    """What `device.memory_stats()["bytes_limit"]` reports under JAX's default allocator."""
    return int(JAX_PREALLOCATE_FRACTION * self.memory_bytes)

  def target_config(self) -> str:
    """XLA's GpuTargetConfig text proto for this card."""
    major, minor = self.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: {self.threads_per_sm}
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_cores_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.boost_clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{self.description}"
"""


# Figures: NVIDIA H100 Tensor Core GPU data sheet (SXM5), A100 data sheet (SXM4 40/80 GB),
# L4 data sheet; SM counts, clocks, L2 and shared memory from the architecture whitepapers
# and the CUDA C++ Programming Guide (compute capabilities 8.0, 8.9, 9.0). Peak FLOP/s are
# the dense (no 2:4 sparsity) tensor-core figures; "float32" is the TF32 rate, which XLA's
# default-precision float32 dots use on these cards (the CUDA-core rate is lower, so a bound
# from it would not be a lower bound).
TARGETS: dict[str, GpuTarget] = {
    "h100": GpuTarget(
        name="h100", description="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
        sm_count=132, fp32_cores_per_sm=128, boost_clock_ghz=1.98, memory_mib=81559,
        memory_bandwidth=3.35e12, l2_cache_bytes=50 * MIB, shared_memory_per_sm=228 * 1024,
        shared_memory_per_block_optin=227 * 1024, threads_per_sm=2048,
        peak_flops={"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}),
    "a100-80": GpuTarget(
        name="a100-80", description="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0),
        sm_count=108, fp32_cores_per_sm=64, boost_clock_ghz=1.41, memory_mib=81920,
        memory_bandwidth=2.039e12, l2_cache_bytes=40 * MIB, shared_memory_per_sm=164 * 1024,
        shared_memory_per_block_optin=163 * 1024, threads_per_sm=2048,
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    "a100-40": GpuTarget(
        name="a100-40", description="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
        sm_count=108, fp32_cores_per_sm=64, boost_clock_ghz=1.41, memory_mib=40960,
        memory_bandwidth=1.555e12, l2_cache_bytes=40 * MIB, shared_memory_per_sm=164 * 1024,
        shared_memory_per_block_optin=163 * 1024, threads_per_sm=2048,
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    "l4": GpuTarget(
        name="l4", description="NVIDIA L4", compute_capability=(8, 9),
        sm_count=58, fp32_cores_per_sm=128, boost_clock_ghz=2.04, memory_mib=23034,
        memory_bandwidth=300e9, l2_cache_bytes=48 * MIB, shared_memory_per_sm=100 * 1024,
        shared_memory_per_block_optin=99 * 1024, threads_per_sm=1536,
        peak_flops={"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
}


def get_target(name: str) -> GpuTarget:
  """The target called `name`; a ValueError naming the known ones otherwise."""
  if name not in TARGETS:
    raise ValueError(f"--target {name!r} is unknown; known targets: {', '.join(TARGETS)}")
  return TARGETS[name]


def topology(target: GpuTarget, num_devices: int = 1, num_hosts: int = 1) -> Any:
  """A device-less topology of `num_devices` such cards over `num_hosts` hosts (one slice)."""
  if num_devices % num_hosts:
    raise ValueError(f"{num_devices} devices do not split over {num_hosts} hosts")
  return topologies.get_topology_desc(
      platform="cuda", target_config=target.target_config(),
      topology=f"1x{num_hosts}x{num_devices // num_hosts}")


def cuda_compiler_missing() -> Optional[str]:
  """None where XLA's GPU compiler can be reached (JAX's CUDA plugin installed and loaded);
  otherwise the one-line reason and fix."""
  if importlib.util.find_spec("jax_plugins") is None or not any(
      importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12)):
    return ('no GPU compiler: JAX\'s CUDA plugin is not installed (pip install '
            '"jax[cuda13]==<the installed jax>", then run with JAX_PLATFORMS=cpu)')
  try:
    topology(TARGETS["h100"])
  except (NotImplementedError, RuntimeError) as e:
    return (f"no GPU compiler: the CUDA plugin did not load ({str(e).splitlines()[0]}); on a "
            "machine without a GPU run with JAX_PLATFORMS=cpu")
  return None
