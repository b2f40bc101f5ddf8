"""The suite runs on the CPU. Where JAX's CUDA plugin is installed (the deviceless GPU
compile tests), JAX_PLATFORMS=cpu keeps the plugin from looking for a GPU at start-up while
it still compiles for GPU topologies (fedpeft_jax.accelerators)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
