"""One jitted federated round: chunks of clients vmapped, chunks scanned, devices sharded.

Layout of a round's client slots: [devices, chunks_per_device, clients_per_chunk]. Each
device scans over its chunks, vmapping the clients of a chunk, and keeps a running
weighted sum of the updates (so memory holds one chunk's activations); the sums are
reduced across devices with `psum` inside `shard_map`. Padded slots are masked no-ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fedpeft_jax.data as fdata
from fedpeft_jax.federated import features
from fedpeft_jax.federated import state as server_lib
from fedpeft_jax.federated.client import ClientSpec, make_client_update, tree_where
from fedpeft_jax.federated.sampling import RoundPlan

PyTree = Any
AXIS = "clients"
WEIGHTINGS = ("examples", "uniform")


@dataclasses.dataclass(frozen=True)
class ServerDP:
  """Client-level DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping."""
  enabled: bool = False
  noise_multiplier: float = 0.0
  expected_clients: int = 1  # the sum is divided by this (clients_per_round)
  adaptive: bool = False
  target_quantile: float = 0.5
  clip_lr: float = 0.2
  count_noise_std: float = 0.0  # std of the noise on the count of unclipped clients


@dataclasses.dataclass(frozen=True)
class RoundSpec:
  """Static settings of the round (hashable)."""
  clients_per_chunk: int
  num_devices: int
  weighting: str = "examples"
  max_update_norm: float = 0.0  # > 0: clip each client update's global norm at the server
  dp: ServerDP = ServerDP()
  # Pad every round to at least this many client slots, so rounds with a varying number
  # of clients (Poisson sampling, dropout) share one compiled executable.
  min_slots: int = 0


class FederatedAlgorithm(NamedTuple):
  """fedjax-style pair: `init(trainable, seed) -> state`, `apply(state, ...) -> (state, metrics)`;
  `lower(state, frozen, data, plan)` gives the round's `jax.stages.Lowered` (for XLA's cost
  and memory analyses) without running it."""
  init: Callable[..., server_lib.ServerState]
  apply: Callable[..., tuple[server_lib.ServerState, dict]]
  lower: Optional[Callable[..., Any]] = None


MEMORY_FRACTION = 0.75  # share of device memory a compiled round may plan to use


def auto_clients_per_chunk(clients_per_round: int, num_devices: int, batch_size: int = 64,
                           backend: Optional[str] = None, max_images: int = 256,
                           memory_of: Optional[Callable[[int], Optional[int]]] = None,
                           bytes_limit: Optional[int] = None) -> tuple[int, str]:
  """The clients vmapped per chunk, and why (a line for the log).

  CPU: 1 (a sequential loop measured fastest; every client runs exactly its own steps).
  Accelerators: the largest chunk (up to a device's share of the round) whose compiled
  round XLA plans to fit in MEMORY_FRACTION of `bytes_limit` (`device.memory_stats()`),
  `memory_of(chunk)` giving the compiled round's bytes (`compiled_round_bytes`). Where the
  backend reports neither, the rule of thumb: <= `max_images` images per chunk step.
  """
  backend = backend or jax.default_backend()
  per_device = max(1, math.ceil(clients_per_round / num_devices))
  if backend == "cpu":
    return 1, "cpu: one client at a time"
  if memory_of is not None and bytes_limit:
    budget = MEMORY_FRACTION * bytes_limit
    candidates = sorted({per_device} | {2 ** i for i in range(per_device.bit_length())},
                        reverse=True)
    tried = []
    for chunk in candidates:
      need = memory_of(chunk)
      if need is None:
        break
      tried.append(f"{chunk}: {need / 2**30:.2f} GiB")
      if need <= budget:
        return chunk, (f"largest chunk within {MEMORY_FRACTION:.0%} of {bytes_limit / 2**30:.1f}"
                       f" GiB by XLA's estimate ({'; '.join(tried)})")
    if tried:
      return 1, f"no chunk fits by XLA's estimate ({'; '.join(tried)}); using 1"
  chunk = max(1, min(per_device, max_images // max(1, batch_size)))
  return chunk, f"rule of thumb: <= {max_images} images per chunk step (no memory estimate)"


def compiled_round_bytes(lowered: Any) -> Optional[int]:
  """Device bytes XLA plans for a lowered round: arguments + outputs + temporaries,
  less donated (aliased) buffers; None where the backend gives no memory analysis."""
  try:
    mem = lowered.compile().memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def device_bytes_limit(device: Optional[Any] = None) -> Optional[int]:
  """`bytes_limit` of the device's memory stats, or None where the backend has none."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def make_mesh(devices: Optional[list] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (AXIS,))


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _scale(tree: PyTree, s: jax.Array) -> PyTree:
  return jax.tree_util.tree_map(lambda x: x * s.astype(x.dtype), tree)


def build_algorithm(model: nn.Module, client_tx: optax.GradientTransformation,
                    server_tx: optax.GradientTransformation, client_spec: ClientSpec,
                    round_spec: RoundSpec, num_classes: int,
                    mesh: Optional[Mesh] = None,
                    client_update: Optional[Callable[..., dict]] = None) -> FederatedAlgorithm:
  """The federated algorithm for `model` whose trainable subtree the server holds.

  `client_update(trainable, frozen, data, client_id, key) -> dict` replaces the default
  local training (same contract as `make_client_update`), e.g. for a custom client rule.
  """
  if round_spec.weighting not in WEIGHTINGS:
    raise ValueError(f"federated.weighting: {round_spec.weighting!r}; allowed: "
                     f"{', '.join(WEIGHTINGS)}")
  mesh = mesh if mesh is not None else make_mesh(jax.devices()[:round_spec.num_devices])
  if mesh.devices.size != round_spec.num_devices:
    raise ValueError(f"mesh has {mesh.devices.size} devices, RoundSpec says "
                     f"{round_spec.num_devices}")
  if client_update is None:
    client_update = make_client_update(model, client_tx, client_spec, num_classes)
  dp = round_spec.dp

  def init(trainable: PyTree, seed: int, clip_norm: float = 0.0) -> server_lib.ServerState:
    # Placed replicated on the mesh like every later state, so round 2 reuses round 1's
    # compiled executable.
    return replicate(server_lib.init_server_state(trainable, server_tx, seed, clip_norm), mesh)

  def device_sums(trainable, frozen, data, ids, valid, keys, clip_norm):
    """Per-device: scan over chunks [chunks, chunk]; returns this device's sums."""
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), trainable)
    f32 = lambda: jnp.zeros((), jnp.float32)
    init_carry = {"update": zeros, "weight": f32(), "loss": f32(), "examples": f32(),
                  "contributed": f32(), "nonfinite": f32(), "unclipped": f32(),
                  "steps": f32(), "executed_steps": f32(), "poisson_dropped": f32()}

    def chunk_body(carry, xs):
      ids_c, valid_c, keys_c = xs
      keys_c = jax.random.wrap_key_data(keys_c)
      if ids_c.shape[0] == 1:
        # One client per chunk: no vmap, the client's loop runs exactly its real steps.
        out = client_update(trainable, frozen, data, ids_c[0], keys_c[0], valid_c[0])
        out = jax.tree_util.tree_map(lambda x: x[None], out)
      else:
        out = jax.vmap(client_update, in_axes=(None, None, None, 0, 0, 0))(
            trainable, frozen, data, ids_c, keys_c, valid_c)
      update = out["update"]
      finite = jax.vmap(_all_finite)(update)
      ok = valid_c & finite
      norms = jax.vmap(optax.tree.norm)(update)
      # Server-side clipping: robustness (max_update_norm) and DP-FedAvg (clip_norm).
      bound = jnp.inf
      if round_spec.max_update_norm > 0:
        bound = jnp.minimum(bound, round_spec.max_update_norm)
      if dp.enabled:
        bound = jnp.minimum(bound, clip_norm)
      factor = jnp.where(jnp.isfinite(bound), jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-12)),
                         1.0)
      if dp.enabled or round_spec.weighting == "uniform":
        w = ok.astype(jnp.float32)
      else:
        w = jnp.where(ok, out["num_examples"], 0.0)
      # Replace non-finite updates by zeros before weighting (0 * NaN is NaN).
      safe = jax.tree_util.tree_map(
          lambda u: jnp.where(ok.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0.0), update)
      coeff = jnp.where(ok, w * factor, 0.0)  # a NaN norm must not reach the sum via 0 * NaN
      weighted = jax.tree_util.tree_map(lambda u: jnp.tensordot(coeff.astype(u.dtype), u, 1), safe)
      new = dict(carry)
      new["update"] = jax.tree_util.tree_map(jnp.add, carry["update"], weighted)
      new["weight"] = carry["weight"] + jnp.sum(w)
      new["loss"] = carry["loss"] + jnp.sum(jnp.where(ok, out["loss"] * out["num_examples"], 0.0))
      new["examples"] = carry["examples"] + jnp.sum(jnp.where(ok, out["num_examples"], 0.0))
      new["contributed"] = carry["contributed"] + jnp.sum(ok)
      new["nonfinite"] = carry["nonfinite"] + jnp.sum(valid_c & ~finite)
      new["unclipped"] = carry["unclipped"] + jnp.sum(ok & (norms <= clip_norm))
      new["steps"] = carry["steps"] + jnp.sum(jnp.where(ok, out["steps"], 0))
      # What the hardware ran: every slot of a vmapped chunk steps until its longest client
      # is done (the select keeps finished clients still, but their compute happens).
      new["executed_steps"] = carry["executed_steps"] + (
          jnp.max(out["steps"]).astype(jnp.float32) * ids_c.shape[0])
      new["poisson_dropped"] = carry["poisson_dropped"] + jnp.sum(
          jnp.where(valid_c, out["poisson_dropped"], 0))
      return new, None

    sums, _ = jax.lax.scan(chunk_body, init_carry, (ids, valid, keys))
    return sums

  def sharded_sums(trainable, frozen, data, ids, valid, keys, clip_norm):
    def per_device(trainable, frozen, data, ids, valid, keys, clip_norm):
      s = device_sums(trainable, frozen, data, ids[0], valid[0], keys[0], clip_norm)
      return jax.lax.psum(s, AXIS)
    split, rep = P(AXIS), P()
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(rep, rep, rep, split, split, split, rep), out_specs=rep,
                         check_vma=False)(trainable, frozen, data, ids, valid, keys, clip_norm)

  # The server state is donated: its buffers become the next state's, so a round holds
  # one copy of the trainable params and optimizer state (the caller must not reuse it).
  @functools.partial(jax.jit, donate_argnums=(0,))
  def round_step(state: server_lib.ServerState, frozen: PyTree, data: Any, ids: jax.Array,
                 valid: jax.Array):
    rng = jax.random.wrap_key_data(state.rng)
    round_key = jax.random.fold_in(rng, state.round)
    # Each client's randomness depends only on (seed, round, client id): chunking and
    # device layout cannot change results.
    flat_keys = jax.vmap(lambda c: jax.random.key_data(jax.random.fold_in(round_key, c)))(
        ids.reshape(-1))
    keys = flat_keys.reshape(ids.shape + flat_keys.shape[1:])
    sums = sharded_sums(state.trainable, frozen, data, ids, valid, keys, state.clip_norm)
    metrics = {
        "clients_contributed": sums["contributed"],
        "clients_nonfinite": sums["nonfinite"],
        "train_loss": sums["loss"] / jnp.maximum(sums["examples"], 1.0),
        "local_steps": sums["steps"],
        "executed_steps": sums["executed_steps"],
        "poisson_dropped": sums["poisson_dropped"],
    }
    clip_norm = state.clip_norm
    if dp.enabled:
      k_noise = jax.random.fold_in(round_key, -1 & 0x7FFFFFFF)
      leaves, treedef = jax.tree_util.tree_flatten(sums["update"])
      noise_keys = jax.random.split(k_noise, len(leaves) + 1)
      std = dp.noise_multiplier * state.clip_norm
      noisy = [x + std * jax.random.normal(k, x.shape, x.dtype)
               for x, k in zip(leaves, noise_keys[:-1])]
      mean_update = _scale(jax.tree_util.tree_unflatten(treedef, noisy),
                           jnp.asarray(1.0 / dp.expected_clients))
      if dp.adaptive:
        # Andrew et al. (2021): each client reports b_i - 1/2 (sensitivity 1/2), noised.
        centred = (sums["unclipped"] - 0.5 * sums["contributed"]
                   + dp.count_noise_std * jax.random.normal(noise_keys[-1]))
        frac = centred / dp.expected_clients + 0.5
        clip_norm = state.clip_norm * jnp.exp(-dp.clip_lr * (frac - dp.target_quantile))
      metrics["clip_norm"] = state.clip_norm
      metrics["unclipped_fraction"] = sums["unclipped"] / jnp.maximum(sums["contributed"], 1.0)
      apply_update = jnp.asarray(True)
    else:
      mean_update = _scale(sums["update"], 1.0 / jnp.maximum(sums["weight"], 1e-12))
      apply_update = sums["weight"] > 0
    new_trainable, new_opt = server_lib.apply_server_update(state, mean_update, server_tx)
    # A round in which no client contributed leaves the model and optimizer untouched.
    new_trainable = tree_where(apply_update, new_trainable, state.trainable)
    new_opt = tree_where(apply_update, new_opt, state.opt_state)
    new_state = state.replace(trainable=new_trainable, opt_state=new_opt, round=state.round + 1,
                              clip_norm=clip_norm)
    metrics["update_norm"] = optax.tree.norm(mean_update)
    return new_state, metrics

  sizes_cache: dict[str, Any] = {}

  def round_args(state, frozen, data, plan):
    if sizes_cache.get("array") is not data.sizes:  # one device-to-host read per dataset
      sizes_cache.update(array=data.sizes, host=host_sizes(data))
    steps = client_spec.real_steps(sizes_cache["host"][plan.reporting])
    ids, valid = layout_clients(plan.reporting, round_spec.num_devices,
                                round_spec.clients_per_chunk, round_spec.min_slots, steps)
    sharding = NamedSharding(mesh, P(AXIS))
    return state, frozen, data, _to_global(ids, sharding), _to_global(valid, sharding)

  def lower(state: server_lib.ServerState, frozen: PyTree, data: Any, plan: RoundPlan) -> Any:
    return round_step.lower(*round_args(state, frozen, data, plan))

  def apply(state: server_lib.ServerState, frozen: PyTree, data: Any,
            plan: RoundPlan) -> tuple[server_lib.ServerState, dict]:
    new_state, metrics = round_step(*round_args(state, frozen, data, plan))
    metrics = dict(metrics)
    metrics["clients_sampled"] = plan.num_sampled
    metrics["clients_reporting"] = plan.num_reporting
    return new_state, metrics

  return FederatedAlgorithm(init=init, apply=apply, lower=lower)


def layout_clients(client_ids: np.ndarray, num_devices: int, clients_per_chunk: int,
                   min_slots: int = 0, steps: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The round's client slots as [devices, chunks, chunk]; padded slots are invalid.

  With `steps` (each client's real local steps, aligned with `client_ids`) the clients are
  ordered longest first (ties by position, so the layout is deterministic) before they are
  dealt out: client i of that order goes to device i % devices, chunk i // (chunk *
  devices). Chunk c therefore holds clients of similar length on every device, a chunk
  trains only as long as its longest client, and every device gets a similar share.
  Padding slots (id 0, invalid) come last and cost nothing.
  """
  client_ids = np.asarray(client_ids, np.int32)
  n = int(len(client_ids))
  per_step = num_devices * clients_per_chunk
  chunks = max(1, math.ceil(max(n, min_slots) / per_step))
  total = chunks * per_step
  if steps is not None:
    client_ids = client_ids[np.argsort(-np.asarray(steps), kind="stable")]
  ids = np.zeros(total, np.int32)
  valid = np.zeros(total, bool)
  ids[:n] = client_ids
  valid[:n] = True
  order = np.arange(total).reshape(chunks, clients_per_chunk, num_devices).transpose(2, 0, 1)
  return ids[order], valid[order]


def host_sizes(data: Any) -> np.ndarray:
  """`data.sizes` on the host (also from a replicated multi-process global array)."""
  x = data.sizes
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))  # replicated: every shard holds all clients
  return np.asarray(x)


def _to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from identical host values (works single- and multi-process)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Place a pytree (frozen backbone, client data) replicated on every device of `mesh`."""
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: _to_global(np.asarray(x), sharding), tree)


def place_eval_set(images: np.ndarray, labels: np.ndarray, mesh: Mesh
                   ) -> tuple[jax.Array, jax.Array]:
  """An evaluation set split row-wise over `mesh`'s devices (each holds 1/devices of it),
  padded to a multiple of the device count with label -1 (not counted)."""
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  pad = (-len(labels)) % mesh.devices.size
  if pad:
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.full(pad, -1, np.int32)])
  sharding = NamedSharding(mesh, P(AXIS))
  return _to_global(images, sharding), _to_global(labels, sharding)


def make_evaluate(model: nn.Module, batch_size: int, image_size: int,
                  mesh: Optional[Mesh] = None,
                  inputs: Optional[features.InputSpec] = None) -> Callable[..., dict]:
  """evaluate(params, examples, labels) -> {'accuracy', 'loss'}, batched inside one jit.

  The examples are split over `mesh`'s devices (default: all devices); each device runs
  its share and the correct counts and losses are summed with `psum`. Rows labelled -1
  are padding (see `place_eval_set`). `inputs` says what the examples are (default: uint8
  images; or a cached frozen prefix, see `features`).
  """
  mesh = mesh if mesh is not None else make_mesh()
  num_devices = mesh.devices.size
  inputs = inputs or features.images_input(image_size)

  def local(params, examples, labels):
    index, mask = fdata.eval_schedule(examples.shape[0], batch_size)

    def body(carry, xs):
      idx, m = xs
      x = inputs.prepare(examples[idx], None, "none", train=False)
      logits = inputs.logits(model, params, x, train=False)
      y = labels[idx]
      valid = m & (y >= 0)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
      correct = jnp.argmax(logits, -1) == y
      mf = valid.astype(jnp.float32)
      return (carry[0] + jnp.sum(correct * mf), carry[1] + jnp.sum(ce * mf),
              carry[2] + jnp.sum(mf)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero), (index, mask))
    return jax.lax.psum(sums, AXIS)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(),
                          check_vma=False)

  @jax.jit
  def evaluate(params: PyTree, examples: jax.Array, labels: jax.Array) -> dict:
    pad = (-examples.shape[0]) % num_devices
    if pad:  # arrays not placed by place_eval_set
      examples = jnp.pad(examples, [(0, pad)] + [(0, 0)] * (examples.ndim - 1))
      labels = jnp.pad(labels, (0, pad), constant_values=-1)
    correct, loss, n = sharded(params, examples, labels)
    return {"accuracy": correct / n, "loss": loss / n}

  return evaluate
