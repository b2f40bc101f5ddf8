"""A run's summary: summary.json, the plots and the one-row table.

summary.json is written last and marks the run finished: a later start in the same
workdir prints it (`finished_summary`) instead of training again. Before it, a private run
seals its checkpoints (the DP key and per-client rows are erased from disk).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax.numpy as jnp

from fedpeft_jax import peft
from fedpeft_jax.federated import client_rows, client_state_bytes
from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.experiment import Experiment
from fedpeft_jax.runner.loop import RoundsOutcome

SUMMARY_COLUMNS = ["method", "final_accuracy", "best_accuracy", "trainable_params",
                   "MB_per_round", "total_MB"]


def best_round(rows: list[dict]) -> dict:
  """The best evaluated round and its test accuracy. Chosen on validation (`val_accuracy`,
  the first of ties) when the run has a validation split, so the test split is only
  reported; without one, the round of the highest test accuracy, an optimistic number that
  `best_selected_on: "test"` marks."""
  evaluated = [x for x in rows if "test_accuracy" in x]
  if not evaluated:
    return {"best_accuracy": None, "best_round": None, "best_selected_on": None}
  on = "val_accuracy" if all("val_accuracy" in x for x in evaluated) else "test_accuracy"
  best = max(evaluated, key=lambda x: x[on])  # max keeps the first of equal values
  out = {"best_accuracy": best["test_accuracy"], "best_round": best["round"],
         "best_selected_on": "validation" if on == "val_accuracy" else "test"}
  if on == "val_accuracy":
    out.update(best_val_accuracy=best["val_accuracy"],
               final_val_accuracy=evaluated[-1]["val_accuracy"])
  return out


def summary_row(summary: dict) -> dict:
  """The summary's row of the printed table (SUMMARY_COLUMNS): traffic in MB, or None where
  DP hides the byte counts."""
  total = summary.get("total_bytes")  # absent when DP hides it (non-private)
  return {
      "method": summary["method"],
      "final_accuracy": summary["final_accuracy"],
      "best_accuracy": summary["best_accuracy"],
      "trainable_params": summary["trainable_params"],
      "MB_per_round": None if total is None else round(total / max(summary["rounds"], 1) / 1e6, 4),
      "total_MB": None if total is None else round(total / 1e6, 3),
  }


def finished_summary(workdir: str) -> Optional[dict]:
  """The summary of a run that already finished in `workdir` (printed with its table), or
  None when there is none: a finished run is reported, never trained again."""
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    return None
  with open(summary_path) as f:
    summary = json.load(f)
  print(f"Run in {workdir} already finished; summary:")
  print(outputs.format_table([summary_row(summary)], SUMMARY_COLUMNS))
  return summary


def build_summary(experiment: Experiment, outcome: RoundsOutcome, started: float
                  ) -> dict[str, Any]:
  """summary.json's contents: what was run, its final and best accuracies, its traffic and
  costs, and the privacy plan's summary, filtered as the plan releases metrics. `started`:
  when this session began (time.time()), for wall_seconds_this_session."""
  config, state, rows = experiment.config, outcome.state, outcome.rows
  federated, cost, cumulative = config.federated, experiment.comm_cost, outcome.cumulative
  accuracies = [x["test_accuracy"] for x in rows if "test_accuracy" in x]
  personalized = [x["personalized_accuracy"] for x in rows if "personalized_accuracy" in x]
  personalized_trained = [x["personalized_accuracy_trained"] for x in rows
                          if "personalized_accuracy_trained" in x]
  summary = {
      "dataset": config.data.dataset,
      "method": config.peft.method,
      "lora_aggregation": federated.lora_aggregation,
      "pretrained": config.model.pretrained or "scratch",
      "rounds": int(state.round),
      "stopped_early_for_privacy_budget": outcome.stopped_early,
      "final_accuracy": accuracies[-1] if accuracies else None,
      **best_round(rows),
      "final_personalized_accuracy": personalized[-1] if personalized else None,
      "final_personalized_accuracy_trained": (personalized_trained[-1] if personalized_trained
                                              else None),
      "personal": federated.personal,
      "personal_schedule": federated.personal_schedule if federated.personal else None,
      # What each client keeps for itself, never sent.
      "personal_params_per_client": (0 if experiment.personal_init is None
                                     else peft.count(experiment.personal_init)),
      # Per-client rows the round carries (personal heads, top-k residuals), split over
      # the devices by client id: what one device holds, and the whole population's.
      "client_state_bytes_per_device": client_state_bytes(state),
      "client_state_bytes": (client_state_bytes(state) * federated.num_clients
                             // client_rows.rows_per_device(federated.num_clients,
                                                            experiment.num_devices)),
      "trainable_params": cost.trainable_params,
      "total_params": cost.total_params,
      "bytes_per_transfer": cost.trainable_bytes,
      "total_bytes": cumulative["bytes"],
      "total_bytes_full_equivalent": cumulative["bytes_full"],
      "train_seconds": cumulative["seconds"],
      "compute_dtype": jnp.dtype(experiment.model.dtype).name,
      "feature_cache": experiment.feature_cache_note,
      "clients_per_chunk": experiment.clients_per_chunk,
      "wall_seconds_this_session": time.time() - started,
      "partition": experiment.partition.summary(),
      "validation_examples": experiment.dataset.num_val,
      "versions": outputs.versions(),
  }
  summary.update(experiment.privacy.summary())
  return experiment.privacy.filter_metrics(summary)


def finish_run(experiment: Experiment, outcome: RoundsOutcome, workdir: str, started: float
               ) -> dict:
  """Builds the summary (`build_summary`), seals a private run's checkpoints, then (process
  0) writes the plots and summary.json, which marks the run finished, and prints the table.
  Returns the summary."""
  summary = build_summary(experiment, outcome, started)
  if experiment.private:
    # Nothing is left to resume: erase the key and the per-client rows from disk (every
    # process: orbax's reads and writes are collective). Before the summary, which marks
    # the run finished: a seal killed mid-way is completed by the next start, which finds
    # no summary and resumes at the last round.
    outcome.checkpointer.seal(outcome.state)
  if outcome.primary:
    outputs.write_plots(outcome.rows, workdir, title=experiment.header())
    outputs.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    print(outputs.format_table([summary_row(summary)], SUMMARY_COLUMNS))
  return summary
