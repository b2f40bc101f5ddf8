"""A run's set-up: everything built from the config before the first round.

`build_experiment(config)` loads the data and draws the partition, builds the model and its
params, splits them into trainable, frozen and personal leaves, prices a round's traffic,
plans the privacy accounting, caches the frozen prefix where it can, and places the
backbone, the clients' data and the evaluation sets on the mesh, down to the compiled
algorithm (`federated.build_algorithm`). It writes nothing: a config that fails on its data,
model or privacy plan leaves no workdir behind (`runner.loop` makes the workdir).

The helpers below are also the pieces `experiments/plan.py` rebuilds a run from, without
devices (they stay importable from `fedpeft_jax.runner.train`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
from fedpeft_jax.accelerators import aot
from fedpeft_jax.federated import compression
from fedpeft_jax.federated import lora_aggregation as lora_agg
from fedpeft_jax.federated import personal as personal_lib
from fedpeft_jax.federated import (ClientSpec, ClientStateSpec, CommCost, FederatedAlgorithm,
                                   InputSpec, RoundSpec, auto_clients_per_chunk, build_algorithm,
                                   build_cache, choose_input, comm_cost, compiled_round_bytes,
                                   device_bytes_limit, make_client_evaluate,
                                   make_client_optimizer, make_evaluate, make_mesh,
                                   make_server_optimizer, place_eval_set, replicate,
                                   resolve_clients_per_round)
from fedpeft_jax.models.factory import base_param_shapes, build_model, init_params
from fedpeft_jax.privacy import PrivacyBudgetError, PrivacyPlan, poisson_capacity
from fedpeft_jax.runner.validate import ConfigError, as_config_error, parse_clients_per_chunk

PyTree = Any


def load_data(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(dataset, the clients' partition) of config.data, both from the seed's streams; the
  validation split is held out of the training pool before the partition is drawn, so no
  client ever trains on it."""
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
                                    bias_correction=fed.server_bias_correction,
                                    schedule=fed.server_lr_schedule, rounds=fed.rounds)
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


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
  """A run as built from its config, before any round: what the round loop (`runner.loop`)
  and the summary (`runner.summary`) read. The arrays named `..._on_device` are placed on
  `mesh`; `privacy` keeps the run's privacy ledger, which the loop updates as rounds are
  released (the one mutable part)."""
  config: ml_collections.ConfigDict
  dataset: Any  # data.Dataset (its validation split held out)
  partition: Any  # the clients' training indices (data.partition)
  model: Any  # the flax ViT, in the compute dtype
  # The params as initialised, before placement on the mesh: the server's initial shared
  # trainable leaves and the frozen backbone.
  trainable: PyTree
  frozen: PyTree
  # Each client's personal leaves before its first round (federated.personal); None without.
  personal_init: Optional[PyTree]
  comm_cost: CommCost
  num_devices: int
  clients_per_round: int
  poisson_sampling: bool  # whether rounds draw clients by Poisson sampling
  privacy: PrivacyPlan
  inputs: InputSpec  # images, or the cached frozen prefix's output
  feature_cache_note: str  # why `inputs` is what it is (and the cache's size)
  client_spec: ClientSpec
  mesh: Mesh
  # The frozen backbone in the compute dtype; with the personal leaves at their init (where
  # a new client starts: the global model's fixed part); and what a round holds fixed
  # (FedBABU also freezes the personal leaves).
  frozen_on_device: PyTree
  global_frozen_on_device: PyTree
  round_frozen_on_device: PyTree
  client_state_spec: Optional[ClientStateSpec]  # the personal rows a round carries
  client_data: Any  # the clients' training data (images or cached features) on the mesh
  evaluate_global: Callable[..., dict]
  test_set: tuple[jax.Array, jax.Array]
  validation_set: Optional[tuple[jax.Array, jax.Array]]
  # Personalised evaluation (with personal leaves, or federated.eval_per_client): each
  # client's model on its own test set; None otherwise, like the three fields after it.
  evaluate_clients: Optional[Callable[..., dict]]
  client_test_data: Any
  fixed_personal_rows: Optional[PyTree]  # FedBABU: every client's copy of the initial head
  personal_eval_key: Optional[jax.Array]
  clients_per_chunk: int
  chunk_note: str  # why that many clients per chunk
  algorithm: FederatedAlgorithm

  @property
  def private(self) -> bool:
    """Whether a DP mechanism covers the run: its checkpoints are then private, a fresh
    start never re-releases logged rounds, and the checkpoints are sealed at the end."""
    return self.privacy.mechanism != "none"

  def header(self) -> str:
    """The run's one-line description: printed when the rounds start, and the plots' title."""
    config, cost = self.config, self.comm_cost
    return (f"{config.data.dataset} | {'+'.join(peft.parse_methods(config.peft.method))} | "
            f"trainable {cost.trainable_params:,} / {cost.total_params:,} params | "
            f"{cost.trainable_bytes / 1e6:.3f} MB per transfer | {self.clients_per_round} of "
            f"{config.federated.num_clients} clients per round | {self.num_devices} device(s), "
            f"chunk {self.clients_per_chunk}")


def privacy_plan(config: ml_collections.ConfigDict, sizes: Any, per_round: int,
                 steps_of: Callable[[int], int], trainable: PyTree) -> PrivacyPlan:
  """The run's privacy plan; a plan that does not meet the data (e.g. dp_sgd with no client
  holding data) is the config's `privacy` error. PrivacyBudgetError passes as it is: its own
  one-line error at the command line."""
  try:
    return PrivacyPlan(config, np.asarray(sizes), per_round, steps_of,
                       len(jax.tree_util.tree_leaves(trainable)))
  except PrivacyBudgetError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.privacy: {e}", field="config.privacy") from e


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Builds everything a run of `config` needs before its first round (module docstring),
  on the devices, and writes nothing. Config errors only the data or the model reveal (a
  partition that cannot be drawn, personal patterns that match no leaf, a privacy plan that
  cannot be met) are ConfigErrors naming the field."""
  federated = config.federated
  dataset, partition = load_data(config)
  model = as_config_error("model", lambda: build_model(config, dataset.num_classes))
  init_key_data = jnp.asarray(rng_lib.stream_key_data(config.seed, "init"))
  params = init_params(config, model, init_key_data)
  mask = peft.trainable_mask(params, training_peft(config))
  trainable, frozen = peft.split(params, mask)
  # Personalisation: the server holds and sends only the shared leaves; the personal ones
  # start at their init on every client (`federated.personal`).
  trainable, personal_part = as_config_error(
      "federated", lambda: personal_lib.split_for_schedule(trainable, federated.personal,
                                                           federated.personal_schedule))
  personal_init = personal_lib.initial_personal(personal_part, federated.personal_schedule,
                                                jax.random.wrap_key_data(init_key_data))
  personal_frozen = personal_lib.freezes_personal(federated.personal_schedule)  # FedBABU
  per_client_eval = personal_init is not None or federated.eval_per_client
  upload = (0 if federated.compression == "none" else compression.encoded_bytes(
      trainable, federated.compression, federated.compression_block,
      federated.compression_fraction))
  # FedEx-LoRA / FLoRA: every download also carries the folded deltas of the target kernels.
  folds = federated.lora_aggregation in lora_agg.FOLDING_AGGREGATIONS
  cost = comm_cost(trainable, params, base_param_shapes(config, dataset.num_classes),
                   federated.wire_dtype, upload_bytes=upload,
                   download_extra=lora_agg.folded_zeros(trainable) if folds else None)

  num_devices = len(jax.devices())
  clients_per_round = resolve_clients_per_round(
      federated.num_clients, federated.clients_per_round, federated.participation)
  fixed_chunk = parse_clients_per_chunk(federated.clients_per_chunk)
  augment = dataset.augment if config.data.augment == "auto" else config.data.augment
  max_examples = int(max(partition.sizes))
  local_epochs = resolve_local_epochs(config, partition.sizes)

  def steps_of(n: int) -> int:  # the real local steps a client of n examples runs
    return int(fdata.num_local_steps(n, federated.batch_size, local_epochs,
                                     federated.local_steps))

  privacy = privacy_plan(config, partition.sizes, clients_per_round, steps_of, trainable)
  inputs, cache_note = input_spec(config, model, mask, augment)
  local_training = client_spec(config, local_epochs, max_examples, augment, inputs, privacy)
  poisson_sampling = poisson_clients(config, privacy)
  min_slots = round_slots(config, clients_per_round, privacy)
  client_tx, server_tx = optimizers(config)
  mesh = make_mesh()
  # The frozen backbone lives on device once, in the compute dtype (no cast per step).
  frozen_on_device = replicate(optax.tree.cast(frozen, model.dtype), mesh)
  personal_on_device = None if personal_init is None else replicate(personal_init, mesh)
  # The global model's fixed part (the personal leaves at init, where a new client starts),
  # and what the round holds fixed (FedBABU also freezes the personal leaves at their init).
  global_frozen_on_device = (frozen_on_device if personal_on_device is None
                             else peft.merge(frozen_on_device, personal_on_device))
  round_frozen_on_device = global_frozen_on_device if personal_frozen else frozen_on_device
  client_rule, client_state_spec = personal_lib.personal_client_rule(
      model, client_tx, local_training, dataset.num_classes, personal_init,
      federated.personal_schedule, federated.personal_epochs, federated.num_clients)
  host_data = fdata.client_data(dataset, partition, device=jax.local_devices(backend="cpu")[0])
  test_examples = np.asarray(dataset.test_images)
  val_examples = None if dataset.val_images is None else np.asarray(dataset.val_images)
  if inputs.kind != "images":
    cached_params = params  # the prefix reads frozen leaves only
    cached = lambda images: np.asarray(build_cache(model, cached_params, images, inputs,
                                                   federated.eval_batch_size))
    host_data = dataclasses.replace(host_data,
                                    images=cached(np.asarray(dataset.train_images)))
    test_examples = cached(test_examples)
    val_examples = None if val_examples is None else cached(val_examples)
    cached_bytes = host_data.images.nbytes + test_examples.nbytes + (
        0 if val_examples is None else val_examples.nbytes)
    cache_note += (f" ({cached_bytes / 1e6:.1f} MB, "
                   f"{host_data.images.dtype})")
  client_data = replicate(host_data, mesh)
  evaluate_global = make_evaluate(model, federated.eval_batch_size, config.model.image_size,
                                  mesh=mesh, inputs=inputs)
  evaluate_clients, client_test_data, fixed_rows, personal_eval_key = None, None, None, None
  if per_client_eval:
    # Each client's local test set follows its training class mix (data.partition_test).
    test_part = as_config_error("federated", lambda: local_test_partition(
        dataset.test_labels, partition, federated.local_test_size,
        rng_lib.stream_seed(config.seed, "personal")))
    client_test_data = fdata.client_data(fdata.as_test_source(dataset), test_part,
                                         device=jax.local_devices(backend="cpu")[0])
    if inputs.kind != "images":  # the cached prefix features, as for training (above)
      client_test_data = dataclasses.replace(client_test_data, images=test_examples)
    client_test_data = replicate(client_test_data, mesh)
    evaluate_clients = make_client_evaluate(
        model, federated.eval_batch_size, config.model.image_size, mesh=mesh, inputs=inputs,
        adapt=personal_lib.evaluation_finetune(model, client_tx, local_training,
                                               dataset.num_classes, federated.personal_schedule,
                                               federated.personal_finetune_epochs))
    # FedBABU: every client fine-tunes its copy of the initial personal leaves.
    fixed_rows = personal_lib.fixed_personal_rows(personal_init, federated.personal_schedule,
                                                  federated.num_clients, mesh)
    personal_eval_key = jax.random.wrap_key_data(
        jnp.asarray(rng_lib.stream_key_data(config.seed, "personal")))

  client_ranks = lora_client_ranks(config)

  def build(chunk: int) -> FederatedAlgorithm:
    spec = round_spec(config, chunk, num_devices, privacy, min_slots, client_ranks)
    return build_algorithm(model, client_tx, server_tx, local_training, spec,
                           dataset.num_classes, mesh=mesh, client_update=client_rule,
                           client_state=client_state_spec)

  def round_bytes(chunk: int) -> int | None:  # XLA's plan for one round at this chunk
    # From shapes alone, as experiments/plan.py lowers for a device-less target.
    trial = build(chunk)
    return compiled_round_bytes(trial.lower(trial.state_shapes(trainable),
                                            aot.like(round_frozen_on_device),
                                            aot.like(client_data), clients_per_round))

  if fixed_chunk:
    chunk, chunk_note = fixed_chunk, "federated.clients_per_chunk"
  else:
    chunk, chunk_note = auto_clients_per_chunk(clients_per_round, num_devices,
                                               federated.batch_size, memory_of=round_bytes,
                                               bytes_limit=device_bytes_limit())
  algorithm = build(chunk)
  test_set = place_eval_set(test_examples, dataset.test_labels, mesh)
  validation_set = (None if val_examples is None
                    else place_eval_set(val_examples, dataset.val_labels, mesh))
  return Experiment(
      config=config, dataset=dataset, partition=partition, model=model, trainable=trainable,
      frozen=frozen, personal_init=personal_init, comm_cost=cost, num_devices=num_devices,
      clients_per_round=clients_per_round, poisson_sampling=poisson_sampling, privacy=privacy,
      inputs=inputs, feature_cache_note=cache_note, client_spec=local_training, mesh=mesh,
      frozen_on_device=frozen_on_device, global_frozen_on_device=global_frozen_on_device,
      round_frozen_on_device=round_frozen_on_device, client_state_spec=client_state_spec,
      client_data=client_data, evaluate_global=evaluate_global, test_set=test_set,
      validation_set=validation_set, evaluate_clients=evaluate_clients,
      client_test_data=client_test_data, fixed_personal_rows=fixed_rows,
      personal_eval_key=personal_eval_key, clients_per_chunk=chunk, chunk_note=chunk_note,
      algorithm=algorithm)
