"""A run's rounds: the workdir, checkpoints, resume, the per-round metrics, the stop rules.

`run_rounds(experiment, workdir)` makes the workdir (only now: a config that fails while
the experiment is built leaves nothing behind), writes config.json and partition.json,
places the DP key, restores the latest checkpoint if there is one, and runs the remaining
rounds. The host never waits on the round it just dispatched: a round's metrics are read
(one host sync) once the next round is queued, so the device always has work; checkpoint
rounds read their own row first, so a checkpoint never gets ahead of metrics.jsonl. The
loop ends at config.federated.rounds, before a round that would exceed the privacy budget,
or (`stop_after_round`) as if the process were killed there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
from fedpeft_jax.federated import RoundPlan, ServerState, client_state_bytes, host_value, plan_round
from fedpeft_jax.federated import lora_aggregation as lora_agg
from fedpeft_jax.models.factory import attention_choice, device_capability
from fedpeft_jax.privacy import PrivacyPlan
from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.checkpointing import RunCheckpointer
from fedpeft_jax.runner.experiment import Experiment
from fedpeft_jax.runner.validate import ConfigError


@dataclasses.dataclass(frozen=True)
class RoundsOutcome:
  """What the rounds leave for the summary (`runner.summary.finish_run`)."""
  state: ServerState  # the server state after the last round run
  # Totals over every round so far, resumed ones included: bytes (up + down), the same
  # traffic under full fine-tuning (bytes_full), and training seconds.
  cumulative: dict
  stopped_early: bool  # before a round that would exceed privacy.max_epsilon
  rows: list[dict]  # metrics.jsonl's rows ([] on processes other than 0)
  checkpointer: RunCheckpointer  # closed; a private run seals it once the summary is built
  primary: bool  # process 0, which writes the workdir's files
  # stop_after_round ended the loop as a kill would: no summary, resume goes on from the
  # last checkpoint.
  interrupted: bool


def resolved_config(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json stores it: what a resumed run must match."""
  return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config: resuming it would mix the two."""
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      previous = json.load(f)
    if previous != resolved_config(config):
      raise ConfigError(f"--workdir {workdir} holds a run of a different config; use a new "
                        "--workdir (diff the two with config.json)", field="workdir")


@dataclasses.dataclass(frozen=True)
class _Pending:
  """A dispatched round whose device metrics are not read yet, and its host-side values."""
  round_index: int
  plan: RoundPlan
  round_bytes: dict
  metrics: Any  # device arrays
  evaluation: Optional[dict]  # device arrays; None in a round without evaluation
  reported: np.ndarray  # which clients have reported up to this round
  cumulative_bytes: int
  cumulative_bytes_full: int
  privacy_metrics: dict


class _Discard:
  """Stands in for the metrics log and TensorBoard on processes other than 0."""

  def __getattr__(self, name: str):
    return lambda *args, **kwargs: [] if name == "read" else None


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  return tqdm(total=total, initial=initial, desc="rounds", unit="round", dynamic_ncols=True)


def _checkpoint_meta(cumulative: dict, privacy: PrivacyPlan) -> dict:
  return {"cumulative": cumulative,
          "ledger": privacy.ledger.to_dict() if privacy.ledger else None}


def _metrics_row(pending: _Pending, metrics: dict, evaluation: Optional[dict], seconds: float,
                client_poisson: bool) -> dict[str, Any]:
  """One round's metrics.jsonl row from its host-side values (`pending`), its device metrics
  and evaluation read back to the host, before the privacy plan filters it."""
  row: dict[str, Any] = {"round": pending.round_index + 1}
  if evaluation is not None:
    row.update({"test_accuracy": float(evaluation["accuracy"]),
                "test_loss": float(evaluation["loss"])})
    if "val" in evaluation:
      row.update({"val_accuracy": float(evaluation["val"]["accuracy"]),
                  "val_loss": float(evaluation["val"]["loss"])})
  if evaluation is not None and "clients" in evaluation:
    clients = evaluation["clients"]
    row.update({"personalized_accuracy": float(clients["mean"]),
                "personalized_accuracy_min": float(clients["min"]),
                "personalized_accuracy_max": float(clients["max"])})
    # The mean over every client (above) counts those never sampled at their initial
    # rows (chance for FedPer's zero-init head); this one only clients that reported in
    # some round so far.
    accuracy = np.asarray(clients["accuracy"])
    seen = pending.reported & ~np.isnan(accuracy)
    row["personalized_accuracy_trained"] = float(accuracy[seen].mean()) if seen.any() else None
  plan, round_bytes = pending.plan, pending.round_bytes
  row.update({
      "train_loss": float(metrics["train_loss"]),
      "clients_sampled": plan.num_sampled,
      "clients_reporting": plan.num_reporting,
      "clients_contributed": int(metrics["clients_contributed"]),
      "clients_nonfinite": int(metrics["clients_nonfinite"]),
      "local_steps": int(metrics["local_steps"]),
      "executed_steps": int(metrics["executed_steps"]),
      "bytes_up": round_bytes["bytes_up"],
      "bytes_down": round_bytes["bytes_down"],
      "cumulative_bytes": pending.cumulative_bytes,
      "cumulative_bytes_full_equivalent": pending.cumulative_bytes_full,
      "seconds": seconds,
  })
  for key in ("clip_norm", "unclipped_fraction", "unclipped_fraction_noisy", "update_norm"):
    if key in metrics:
      row[key] = float(metrics[key])
  if client_poisson:
    row["poisson_dropped"] = int(metrics["poisson_dropped"])
  row.update(pending.privacy_metrics)
  return row


class _Releases:
  """Logs rounds once their device metrics are read: metrics.jsonl, TensorBoard, the bar."""

  def __init__(self, privacy: PrivacyPlan, metrics_log: Any, tensorboard: Any, bar: Any,
               cumulative: dict):
    self.privacy, self.metrics_log, self.tensorboard, self.bar = (
        privacy, metrics_log, tensorboard, bar)
    self.cumulative = cumulative
    self.last = time.time()

  def finish(self, pending: _Pending) -> None:
    """Reads a dispatched round's device metrics (one host sync) and logs its row."""
    metrics, evaluation = jax.device_get((pending.metrics, pending.evaluation))
    now = time.time()
    seconds, self.last = now - self.last, now
    self.cumulative["seconds"] += seconds
    row = _metrics_row(pending, metrics, evaluation, seconds, self.privacy.client.poisson)
    row = self.privacy.filter_metrics(row)  # under DP: only what epsilon covers, unless asked
    self.metrics_log.append(row)
    self.tensorboard.log(row, step=pending.round_index + 1)
    if self.bar is not None:
      if "test_accuracy" in row:
        shown = {"acc": f"{row['test_accuracy']:.4f}"}
        if "cumulative_bytes" in row:  # under DP-FedAvg the traffic reveals the sample size
          shown["MB"] = f"{row['cumulative_bytes'] / 1e6:.2f}"
        self.bar.set_postfix(**shown)
      self.bar.update(1)


def _prepare_workdir(experiment: Experiment, workdir: str) -> bool:
  """Makes the workdir and (process 0) writes config.json and partition.json; returns
  whether this process is process 0. Several processes (jax.distributed) share the workdir:
  process 0 writes the files, all take part in the (collective) checkpoints."""
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    outputs.atomic_write_json(os.path.join(workdir, "config.json"),
                              resolved_config(experiment.config))
    # Per-client class histograms are not covered by DP: under DP written only if asked.
    if "partition" in experiment.privacy.filter_metrics({"partition": None}):
      outputs.atomic_write_json(os.path.join(workdir, "partition.json"),
                                experiment.partition.to_json())
  return primary


def _dp_key(config: ml_collections.ConfigDict, checkpointer: RunCheckpointer, workdir: str,
            secret_key: bool, resuming: bool) -> Optional[np.ndarray]:
  """The dp stream's key data: from the OS, unless the config asks for noise derived from its
  seed (tests and debugging; no guarantee then). Under privacy the checkpoints are private
  (0700/0600), hold no key, and the OS key lives in their folder's secret file until the
  run finishes (runner.checkpointing). None: a fresh private run draws it from the OS
  (engine.init)."""
  if not secret_key:  # no privacy, or privacy.reproducible_noise
    return rng_lib.stream_key_data(config.seed, "dp")
  if not resuming:
    return None
  dp_key = checkpointer.read_secret()
  if dp_key is None and checkpointer.latest_step() >= config.federated.rounds:
    return np.zeros(rng_lib.DP_KEY_WORDS, np.uint32)  # finished: no round left to noise
  if dp_key is None:
    raise ConfigError(
        f"--workdir {workdir}: its checkpoints hold no DP key (the run's secret file is "
        "gone: erased when the run finished, or deleted); resuming would release rounds "
        "under a new key: restore the run's files or use a new --workdir", field="workdir")
  return dp_key


def _check_released(metrics_path: str, workdir: str, resuming: bool, private: bool) -> None:
  """A metrics.jsonl without a checkpoint to resume from: a private run refuses (a fresh
  start would release those rounds again with new, unaccounted noise), another warns and
  rewrites them. Every process reads it (the workdir is shared), so all refuse together."""
  released = outputs.MetricsLog(metrics_path).read()
  if not resuming and released:
    message = (f"--workdir {workdir}: metrics.jsonl holds {len(released)} released rounds but "
               "no checkpoint can be restored")
    if private:
      raise ConfigError(f"{message}; restore {os.path.join(workdir, 'checkpoints')} or use a "
                        "new --workdir", field="workdir")
    print(f"Warning: {message}; starting afresh and rewriting them")


def _restore_or_start(experiment: Experiment, state: ServerState, checkpointer: RunCheckpointer,
                      metrics_log: Any, workdir: str, secret_key: bool, primary: bool
                      ) -> tuple[ServerState, dict]:
  """(server state, cumulative counters) to go on from: the latest checkpoint's (metrics.jsonl
  cut back to its round), or round 0's (a private run checkpoints it at once)."""
  privacy = experiment.privacy
  try:
    restored = checkpointer.restore_latest(state)
  except ValueError as e:  # orbax: a stored array whose shape or dtype the state no longer has
    raise ConfigError(
        f"--workdir {workdir}: its checkpoints do not fit this run's server state "
        f"({str(e).strip().splitlines()[0][:200]}); they may come from an older fedpeft_jax "
        "(e.g. a 2-word dp_rng): resume them with that version or use a new --workdir",
        field="workdir") from e
  cumulative = {"bytes": 0, "bytes_full": 0, "seconds": 0.0}
  if restored is not None:
    # The key was never checkpointed: keep the one placed above (the secret, or the seed's).
    state, meta = restored[0].replace(dp_rng=state.dp_rng), restored[1]
    cumulative = meta["cumulative"]
    privacy.restore_ledger(meta.get("ledger"))
    metrics_log.truncate_after(int(state.round))
    print(f"Resumed from round {int(state.round)} in {workdir}")
  else:
    metrics_log.truncate_after(0)
    if secret_key and primary:
      checkpointer.write_secret(host_value(state.dp_rng))
    if experiment.private:
      # Round 0's checkpoint is committed before any row is released: a DP run killed
      # before its first periodic checkpoint then resumes (with the same key) and replays
      # the rows it had written, instead of starting afresh and releasing them again.
      checkpointer.save(0, state, {"cumulative": cumulative,
                                   "ledger": privacy.ledger.to_dict()})
      checkpointer.wait()
  return state, cumulative


def _print_start(experiment: Experiment, state: ServerState) -> None:
  """The run's header, its compute choices (and why), and the per-client state's size."""
  config, model = experiment.config, experiment.model
  print(experiment.header())
  _, attention_why = attention_choice(config, model, jax.default_backend(),
                                      device_capability(jax.devices()[0]))
  print(f"compute dtype {jnp.dtype(model.dtype).name} | attention {model.attention} "
        f"({attention_why}) | "
        f"feature cache {experiment.feature_cache_note} | "
        f"clients per chunk {experiment.clients_per_chunk}: {experiment.chunk_note}")
  if state.clients is not None:
    print(f"per-client state: {client_state_bytes(state) / 1e6:.3f} MB per device "
          f"({config.federated.num_clients} clients split over {experiment.num_devices} "
          "device(s))")


def _evaluate(experiment: Experiment, state: ServerState, round_index: int) -> dict:
  """The global model's test (and validation) scores, and with per-client evaluation each
  client's model on its own test set (device arrays, read with the round's metrics)."""
  # The global model: the trainable leaves over the frozen weights with what FedEx-LoRA /
  # FLoRA folded into them.
  global_params = peft.merge(state.trainable, lora_agg.fold_into(
      experiment.global_frozen_on_device, state.folded))
  evaluation = experiment.evaluate_global(global_params, *experiment.test_set)
  if experiment.validation_set is not None:
    evaluation["val"] = experiment.evaluate_global(global_params, *experiment.validation_set)
  if experiment.evaluate_clients is not None:
    # The clients' personal rows as trained in the rounds; FedBABU's fixed initial ones.
    personal_rows = (state.clients["rule"] if experiment.client_state_spec is not None
                     else experiment.fixed_personal_rows)
    evaluation["clients"] = experiment.evaluate_clients(
        state.trainable, lora_agg.fold_into(experiment.frozen_on_device, state.folded),
        personal_rows, experiment.client_test_data, experiment.client_data,
        jax.random.fold_in(experiment.personal_eval_key, round_index))
  return evaluation


def run_rounds(experiment: Experiment, workdir: str, *, progress: bool = True,
               stop_after_round: int | None = None) -> RoundsOutcome:
  """Runs (or resumes) the experiment's rounds in `workdir` (module docstring)."""
  config, privacy, algorithm = experiment.config, experiment.privacy, experiment.algorithm
  federated = config.federated
  primary = _prepare_workdir(experiment, workdir)
  secret_key = experiment.private and not privacy.reproducible_noise
  checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.keep_checkpoints, private=experiment.private)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  resuming = checkpointer.latest_step() is not None
  dp_key = _dp_key(config, checkpointer, workdir, secret_key, resuming)
  _check_released(metrics_path, workdir, resuming, experiment.private)
  state = algorithm.init(experiment.trainable, seed=config.seed, clip_norm=privacy.clip_norm,
                         dp_key=dp_key)
  metrics_log = outputs.MetricsLog(metrics_path) if primary else _Discard()
  state, cumulative = _restore_or_start(experiment, state, checkpointer, metrics_log, workdir,
                                        secret_key, primary)
  # Who takes part is what client-level DP hides: under DP-FedAvg clients are drawn from
  # the secret dp stream (read from the state, so a resumed run draws the same clients).
  sampling_seed = (rng_lib.key_seed(host_value(state.dp_rng)) if privacy.mechanism == "dp_fedavg"
                   else rng_lib.stream_seed(config.seed, "sampling"))
  tensorboard = (outputs.TensorBoardLogger(os.path.join(workdir, "tensorboard"),
                                           purge_step=int(state.round) + 1)
                 if primary else _Discard())
  _print_start(experiment, state)
  bar = _progress(federated.rounds, int(state.round), progress and primary)
  stopped_early = False
  releases = _Releases(privacy, metrics_log, tensorboard, bar, cumulative)

  def draw(round_index: int) -> RoundPlan:
    return plan_round(sampling_seed, round_index, federated.num_clients,
                      experiment.clients_per_round, federated.dropout,
                      poisson=experiment.poisson_sampling)

  pending: _Pending | None = None
  # Which clients have reported so far (personalized_accuracy_trained); a resumed run
  # replays the earlier rounds' draws.
  reported = np.zeros(federated.num_clients, bool)
  for round_index in range(int(state.round)):
    reported[draw(round_index).reporting] = True
  for round_index in range(int(state.round), federated.rounds):
    plan = draw(round_index)
    reported[plan.reporting] = True
    if privacy.would_exceed(plan.reporting):
      print(f"Stopping before round {round_index + 1}: it would exceed privacy.max_epsilon "
            f"{privacy.max_epsilon}")
      stopped_early = True
      break
    state, metrics = algorithm.apply(state, experiment.round_frozen_on_device,
                                     experiment.client_data, plan)
    evaluation = None
    if (round_index + 1) % federated.eval_every == 0 or round_index + 1 == federated.rounds:
      evaluation = _evaluate(experiment, state, round_index)
    privacy.record(plan.reporting)
    round_bytes = experiment.comm_cost.round_bytes(plan.num_sampled, plan.num_reporting)
    cumulative["bytes"] += round_bytes["bytes_down"] + round_bytes["bytes_up"]
    cumulative["bytes_full"] += round_bytes["bytes_full_equivalent"]
    if pending is not None:
      releases.finish(pending)
    pending = _Pending(round_index=round_index, plan=plan, round_bytes=round_bytes,
                       metrics=metrics, evaluation=evaluation, reported=reported.copy(),
                       cumulative_bytes=cumulative["bytes"],
                       cumulative_bytes_full=cumulative["bytes_full"],
                       privacy_metrics=privacy.metrics())
    done = round_index + 1 == federated.rounds
    stopping = (stop_after_round is not None and round_index + 1 >= stop_after_round
                and not done)
    if done or (config.checkpoint_every and (round_index + 1) % config.checkpoint_every == 0):
      releases.finish(pending)
      pending = None
      checkpointer.save(round_index + 1, state, _checkpoint_meta(cumulative, privacy))
    if stopping:  # as if killed here: rows past the last checkpoint are redone on resume
      if pending is not None:
        releases.finish(pending)
      checkpointer.close()
      tensorboard.close()
      return RoundsOutcome(state=state, cumulative=cumulative, stopped_early=False, rows=[],
                           checkpointer=checkpointer, primary=primary, interrupted=True)
  if pending is not None:
    releases.finish(pending)
  if bar is not None:
    bar.close()
  if stopped_early and checkpointer.latest_step() != int(state.round):
    checkpointer.save(int(state.round), state, _checkpoint_meta(cumulative, privacy))
  checkpointer.close()
  tensorboard.close()
  return RoundsOutcome(state=state, cumulative=cumulative, stopped_early=stopped_early,
                       rows=metrics_log.read(), checkpointer=checkpointer, primary=primary,
                       interrupted=False)
