"""The experiment runner: config validation, training loop, checkpoints and outputs.

Submodules are imported on use (`from fedpeft_jax.runner import outputs`), so loading
`validate` or `outputs` never pulls in JAX.
"""
