"""The suite runs on the CPU. Where JAX's CUDA plugin is installed (the deviceless GPU
compile tests), JAX_PLATFORMS=cpu keeps the plugin from looking for a GPU at start-up while
it still compiles for GPU topologies (fedpeft_jax.accelerators).

Compiling dominates most integration tests: many runs compile the same tiny round (a DP
config run twice, a run and its resumed self, the CLI subprocesses). The suite therefore
shares one persistent XLA compilation cache across its tests, its pytest-xdist workers,
both tiers and the subprocesses they start (they inherit the environment), keyed as JAX
keys it (the HLO, the compile options, the devices' kind and topology, the jaxlib
version), so a hit returns what the compile would. It lives in the repository's
.pytest_cache/xla_compilation_cache (git ignores it; delete the folder to empty it), within
the bound set below; a JAX_COMPILATION_CACHE_DIR already set wins. The DP tests also search
it for their secret keys (tests/test_dp_runs.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_CACHE_DIR = os.path.join(ROOT, ".pytest_cache", "xla_compilation_cache")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
# Every compile is cached, however quick (JAX's default skips those under a second).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# A bound turns on JAX's least-recently-used eviction, and with it a file lock around every
# read and write: without one, entries are written in place, unlocked, and a worker could
# read another's half-written entry. 1 GiB holds several runs of the whole suite.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))
