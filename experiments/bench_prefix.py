"""What a frozen prefix saves: head tuning and `peft.last_blocks` with and without the cache.

  python -m experiments.bench_prefix [--rounds=3] [--variant=Ti/4] [--image_size=32]
      [--runner_rounds=6] [--runner_only] [--out=runner.json]

On the study code's round shape (8 clients x 320 images, batch 16, 1 local epoch, SGD with
Nesterov momentum, FedAvg; evaluation of 500 test images), in one process, side by side:
  bias (all 12 blocks)        the reference
  bias, last_blocks=2         gradients stop at block 10 (XLA prunes the earlier backward)
  bias, last_blocks=2, cache  plus the activations entering block 10 computed once
  head                        the whole ViT forward on every step
  head, cache                 the pooled features computed once; clients train one Dense
For each: seconds per round (training + evaluation, best of --rounds after a warm-up round),
the one-off cache build, and the final accuracy of the cached vs the uncached run (they must
agree: the cache changes where the work happens, not the result).

With --runner_rounds > 0, also head tuning on digits (offline, a seeded random backbone)
through `fedpeft_jax.runner.train.run` with `federated.feature_cache` auto vs off: the
runner's per-round seconds (median after round 1) and the whole run's wall time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.federated import (ClientSpec, InputSpec, RoundSpec, build_algorithm, build_cache,
                                   choose_input, make_client_optimizer, make_evaluate,
                                   make_server_optimizer, plan_round)
from fedpeft_jax.models import ViT
from fedpeft_jax.runner import train as runner_train
from fedpeft_jax.config_files import repo_config

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per configuration (after a warm-up).")
_VARIANT = flags.DEFINE_string("variant", "Ti/4", "ViT variant.")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Image size.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Clients per round.")
_PER_CLIENT = flags.DEFINE_integer("examples", 320, "Examples per client.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_LAST = flags.DEFINE_integer("last_blocks", 2, "peft.last_blocks of the prefix rows.")
_RUNNER_ROUNDS = flags.DEFINE_integer("runner_rounds", 0, "> 0: also head tuning through the "
                                      "runner, feature cache auto vs off, this many rounds.")
_RUNNER_ONLY = flags.DEFINE_bool("runner_only", False, "Only the runner comparison (rounds: "
                                 "--runner_rounds, at least 2).")
_RUNNER_MODE = flags.DEFINE_string("runner_mode", "", "Internal: one runner mode, as JSON.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path of the runner comparison.")
NUM_CLASSES = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_EXAMPLES = 500


def _run(method: str, last_blocks: int, cache: bool) -> dict[str, Any]:
  cfg = peft.method_config(method)
  cfg.last_blocks = last_blocks
  size = _IMAGE.value
  model = ViT(variant=_VARIANT.value, num_classes=NUM_CLASSES, image_size=size, peft=cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
  mask = peft.trainable_mask(params, cfg)
  trainable, frozen = peft.split(params, mask)
  depth = model.arch()["depth"]
  k, n, b = _CLIENTS.value, _PER_CLIENT.value, _BATCH.value
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (k * n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, k * n).astype(np.int32)
  test_images = rng.integers(0, 256, (TEST_EXAMPLES, size, size, 3), dtype=np.uint8)
  test_labels = rng.integers(0, NUM_CLASSES, TEST_EXAMPLES).astype(np.int32)
  inputs: Optional[InputSpec] = None
  build_s = 0.0
  if cache:
    inputs, note = choose_input("auto", peft.only_head_trainable(mask),
                                peft.first_trainable_block(mask, depth, last_blocks), depth,
                                "none", True, size)
    assert inputs.kind != "images", note
    t = time.perf_counter()
    images = np.asarray(build_cache(model, params, images, inputs))
    test_images = np.asarray(build_cache(model, params, test_images, inputs))
    build_s = time.perf_counter() - t
  data = fdata.ClientData(jnp.asarray(images), jnp.asarray(labels),
                          jnp.asarray(np.arange(k * n, dtype=np.int32).reshape(k, n)),
                          jnp.full((k,), n, jnp.int32))
  cspec = ClientSpec(batch_size=b, local_epochs=1, max_examples=n, image_size=size,
                     augment="none", inputs=inputs)
  algo = build_algorithm(model, make_client_optimizer("sgd", 0.01), make_server_optimizer("fedavg"),
                         cspec, RoundSpec(1, 1), NUM_CLASSES)
  evaluate = make_evaluate(model, 250, size, inputs=inputs)
  test_x, test_y = jnp.asarray(test_images), jnp.asarray(test_labels)
  state = algo.init(trainable, seed=0)
  times = []
  for r in range(_ROUNDS.value + 1):
    t = time.perf_counter()
    state, _ = algo.apply(state, frozen, data, plan_round(0, r, k, k))
    ev = evaluate(peft.merge(state.trainable, frozen), test_x, test_y)
    acc = float(ev["accuracy"])  # blocks until the round and its evaluation are done
    times.append(time.perf_counter() - t)
  return {"method": method, "last_blocks": last_blocks, "cache": cache,
          "trainable": peft.count(trainable), "first_round_s": times[0],
          "s_per_round": min(times[1:] or times), "cache_build_s": build_s, "accuracy": acc,
          "final": peft.flatten(jax.device_get(state.trainable))}


def measure_runner(mode: str, rounds: int) -> dict:
  """Head tuning on digits (offline) through fedpeft_jax.runner.train.run."""
  c = repo_config("quickstart").get_config("head")
  c.model.pretrained = ""  # a seeded random backbone: offline, same for both modes
  c.federated.rounds = rounds
  c.federated.feature_cache = mode
  c.checkpoint_every = 0
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    summary = runner_train.run(c, d, progress=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(d, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  secs = [r["seconds"] for r in rows]
  steady = secs[1:] or secs
  return {"impl": "runner", "feature_cache": mode, "rounds": len(rows),
          "first_round_seconds": secs[0], "seconds_per_round": statistics.median(steady),
          "rounds_per_s": 1.0 / statistics.median(steady), "run_wall_seconds": wall,
          "final_accuracy": summary.get("final_accuracy"),
          "best_accuracy": summary.get("best_accuracy")}


def runner_table(rounds: int) -> dict:
  """Head tuning through the runner, feature cache auto vs off, each mode in a fresh process
  (no jit cache or warm-up carries from one to the other)."""
  rows = []
  for mode in ("auto", "off"):
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_prefix",
                           f"--runner_mode={mode}", f"--runner_rounds={rounds}"],
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    rows.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                {"feature_cache": mode, "error": f"exited with {proc.returncode}"})
  print("\n| feature_cache | s/round (runner's 'seconds', median after round 1) | rounds/s | "
        "first round s | whole run wall s (setup, cache, compile, rounds) | final acc | "
        "best acc |\n|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['feature_cache']} | {r['error']} | | | | | |")
      continue
    print(f"| {r['feature_cache']} | {r['seconds_per_round']:.3f} | {r['rounds_per_s']:.2f} | "
          f"{r['first_round_seconds']:.1f} | {r['run_wall_seconds']:.1f} | "
          f"{_f(r['final_accuracy'])} | {_f(r['best_accuracy'])} |")
  out = {"rounds": rounds, "rows": rows}
  if all("error" not in r for r in rows):
    out["rounds_per_s_ratio_auto_over_off"] = rows[0]["rounds_per_s"] / rows[1]["rounds_per_s"]
    out["wall_ratio_off_over_auto"] = rows[1]["run_wall_seconds"] / rows[0]["run_wall_seconds"]
    print(f"\nhead tuning on digits, {rounds} rounds: feature_cache auto / off = "
          f"{out['rounds_per_s_ratio_auto_over_off']:.2f}x rounds/s by the runner's per-round "
          f"'seconds' (host time per round: device work may run asynchronously), "
          f"{out['wall_ratio_off_over_auto']:.2f}x by whole-run wall time")
  return out


def _f(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.4f}"


def main(argv: list[str]) -> None:
  del argv
  if _RUNNER_MODE.value:  # one mode of runner_table, in its own process
    print(json.dumps(measure_runner(_RUNNER_MODE.value, _RUNNER_ROUNDS.value)))
    return
  if _RUNNER_ONLY.value:
    result = runner_table(max(_RUNNER_ROUNDS.value, 2))
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
    return
  last = _LAST.value
  rows = [_run("bias", 0, False), _run("bias", last, False), _run("bias", last, True),
          _run("head", 0, False), _run("head", 0, True)]
  ref = {("bias", 0): rows[0], ("bias", last): rows[1], ("head", 0): rows[3]}
  print(f"\n{_CLIENTS.value} clients x {_PER_CLIENT.value} images, batch {_BATCH.value}, "
        f"ViT-{_VARIANT.value} at {_IMAGE.value} px, 1 local epoch + eval of {TEST_EXAMPLES}; "
        f"backend {jax.default_backend()}, best of {_ROUNDS.value} rounds\n")
  print("| method | cache | trainable | s/round | rounds/s vs all-block bias | vs same method "
        "uncached | cache build s | test acc | max |param diff| vs uncached |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    name = r["method"] + (f", last_blocks={r['last_blocks']}" if r["last_blocks"] else "")
    base = ref[(r["method"], r["last_blocks"])]
    diff = max(float(np.max(np.abs(r["final"][p] - base["final"][p]))) for p in base["final"])
    print(f"| {name} | {'on' if r['cache'] else 'off'} | {r['trainable']:,} | "
          f"{r['s_per_round']:.3f} | {rows[0]['s_per_round'] / r['s_per_round']:.1f}x | "
          f"{base['s_per_round'] / r['s_per_round']:.1f}x | {r['cache_build_s']:.2f} | "
          f"{r['accuracy']:.3f} | {diff:.1e} |")
  if _RUNNER_ROUNDS.value > 0:
    result = runner_table(_RUNNER_ROUNDS.value)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
