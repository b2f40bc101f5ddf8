"""One jitted federated round: chunks of clients vmapped, chunks scanned, devices sharded.

Layout of a round's client slots: [devices, chunks_per_device, clients_per_chunk] (see
`client_slots`). Each device scans over its chunks, vmapping the clients of a chunk, and
keeps running sums of what the aggregator makes of their updates (so memory holds one
chunk's activations); the sums are reduced across devices with `psum` inside `shard_map`,
and the aggregator turns them into the server's mean update. Padded slots are masked no-ops.

The round is assembled from pluggable pieces (`RoundPieces`), each owned by its module:
the client rule (`client.make_client_update`), the upload codec (`compression.upload_codec`:
wire rounding, compression, error feedback), the aggregator (`aggregation`), the LoRA
folding plug (`lora_aggregation.lora_round`) and the server optimizer (`server`). The steps
that combine them are module-level functions (`train_chunk`, `upload`, `chunk_step`,
`device_sums`, `sharded_sums`, `server_round`) with no branch per rule; `build_algorithm`
checks the settings, assembles the pieces and jits `server_round`.
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
from fedpeft_jax.mesh import AXIS, host_value, make_mesh, replicate, to_global
from fedpeft_jax.federated.sampling import RoundPlan
from fedpeft_jax.peft.spec import to_spec

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


@dataclasses.dataclass(frozen=True)
class RoundPieces:
  """The round's pluggable parts, as `build_algorithm` assembles them. The steps below are
  module-level functions of these pieces (no closures), so each can be read and called on
  its own: `train_chunk` -> `upload` -> `chunk_step` (a chunk's sums) -> `device_sums` (a
  device's scan over its chunks) -> `sharded_sums` (psum over the mesh) -> `server_round`."""
  client_update: Callable[..., dict]  # `make_client_update`'s contract
  codec: compression.UploadCodec  # wire rounding + compression (+ error feedback)
  aggregator: aggregation.Aggregator  # updates -> the server's mean update
  folding: lora_aggregation.Folding  # LoRA folding (the identity for fedit / ffa)
  server_tx: optax.GradientTransformation
  round_spec: RoundSpec
  mesh: Mesh
  private: bool  # any privacy mechanism: clients draw from the secret dp stream


def train_chunk(pieces: RoundPieces, trainable: PyTree, frozen: PyTree, data: Any,
                ids: jax.Array, keys: jax.Array, valid: jax.Array, rule_rows: tuple
                ) -> dict:
  """A chunk's clients trained from `trainable` (outputs stacked [K, ...]). One client per
  chunk runs without vmap, so its loop runs exactly its real steps."""
  if ids.shape[0] == 1:
    out = pieces.client_update(trainable, frozen, data, ids[0], keys[0], valid[0],
                               *jax.tree_util.tree_map(lambda x: x[0], rule_rows))
    return jax.tree_util.tree_map(lambda x: x[None], out)
  return jax.vmap(pieces.client_update, in_axes=(None, None, None, 0, 0, 0)
                  + (0,) * len(rule_rows))(trainable, frozen, data, ids, keys, valid,
                                           *rule_rows)


def upload(pieces: RoundPieces, updates: PyTree, residuals: PyTree | None, keys: jax.Array,
           clip_norm: jax.Array) -> tuple[PyTree, PyTree | None, jax.Array | None]:
  """A chunk's updates as the server decodes them, the clients' new codec states and, where
  the clients clipped for the server (`UploadCodec.encode`), the norms before that clip."""
  bound = None if pieces.aggregator.bound is None else pieces.aggregator.bound(clip_norm)
  payload, residuals, norms = jax.vmap(pieces.codec.encode, in_axes=(0, 0, 0, None))(
      updates, residuals, keys, bound)
  return jax.vmap(pieces.codec.decode)(payload), residuals, norms


def chunk_step(pieces: RoundPieces, trainable: PyTree, frozen: PyTree, data: Any,
               clip_norm: jax.Array, carry: dict, xs: tuple) -> tuple[dict, tuple]:
  """One chunk of the scan: its clients trained, uploaded and contributed to the running
  sums `carry`; per slot the update norm, whether it counted, and its new per-client rows."""
  ids, valid, keys, rows = xs
  # Under privacy the clients' keys are the dp stream's (128-bit `rng.DP_KEY_IMPL`).
  keys = rng_lib.dp_key(keys) if pieces.private else jax.random.wrap_key_data(keys)
  rows = rows or {}
  rule_rows = (rows["rule"],) if "rule" in rows else ()
  out = train_chunk(pieces, trainable, frozen, data, ids, keys, valid, rule_rows)
  received, residuals, pre_clip_norms = upload(pieces, out["update"], rows.get("residual"),
                                               keys, clip_norm)
  new_rows = {"residual": residuals} if pieces.codec.stateful else {}
  finite = jax.vmap(_all_finite)(received)
  if "rule" in rows:  # a non-finite personal row is no more usable than a NaN update
    new_rows["rule"] = out["client_state"]
    finite = finite & jax.vmap(_all_finite)(out["client_state"])
  ok = valid & finite
  # Non-finite updates become zeros before anything multiplies them (0 * NaN is NaN).
  safe = jax.tree_util.tree_map(
      lambda u: jnp.where(ok.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0.0), received)
  norms = () if pre_clip_norms is None else (jnp.where(ok, pre_clip_norms, 0.0),)
  c = pieces.aggregator.contribute(safe, out["num_examples"], ok, clip_norm, *norms)
  coeff = jnp.where(ok, c.coefficients, 0.0)
  examples = jnp.where(ok, out["num_examples"], 0.0)
  new = {
      "update": optax.tree.add(carry["update"], jax.tree_util.tree_map(
          lambda u: jnp.tensordot(coeff.astype(u.dtype), u, 1), c.updates)),
      "weight": carry["weight"] + jnp.sum(jnp.where(ok, c.weights, 0.0)),
      "loss": carry["loss"] + jnp.sum(jnp.where(ok, out["loss"], 0.0) * examples),
      "examples": carry["examples"] + jnp.sum(examples),
      "contributed": carry["contributed"] + jnp.sum(ok),
      "nonfinite": carry["nonfinite"] + jnp.sum(valid & ~finite),
      # Steps every reporting client ran, usable update or not: counting only usable ones
      # would reveal clients_nonfinite (not covered by DP-SGD's epsilon).
      "steps": carry["steps"] + jnp.sum(jnp.where(valid, out["steps"], 0)),
      # What the hardware ran: every slot of a vmapped chunk steps until its longest client
      # is done (the select keeps finished clients still, but their compute happens).
      "executed_steps": carry["executed_steps"] + (
          jnp.max(out["steps"]).astype(jnp.float32) * ids.shape[0]),
      "poisson_dropped": carry["poisson_dropped"] + jnp.sum(
          jnp.where(valid, out["poisson_dropped"], 0)),
      # The products of the factors each client ended with, as the server decoded them.
      "lora_products": optax.tree.add(carry["lora_products"], pieces.folding.contribute(
          trainable, c.updates, coeff, ids)),
  }
  return new, (c.norms.astype(jnp.float32), ok, new_rows or None)


def device_sums(pieces: RoundPieces, trainable: PyTree, frozen: PyTree, data: Any,
                ids: jax.Array, valid: jax.Array, keys: jax.Array, clip_norm: jax.Array,
                rows: PyTree | None) -> tuple[dict, tuple]:
  """Per device: scan over chunks [chunks, chunk]; this device's sums, and per slot the
  update norm, whether it counted and its new per-client rows ([chunks, chunk] each).
  `rows`: the slots' per-client rows (leaves [chunks, chunk, ...]) or None."""
  zero = jnp.zeros((), jnp.float32)
  init = {"update": optax.tree.zeros_like(trainable), "weight": zero, "loss": zero,
          "examples": zero, "contributed": zero, "nonfinite": zero, "steps": zero,
          "executed_steps": zero, "poisson_dropped": zero,
          "lora_products": jax.tree_util.tree_map(jnp.asarray,
                                                  pieces.folding.init(trainable))}
  step = functools.partial(chunk_step, pieces, trainable, frozen, data, clip_norm)
  return jax.lax.scan(step, init, (ids, valid, keys, rows))


def sharded_sums(pieces: RoundPieces, trainable: PyTree, frozen: PyTree, data: Any,
                 ids: jax.Array, valid: jax.Array, keys: jax.Array, clip_norm: jax.Array,
                 clients: PyTree | None) -> tuple[dict, tuple, PyTree | None]:
  """The round's sums over every device, per slot (norm, counted), and the per-client
  table with the round's new rows written (each device its own block, `client_rows`)."""
  def per_device(trainable, frozen, data, ids, valid, keys, clip_norm, clients):
    ids, valid, keys = ids[0], valid[0], keys[0]
    rows = None
    if clients is not None:  # every device's slots, device-major, as the table sees them
      every_id = jax.lax.all_gather(ids, AXIS, tiled=True).reshape(-1)
      rows = jax.tree_util.tree_map(lambda x: x.reshape(ids.shape + x.shape[1:]),
                                    client_rows.gather(clients, every_id))
    sums, (norms, ok, new_rows) = device_sums(pieces, trainable, frozen, data, ids, valid,
                                              keys, clip_norm, rows)
    if clients is not None:
      gathered = lambda x: jax.lax.all_gather(x.reshape((-1,) + x.shape[2:]), AXIS,
                                              tiled=True)
      clients = client_rows.scatter(clients, every_id, gathered(ok),
                                    jax.tree_util.tree_map(gathered, new_rows))
    return jax.lax.psum(sums, AXIS), (norms[None], ok[None]), clients
  split, rep = P(AXIS), P()
  return jax.shard_map(per_device, mesh=pieces.mesh,
                       in_specs=(rep, rep, rep, split, split, split, rep, split),
                       out_specs=(rep, split, split), check_vma=False)(
                           trainable, frozen, data, ids, valid, keys, clip_norm, clients)


def server_round(pieces: RoundPieces, state: state_lib.ServerState, frozen: PyTree,
                 data: Any, ids: jax.Array, valid: jax.Array
                 ) -> tuple[state_lib.ServerState, dict]:
  """One round, from the server state and the slots' client ids (`layout_clients`) to the
  next state and the round's metrics: what `build_algorithm` jits."""
  wire = pieces.round_spec.wire_dtype
  train_round = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round)
  dp_round = jax.random.fold_in(rng_lib.dp_key(state.dp_rng), state.round)
  client_stream = jax.random.fold_in(dp_round, 0) if pieces.private else train_round
  # Each client's randomness depends only on (stream, round, client id): chunking and
  # device layout cannot change results.
  flat_keys = jax.vmap(lambda c: jax.random.key_data(jax.random.fold_in(client_stream, c)))(
      ids.reshape(-1))
  keys = flat_keys.reshape(ids.shape + flat_keys.shape[1:])
  sent = comm.on_wire(state.trainable, wire)  # the model the clients receive
  # The frozen weights with what FedEx-LoRA / FLoRA folded into them (a no-op otherwise),
  # as the clients download the folded deltas: in the wire dtype.
  seen = lora_aggregation.fold_into(frozen, comm.on_wire(state.folded, wire))
  sums, (norms, ok), clients = sharded_sums(pieces, sent, seen, data, ids, valid, keys,
                                            state.clip_norm, state.clients)
  mean_update, clip_norm, apply_update, agg_metrics = pieces.aggregator.finalize(
      sums["update"], sums["weight"], norms.reshape(-1), ok.reshape(-1), state.clip_norm,
      jax.random.fold_in(dp_round, 1))
  new_trainable, new_opt = state_lib.apply_server_update(state, mean_update, pieces.server_tx)
  # FLoRA's restart key: the train stream's LORA_INIT_STREAM sub-stream at this round.
  restart = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                  LORA_INIT_STREAM), state.round)
  new_trainable, delta = pieces.folding.finalize(sums["lora_products"], sums["weight"],
                                                 new_trainable, restart)
  # A round in which no client contributed leaves the model and optimizer untouched.
  folded = optax.tree.where(apply_update, optax.tree.add(state.folded, delta), state.folded)
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


def initial_state(pieces: RoundPieces, client_state: ClientStateSpec | None,
                  trainable: PyTree, seed: int, clip_norm: float, dp_key: np.ndarray,
                  xp: Any = np) -> state_lib.ServerState:
  """Round 0's state, not yet placed. The per-client rows (the client rule's, "rule", and
  the codec's, "residual") are NumPy broadcast views (no num_clients copies before
  placement), as many as `client_rows.padded_rows` (padding rows last); `state_shapes`
  traces it with `xp=jnp`."""
  def per_client(one, num):
    rows = client_rows.padded_rows(num, pieces.round_spec.num_devices)
    return jax.tree_util.tree_map(
        lambda x: xp.broadcast_to(xp.asarray(x), (rows,) + xp.shape(x)), one)
  clients = {}
  if client_state is not None:
    clients["rule"] = per_client(client_state.init(trainable), client_state.num_clients)
  if pieces.codec.stateful:
    clients["residual"] = per_client(pieces.codec.init(trainable),
                                     pieces.round_spec.num_clients)
  return state_lib.init_server_state(trainable, pieces.server_tx,
                                     rng_lib.stream_key_data(seed, "train"), dp_key, clip_norm,
                                     clients or None, pieces.folding.init(trainable))


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
  codec = compression.upload_codec(round_spec.wire_dtype, round_spec.compression,
                                   round_spec.compression_block,
                                   round_spec.compression_fraction)
  if codec.stateful and round_spec.num_clients <= 0:
    raise ValueError("federated.compression='topk' keeps a residual per client: RoundSpec."
                     "num_clients must be the number of clients (federated.num_clients)")
  lora_aggregation.check_round(round_spec.lora_aggregation, round_spec.compression,
                               "dp_fedavg" if round_spec.dp.enabled else client_spec.dp.mechanism)
  folding = lora_aggregation.lora_round(
      round_spec.lora_aggregation,
      to_spec(model.peft).lora_scaling if round_spec.lora_aggregation != "fedit" else 1.0,
      round_spec.client_ranks, round_spec.num_clients)
  rule = client_update or make_client_update(model, client_tx, client_spec, num_classes)

  def started_client(trainable, frozen, data, client_id, key, active, *rows):
    return rule(folding.client_start(trainable, client_id), frozen, data, client_id, key,
                active, *rows)

  pieces = RoundPieces(started_client, codec, aggregator or default_aggregator(round_spec),
                       folding, server_tx, round_spec, mesh,
                       round_spec.dp.enabled or client_spec.dp.mechanism != "none")
  # The server state is donated: its buffers become the next state's, so a round holds
  # one copy of the trainable params and optimizer state (the caller must not reuse it).
  round_step = jax.jit(functools.partial(server_round, pieces), donate_argnums=(0,))
  start = functools.partial(initial_state, pieces, client_state)
  split = functools.partial(NamedSharding, mesh, P(AXIS))

  def init(trainable: PyTree, seed: int, clip_norm: float = 0.0,
           dp_key: np.ndarray | None = None) -> state_lib.ServerState:
    """Round 0's state, placed like every later one (`place_initial_state`)."""
    return place_initial_state(pieces, start(trainable, seed, clip_norm,
                                             initial_dp_key(pieces.private, seed, dp_key)))

  def state_shapes(trainable: PyTree) -> state_lib.ServerState:
    """Round 0's state as ShapeDtypeStructs placed on the mesh like `init`'s: `trainable`
    may be shapes only (nothing is drawn, allocated or placed)."""
    shapes = jax.eval_shape(
        lambda t: start(t, 0, 0.0, rng_lib.stream_key_data(0, "dp"), xp=jnp), trainable)
    return aot.abstract(shapes.replace(clients=None), mesh).replace(
        clients=aot.abstract(shapes.clients, mesh, P(AXIS)))

  def lower(state: state_lib.ServerState, frozen: PyTree, data: Any, slots: int) -> Any:
    """The round's `jax.stages.Lowered` for `slots` reporting clients, from arrays or shapes
    (`accelerators.aot`): the layout's shape depends only on the counts, so a round lowers
    for this mesh's devices or a device-less target topology."""
    shape = layout_shape(slots, round_spec.num_devices, round_spec.clients_per_chunk,
                         round_spec.min_slots)
    return round_step.lower(state, frozen, data,
                            jax.ShapeDtypeStruct(shape, jnp.int32, sharding=split()),
                            jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=split()))

  sizes = HostSizes()

  def apply(state: state_lib.ServerState, frozen: PyTree, data: Any,
            plan: RoundPlan) -> tuple[state_lib.ServerState, dict]:
    steps = client_spec.real_steps(sizes(data)[plan.reporting])
    ids, valid = layout_clients(plan.reporting, round_spec.num_devices,
                                round_spec.clients_per_chunk, round_spec.min_slots, steps)
    new_state, metrics = round_step(state, frozen, data, to_global(ids, split()),
                                    to_global(valid, split()))
    return new_state, {**metrics, "clients_sampled": plan.num_sampled,
                       "clients_reporting": plan.num_reporting}

  return FederatedAlgorithm(init=init, apply=apply, lower=lower, state_shapes=state_shapes)


def initial_dp_key(private: bool, seed: int, dp_key: np.ndarray | None) -> np.ndarray:
  """Raw key data of round 0's dp stream: `dp_key` when given; else drawn from the OS when
  a privacy mechanism is on (every process then holds process 0's secret), and the seed's
  otherwise unused dp stream when not."""
  if dp_key is not None:
    return dp_key
  if not private:
    return rng_lib.stream_key_data(seed, "dp")
  key = rng_lib.secret_key_data()
  if jax.process_count() > 1:
    key = np.asarray(multihost_utils.broadcast_one_to_all(key))
  return key


def place_initial_state(pieces: RoundPieces, state: state_lib.ServerState
                        ) -> state_lib.ServerState:
  """`initial_state`'s result placed like every later state (replicated, the per-client
  rows split over the devices), so round 2 reuses round 1's compiled executable."""
  placed = replicate(state.replace(clients=None), pieces.mesh)
  return placed.replace(clients=None if state.clients is None
                        else client_rows.place(state.clients, pieces.mesh))


class HostSizes:
  """The clients' example counts on the host, read once per dataset (one device-to-host
  transfer, not one per round)."""

  def __init__(self):
    self._array, self._host = None, None

  def __call__(self, data: Any) -> np.ndarray:
    if self._array is not data.sizes:
      self._array, self._host = data.sizes, host_value(data.sizes)
    return self._host
