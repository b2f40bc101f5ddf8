"""Round benchmark: one jitted round of K clients x S local steps x batch B (ViT-Ti/4, 32x32).

  python -m experiments.bench_round --methods=full,bias --chunks=1,2,8 --clients=8 --steps=4

For each method and `clients_per_chunk` it reports images/s, rounds/s and XLA's memory
estimate of the compiled round; then the same workload run the way most FL simulators do
it, one client at a time through a per-step jitted train step called from Python.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.federated import (ClientSpec, RoundSpec, build_algorithm, make_server_optimizer,
                                   plan_round)
from fedpeft_jax.federated.client import masked_cross_entropy
from fedpeft_jax.models import ViT

_METHODS = flags.DEFINE_list("methods", ["full", "bias"], "PEFT methods.")
_CHUNKS = flags.DEFINE_list("chunks", ["1", "2", "8"], "clients_per_chunk values.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Clients per round (K).")
_STEPS = flags.DEFINE_integer("steps", 4, "Local steps per client (S).")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size (B).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds (after one warm-up round).")
_VARIANT = flags.DEFINE_string("variant", "Ti/4", "ViT variant.")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Image size.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path.")
_UNEVEN = flags.DEFINE_bool("uneven", False, "Unequal clients (1..S batches each, as non-IID "
                            "splits produce) instead of S batches each.")
_SINGLE = flags.DEFINE_string("single", "", "Internal: run one 'method:chunk' (or 'method:loop') "
                              "in this process and print its JSON row.")


def _setup(method: str):
  cfg = peft.method_config(method)
  model = ViT(variant=_VARIANT.value, num_classes=10, image_size=_IMAGE.value, peft=cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, _IMAGE.value, _IMAGE.value, 3)))
  params = params["params"]
  trainable, frozen = peft.split(params, peft.trainable_mask(params, cfg))
  k, s, b = _CLIENTS.value, _STEPS.value, _BATCH.value
  n = k * s * b
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, _IMAGE.value, _IMAGE.value, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  indices = np.arange(n, dtype=np.int32).reshape(k, s * b)
  sizes = _client_steps() * b
  data = fdata.ClientData(images=jnp.asarray(images), labels=jnp.asarray(labels),
                          indices=jnp.asarray(indices), sizes=jnp.asarray(sizes, jnp.int32))
  return model, trainable, frozen, data


def _client_steps() -> np.ndarray:
  k, s = _CLIENTS.value, _STEPS.value
  return (np.arange(k) % s) + 1 if _UNEVEN.value else np.full(k, s)


def bench_engine(method: str, chunk: int) -> dict:
  model, trainable, frozen, data = _setup(method)
  k, s, b = _CLIENTS.value, _STEPS.value, _BATCH.value
  client_tx = optax.chain(optax.add_decayed_weights(1e-4),
                          optax.sgd(0.01, momentum=0.9, nesterov=True))
  cspec = ClientSpec(batch_size=b, local_epochs=1, max_examples=s * b, image_size=_IMAGE.value,
                     augment="none")
  algo = build_algorithm(model, client_tx, make_server_optimizer("fedavg"), cspec,
                         RoundSpec(chunk, 1), 10)
  state = algo.init(trainable, seed=0)
  t = time.perf_counter()
  state, _ = algo.apply(state, frozen, data, plan_round(0, 0, k, k))
  jax.block_until_ready(state.trainable)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for r in range(_ROUNDS.value):
    state, m = algo.apply(state, frozen, data, plan_round(0, r + 1, k, k))
  jax.block_until_ready(state.trainable)
  dt = (time.perf_counter() - t) / _ROUNDS.value
  return {"method": method, "mode": f"jitted round, chunk={chunk}", "seconds_per_round": dt,
          "rounds_per_s": 1 / dt, "images_per_s": int(_client_steps().sum()) * b / dt,
          "first_round_s": compile_s}


def bench_loop(method: str) -> dict:
  """Baseline: Python loop over clients and steps, one jitted call per step."""
  model, trainable, frozen, data = _setup(method)
  k, s, b = _CLIENTS.value, _STEPS.value, _BATCH.value
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9, nesterov=True))
  size = _IMAGE.value

  @jax.jit
  def train_step(t, opt_state, frozen, images, labels):
    x = fdata.preprocess(images, None, image_size=size, augment="none", train=False)

    def loss_fn(t):
      logits = model.apply({"params": peft.merge(t, frozen)}, x)
      return masked_cross_entropy(logits, labels, jnp.ones(labels.shape, bool), 10)

    g = jax.grad(loss_fn)(t)
    u, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, u), opt_state

  images, labels = np.asarray(data.images), np.asarray(data.labels)

  def one_round(global_t):
    total = jax.tree_util.tree_map(jnp.zeros_like, global_t)
    for c in range(k):
      t, opt_state = global_t, tx.init(global_t)
      for step in range(int(_client_steps()[c])):
        sl = slice((c * s + step) * b, (c * s + step + 1) * b)
        t, opt_state = train_step(t, opt_state, frozen, images[sl], labels[sl])
      total = jax.tree_util.tree_map(lambda a, n, o: a + (n - o) / k, total, t, global_t)
    return jax.tree_util.tree_map(jnp.add, global_t, total)

  t0 = time.perf_counter()
  trainable = one_round(trainable)
  jax.block_until_ready(trainable)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(_ROUNDS.value):
    trainable = one_round(trainable)
  jax.block_until_ready(trainable)
  dt = (time.perf_counter() - t0) / _ROUNDS.value
  return {"method": method, "mode": "per-step jitted loop", "seconds_per_round": dt,
          "rounds_per_s": 1 / dt, "images_per_s": int(_client_steps().sum()) * b / dt,
          "first_round_s": first}


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_single(spec: str) -> dict:
  """Each configuration in a fresh process, so peak RSS is its own."""
  args = [a for a in sys.argv[1:] if not a.startswith("--single")]
  out = subprocess.run([sys.executable, "-m", "experiments.bench_round", f"--single={spec}"]
                       + args, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  del argv
  if _SINGLE.value:
    method, mode = _SINGLE.value.split(":")
    row = bench_loop(method) if mode == "loop" else bench_engine(method, int(mode))
    row["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(row))
    return
  rows = []
  for method in _METHODS.value:
    loop = _run_single(f"{method}:loop")
    rows.append(loop)
    print(loop, flush=True)
    for chunk in _CHUNKS.value:
      row = _run_single(f"{method}:{chunk}")
      row["speedup_vs_loop"] = loop["seconds_per_round"] / row["seconds_per_round"]
      rows.append(row)
      print(row, flush=True)
  print(f"\nK={_CLIENTS.value} clients x S={_STEPS.value} steps"
        f"{' (uneven: 1..S)' if _UNEVEN.value else ''} x B={_BATCH.value}, "
        f"ViT-{_VARIANT.value} {_IMAGE.value}px, backend {jax.default_backend()} "
        f"({len(jax.devices())} device(s))\n")
  print("| method | mode | images/s | rounds/s | s/round | first round (compile) s | peak RSS MB "
        "| vs loop |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['mode']} | {r['images_per_s']:.1f} | {r['rounds_per_s']:.3f} | "
          f"{r['seconds_per_round']:.2f} | {r['first_round_s']:.1f} | {r['peak_rss_mb']:.0f} | "
          f"{r.get('speedup_vs_loop', 1.0):.2f}x |")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
