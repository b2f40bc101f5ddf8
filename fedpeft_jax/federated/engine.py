"""One jitted federated round: chunks of clients vmapped, chunks scanned, devices sharded.

Layout of a round's client slots: [devices, chunks_per_device, clients_per_chunk] (see
`layout`). Each device scans over its chunks, vmapping the clients of a chunk, and keeps
running sums of what the aggregator makes of their updates (so memory holds one chunk's
activations); the sums are reduced across devices with `psum` inside `shard_map`, and the
aggregator turns them into the server's mean update. Padded slots are masked no-ops.

What travels is what `comm` says: clients start from the server model rounded to the wire
dtype, and their updates are rounded to it before aggregation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedpeft_jax import rng as rng_lib
from fedpeft_jax.accelerators import aot
from fedpeft_jax.federated import aggregation, client_rows, comm, compression, lora_aggregation
from fedpeft_jax.federated import state as state_lib
from fedpeft_jax.federated.client import ClientSpec, make_client_update
from fedpeft_jax.federated.client_slots import layout_clients, layout_shape
from fedpeft_jax.federated.mesh import AXIS, host_value, make_mesh, replicate, to_global
from fedpeft_jax.federated.sampling import RoundPlan
from fedpeft_jax.peft.spec import to_spec
from fedpeft_jax.privacy import mechanisms

PyTree = Any
# Folded into the train stream's key (then the round) for FLoRA's LoRA restart. Clients' keys
# fold the round, then their id, into the same key: the two would meet only in round
# LORA_INIT_STREAM (2**31 - 16), never reached.
LORA_INIT_STREAM = 0x7FFFFFF0


@dataclasses.dataclass(frozen=True)
class RoundSpec:
  """Static settings of the round (hashable)."""
  clients_per_chunk: int
  num_devices: int
  weighting: str = "examples"
  max_update_norm: float = 0.0  # > 0: clip each client update's global norm at the server
  dp: aggregation.ServerDP = dataclasses.field(default_factory=aggregation.ServerDP)
  # Pad every round to at least this many client slots, so rounds with a varying number
  # of clients (Poisson sampling, dropout) share one compiled executable.
  min_slots: int = 0
  wire_dtype: str = "float32"  # what the model and the updates are rounded to in transit
  # Upload compression (`compression.COMPRESSIONS`); downloads stay at wire_dtype.
  compression: str = "none"
  compression_block: int = 0  # int8/int4: values per absmax scale (0 = one per tensor)
  compression_fraction: float = 0.1  # topk: share of each tensor's entries sent
  # Clients in the population: needed when the round keeps per-client state of its own
  # (topk's error-feedback residual).
  num_clients: int = 0
  # How LoRA factors are aggregated (`lora_aggregation.LORA_AGGREGATIONS`): 'fedit' and
  # 'ffa' are the plain mean of the trainable leaves ('ffa' = a trainable tree without A);
  # 'fedex' and 'flora' also fold the exact mean of the client products into
  # `ServerState.folded` (they assume the plain mean: fedavg with lr 1, no DP).
  lora_aggregation: str = "fedit"
  # flora only: each client id's LoRA rank (zero-padded to the model's); () = the model's.
  client_ranks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ClientStateSpec:
  """State a client rule carries from round to round (the extension point for personal
  parameters and error feedback): `init(trainable) -> one client's state` (a pytree), kept
  for `num_clients` clients as leaves [num_clients, ...] in `ServerState.clients`.

  A stateful rule is called as `client_update(trainable, frozen, data, client_id, key,
  active, client_state)` with its client's row and returns the new row as
  `out["client_state"]`. Rows of clients that did not report, and of clients whose update
  was not finite, are kept unchanged; padding slots never write. The rows are split over
  the mesh's devices by client id (`client_rows`): `ServerState.clients` holds
  `client_rows.padded_rows(num_clients, devices)` rows, client c's at index c.
  """
  init: Callable[[PyTree], PyTree]
  num_clients: int


def client_state_bytes(state: state_lib.ServerState) -> int:
  """Bytes the per-client state holds on one device (0 without one): its block of the
  table split over the devices (`client_rows`)."""
  return client_rows.bytes_per_device(state.clients)


class FederatedAlgorithm(NamedTuple):
  """fedjax-style pair: `init(trainable, seed) -> state`, `apply(state, ...) -> (state, metrics)`;
  `lower(state, frozen, data, slots)` gives the round's `jax.stages.Lowered` (for XLA's
  cost and memory analyses) without running it, from arrays or shapes alike, and
  `state_shapes(trainable)` the abstract round-0 state to lower with."""
  init: Callable[..., state_lib.ServerState]
  apply: Callable[..., tuple[state_lib.ServerState, dict]]
  lower: Callable[..., Any] | None = None
  state_shapes: Callable[..., state_lib.ServerState] | None = None


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def default_aggregator(round_spec: RoundSpec) -> aggregation.Aggregator:
  """DP-FedAvg when `round_spec.dp` is enabled, else the weighted mean."""
  if round_spec.dp.enabled:
    return aggregation.dp_fedavg(round_spec.dp, round_spec.max_update_norm)
  return aggregation.weighted_mean(round_spec.weighting, round_spec.max_update_norm)


def build_algorithm(model: nn.Module, client_tx: optax.GradientTransformation,
                    server_tx: optax.GradientTransformation, client_spec: ClientSpec,
                    round_spec: RoundSpec, num_classes: int,
                    mesh: Mesh | None = None,
                    client_update: Callable[..., dict] | None = None,
                    aggregator: aggregation.Aggregator | None = None,
                    client_state: ClientStateSpec | None = None) -> FederatedAlgorithm:
  """The federated algorithm for `model` whose trainable subtree the server holds.

  `client_update(trainable, frozen, data, client_id, key, active) -> dict` replaces the
  default local training (same contract as `make_client_update`), e.g. for a custom
  client rule; `aggregator` replaces the rule that turns updates into the server's mean
  update (default: `default_aggregator(round_spec)`); `client_state` gives the rule a
  per-client state carried across rounds inside the jitted round (`ClientStateSpec`).

  Randomness: clients' keys come from the state's `train` stream, or, when any privacy
  mechanism is on, from its secret `dp` stream (then every client-side draw, noise and
  Poisson sampling included, is unpredictable from the config); the server's DP noise
  always comes from the `dp` stream.
  """
  mesh = mesh if mesh is not None else make_mesh(jax.devices()[:round_spec.num_devices])
  if mesh.devices.size != round_spec.num_devices:
    raise ValueError(f"mesh has {mesh.devices.size} devices, RoundSpec says "
                     f"{round_spec.num_devices}")
  comm.check_wire_dtype(round_spec.wire_dtype)
  aggregator = aggregator or default_aggregator(round_spec)
  compression.check_compression(round_spec.compression, round_spec.compression_block,
                                round_spec.compression_fraction)
  # top-k keeps each client's error-feedback residual (Stich et al. 2018) in client state.
  error_feedback = round_spec.compression == "topk"
  if error_feedback and round_spec.num_clients <= 0:
    raise ValueError("federated.compression='topk' keeps a residual per client: RoundSpec."
                     "num_clients must be the number of clients (federated.num_clients)")
  if client_update is None:
    client_update = make_client_update(model, client_tx, client_spec, num_classes)
  private = round_spec.dp.enabled or client_spec.dp.mechanism != "none"
  wire = round_spec.wire_dtype
  # FedEx-LoRA / FLoRA: the one piece of the round that knows about LoRA factors.
  folding = lora_aggregation.lora_round(
      round_spec.lora_aggregation,
      to_spec(model.peft).lora_scaling if round_spec.lora_aggregation != "fedit" else 1.0,
      round_spec.client_ranks)
  lora_aggregation.check_round(round_spec.lora_aggregation, round_spec.compression,
                               "dp_fedavg" if round_spec.dp.enabled else client_spec.dp.mechanism)
  if folding is not None:
    if folding.ranks and len(folding.ranks) != round_spec.num_clients:
      raise ValueError(f"peft.lora.client_ranks: {len(folding.ranks)} ranks, but RoundSpec."
                       f"num_clients is {round_spec.num_clients}; give one rank per client")
    rule = client_update

    def client_update(trainable, frozen, data, client_id, key, active, *state):
      return rule(folding.client_start(trainable, client_id), frozen, data, client_id, key,
                  active, *state)

  def initial_state(trainable: PyTree, seed: int, clip_norm: float, dp_key: np.ndarray,
                    xp: Any = np) -> state_lib.ServerState:
    """Round 0's state, not yet placed. The per-client rows are NumPy broadcast views (no
    num_clients copies before placement), as many as `client_rows.padded_rows` (padding
    rows last); `state_shapes` traces it with `xp=jnp`."""
    def per_client(one, num):
      rows = client_rows.padded_rows(num, round_spec.num_devices)
      return jax.tree_util.tree_map(
          lambda x: xp.broadcast_to(xp.asarray(x), (rows,) + xp.shape(x)), one)
    # Per-client state: the rule's own ("rule") and the round's ("residual"), if any.
    clients = {}
    if client_state is not None:
      clients["rule"] = per_client(client_state.init(trainable), client_state.num_clients)
    if error_feedback:
      clients["residual"] = per_client(
          jax.tree_util.tree_map(lambda x: xp.zeros(xp.shape(x), xp.float32), trainable),
          round_spec.num_clients)
    clients = clients or None
    if round_spec.lora_aggregation == "ffa" and any(
        p.endswith("_lora/lora_a") for p in lora_aggregation.flatten(trainable)):
      raise ValueError("federated.lora_aggregation='ffa' (FFA-LoRA) keeps A frozen: build the "
                       "trainable mask with peft.lora.freeze_a=True")
    folded = None if folding is None else lora_aggregation.folded_zeros(trainable)
    return state_lib.init_server_state(trainable, server_tx,
                                        rng_lib.stream_key_data(seed, "train"), dp_key,
                                        clip_norm, clients, folded)

  def init(trainable: PyTree, seed: int, clip_norm: float = 0.0,
           dp_key: np.ndarray | None = None) -> state_lib.ServerState:
    """Round 0's state. `dp_key`: raw key data of the dp stream; by default drawn from
    the OS when a privacy mechanism is on (and the seed's otherwise unused dp stream when
    not). Placed like every later state (replicated, the per-client rows split over the
    devices), so round 2 reuses round 1's compiled executable."""
    if dp_key is None and private:
      dp_key = rng_lib.secret_key_data()
      if jax.process_count() > 1:  # every process must hold process 0's secret
        dp_key = np.asarray(multihost_utils.broadcast_one_to_all(dp_key))
    elif dp_key is None:
      dp_key = rng_lib.stream_key_data(seed, "dp")
    state = initial_state(trainable, seed, clip_norm, dp_key)  # its rows are padded already
    return replicate(state.replace(clients=None), mesh).replace(
        clients=None if state.clients is None else client_rows.place(state.clients, mesh))

  def state_shapes(trainable: PyTree) -> state_lib.ServerState:
    """Round 0's state as ShapeDtypeStructs placed on the mesh like `init`'s: `trainable`
    may be shapes only (nothing is drawn, allocated or placed)."""
    shapes = jax.eval_shape(
        lambda t: initial_state(t, 0, 0.0, rng_lib.stream_key_data(0, "dp"), xp=jnp), trainable)
    return aot.abstract(shapes.replace(clients=None), mesh).replace(
        clients=aot.abstract(shapes.clients, mesh, P(AXIS)))

  def device_sums(trainable, frozen, data, ids, valid, keys, clip_norm, rows):
    """Per device: scan over chunks [chunks, chunk]; this device's sums, and per slot the
    update norm, whether it counted and its new per-client rows ([chunks, chunk] each).
    `rows`: the slots' per-client rows (leaves [chunks, chunk, ...]) or None."""
    f32 = lambda: jnp.zeros((), jnp.float32)
    init_carry = {"update": optax.tree.zeros_like(trainable), "weight": f32(), "loss": f32(),
                  "examples": f32(), "contributed": f32(), "nonfinite": f32(), "steps": f32(),
                  "executed_steps": f32(), "poisson_dropped": f32()}
    if folding is not None:  # sum_k c_k s A_k B_k per target
      init_carry["lora_products"] = jax.tree_util.tree_map(
          jnp.asarray, lora_aggregation.folded_zeros(trainable))

    def chunk_body(carry, xs):
      ids_c, valid_c, keys_c, rows = xs  # rows: this chunk's per-client rows
      # Under privacy the clients' keys are the dp stream's (128-bit `rng.DP_KEY_IMPL`).
      keys_c = rng_lib.dp_key(keys_c) if private else jax.random.wrap_key_data(keys_c)
      rows = rows or {}
      rule_rows = (rows["rule"],) if "rule" in rows else ()
      if ids_c.shape[0] == 1:
        # One client per chunk: no vmap, the client's loop runs exactly its real steps.
        out = client_update(trainable, frozen, data, ids_c[0], keys_c[0], valid_c[0],
                            *jax.tree_util.tree_map(lambda x: x[0], rule_rows))
        out = jax.tree_util.tree_map(lambda x: x[None], out)
      else:
        out = jax.vmap(client_update,
                       in_axes=(None, None, None, 0, 0, 0) + (0,) * len(rule_rows))(
            trainable, frozen, data, ids_c, keys_c, valid_c, *rule_rows)
      upload = comm.on_wire(out["update"], wire)  # what the server receives
      new_rows = {}
      residual_in, pre_clip_norms = rows.get("residual"), None
      if error_feedback and aggregator.bound is not None:
        # The server clips each update (DP-FedAvg, max_update_norm): clip update + residual
        # to that norm here, before top-k, and keep the residual of the clipped message. Top-k
        # never lengthens a vector, so the server's clip then cuts nothing, and model +
        # residuals = every clipped message exactly. The aggregator is handed the norms
        # before this clip (adaptive clipping counts them).
        combined = jax.tree_util.tree_map(lambda u, r: u.astype(r.dtype) + r, upload,
                                          residual_in)
        upload, pre_clip_norms = mechanisms.clip_per_example(combined,
                                                             aggregator.bound(clip_norm))
        residual_in = optax.tree.zeros_like(residual_in)
      if round_spec.compression != "none":
        # Stochastic rounding with the client's own key, or top-k of update + residual; the
        # server decodes. The residual of what top-k did not send stays with the client.
        def encode(u, k, r):
          decoded, residual, _ = compression.compress(
              u, jax.random.fold_in(k, 3), round_spec.compression, round_spec.compression_block,
              round_spec.compression_fraction, r)
          return decoded, residual
        upload, residual = jax.vmap(encode)(upload, keys_c, residual_in)
        if error_feedback:
          new_rows["residual"] = residual
      if "rule" in rows:
        new_rows["rule"] = out["client_state"]
      finite = jax.vmap(_all_finite)(upload)
      if "rule" in rows:  # a non-finite personal row is no more usable than a NaN update
        finite = finite & jax.vmap(_all_finite)(out["client_state"])
      ok = valid_c & finite
      # Non-finite updates become zeros before anything multiplies them (0 * NaN is NaN).
      safe = jax.tree_util.tree_map(
          lambda u: jnp.where(ok.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0.0), upload)
      if pre_clip_norms is None:
        c = aggregator.contribute(safe, out["num_examples"], ok, clip_norm)
      else:  # the aggregator reports the norms before the clients' own clip
        c = aggregator.contribute(safe, out["num_examples"], ok, clip_norm,
                                  jnp.where(ok, pre_clip_norms, 0.0))
      coeff = jnp.where(ok, c.coefficients, 0.0)
      weighted = jax.tree_util.tree_map(lambda u: jnp.tensordot(coeff.astype(u.dtype), u, 1),
                                        c.updates)
      examples = jnp.where(ok, out["num_examples"], 0.0)
      if folding is not None:
        # The products of the factors each client ended with, as the server decoded them.
        lora_products = optax.tree.add(carry["lora_products"], folding.products(
            trainable, c.updates, coeff, ids_c))
      new = {
          "update": optax.tree.add(carry["update"], weighted),
          "weight": carry["weight"] + jnp.sum(jnp.where(ok, c.weights, 0.0)),
          "loss": carry["loss"] + jnp.sum(jnp.where(ok, out["loss"], 0.0) * examples),
          "examples": carry["examples"] + jnp.sum(examples),
          "contributed": carry["contributed"] + jnp.sum(ok),
          "nonfinite": carry["nonfinite"] + jnp.sum(valid_c & ~finite),
          # Steps every reporting client ran, usable update or not: counting only usable
          # ones would reveal clients_nonfinite (not covered by DP-SGD's epsilon).
          "steps": carry["steps"] + jnp.sum(jnp.where(valid_c, out["steps"], 0)),
          # What the hardware ran: every slot of a vmapped chunk steps until its longest
          # client is done (the select keeps finished clients still, but their compute
          # happens).
          "executed_steps": carry["executed_steps"] + (
              jnp.max(out["steps"]).astype(jnp.float32) * ids_c.shape[0]),
          "poisson_dropped": carry["poisson_dropped"] + jnp.sum(
              jnp.where(valid_c, out["poisson_dropped"], 0)),
      }
      if folding is not None:
        new["lora_products"] = lora_products
      return new, (c.norms.astype(jnp.float32), ok, new_rows or None)

    return jax.lax.scan(chunk_body, init_carry, (ids, valid, keys, rows))

  def sharded_sums(trainable, frozen, data, ids, valid, keys, clip_norm, clients):
    """The round's sums over every device, per slot (norm, counted), and the per-client
    table with the round's new rows written (each device its own block, `client_rows`)."""
    def per_device(trainable, frozen, data, ids, valid, keys, clip_norm, clients):
      ids, valid, keys = ids[0], valid[0], keys[0]
      rows = None
      if clients is not None:  # every device's slots, device-major, as the table sees them
        every_id = jax.lax.all_gather(ids, AXIS, tiled=True).reshape(-1)
        rows = jax.tree_util.tree_map(lambda x: x.reshape(ids.shape + x.shape[1:]),
                                      client_rows.gather(clients, every_id))
      sums, (norms, ok, new_rows) = device_sums(trainable, frozen, data, ids, valid, keys,
                                                clip_norm, rows)
      if clients is not None:
        gathered = lambda x: jax.lax.all_gather(x.reshape((-1,) + x.shape[2:]), AXIS,
                                                tiled=True)
        clients = client_rows.scatter(clients, every_id, gathered(ok),
                                      jax.tree_util.tree_map(gathered, new_rows))
      return jax.lax.psum(sums, AXIS), (norms[None], ok[None]), clients
    split, rep = P(AXIS), P()
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(rep, rep, rep, split, split, split, rep, split),
                         out_specs=(rep, split, split), check_vma=False)(
                             trainable, frozen, data, ids, valid, keys, clip_norm, clients)

  # The server state is donated: its buffers become the next state's, so a round holds
  # one copy of the trainable params and optimizer state (the caller must not reuse it).
  @functools.partial(jax.jit, donate_argnums=(0,))
  def round_step(state: state_lib.ServerState, frozen: PyTree, data: Any, ids: jax.Array,
                 valid: jax.Array):
    train_round = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round)
    dp_round = jax.random.fold_in(rng_lib.dp_key(state.dp_rng), state.round)
    client_stream = jax.random.fold_in(dp_round, 0) if private else train_round
    # Each client's randomness depends only on (stream, round, client id): chunking and
    # device layout cannot change results.
    flat_keys = jax.vmap(lambda c: jax.random.key_data(jax.random.fold_in(client_stream, c)))(
        ids.reshape(-1))
    keys = flat_keys.reshape(ids.shape + flat_keys.shape[1:])
    sent = comm.on_wire(state.trainable, wire)  # the model the clients receive
    # The frozen weights with what FedEx-LoRA / FLoRA folded into them (a no-op otherwise),
    # as the clients download the folded deltas: in the wire dtype.
    seen = lora_aggregation.fold_into(frozen, comm.on_wire(state.folded, wire))
    sums, (norms, ok), clients = sharded_sums(sent, seen, data, ids, valid, keys,
                                              state.clip_norm, state.clients)
    mean_update, clip_norm, apply_update, agg_metrics = aggregator.finalize(
        sums["update"], sums["weight"], norms.reshape(-1), ok.reshape(-1), state.clip_norm,
        jax.random.fold_in(dp_round, 1))
    new_trainable, new_opt = state_lib.apply_server_update(state, mean_update, server_tx)
    folded = state.folded
    if folding is not None:
      # FLoRA's restart key: the train stream's LORA_INIT_STREAM sub-stream at this round.
      restart = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                      LORA_INIT_STREAM), state.round)
      new_trainable, delta = folding.finalize(sums["lora_products"], sums["weight"],
                                              new_trainable, restart)
      folded = optax.tree.where(apply_update, optax.tree.add(state.folded, delta), state.folded)
    # A round in which no client contributed leaves the model and optimizer untouched.
    new_trainable = optax.tree.where(apply_update, new_trainable, state.trainable)
    new_opt = optax.tree.where(apply_update, new_opt, state.opt_state)
    new_state = state.replace(trainable=new_trainable, opt_state=new_opt, round=state.round + 1,
                              clip_norm=clip_norm, clients=clients, folded=folded)
    metrics = {
        "clients_contributed": sums["contributed"],
        "clients_nonfinite": sums["nonfinite"],
        "train_loss": sums["loss"] / jnp.maximum(sums["examples"], 1.0),
        "local_steps": sums["steps"],
        "executed_steps": sums["executed_steps"],
        "poisson_dropped": sums["poisson_dropped"],
        "update_norm": optax.tree.norm(mean_update),
        **agg_metrics,
    }
    return new_state, metrics

  sizes_cache: dict[str, Any] = {}

  def round_args(state, frozen, data, plan):
    if sizes_cache.get("array") is not data.sizes:  # one device-to-host read per dataset
      sizes_cache.update(array=data.sizes, host=host_value(data.sizes))
    steps = client_spec.real_steps(sizes_cache["host"][plan.reporting])
    ids, valid = layout_clients(plan.reporting, round_spec.num_devices,
                                round_spec.clients_per_chunk, round_spec.min_slots, steps)
    sharding = NamedSharding(mesh, P(AXIS))
    return state, frozen, data, to_global(ids, sharding), to_global(valid, sharding)

  def lower(state: state_lib.ServerState, frozen: PyTree, data: Any, slots: int) -> Any:
    """The round's `jax.stages.Lowered` for `slots` reporting clients. Every argument may
    be abstract (ShapeDtypeStructs with shardings, see `accelerators.aot`): the layout's
    shape depends only on the counts, so a round lowers from shapes alone, for this mesh's
    devices or a device-less target topology."""
    shape = layout_shape(slots, round_spec.num_devices, round_spec.clients_per_chunk,
                         round_spec.min_slots)
    sharding = NamedSharding(mesh, P(AXIS))
    return round_step.lower(state, frozen, data,
                            jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
                            jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding))

  def apply(state: state_lib.ServerState, frozen: PyTree, data: Any,
            plan: RoundPlan) -> tuple[state_lib.ServerState, dict]:
    new_state, metrics = round_step(*round_args(state, frozen, data, plan))
    metrics = dict(metrics)
    metrics["clients_sampled"] = plan.num_sampled
    metrics["clients_reporting"] = plan.num_reporting
    return new_state, metrics

  return FederatedAlgorithm(init=init, apply=apply, lower=lower, state_shapes=state_shapes)
