"""Run one federated experiment from a config: data, model, rounds, outputs, resume.

Everything a run produces derives from (config, seed), through the named streams of
`fedpeft_jax.rng`: init, data, client sampling from (stream, round), client randomness from
the server state's key folded with (round, client id). The exception is DP: its stream
comes from the OS and lives only in the checkpointed server state. A run killed at any
moment and resumed from its latest checkpoint therefore ends with the same params and
metrics as an uninterrupted one, and two DP runs of one config draw different noise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.accelerators import aot
from fedpeft_jax import rng as rng_lib
from fedpeft_jax.federated import client_rows, compression
from fedpeft_jax.federated import personal as personal_lib
from fedpeft_jax.federated import (ClientSpec, ClientStateSpec, RoundSpec,
                                   auto_clients_per_chunk, build_algorithm, build_cache,
                                   choose_input, client_state_bytes, comm_cost, compiled_round_bytes,
                                   device_bytes_limit, host_value, make_client_evaluate,
                                   make_client_optimizer, make_evaluate, make_mesh, make_server_optimizer,
                                   place_eval_set, plan_round, replicate,
                                   resolve_clients_per_round)
from fedpeft_jax.federated import lora_aggregation as lora_agg
from fedpeft_jax.models.factory import (attention_choice, base_param_shapes, build_model,
                                        device_capability, init_params)
from fedpeft_jax.privacy import PrivacyBudgetError, PrivacyPlan, poisson_capacity
from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.checkpointing import RunCheckpointer
from fedpeft_jax.runner.validate import (ConfigError, as_config_error, parse_clients_per_chunk,
                                         validate_config)

PyTree = Any


def load_data(config: ml_collections.ConfigDict):
  d = config.data
  kw = {}
  if d.dataset in ("digits", "synthetic"):
    kw["resolution"] = d.resolution
  elif d.host_resolution > 0:  # e.g. Resisc45's 256 px -> 224 px: 3.8 GB instead of 5.0 GB
    kw["resolution"] = d.host_resolution
  seed = rng_lib.stream_seed(config.seed, "data")
  dataset = fdata.load_dataset(d.dataset, data_dir=d.data_dir or None,
                               train_size=d.train_size or None,
                               sample_with_replacement=d.sample_with_replacement, seed=seed,
                               classes=d.classes, **kw)
  # The validation split leaves the training pool before any client is drawn from it.
  dataset = as_config_error("data", lambda: fdata.split_validation(
      dataset, d.val_size, rng_lib.stream_seed(config.seed, "validation")))
  return dataset, partition_clients(config, dataset.train_labels)


def partition_clients(config: ml_collections.ConfigDict, train_labels: np.ndarray) -> Any:
  """The clients' training indices (config.data's partition over config.federated's
  clients), drawn from the seed's data stream."""
  d = config.data
  seed = rng_lib.stream_seed(config.seed, "data")
  draw = lambda min_size: fdata.partition(  # noqa: E731
      train_labels, config.federated.num_clients, method=d.partition, alpha=d.alpha,
      min_size=min_size, seed=seed, shards_per_client=d.shards_per_client)
  try:
    return draw(d.min_size)
  except ValueError as e:
    n, k = len(train_labels), config.federated.num_clients
    if d.partition != "dirichlet":
      raise ConfigError(
          f"config.data.partition {d.partition!r} of {n} examples over config.federated."
          f"num_clients={k} cannot be drawn ({e}); use fewer clients"
          + (" or a smaller config.data.shards_per_client" if d.partition == "shards" else ""),
          field="config.federated.num_clients") from e
    fits = "use fewer clients or a larger alpha"
    if d.min_size * k <= n:
      # The first draw is the same whatever min_size: its smallest client is what fits.
      try:
        smallest = int(min(draw(0).sizes))
      except ValueError:  # not even min_size 0 can be drawn (more clients than examples)
        smallest = 0
      if smallest > 0:
        fits = f"set config.data.min_size <= {smallest} (fits this seed), or {fits}"
      else:
        fits = f"a client of this seed's draw holds no example: {fits}"
    raise ConfigError(
        f"config.data.partition 'dirichlet' of {n} examples over config.federated."
        f"num_clients={k} with config.data.alpha={d.alpha}, config.data.min_size={d.min_size} "
        f"cannot be drawn ({e.args[0].split(';')[0]}): {fits}",
        field="config.data.min_size") from e


def local_test_partition(test_labels: np.ndarray, part: Any, size: int, seed: int) -> Any:
  """Per-client test sets (`data.partition_test`); a test split that cannot supply them is
  the config's `federated.local_test_size` error."""
  try:
    return fdata.partition_test(test_labels, part, size, seed=seed)
  except ValueError as e:
    raise ValueError(f"federated.local_test_size ({size}): {e}") from e


def training_peft(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.peft as the run trains it. FFA-LoRA (federated.lora_aggregation='ffa') is
  peft.lora.freeze_a=True: one path (the trainable mask) keeps A frozen and unsent."""
  if config.federated.lora_aggregation != "ffa":
    return config.peft
  cfg = copy.deepcopy(config.peft)
  cfg.lora.freeze_a = True
  return cfg


def lora_client_ranks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Each client's LoRA rank from peft.lora.client_ranks ('uniform:...' draws from the seed's
  data stream); () when unset (every client at peft.lora.rank)."""
  spec = config.peft.lora.client_ranks
  if not spec.strip():
    return ()
  return tuple(lora_agg.client_ranks(spec, config.federated.num_clients,
                                     rng_lib.stream_seed(config.seed, "data"),
                                     max_rank=config.peft.lora.rank).tolist())


def resolve_local_epochs(config: ml_collections.ConfigDict, sizes: Any) -> int:
  """federated.local_epochs, or with local_steps > 0 enough epochs for the smallest client
  (of `sizes`) to reach local_steps."""
  fed = config.federated
  if fed.local_steps <= 0:
    return fed.local_epochs
  smallest = max(1, int(min(sizes)))
  return math.ceil(fed.local_steps / math.ceil(smallest / fed.batch_size))


def input_spec(config: ml_collections.ConfigDict, model: Any, mask: Any, augment: str
               ) -> tuple[Any, str]:
  """What the clients' data holds (raw images or a cached frozen prefix), and why."""
  depth = model.arch()["depth"]
  return choose_input(
      config.federated.feature_cache, peft.only_head_trainable(mask),
      peft.first_trainable_block(mask, depth, peft.to_spec(config.peft).last_blocks),
      depth, augment, config.model.dropout == 0 and config.model.attention_dropout == 0,
      config.model.image_size)


def optimizers(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(client optimizer, server optimizer) of config.federated."""
  fed = config.federated
  client_tx = make_client_optimizer(fed.client_optimizer, fed.client_lr, fed.client_momentum,
                                    fed.client_nesterov, fed.client_weight_decay)
  server_tx = make_server_optimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum,
                                    fed.server_b1, fed.server_b2, fed.server_eps,
                                    bias_correction=fed.server_bias_correction)
  return client_tx, server_tx


def client_spec(config: ml_collections.ConfigDict, local_epochs: int, max_examples: int,
                augment: str, inputs: Any, privacy: PrivacyPlan) -> ClientSpec:
  """The run's local training, as the round compiles it."""
  fed = config.federated
  return ClientSpec(batch_size=fed.batch_size, local_epochs=local_epochs,
                    max_examples=max_examples, image_size=config.model.image_size,
                    augment=augment, inputs=inputs, local_steps=fed.local_steps,
                    label_smoothing=fed.label_smoothing, fedprox_mu=fed.fedprox_mu,
                    dp=privacy.client)


def poisson_clients(config: ml_collections.ConfigDict, privacy: PrivacyPlan) -> bool:
  """Whether rounds draw clients by Poisson sampling: DP-FedAvg's accounting needs it, and
  federated.client_sampling='poisson' asks for it (a non-DP reference sampled alike)."""
  return privacy.poisson_clients or config.federated.client_sampling == "poisson"


def round_slots(config: ml_collections.ConfigDict, per_round: int, privacy: PrivacyPlan) -> int:
  """The fewest client slots a round compiles for. DP-FedAvg is accounted for Poisson
  client sampling, so with privacy.sampling='poisson' that is how clients are drawn; rounds
  pad to a capacity the count exceeds with probability 1e-6 (a rarer, larger round just
  compiles once more)."""
  num_clients = config.federated.num_clients
  if poisson_clients(config, privacy) and per_round < num_clients:
    return poisson_capacity(per_round, 1e-6, client_size=num_clients)
  return per_round


def round_spec(config: ml_collections.ConfigDict, chunk: int, num_devices: int,
               privacy: PrivacyPlan, min_slots: int, client_ranks: tuple[int, ...]) -> RoundSpec:
  """The run's round at `chunk` clients per chunk over `num_devices` devices."""
  fed = config.federated
  return RoundSpec(clients_per_chunk=chunk, num_devices=num_devices, weighting=fed.weighting,
                   max_update_norm=fed.max_update_norm, dp=privacy.server,
                   min_slots=min_slots, wire_dtype=fed.wire_dtype,
                   compression=fed.compression, compression_block=fed.compression_block,
                   compression_fraction=fed.compression_fraction,
                   num_clients=fed.num_clients, lora_aggregation=fed.lora_aggregation,
                   client_ranks=client_ranks)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        stop_after_round: int | None = None) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the summary dict."""
  validate_config(config)
  summary_path = os.path.join(workdir, "summary.json")
  resolved = json.loads(config.to_json_best_effort())
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      previous = json.load(f)
    if previous != resolved:
      raise ConfigError(f"--workdir {workdir} holds a run of a different config; use a new "
                        "--workdir (diff the two with config.json)", field="workdir")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    print(f"Run in {workdir} already finished; summary:")
    print(outputs.format_table([summary_row(summary)], SUMMARY_COLUMNS))
    return summary
  t_start = time.time()
  fed = config.federated
  dataset, part = load_data(config)
  model = as_config_error("model", lambda: build_model(config, dataset.num_classes))
  params = init_params(config, model, jnp.asarray(rng_lib.stream_key_data(config.seed, "init")))
  mask = peft.trainable_mask(params, training_peft(config))
  trainable, frozen = peft.split(params, mask)
  # Personalisation: the server holds and sends only the shared leaves; the personal ones
  # start at their init on every client (`federated.personal`).
  personal_init = None
  if fed.personal:
    trainable, personal_init = as_config_error(
        "federated", lambda: personal_lib.split_personal(trainable, fed.personal))
  babu = fed.personal_schedule == "fedbabu"
  if babu and personal_init is not None:
    as_config_error("federated", lambda: personal_lib.check_fedbabu(personal_init))
    personal_init = personal_lib.fedbabu_init(personal_init, jax.random.fold_in(
        jax.random.wrap_key_data(jnp.asarray(rng_lib.stream_key_data(config.seed, "init"))), 1))
  per_client_eval = personal_init is not None or fed.eval_per_client
  upload = (0 if fed.compression == "none" else compression.encoded_bytes(
      trainable, fed.compression, fed.compression_block, fed.compression_fraction))
  # FedEx-LoRA / FLoRA: every download also carries the folded deltas of the target kernels.
  folds = fed.lora_aggregation in lora_agg.FOLDING_AGGREGATIONS
  cost = comm_cost(trainable, params, base_param_shapes(config, dataset.num_classes),
                   fed.wire_dtype, upload_bytes=upload,
                   download_extra=lora_agg.folded_zeros(trainable) if folds else None)

  num_devices = len(jax.devices())
  per_round = resolve_clients_per_round(fed.num_clients, fed.clients_per_round, fed.participation)
  fixed_chunk = parse_clients_per_chunk(fed.clients_per_chunk)
  augment = dataset.augment if config.data.augment == "auto" else config.data.augment
  max_n = int(max(part.sizes))

  local_epochs = resolve_local_epochs(config, part.sizes)

  def steps_of(n: int) -> int:  # the real local steps a client of n examples runs
    return int(fdata.num_local_steps(n, fed.batch_size, local_epochs, fed.local_steps))

  try:
    privacy = PrivacyPlan(config, np.asarray(part.sizes), per_round, steps_of,
                          len(jax.tree_util.tree_leaves(trainable)))
  except PrivacyBudgetError:
    raise  # its own one-line error at the command line
  except ValueError as e:  # the plan meets the data (e.g. dp_sgd with no client holding data)
    raise ConfigError(f"config.privacy: {e}", field="config.privacy") from e
  inputs, cache_note = input_spec(config, model, mask, augment)
  cspec = client_spec(config, local_epochs, max_n, augment, inputs, privacy)
  poisson_draws = poisson_clients(config, privacy)
  min_slots = round_slots(config, per_round, privacy)
  client_tx, server_tx = optimizers(config)
  mesh = make_mesh()
  # The frozen backbone lives on device once, in the compute dtype (no cast per step).
  base_frozen_dev = replicate(optax.tree.cast(frozen, model.dtype), mesh)
  personal_dev = None if personal_init is None else replicate(personal_init, mesh)
  # The global model's fixed part (the personal leaves at init, where a new client starts),
  # and what the round holds fixed (FedBABU also freezes the personal leaves at their init).
  global_frozen_dev = (base_frozen_dev if personal_dev is None
                       else peft.merge(base_frozen_dev, personal_dev))
  frozen_dev = global_frozen_dev if babu else base_frozen_dev
  client_rule, client_state = None, None
  if personal_init is not None and not babu:
    client_rule = personal_lib.make_personal_update(
        model, client_tx, cspec, dataset.num_classes, fed.personal_schedule,
        fed.personal_epochs)
    client_state = ClientStateSpec(init=lambda _: personal_init, num_clients=fed.num_clients)
  host_data = fdata.client_data(dataset, part, device=jax.local_devices(backend="cpu")[0])
  test_examples = np.asarray(dataset.test_images)
  val_examples = None if dataset.val_images is None else np.asarray(dataset.val_images)
  if inputs.kind != "images":
    cached_params = params  # the prefix reads frozen leaves only
    cached = lambda images: np.asarray(build_cache(model, cached_params, images, inputs,
                                                   fed.eval_batch_size))
    host_data = dataclasses.replace(host_data,
                                    images=cached(np.asarray(dataset.train_images)))
    test_examples = cached(test_examples)
    val_examples = None if val_examples is None else cached(val_examples)
    cached_bytes = host_data.images.nbytes + test_examples.nbytes + (
        0 if val_examples is None else val_examples.nbytes)
    cache_note += (f" ({cached_bytes / 1e6:.1f} MB, "
                   f"{host_data.images.dtype})")
  client_data = replicate(host_data, mesh)
  evaluate = make_evaluate(model, fed.eval_batch_size, config.model.image_size, mesh=mesh,
                           inputs=inputs)
  local_eval = None
  if per_client_eval:
    # Each client's local test set follows its training class mix (data.partition_test).
    test_part = as_config_error("federated", lambda: local_test_partition(
        dataset.test_labels, part, fed.local_test_size,
        rng_lib.stream_seed(config.seed, "personal")))
    local_test = replicate(fdata.client_data(fdata.as_test_source(
        dataclasses.replace(dataset, test_images=test_examples)), test_part), mesh)
    local_eval = make_client_evaluate(
        model, fed.eval_batch_size, config.model.image_size, mesh=mesh, inputs=inputs,
        adapt=(personal_lib.make_finetune(model, client_tx, cspec, dataset.num_classes,
                                          fed.personal_finetune_epochs) if babu else None))
    # FedBABU: every client fine-tunes its copy of the initial personal leaves.
    babu_rows = (client_rows.place(jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (fed.num_clients,) + np.shape(x)),
        personal_init), mesh) if babu else None)
    personal_key = jax.random.wrap_key_data(
        jnp.asarray(rng_lib.stream_key_data(config.seed, "personal")))

  client_ranks = lora_client_ranks(config)

  def build(chunk: int):
    rspec = round_spec(config, chunk, num_devices, privacy, min_slots, client_ranks)
    return build_algorithm(model, client_tx, server_tx, cspec, rspec, dataset.num_classes,
                           mesh=mesh, client_update=client_rule, client_state=client_state)

  def round_bytes(chunk: int) -> int | None:  # XLA's plan for one round at this chunk
    # From shapes alone, as experiments/plan.py lowers for a device-less target.
    trial = build(chunk)
    return compiled_round_bytes(trial.lower(trial.state_shapes(trainable), aot.like(frozen_dev),
                                            aot.like(client_data), per_round))

  if fixed_chunk:
    chunk, chunk_note = fixed_chunk, "federated.clients_per_chunk"
  else:
    chunk, chunk_note = auto_clients_per_chunk(per_round, num_devices, fed.batch_size,
                                               memory_of=round_bytes,
                                               bytes_limit=device_bytes_limit())
  algo = build(chunk)
  test_images, test_labels = place_eval_set(test_examples, dataset.test_labels, mesh)
  val_set = (None if val_examples is None
             else place_eval_set(val_examples, dataset.val_labels, mesh))

  # The workdir is made only once data, checkpoint and privacy plan are in hand: a run
  # that fails on its inputs leaves nothing behind. Several processes (jax.distributed)
  # share it: process 0 writes the files, all take part in the (collective) checkpoints.
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    outputs.atomic_write_json(config_path, resolved)
    # Per-client class histograms are not covered by DP: under DP written only if asked.
    if "partition" in privacy.filter_metrics({"partition": None}):
      outputs.atomic_write_json(os.path.join(workdir, "partition.json"), part.to_json())
  # The dp stream's key: from the OS, unless the config asks for noise derived from its seed
  # (tests and debugging; no guarantee then). Under privacy the checkpoints are private
  # (0700/0600), hold no key, and the OS key lives in their folder's secret file until the
  # run finishes (runner.checkpointing).
  private = privacy.mechanism != "none"
  secret_key = private and not privacy.reproducible_noise
  ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                         private=private)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  resuming = ckpt.latest_step() is not None
  dp_key = None  # a fresh private run draws it from the OS (engine.init)
  if not secret_key:  # no privacy, or privacy.reproducible_noise
    dp_key = rng_lib.stream_key_data(config.seed, "dp")
  elif resuming:
    dp_key = ckpt.read_secret()
    if dp_key is None and ckpt.latest_step() >= fed.rounds:
      dp_key = np.zeros(rng_lib.DP_KEY_WORDS, np.uint32)  # finished: no round left to noise
    elif dp_key is None:
      raise ConfigError(
          f"--workdir {workdir}: its checkpoints hold no DP key (the run's secret file is "
          "gone: erased when the run finished, or deleted); resuming would release rounds "
          "under a new key: restore the run's files or use a new --workdir", field="workdir")
  # Every process reads it (the workdir is shared), so all of them refuse together.
  released = outputs.MetricsLog(metrics_path).read()
  if not resuming and released:
    message = (f"--workdir {workdir}: metrics.jsonl holds {len(released)} released rounds but "
               "no checkpoint can be restored")
    if private:  # a fresh start would release those rounds again with new, unaccounted noise
      raise ConfigError(f"{message}; restore {os.path.join(workdir, 'checkpoints')} or use a "
                        "new --workdir", field="workdir")
    print(f"Warning: {message}; starting afresh and rewriting them")
  state = algo.init(trainable, seed=config.seed, clip_norm=privacy.clip_norm, dp_key=dp_key)
  metrics_log = outputs.MetricsLog(metrics_path) if primary else _Discard()
  try:
    restored = ckpt.restore_latest(state)
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
      ckpt.write_secret(host_value(state.dp_rng))
    if private:
      # Round 0's checkpoint is committed before any row is released: a DP run killed
      # before its first periodic checkpoint then resumes (with the same key) and replays
      # the rows it had written, instead of starting afresh and releasing them again.
      ckpt.save(0, state, {"cumulative": cumulative, "ledger": privacy.ledger.to_dict()})
      ckpt.wait()
  # Who takes part is what client-level DP hides: under DP-FedAvg clients are drawn from
  # the secret dp stream (read from the state, so a resumed run draws the same clients).
  sampling_seed = (rng_lib.key_seed(host_value(state.dp_rng)) if privacy.mechanism == "dp_fedavg"
                   else rng_lib.stream_seed(config.seed, "sampling"))
  tb = (outputs.TensorBoardLogger(os.path.join(workdir, "tensorboard"),
                                  purge_step=int(state.round) + 1) if primary else _Discard())

  header = (f"{config.data.dataset} | {'+'.join(peft.parse_methods(config.peft.method))} | "
            f"trainable {cost.trainable_params:,} / {cost.total_params:,} params | "
            f"{cost.trainable_bytes / 1e6:.3f} MB per transfer | {per_round} of "
            f"{fed.num_clients} clients per round | {num_devices} device(s), chunk {chunk}")
  print(header)
  _, attention_why = attention_choice(config, model, jax.default_backend(),
                                     device_capability(jax.devices()[0]))
  print(f"compute dtype {jnp.dtype(model.dtype).name} | attention {model.attention} "
        f"({attention_why}) | "
        f"feature cache {cache_note} | "
        f"clients per chunk {chunk}: {chunk_note}")
  if state.clients is not None:
    print(f"per-client state: {client_state_bytes(state) / 1e6:.3f} MB per device "
          f"({fed.num_clients} clients split over {num_devices} device(s))")
  bar = _progress(fed.rounds, int(state.round), progress and primary)
  stopped_early = False
  clock = {"last": time.time()}

  def finish(pending: dict) -> None:
    """Reads a dispatched round's device metrics (one host sync) and logs its row."""
    r, plan, b = pending["round"], pending["plan"], pending["bytes"]
    m, ev = jax.device_get((pending["metrics"], pending["eval"]))
    now = time.time()
    seconds, clock["last"] = now - clock["last"], now
    cumulative["seconds"] += seconds
    row: dict[str, Any] = {"round": r + 1}
    if ev is not None:
      row.update({"test_accuracy": float(ev["accuracy"]), "test_loss": float(ev["loss"])})
      if "val" in ev:
        row.update({"val_accuracy": float(ev["val"]["accuracy"]),
                    "val_loss": float(ev["val"]["loss"])})
    if ev is not None and "clients" in ev:
      row.update({"personalized_accuracy": float(ev["clients"]["mean"]),
                  "personalized_accuracy_min": float(ev["clients"]["min"]),
                  "personalized_accuracy_max": float(ev["clients"]["max"])})
      # The mean over every client (above) counts those never sampled at their initial
      # rows (chance for FedPer's zero-init head); this one only clients that reported in
      # some round so far.
      acc = np.asarray(ev["clients"]["accuracy"])
      seen = pending["reported"] & ~np.isnan(acc)
      row["personalized_accuracy_trained"] = float(acc[seen].mean()) if seen.any() else None
    row.update({
        "train_loss": float(m["train_loss"]),
        "clients_sampled": plan.num_sampled,
        "clients_reporting": plan.num_reporting,
        "clients_contributed": int(m["clients_contributed"]),
        "clients_nonfinite": int(m["clients_nonfinite"]),
        "local_steps": int(m["local_steps"]),
        "executed_steps": int(m["executed_steps"]),
        "bytes_up": b["bytes_up"],
        "bytes_down": b["bytes_down"],
        "cumulative_bytes": pending["cumulative_bytes"],
        "cumulative_bytes_full_equivalent": pending["cumulative_bytes_full"],
        "seconds": seconds,
    })
    for key in ("clip_norm", "unclipped_fraction", "unclipped_fraction_noisy", "update_norm"):
      if key in m:
        row[key] = float(m[key])
    if privacy.client.poisson:
      row["poisson_dropped"] = int(m["poisson_dropped"])
    row.update(pending["privacy"])
    row = privacy.filter_metrics(row)  # under DP: only what epsilon covers, unless asked
    metrics_log.append(row)
    tb.log(row, step=r + 1)
    if bar is not None:
      if "test_accuracy" in row:
        shown = {"acc": f"{row['test_accuracy']:.4f}"}
        if "cumulative_bytes" in row:  # under DP-FedAvg the traffic reveals the sample size
          shown["MB"] = f"{row['cumulative_bytes'] / 1e6:.2f}"
        bar.set_postfix(**shown)
      bar.update(1)

  # The host never waits on the round it just dispatched: round r's metrics are read after
  # round r + 1 is queued, so the device always has work. Checkpoint rounds read their own
  # row first, so a checkpoint never gets ahead of metrics.jsonl.
  pending: dict | None = None
  # Which clients have reported so far (personalized_accuracy_trained); a resumed run
  # replays the earlier rounds' draws.
  reported = np.zeros(fed.num_clients, bool)
  for r in range(int(state.round)):
    reported[plan_round(sampling_seed, r, fed.num_clients, per_round, fed.dropout,
                        poisson=poisson_draws).reporting] = True
  for r in range(int(state.round), fed.rounds):
    plan = plan_round(sampling_seed, r, fed.num_clients, per_round, fed.dropout,
                      poisson=poisson_draws)
    reported[plan.reporting] = True
    if privacy.would_exceed(plan.reporting):
      print(f"Stopping before round {r + 1}: it would exceed privacy.max_epsilon "
            f"{privacy.max_epsilon}")
      stopped_early = True
      break
    state, m = algo.apply(state, frozen_dev, client_data, plan)
    ev = None
    if (r + 1) % fed.eval_every == 0 or r + 1 == fed.rounds:
      # The global model: the trainable leaves over the frozen weights with what
      # FedEx-LoRA / FLoRA folded into them.
      global_params = peft.merge(state.trainable,
                                 lora_agg.fold_into(global_frozen_dev, state.folded))
      ev = evaluate(global_params, test_images, test_labels)
      if val_set is not None:
        ev["val"] = evaluate(global_params, *val_set)
      if local_eval is not None:
        rows = state.clients["rule"] if client_state is not None else babu_rows
        ev["clients"] = local_eval(state.trainable,
                                   lora_agg.fold_into(base_frozen_dev, state.folded), rows,
                                   local_test, client_data, jax.random.fold_in(personal_key, r))
    privacy.record(plan.reporting)
    b = cost.round_bytes(plan.num_sampled, plan.num_reporting)
    cumulative["bytes"] += b["bytes_down"] + b["bytes_up"]
    cumulative["bytes_full"] += b["bytes_full_equivalent"]
    if pending is not None:
      finish(pending)
    pending = {"round": r, "plan": plan, "bytes": b, "metrics": m, "eval": ev,
               "reported": reported.copy(),
               "cumulative_bytes": cumulative["bytes"],
               "cumulative_bytes_full": cumulative["bytes_full"], "privacy": privacy.metrics()}
    done = r + 1 == fed.rounds
    stopping = stop_after_round is not None and r + 1 >= stop_after_round and not done
    if done or (config.checkpoint_every and (r + 1) % config.checkpoint_every == 0):
      finish(pending)
      pending = None
      ckpt.save(r + 1, state, {"cumulative": cumulative,
                               "ledger": privacy.ledger.to_dict() if privacy.ledger else None})
    if stopping:  # as if killed here: rows past the last checkpoint are redone on resume
      if pending is not None:
        finish(pending)
      ckpt.close()
      tb.close()
      return {}
  if pending is not None:
    finish(pending)
  if bar is not None:
    bar.close()
  if stopped_early and ckpt.latest_step() != int(state.round):
    ckpt.save(int(state.round), state, {
        "cumulative": cumulative, "ledger": privacy.ledger.to_dict() if privacy.ledger else None})
  ckpt.close()
  tb.close()

  rows = metrics_log.read()
  accs = [x["test_accuracy"] for x in rows if "test_accuracy" in x]
  personalized = [x["personalized_accuracy"] for x in rows if "personalized_accuracy" in x]
  personalized_trained = [x["personalized_accuracy_trained"] for x in rows
                          if "personalized_accuracy_trained" in x]
  summary = {
      "dataset": config.data.dataset,
      "method": config.peft.method,
      "lora_aggregation": fed.lora_aggregation,
      "pretrained": config.model.pretrained or "scratch",
      "rounds": int(state.round),
      "stopped_early_for_privacy_budget": stopped_early,
      "final_accuracy": accs[-1] if accs else None,
      **best_round(rows),
      "final_personalized_accuracy": personalized[-1] if personalized else None,
      "final_personalized_accuracy_trained": (personalized_trained[-1] if personalized_trained
                                              else None),
      "personal": fed.personal,
      "personal_schedule": fed.personal_schedule if fed.personal else None,
      # What each client keeps for itself, never sent.
      "personal_params_per_client": (0 if personal_init is None
                                     else peft.count(personal_init)),
      # Per-client rows the round carries (personal heads, top-k residuals), split over
      # the devices by client id: what one device holds, and the whole population's.
      "client_state_bytes_per_device": client_state_bytes(state),
      "client_state_bytes": (client_state_bytes(state) * fed.num_clients
                             // client_rows.rows_per_device(fed.num_clients, num_devices)),
      "trainable_params": cost.trainable_params,
      "total_params": cost.total_params,
      "bytes_per_transfer": cost.trainable_bytes,
      "total_bytes": cumulative["bytes"],
      "total_bytes_full_equivalent": cumulative["bytes_full"],
      "train_seconds": cumulative["seconds"],
      "compute_dtype": jnp.dtype(model.dtype).name,
      "feature_cache": cache_note,
      "clients_per_chunk": chunk,
      "wall_seconds_this_session": time.time() - t_start,
      "partition": part.summary(),
      "validation_examples": dataset.num_val,
      "versions": outputs.versions(),
  }
  summary.update(privacy.summary())
  summary = privacy.filter_metrics(summary)
  if private:
    # Nothing is left to resume: erase the key and the per-client rows from disk (every
    # process: orbax's reads and writes are collective). Before the summary, which marks
    # the run finished: a seal killed mid-way is completed by the next start, which finds
    # no summary and resumes at the last round.
    ckpt.seal(state)
  if primary:
    outputs.write_plots(rows, workdir, title=header)
    outputs.atomic_write_json(summary_path, summary)
    print(outputs.format_table([summary_row(summary)], SUMMARY_COLUMNS))
  return summary


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


class _Discard:
  """Stands in for the metrics log and TensorBoard on processes other than 0."""

  def __getattr__(self, name: str):
    return lambda *args, **kwargs: [] if name == "read" else None


SUMMARY_COLUMNS = ["method", "final_accuracy", "best_accuracy", "trainable_params",
                   "MB_per_round", "total_MB"]


def summary_row(summary: dict) -> dict:
  total = summary.get("total_bytes")  # absent when DP hides it (non-private)
  return {
      "method": summary["method"],
      "final_accuracy": summary["final_accuracy"],
      "best_accuracy": summary["best_accuracy"],
      "trainable_params": summary["trainable_params"],
      "MB_per_round": None if total is None else round(total / max(summary["rounds"], 1) / 1e6, 4),
      "total_MB": None if total is None else round(total / 1e6, 3),
  }


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  return tqdm(total=total, initial=initial, desc="rounds", unit="round", dynamic_ncols=True)
