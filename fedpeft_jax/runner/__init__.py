"""The experiment runner: config validation, training loop, checkpoints and outputs.

Library modules (models, peft, data, federated, privacy) never import the runner; the
runner composes them. `train.run` reads config -> `experiment.build_experiment` (data, model,
privacy plan, the compiled round; nothing written) -> `loop.run_rounds` (workdir,
checkpoints, metrics) -> `summary.finish_run` (summary.json, plots, table). Submodules are
imported on use (`from fedpeft_jax.runner import outputs`); `outputs` does not import JAX.
"""
