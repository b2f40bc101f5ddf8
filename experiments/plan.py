"""Plan a study row for an accelerator that is not here: XLA's memory per chunk size, the
chunk the runner would choose, FLOPs and a roofline lower bound on the round and the row.

  JAX_PLATFORMS=cpu python -m experiments.plan --target=h100 \
      --config=configs/study.py:cifar100,bias [--devices=8] [--out=plan.json]

Needs JAX's CUDA plugin (pip install "jax[cuda13]==<jax>") for the GPU targets, libtpu for
the TPU ones (--target=v5e, v6e); no accelerator. Everything is lowered
from shapes through the library's own code (`FederatedAlgorithm.lower/state_shapes`, the
jitted evaluator), for the target's device-less topology (`fedpeft_jax.accelerators`):
  * the data: a TFDS study dataset that is not prepared here is described by its shape
    (sizes, image shape, classes); its labels, which only the client partition reads, are
    synthetic with the real per-class counts, so the partition (and the largest client,
    which fixes the compiled step count) is a draw like the real one, not the real one;
  * memory: XLA's plan per device (arguments + outputs + temporaries - donated buffers) for
    each candidate chunk; the chunk is the largest within the runner's MEMORY_FRACTION of
    the target's `bytes_limit` (JAX's default allocator share of device memory), the same
    rule `clients_per_chunk="auto"` applies on a real device;
  * FLOPs: XLA's HLO cost analysis of the unoptimized round, whose loops count one body:
    one local step of one chunk (plus the server's update); cuDNN attention calls are
    counted by hand. The round's executed FLOPs = per-client step x the steps the layout
    executes (every slot of a chunk runs as long as its longest client); useful = per-client
    step x the steps clients really need;
  * a feature cache (federated.feature_cache, where the trained part allows it): its one-off
    build (`federated.cache_builder`) compiles from shapes too; the round and the evaluation
    then lower on the stored form, and the build's bound joins the row's;
  * roofline: max(FLOPs / peak FLOP/s of the compute dtype, bytes / memory bandwidth),
    bytes from the cost analysis of the optimized (fused) module. A lower bound: a real
    run adds kernel launch gaps, host syncs and less than peak tensor-core efficiency.
What a device-less compile cannot tell: no autotuning happens (GEMM tilings are XLA's
defaults), cuDNN graphs are not built (a supported attention shape is only confirmed on a
GPU), and the runtime's own memory (CUDA context, cuBLAS/cuDNN workspaces) is not counted.

On a GPU, time and MFU against this bound:
  python -m experiments.bench_round --preset=study --methods=bias --clients_per_chunk=auto
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for GPUs without looking for one

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
from fedpeft_jax.accelerators import aot, targets
from fedpeft_jax.data.datasets import TFDS_DATASETS
from fedpeft_jax.federated import (MEMORY_FRACTION, auto_clients_per_chunk,
                                   build_algorithm, cache_builder, layout_clients,
                                   make_evaluate)
from fedpeft_jax.federated import personal as personal_lib
from fedpeft_jax.mesh import AXIS, make_mesh
from fedpeft_jax.federated.sampling import plan_round, resolve_clients_per_round
from fedpeft_jax.models.factory import attention_choice, build_model
from fedpeft_jax.privacy import PrivacyPlan
from fedpeft_jax.runner import train as runner
from fedpeft_jax.runner.validate import validate_config

# (train, test, image shape, classes) of the TFDS study datasets, for planning without them.
DATASET_SHAPES = {
    "cifar100": (50000, 10000, (32, 32, 3), 100),
    "cifar10": (50000, 10000, (32, 32, 3), 10),
    "resisc45": (25200, 6300, (256, 256, 3), 45),
    "patch_camelyon": (262144, 32768, (96, 96, 3), 2),
}

def _define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing this module (the
  tests do) adds no flags that clash with the other experiments' (--out)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("target", "h100", f"One of {', '.join(targets.ALL_TARGETS)}.")
  flags.DEFINE_integer("devices", 1, "GPUs (TPU chips) of the target in one host.")
  flags.DEFINE_list("chunks", [], "Chunk sizes to compile (default: the runner's candidates, "
                    "largest first, down to the first that fits, and 1).")
  flags.DEFINE_string("out", "", "JSON output path.")


@dataclasses.dataclass(frozen=True)
class DataShape:
  """A dataset as the round compiles it: sizes, image shape, classes, and training labels."""
  name: str
  train_labels: np.ndarray
  num_test: int
  image_shape: tuple[int, int, int]
  num_classes: int
  augment: str


def data_shape(config: Any) -> DataShape:
  """The config's dataset: loaded where it is local (digits, Fashion-MNIST, synthetic), else
  its shape with synthetic labels of the real per-class counts (module docstring)."""
  d = config.data
  if d.dataset not in DATASET_SHAPES:
    ds, _ = runner.load_data(config)
    return DataShape(ds.name, ds.train_labels, ds.num_test, ds.image_shape, ds.num_classes,
                     ds.augment)
  num_train, num_test, shape, classes = DATASET_SHAPES[d.dataset]
  if d.host_resolution > 0:  # as the runner's load_data asks the reader to resize
    shape = (d.host_resolution, d.host_resolution, 3)
  kept = fdata.parse_classes(d.classes)
  if kept is not None:  # a class subset keeps its share of both splits
    num_train, num_test = (n * len(kept) // classes for n in (num_train, num_test))
    classes = len(kept)
  num_train = min(num_train, d.train_size or num_train)
  labels = (np.arange(num_train) % classes).astype(np.int32)
  return DataShape(d.dataset, labels, num_test, shape, classes, TFDS_DATASETS[d.dataset].augment)


def plan_cache(model: Any, inputs: Any, params: Any, images: jax.ShapeDtypeStruct,
               num_test: int, batch_size: int, target: targets.Target) -> dict:
  """The feature cache's one-off build (`federated.cache_builder`, as the runner runs it: on
  one device, over the training images, then the test images) compiled from shapes: its
  memory on the target, the stored form's shape and size, FLOPs and roofline bound."""
  one_device = make_mesh(list(targets.topology(target, 1).devices))
  builder = cache_builder(model, inputs, batch_size)
  lowered = builder.lower(aot.abstract(params, one_device), aot.abstract(images, one_device))
  exe, flags_used = aot.compile_with_fallback(lowered)
  out = lowered.out_info
  per_row = math.prod(out.shape[1:]) * jnp.dtype(out.dtype).itemsize
  batches = math.ceil(images.shape[0] / batch_size) + math.ceil(num_test / batch_size)
  # The scan counts one batch's FLOPs (hlo_flops' one-loop-body rule), the same for test.
  flops = (aot.hlo_flops(lowered) + aot.attention_flops(exe.as_text())) * batches
  moved = aot.optimized_bytes(exe) * batches
  peak = target.peak_flops[jnp.dtype(model.dtype).name]
  return {"kind": inputs.kind, "stored": jax.ShapeDtypeStruct(out.shape, out.dtype),
          "stored_gib": per_row * (images.shape[0] + num_test) / 2**30,
          "peak_gib": aot.compiled_stats(exe).peak_bytes / 2**30, "flops": flops,
          "seconds_bound": max(flops / peak, moved / target.memory_bandwidth),
          "xla_flags": flags_used}


def plan(config: Any, target: targets.Target, num_devices: int = 1,
         chunks: tuple[int, ...] = ()) -> dict:
  """Compile the config's round and evaluation for `target` from shapes; the plan as a dict."""
  validate_config(config)
  fed = config.federated
  t0 = time.time()
  data = data_shape(config)
  part = runner.partition_clients(config, data.train_labels)
  sizes = np.asarray(part.sizes)
  mesh = make_mesh(list(targets.topology(target, num_devices).devices))
  model = build_model(config, data.num_classes, platform=target.platform,
                      compute_capability=target.compute_capability)
  attention, attention_why = attention_choice(config, model, target.platform,
                                              target.compute_capability)
  size = config.model.image_size
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                          jax.random.PRNGKey(0))["params"]
  mask = peft.trainable_mask(params, runner.training_peft(config))
  trainable, frozen = peft.split(params, mask)
  trainable, personal_init = personal_lib.split_for_schedule(trainable, fed.personal,
                                                            fed.personal_schedule)
  babu = personal_lib.freezes_personal(fed.personal_schedule)
  per_round = resolve_clients_per_round(fed.num_clients, fed.clients_per_round, fed.participation)
  local_epochs = runner.resolve_local_epochs(config, sizes)
  steps_of = lambda n: int(fdata.num_local_steps(n, fed.batch_size, local_epochs,
                                                 fed.local_steps))
  privacy = PrivacyPlan(config, sizes, per_round, steps_of,
                        len(jax.tree_util.tree_leaves(trainable)))
  augment = data.augment if config.data.augment == "auto" else config.data.augment
  inputs, cache_note = runner.input_spec(config, model, mask, augment)
  max_n = int(sizes.max())
  cspec = runner.client_spec(config, local_epochs, max_n, augment, inputs, privacy)
  min_slots = runner.round_slots(config, per_round, privacy)
  client_tx, server_tx = runner.optimizers(config)
  cast = lambda tree: jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, model.dtype), tree)
  # As the runner places it: the backbone in the compute dtype; FedBABU's frozen personal
  # leaves (merged in) stay float32.
  frozen_in = cast(frozen) if personal_init is None or not babu else peft.merge(
      cast(frozen), personal_init)
  # The round's personal rule and rows, as the runner builds them (zeros: shapes only).
  zeros = (None if personal_init is None else
           jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), personal_init))
  client_rule, client_state = personal_lib.personal_client_rule(
      model, client_tx, cspec, data.num_classes, zeros, fed.personal_schedule,
      fed.personal_epochs, fed.num_clients)
  stored = jax.ShapeDtypeStruct((len(data.train_labels),) + data.image_shape, jnp.uint8)
  test_rows = math.ceil(data.num_test / num_devices) * num_devices
  test_stored = jax.ShapeDtypeStruct((test_rows,) + data.image_shape, jnp.uint8)
  cache = None
  if inputs.kind != "images":
    cache = plan_cache(model, inputs, params, stored, data.num_test, fed.eval_batch_size,
                       target)
    stored = cache.pop("stored")
    test_stored = jax.ShapeDtypeStruct((test_rows,) + stored.shape[1:], stored.dtype)
    cache["stored_shape"] = list(stored.shape)
  client_data = fdata.ClientData(
      stored, jax.ShapeDtypeStruct((len(data.train_labels),), jnp.int32),
      jax.ShapeDtypeStruct((fed.num_clients, max_n), jnp.int32),
      jax.ShapeDtypeStruct((fed.num_clients,), jnp.int32))
  client_data = aot.abstract(client_data, mesh)
  frozen_abs = aot.abstract(frozen_in, mesh)
  client_ranks = runner.lora_client_ranks(config)

  def build(chunk: int):
    return build_algorithm(model, client_tx, server_tx, cspec,
                           runner.round_spec(config, chunk, num_devices, privacy, min_slots,
                                             client_ranks),
                           data.num_classes, mesh=mesh, client_update=client_rule,
                           client_state=client_state)

  compiled: dict[int, dict] = {}

  def compile_round(chunk: int) -> dict:
    if chunk not in compiled:
      algo = build(chunk)
      start = time.time()
      lowered = algo.lower(algo.state_shapes(trainable), frozen_abs, client_data, per_round)
      exe, flags_used = aot.compile_with_fallback(lowered)
      stats = aot.compiled_stats(exe)
      text = exe.as_text()
      step_flops = aot.hlo_flops(lowered) + aot.attention_flops(text)
      fwd, bwd = stats.cudnn_attention
      compiled[chunk] = {
          "chunk": chunk, "argument_gib": stats.argument_bytes / 2**30,
          "output_gib": stats.output_bytes / 2**30, "temp_gib": stats.temp_bytes / 2**30,
          "alias_gib": stats.alias_bytes / 2**30, "peak_gib": stats.peak_bytes / 2**30,
          "peak_bytes": stats.peak_bytes, "chunk_step_flops": step_flops,
          "chunk_step_bytes": aot.optimized_bytes(exe),
          "cudnn_attention_calls": {"forward": fwd, "backward": bwd},
          "all_reduce_ops": len(re.findall(r"= \S+ all-reduce(?:-start)?\(", text)),
          "xla_flags": flags_used, "compile_seconds": round(time.time() - start, 1)}
    return compiled[chunk]

  budget_note = ""
  if chunks:
    rows = [compile_round(c) for c in chunks]
    fits = [r["chunk"] for r in rows if r["peak_bytes"] <= MEMORY_FRACTION * target.bytes_limit]
    chunk = max(fits) if fits else 1
  else:
    chunk, budget_note = auto_clients_per_chunk(
        per_round, num_devices, fed.batch_size, backend=target.platform,
        memory_of=lambda c: compile_round(c)["peak_bytes"], bytes_limit=target.bytes_limit)
    compile_round(1)
  chosen = compile_round(chunk)
  # Executed vs useful client-steps over the row's rounds, clients drawn by the sampling
  # stream as the runner draws them (under DP-FedAvg the runner draws from its secret
  # stream instead: the same distribution), laid out as the round lays them out.
  steps = np.asarray(cspec.real_steps(sizes))
  executed = useful = 0
  sampling_seed = rng_lib.stream_seed(config.seed, "sampling")
  for r in range(fed.rounds):
    reporting = plan_round(sampling_seed, r, fed.num_clients, per_round, fed.dropout,
                           poisson=runner.poisson_clients(config, privacy)).reporting
    ids, valid = layout_clients(reporting, num_devices, chunk, min_slots, steps[reporting])
    slot_steps = np.where(valid, steps[ids], 0)
    executed += int(slot_steps.max(axis=2).sum()) * chunk
    useful += int(slot_steps.sum())
  executed, useful = executed / fed.rounds, useful / fed.rounds  # per round, on average
  per_client_flops = chosen["chunk_step_flops"] / chunk
  per_client_bytes = chosen["chunk_step_bytes"] / chunk
  peak = target.peak_flops[jnp.dtype(model.dtype).name]
  round_flops = per_client_flops * executed
  round_bound = max(round_flops / peak, per_client_bytes * executed / target.memory_bandwidth
                    ) / num_devices
  # Evaluation of the global model on the test split (every eval_every rounds and the last).
  evaluate = make_evaluate(model, fed.eval_batch_size, size, mesh=mesh, inputs=inputs)
  eval_lowered = evaluate.lower(
      aot.abstract(cast(params), mesh),
      aot.abstract(test_stored, mesh, jax.sharding.PartitionSpec(AXIS)),
      aot.abstract(jax.ShapeDtypeStruct((test_rows,), jnp.int32), mesh,
                   jax.sharding.PartitionSpec(AXIS)))
  eval_exe, eval_flags = aot.compile_with_fallback(eval_lowered)
  batches = math.ceil(test_rows / num_devices / fed.eval_batch_size)
  eval_flops = (aot.hlo_flops(eval_lowered) + aot.attention_flops(eval_exe.as_text())) * batches
  eval_bound = max(eval_flops / peak,
                   aot.optimized_bytes(eval_exe) * batches / target.memory_bandwidth)
  evals = len(range(fed.eval_every, fed.rounds + 1, fed.eval_every)) + (
      fed.rounds % fed.eval_every != 0)
  return {
      "target": target.name, "devices": num_devices, "dataset": data.name,
      "method": config.peft.method, "dtype": jnp.dtype(model.dtype).name,
      "attention": attention, "attention_why": attention_why,
      "clients_per_round": per_round, "max_client_examples": max_n,
      "bytes_limit_gib": target.bytes_limit / 2**30,
      "budget_gib": MEMORY_FRACTION * target.bytes_limit / 2**30,
      "chunks": [compiled[c] for c in sorted(compiled)], "chunk": chunk,
      "chunk_why": budget_note or "largest listed chunk within the budget",
      "flops_per_client_step": per_client_flops,
      "executed_client_steps": executed, "useful_client_steps": useful,
      "round_flops_executed": round_flops, "round_flops_useful": per_client_flops * useful,
      "eval_flops": eval_flops, "round_seconds_bound": round_bound,
      "eval_seconds_bound": eval_bound,
      "row_seconds_bound": (fed.rounds * round_bound + evals * eval_bound
                            + (cache["seconds_bound"] if cache else 0.0)),
      "input": inputs.kind, "input_why": cache_note, "cache": cache,
      "rounds": fed.rounds, "evaluations": evals,
      "eval_memory_gib": aot.compiled_stats(eval_exe).peak_bytes / 2**30,
      "eval_xla_flags": eval_flags,
      "plan_seconds": round(time.time() - t0, 1),
  }


def format_plan(p: dict) -> str:
  lines = [f"{p['dataset']} | {p['method']} | {p['target']} x{p['devices']} | {p['dtype']} | "
           f"attention {p['attention']} ({p['attention_why']})",
           f"budget {p['budget_gib']:.1f} GiB ({MEMORY_FRACTION:.0%} of bytes_limit "
           f"{p['bytes_limit_gib']:.1f} GiB)",
           "chunk | args GiB | out GiB | temp GiB | peak GiB | cuDNN fwd/bwd | compile s | XLA flags"]
  for r in p["chunks"]:
    a = r["cudnn_attention_calls"]
    lines.append(f"{r['chunk']:5d} | {r['argument_gib']:8.2f} | {r['output_gib']:7.2f} | "
                 f"{r['temp_gib']:8.2f} | {r['peak_gib']:8.2f} | {a['forward']}/{a['backward']}"
                 f" | {r['compile_seconds']} | {r['xla_flags'][:40]}")
  lines += [f"chunk chosen: {p['chunk']} ({p['chunk_why']})",
            f"FLOPs per client step {p['flops_per_client_step']:.3e}; round: executed "
            f"{p['round_flops_executed']:.3e} ({p['executed_client_steps']:.1f} client-steps, "
            f"mean over rounds), useful {p['round_flops_useful']:.3e} "
            f"({p['useful_client_steps']:.1f})",
            f"roofline bound: round {p['round_seconds_bound']:.2f} s, evaluation "
            f"{p['eval_seconds_bound']:.2f} s, row ({p['rounds']} rounds, {p['evaluations']} "
            f"evaluations) {p['row_seconds_bound'] / 60:.1f} min",
            f"planned in {p['plan_seconds']} s"]
  if p["cache"]:
    c = p["cache"]
    lines.insert(-1, f"feature cache ({p['input_why']}): {c['stored_gib']:.2f} GiB stored, "
                 f"build peak {c['peak_gib']:.2f} GiB, {c['flops']:.3e} FLOPs, bound "
                 f"{c['seconds_bound']:.2f} s (in the row's bound) | {c['xla_flags'][:40]}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    target = targets.get_target(f.target)
    missing = targets.compiler_missing(target)
    if missing:
      raise ValueError(missing)
    if f.config is None:
      raise ValueError("--config is required (e.g. configs/study.py:cifar100,bias)")
    result = plan(f.config, target, f.devices, tuple(int(c) for c in f.chunks))
  except ValueError as e:
    sys.exit(f"experiments.plan: {e}")
  print(format_plan(result))
  if f.out:
    with open(f.out, "w") as out:
      json.dump(result, out, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
