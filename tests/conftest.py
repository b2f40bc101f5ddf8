"""The suite runs on the CPU. Where JAX's CUDA plugin is installed (the deviceless GPU
compile tests), JAX_PLATFORMS=cpu keeps the plugin from looking for a GPU at start-up while
it still compiles for GPU topologies (fedpeft_jax.accelerators).

Compiling dominates most integration tests: many runs compile the same tiny round (a DP
config run twice, a run and its resumed self, the CLI subprocesses). The suite therefore
shares one persistent XLA compilation cache across its tests, its pytest-xdist workers,
both tiers and the subprocesses they start (they inherit the environment), keyed as JAX
keys it (the HLO, the compile options, the devices' kind and topology, the jaxlib
version), so a hit returns what the compile would. It lives in the repository's
.pytest_cache/xla_compilation_cache (git ignores it; delete the folder to empty it; a session
empties it past the bound below); a JAX_COMPILATION_CACHE_DIR already set wins. JAX writes
unbounded entries in place, without a lock: a process that read an entry while another wrote
it would warn and compile for itself. The DP tests also search the cache for their secret keys
(tests/test_dp_runs.py)."""

import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_CACHE_DIR = os.path.join(ROOT, ".pytest_cache", "xla_compilation_cache")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
# Every compile is cached, however quick (JAX's default skips those under a second).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# No bound is given to JAX: a bound turns on its least-recently-used eviction, which lists
# and reads the whole folder on every write (minutes over a suite's thousands of entries).
# Instead the folder is emptied at the start of a session that finds it over
# XLA_CACHE_MAX_BYTES (in the process that starts the session, not in xdist's workers).
XLA_CACHE_MAX_BYTES = 2 << 30


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


if (os.environ["JAX_COMPILATION_CACHE_DIR"] == XLA_CACHE_DIR
    and "PYTEST_XDIST_WORKER" not in os.environ and os.path.isdir(XLA_CACHE_DIR)
    and _folder_bytes(XLA_CACHE_DIR) > XLA_CACHE_MAX_BYTES):
  shutil.rmtree(XLA_CACHE_DIR, ignore_errors=True)
