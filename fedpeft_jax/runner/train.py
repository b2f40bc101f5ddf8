"""Run one federated experiment from a config: data, model, rounds, outputs, resume.

Everything a run produces derives from (config, seed), through the named streams of
`fedpeft_jax.rng`: init, data, client sampling from (stream, round), client randomness from
the server state's key folded with (round, client id). The exception is DP: its stream
comes from the OS and lives only in the checkpointed server state. A run killed at any
moment and resumed from its latest checkpoint therefore ends with the same params and
metrics as an uninterrupted one, and two DP runs of one config draw different noise.
"""

from __future__ import annotations

import time

import ml_collections

from fedpeft_jax.runner.experiment import (build_experiment, client_spec, input_spec, load_data,
                                           local_test_partition, lora_client_ranks, optimizers,
                                           partition_clients, poisson_clients, resolve_local_epochs,
                                           round_slots, round_spec, training_peft)
from fedpeft_jax.runner.loop import check_workdir, run_rounds
from fedpeft_jax.runner.summary import (SUMMARY_COLUMNS, best_round, finish_run,
                                        finished_summary, summary_row)
from fedpeft_jax.runner.validate import validate_config

# The set-up's helpers (runner.experiment) and the summary's (runner.summary), importable
# from here as before the run was split: experiments/plan.py and the tests use them.
__all__ = [
    "run", "load_data", "partition_clients", "local_test_partition", "training_peft",
    "lora_client_ranks", "resolve_local_epochs", "input_spec", "optimizers", "client_spec",
    "poisson_clients", "round_slots", "round_spec", "best_round", "summary_row",
    "SUMMARY_COLUMNS", "validate_config",
]


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        stop_after_round: int | None = None) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the summary dict.

  config -> Experiment (`runner.experiment`: data, model, privacy plan, compiled round;
  nothing written) -> rounds (`runner.loop`: the workdir, checkpoints, metrics.jsonl) ->
  summary (`runner.summary`: summary.json, plots, the table). A workdir that already holds
  a finished run of this config returns its summary; one of another config is refused.
  `stop_after_round`: return {} after that round as if killed there (tests of resume).
  """
  validate_config(config)
  check_workdir(config, workdir)
  finished = finished_summary(workdir)
  if finished is not None:
    return finished
  started = time.time()
  experiment = build_experiment(config)
  outcome = run_rounds(experiment, workdir, progress=progress,
                       stop_after_round=stop_after_round)
  if outcome.interrupted:
    return {}
  return finish_run(experiment, outcome, workdir, started)
