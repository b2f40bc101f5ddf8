"""Micro-benchmark: one jitted train step of ViT-Ti/4 at 32x32 per PEFT method.

Why: PEFT should make a client's step cheaper, not only its upload. Gradients are
taken only w.r.t. the trainable subtree and the frozen weights enter the jitted
step as arguments (not closed-over constants), so JAX never builds the
weight-gradient matmuls of frozen layers; the remaining backward cost is the
activation gradients. Reports images/s, process CPU time, XLA's FLOP count and
memory for the compiled step, and the speed-up over `full`. Methods are timed
round-robin, and CPU time is reported beside wall time, because a shared CPU's
load from other processes otherwise decides the ranking.

  python -m experiments.bench_peft_step [--batch 32] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax import peft
from fedpeft_jax.models import ViT

METHOD_CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "head": {},
    "bias": {},
    "prompt": dict(kind="deep", num_tokens=10),
    "adapter": dict(kind="sequential", bottleneck=16),  # 192 / 12, the study's 768 -> 96 ratio
    "lora": dict(rank=8, targets="query,value"),
    "ssf": {},
}


def study_sgd(lr: float) -> optax.GradientTransformation:
  """The study's client optimizer: SGD, Nesterov momentum 0.9, weight decay 1e-4."""
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9, nesterov=True))


def make_step(model: ViT, mask: Any, tx: optax.GradientTransformation):
  """A jitted step(params, opt_state, images, labels, rng) that differentiates only the trainable part."""

  def loss_fn(trainable, frozen, images, labels, rng):
    logits = model.apply({"params": peft.merge(trainable, frozen)}, images, train=True,
                         rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, images, labels, rng):
    trainable, frozen = peft.split(params, mask)  # frozen: traced arguments, not constants
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images, labels, rng)
    grads = peft.merge(grads, jax.tree.map(jnp.zeros_like, frozen))  # ignored by set_to_zero
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def prepare(name: str, batch: int, lr: float) -> dict[str, Any]:
  """Builds and compiles one method's step; returns its state and compile-time facts."""
  cfg = peft.method_config(name, **METHOD_CONFIGS[name])
  model = ViT(variant="Ti/4", num_classes=100, image_size=32, peft=cfg)
  key = jax.random.PRNGKey(0)
  images = jax.random.uniform(key, (batch, 32, 32, 3), minval=-1, maxval=1)
  labels = jnp.arange(batch) % 100
  params = jax.jit(model.init)(key, images)["params"]
  mask = peft.trainable_mask(params, cfg)
  tx = peft.optimizer(study_sgd(lr), mask)
  opt_state = tx.init(params)
  rng = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  compiled = make_step(model, mask, tx).lower(params, opt_state, images, labels, rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  trainable, _ = peft.split(params, mask)
  row: dict[str, Any] = {
      "method": name,
      "trainable_params": peft.count(trainable),
      "total_params": peft.count(params),
      "gflop_per_step": float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan"),
      "compile_s": compile_s,
  }
  mem = compiled.memory_analysis()
  if mem is not None:
    row.update(
        temp_mb=mem.temp_size_in_bytes / 2**20,
        argument_mb=mem.argument_size_in_bytes / 2**20,
        output_mb=mem.output_size_in_bytes / 2**20,
        alias_mb=mem.alias_size_in_bytes / 2**20,
        # Live at the peak: inputs + scratch + outputs not written in place of a donated input.
        peak_mb=(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                 - mem.alias_size_in_bytes) / 2**20,
    )
  state = {"compiled": compiled, "args": [params, opt_state, images, labels, rng],
           "wall": [], "cpu": [], "loss": float("nan")}
  run_steps(state, 1)  # warm-up
  state["wall"].clear()
  state["cpu"].clear()
  return {"row": row, "state": state}


def run_steps(state: dict[str, Any], steps: int) -> None:
  """Times `steps` steps (wall and process CPU time, which all XLA threads add to)."""
  params, opt_state, images, labels, rng = state["args"]
  t, c = time.perf_counter(), time.process_time()
  for _ in range(steps):
    params, opt_state, loss = state["compiled"](params, opt_state, images, labels, rng)
  jax.block_until_ready((params, loss))
  state["wall"].append((time.perf_counter() - t) / steps)
  state["cpu"].append((time.process_time() - c) / steps)
  state["args"][:2] = [params, opt_state]
  state["loss"] = float(loss)


def bench(methods: list[str], batch: int, steps: int, repeats: int, lr: float) -> list[dict[str, Any]]:
  """Compiles every method, then times them round-robin so that load from other
  processes on a shared CPU falls on all methods alike."""
  runs = {}
  for name in methods:
    runs[name] = prepare(name, batch, lr)
    print(f"compiled {name:>8} in {runs[name]['row']['compile_s']:.1f}s", flush=True)
  for r in range(repeats):
    for name in methods:
      run_steps(runs[name]["state"], steps)
    print(f"repeat {r + 1}/{repeats}: " + "  ".join(
        f"{n} {1e3 * runs[n]['state']['wall'][-1]:.0f}ms" for n in methods), flush=True)
  rows = []
  for name in methods:
    row, st = runs[name]["row"], runs[name]["state"]
    # The fastest repeat is the one least disturbed by other processes (as timeit advises).
    row.update(step_ms=1e3 * min(st["wall"]), step_ms_median=1e3 * statistics.median(st["wall"]),
               cpu_ms=1e3 * min(st["cpu"]), images_per_s=batch / min(st["wall"]), loss=st["loss"])
    rows.append(row)
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  full = next((r for r in rows if r["method"] == "full"), rows[0])
  lines = ["| method | trainable params | step ms (best) | step ms (median) | images/s "
           "| vs full (wall) | CPU ms/step | vs full (CPU) | GFLOP/step | XLA temp MB "
           "| peak MB (args+temp+out) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['trainable_params']:,} | {r['step_ms']:.0f} | {r['step_ms_median']:.0f} "
        f"| {r['images_per_s']:.1f} | {r['images_per_s'] / full['images_per_s']:.2f}x | {r['cpu_ms']:.0f} "
        f"| {full['cpu_ms'] / r['cpu_ms']:.2f}x | {r['gflop_per_step']:.2f} "
        f"| {r.get('temp_mb', float('nan')):.0f} | {r.get('peak_mb', float('nan')):.0f} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  ap.add_argument("--repeats", type=int, default=5, help="timed repeats, round-robin over methods")
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--methods", default=",".join(METHOD_CONFIGS))
  ap.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = ap.parse_args()

  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  rows = bench(methods, args.batch, args.steps, args.repeats, args.lr)
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"\nViT-Ti/4, 32x32, batch {args.batch}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}), jax {jax.__version__}; best (and median) of "
        f"{args.repeats} repeats x {args.steps} steps; process max RSS {rss_mb:.0f} MB\n")
  print(markdown(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"batch": args.batch, "backend": jax.devices()[0].platform,
                 "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
                 "jax": jax.__version__, "max_rss_mb": rss_mb, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
