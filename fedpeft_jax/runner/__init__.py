"""The experiment runner: config validation, training loop, checkpoints and outputs.

Library modules (models, peft, data, federated, privacy) never import the runner; the
runner composes them (config -> data + model -> rounds -> metrics). Submodules are imported
on use (`from fedpeft_jax.runner import outputs`); `outputs` does not import JAX.
"""
