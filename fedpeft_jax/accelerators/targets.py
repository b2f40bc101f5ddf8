"""Named accelerator targets: what XLA needs to compile for a card that is not here, and the
peak rates a roofline bound divides by.

Each `GpuTarget` holds the vendor's published figures for one card (NVIDIA data sheets and
the CUDA programming guide's per-architecture limits) and renders them as XLA's
`GpuTargetConfig` text proto, which `jax.experimental.topologies.get_topology_desc` turns
into a device-less topology: `jax.jit(...).lower(...).compile()` on its mesh produces a real
executable for that card (sm_90 for the H100) on a machine without one.

Each `TpuTarget` names a Cloud TPU generation with one TensorCore per chip (v5e, v6e), whose
device-less topology libtpu builds from its name alone (`pip install libtpu`, the version
`jax[tpu]` pins). TPU v4 and v5p are left out: libtpu's device-less v4 topology gives two
devices per chip (no megacore), which is not how JAX runs them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional, Union

from jax.experimental import topologies

# JAX's default GPU allocator preallocates this share of device memory and reports it as
# `device.memory_stats()["bytes_limit"]`, the figure the runner's chunk choice budgets from
# (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_PREALLOCATE_FRACTION = 0.75
MIB = 2 ** 20
GIB = 2 ** 30


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


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """One Cloud TPU chip generation (one TensorCore per chip) and its roofline rates."""
  name: str
  generation: str  # libtpu's topology prefix
  description: str  # the device kind JAX reports
  memory_bytes: int  # HBM per chip
  memory_bandwidth: float  # bytes/s
  peak_flops: dict[str, float]  # per chip; float32 dots run as one bf16 pass by default
  platform: str = "tpu"
  compute_capability: None = None

  @property
  def bytes_limit(self) -> int:
    """The chip's HBM. JAX on TPU does not preallocate a share of it, and the runtime's own
    reservation (read as `memory_stats()["bytes_limit"]` on a chip) is not known here."""
    return self.memory_bytes

  def topology_name(self, num_chips: int) -> tuple[str, tuple[int, int, int]]:
    """libtpu's name for a one-host slice of `num_chips` chips and its host bounds."""
    shapes = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4)}
    if num_chips not in shapes:
      raise ValueError(f"--devices {num_chips}: a one-host {self.name} slice has 1, 2, 4 or 8 "
                       "chips")
    x, y = shapes[num_chips]
    return f"{self.generation}:{x}x{y}", (x, y, 1)


# Figures: Google Cloud TPU system architecture pages for v5e and v6e (Trillium): per chip,
# peak bf16 compute, HBM capacity and bandwidth. XLA:TPU runs float32 dots at default
# precision as a single bf16 pass, so float32's rate is bf16's.
TPU_TARGETS: dict[str, TpuTarget] = {
    "v5e": TpuTarget(name="v5e", generation="v5e", description="TPU v5 lite",
                     memory_bytes=16 * GIB, memory_bandwidth=819e9,
                     peak_flops={"bfloat16": 197e12, "float32": 197e12}),
    "v6e": TpuTarget(name="v6e", generation="v6e", description="TPU v6 lite",
                     memory_bytes=32 * GIB, memory_bandwidth=1640e9,
                     peak_flops={"bfloat16": 918e12, "float32": 918e12}),
}
Target = Union[GpuTarget, TpuTarget]
ALL_TARGETS: dict[str, Target] = {**TARGETS, **TPU_TARGETS}


def get_target(name: str) -> Target:
  """The target called `name`; a ValueError naming the known ones otherwise."""
  if name not in ALL_TARGETS:
    raise ValueError(f"--target {name!r} is unknown; known targets: {', '.join(ALL_TARGETS)}")
  return ALL_TARGETS[name]


def topology(target: Target, num_devices: int = 1, num_hosts: int = 1) -> Any:
  """A device-less topology of `num_devices` such cards over `num_hosts` hosts (one slice)."""
  if num_devices % num_hosts:
    raise ValueError(f"{num_devices} devices do not split over {num_hosts} hosts")
  if isinstance(target, TpuTarget):
    if num_hosts != 1:
      raise ValueError(f"{target.name}: only one-host slices are described here")
    name, bounds = target.topology_name(num_devices)
    # libtpu takes a per-machine lock when it loads, meant for processes sharing real chips;
    # a device-less compile holds none, so two planners (or a planner beside the tests) may
    # load it at once. Read when libtpu loads: set before the first TPU topology.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(name, "tpu", chips_per_host_bounds=bounds)
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


def tpu_compiler_missing() -> Optional[str]:
  """None where XLA's TPU compiler can be reached (the libtpu package); otherwise the
  one-line reason and fix."""
  if importlib.util.find_spec("libtpu") is None:
    return ('no TPU compiler: libtpu is not installed (pip install "libtpu==<the version '
            'jax[tpu] pins>", then run with JAX_PLATFORMS=cpu)')
  return None


def compiler_missing(target: Target) -> Optional[str]:
  """Why `target` cannot be compiled for here (one line), or None."""
  return tpu_compiler_missing() if isinstance(target, TpuTarget) else cuda_compiler_missing()
