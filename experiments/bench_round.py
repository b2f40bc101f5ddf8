"""Round benchmark that tells the truth: time, FLOPs, MFU, memory, and a PyTorch reference.

  python -m experiments.bench_round                    # --preset=cpu: the study code's round
  python -m experiments.bench_round --preset=study     # ViT-B/16 224, batch 64, bf16 (GPU/TPU MFU)
  python -m experiments.bench_round --methods=bias,full --clients_per_chunk=1,4 --out=r.json

Per configuration (each in a fresh process, so its peak memory is its own) it reports
seconds per round (training through `algo.apply` + evaluation through `make_evaluate`),
training images/s, the useful local steps (real batches) and the steps the compiled round
executed (padded steps under vmap run too), the XLA FLOPs of ONE local train step
(`jit(step).lower(...).compile().cost_analysis()`, preprocessing + forward + backward +
optimizer) times the executed steps plus the evaluation's FLOPs, the achieved FLOP/s and the
MFU against the matmul peak measured in the same run (the best of several large matmuls),
XLA's memory analysis of the compiled round (arguments + temporaries) and the process peak
RSS (CPU) or the device's peak bytes in use (GPU/TPU).

Beside it, whenever torch is importable, the SAME round as a plain sequential PyTorch
simulator (`experiments/torch_reference.py`); the speed-up is torch_seconds / jax_seconds.
The round shapes live in `bench_workload.py`, the FLOP and executed-step counts in
`flop_count.py`; feature-cache timings through the runner are `bench_prefix.py`'s.

When JAX is slower than PyTorch (or with --profile=on) the local step is broken down: time of
measured variants (data gather + preprocessing, forward, forward + backward, optimizer update,
whole step, one eval batch) and FLOPs by op class from the compiled step's HLO (dense
matmuls and the attention dots, forward and backward; the rest is elementwise/reduce work:
norms, GELU, softmax, preprocessing, optimizer).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import fedpeft_jax.data as fdata
from experiments.bench_workload import (Workload, cast_frozen, client_spec_of, client_tx_of,
                                        cpu_workload, init_split, make_data, make_eval_batch,
                                        make_local_step, make_model, study_cpu_workload,
                                        study_workload, uneven_workloads)
from experiments.flop_count import (executed_steps_fallback, executed_steps_sorted,
                                    step_cost, vit_matmul_flops)
from fedpeft_jax import peft
from fedpeft_jax.federated import (RoundSpec, auto_clients_per_chunk, build_algorithm,
                                   compiled_round_bytes, device_bytes_limit, make_evaluate,
                                   make_server_optimizer, masked_cross_entropy, plan_round)

PyTree = Any
PRESETS = ("cpu", "study")
STUDY_COMMAND = "python -m experiments.bench_round --preset=study"

_PRESET = flags.DEFINE_enum("preset", "cpu", PRESETS, "Which benchmark (module docstring).")
_METHODS = flags.DEFINE_list("methods", ["bias"], "PEFT methods (PyTorch reference: full, head, "
                             "bias).")
_CHUNKS = flags.DEFINE_list("clients_per_chunk", ["auto"], "clients_per_chunk values ('auto': "
                            "the engine's choice for the backend).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per configuration (after one warm-up "
                               "round); the best is reported.")
_TORCH = flags.DEFINE_bool("torch", True, "Run the PyTorch reference when torch is importable.")
_PROFILE = flags.DEFINE_enum("profile", "auto", ["auto", "on", "off"], "Step breakdown: 'auto' "
                             "when JAX is slower than PyTorch.")
_UNEVEN = flags.DEFINE_bool("uneven", True, "cpu preset: also the uneven-clients rows.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path.")
_SINGLE = flags.DEFINE_string("single", "", "Internal: run one job (JSON) in this process and "
                              "print its result as the last line.")


# ------------------------------------------------------------------------------------------------
# Peak matmul throughput and memory
# ------------------------------------------------------------------------------------------------

def matmul_peak(dtype: Any, n: int, reps: int = 5, inner: int = 1) -> float:
  """Best FLOP/s of `inner` chained n^3 matmuls in one jit, over `reps` runs."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = (jax.random.normal(k2, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)
  f = jax.jit(lambda a, b: jax.lax.fori_loop(0, inner, lambda i, x: x @ b, a))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 * inner / best


def device_peaks() -> dict:
  backend = jax.default_backend()
  dev = jax.devices()[0]
  out = {"backend": backend, "device_kind": dev.device_kind, "num_devices": len(jax.devices()),
         "cpu_threads": len(os.sched_getaffinity(0))}
  if backend == "cpu":
    out["peak_float32"] = matmul_peak(jnp.float32, 2048, reps=10)
  else:
    out["peak_float32"] = matmul_peak(jnp.float32, 8192, reps=5, inner=10)
    out["peak_bfloat16"] = matmul_peak(jnp.bfloat16, 8192, reps=5, inner=10)
  return out


def peak_memory_mb() -> dict:
  out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  if jax.default_backend() != "cpu":
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
  return out


def round_memory(algo: Any, state: Any, frozen: PyTree, data: Any, plan: Any) -> dict:
  """XLA's memory analysis of the compiled round (`algo.lower`, or algo.apply under one
  outer jit with only the client sizes, which the engine reads on the host, concrete)."""
  def round_fn(s, f, images, labels, indices):
    return algo.apply(s, f, fdata.ClientData(images, labels, indices, data.sizes), plan)

  try:
    if getattr(algo, "lower", None) is not None:
      lowered = algo.lower(state, frozen, data, plan.num_reporting)
    else:
      lowered = jax.jit(round_fn).lower(state, frozen, data.images, data.labels, data.indices)
    ma = lowered.compile().memory_analysis()
    return {"xla_argument_mb": ma.argument_size_in_bytes / 2 ** 20,
            "xla_temp_mb": ma.temp_size_in_bytes / 2 ** 20,
            "xla_output_mb": ma.output_size_in_bytes / 2 ** 20}
  except Exception as e:  # noqa: BLE001 -- the analysis is a report, not a requirement
    return {"xla_memory_error": f"{type(e).__name__}: {e}"[:200]}


# ------------------------------------------------------------------------------------------------
# The JAX engine round
# ------------------------------------------------------------------------------------------------

def resolve_chunk(chunk: Any, w: Workload, backend: str) -> Any:
  """An integer, or 'auto' (resolved by the engine's rule where the device is: 1 on CPU)."""
  if str(chunk) == "auto":
    return 1 if backend == "cpu" else "auto"
  return int(chunk)


def measure_engine(w: Workload, chunk: Any, rounds: int, memory: bool = True,
                   flops: bool = True) -> dict:
  """One warm-up round (compile) and `rounds` timed rounds of training + evaluation.
  `chunk` 'auto': the engine's rule (XLA's memory estimate on accelerators), as the runner."""
  model = make_model(w)
  trainable, frozen, _ = init_split(w, model)
  frozen = cast_frozen(frozen, w)
  data, test_x, test_y, _ = make_data(w)
  k = len(w.client_sizes)

  def build(c: int) -> Any:
    return build_algorithm(model, client_tx_of(w), make_server_optimizer("fedavg"),
                           client_spec_of(w), RoundSpec(c, 1), w.num_classes)

  chunk_note = ""
  if str(chunk) == "auto":
    def round_bytes(c: int) -> Optional[int]:
      trial = build(c)
      return compiled_round_bytes(trial.lower(trial.state_shapes(trainable), frozen, data, k))

    chunk, chunk_note = auto_clients_per_chunk(k, 1, w.batch_size, memory_of=round_bytes,
                                               bytes_limit=device_bytes_limit())
  algo = build(int(chunk))
  evaluate = make_evaluate(model, w.eval_batch_size, w.image_size)
  test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
  state = algo.init(trainable, seed=0)
  row: dict[str, Any] = {"chunk_note": chunk_note}
  if memory:
    row.update(round_memory(algo, state, frozen, data, plan_round(0, 0, k, k)))

  def one_round(r: int, state: Any) -> tuple[Any, dict, float, float, dict]:
    t0 = time.perf_counter()
    state, m = algo.apply(state, frozen, data, plan_round(0, r, k, k))
    jax.block_until_ready((state.trainable, m))
    t1 = time.perf_counter()
    ev = {}
    if w.eval_examples:
      ev = evaluate(peft.merge(state.trainable, frozen), test_x, test_y)
      jax.block_until_ready(ev)
    return state, m, t1 - t0, time.perf_counter() - t1, ev

  state, m, train0, eval0, ev = one_round(0, state)
  times = []
  for r in range(rounds):
    state, m, tr, te, ev = one_round(r + 1, state)
    times.append((tr + te, tr, te))
  best = min(times) if times else (train0 + eval0, train0, eval0)
  useful = float(m["local_steps"])
  if "executed_steps" in m:
    executed, source = float(m["executed_steps"]), "engine metrics"
  else:
    executed = float(executed_steps_fallback(w, plan_round(0, 0, k, k).reporting, int(chunk)))
    source = "analytic (rule of an engine without executed_steps)"
  row.update({"impl": "jax", "workload": w.name, "method": w.method,
              "clients_per_chunk": int(chunk),
              "seconds_per_round": best[0], "train_seconds": best[1], "eval_seconds": best[2],
              "first_round_seconds": train0 + eval0, "timed_rounds": len(times),
              "all_round_seconds": [t[0] for t in times],
              "train_images_per_s": w.train_images / best[1],
              "useful_steps": useful, "executed_steps": executed, "executed_source": source,
              "expected_useful_steps": w.useful_steps,
              "train_loss": float(m["train_loss"])})
  if ev:
    row["eval_accuracy"] = float(ev["accuracy"])
  if flops:
    row.update(step_cost(w, with_hlo=False))
  return row


def add_flop_rates(row: dict, w: Workload, peaks: dict, cost: dict) -> None:
  """Achieved FLOP/s and MFU: XLA FLOPs of one step x steps (+ eval) over the round's time."""
  step, evalb = cost["step_flops"], cost["eval_batch_flops"]
  eval_flops = evalb * w.eval_batches
  executed = row.get("executed_steps", row["useful_steps"])
  row["step_gflop"] = step / 1e9
  row["eval_batch_gflop"] = evalb / 1e9
  row["workload_json"] = w.to_json()
  row["round_gflop_executed"] = (step * executed + eval_flops) / 1e9
  row["round_gflop_useful"] = (step * row["useful_steps"] + eval_flops) / 1e9
  row["achieved_gflops"] = row["round_gflop_executed"] / row["seconds_per_round"]
  row["useful_gflops"] = row["round_gflop_useful"] / row["seconds_per_round"]
  peak = peaks.get("peak_bfloat16" if w.dtype == "bfloat16" else "peak_float32")
  if peak:
    row["mfu"] = row["achieved_gflops"] * 1e9 / peak
    row["mfu_useful"] = row["useful_gflops"] * 1e9 / peak


# ------------------------------------------------------------------------------------------------
# Step breakdown (profile)
# ------------------------------------------------------------------------------------------------

def _best_ms(fn: Any, *args: Any, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return 1e3 * best


def measure_profile(w: Workload, with_torch: bool) -> dict:
  """Time variants of one local step side by side; FLOPs by op class from its HLO."""
  model = make_model(w)
  trainable, frozen, _ = init_split(w, model)
  tx = client_tx_of(w)
  opt = tx.init(trainable)
  data, test_x, _, _ = make_data(w)
  b = w.batch_size
  idx = jnp.arange(b, dtype=jnp.int32)
  labels, mask = data.labels[:b], jnp.ones((b,), bool)
  key = jax.random.PRNGKey(0)

  frozen = cast_frozen(frozen, w)

  # Every variant takes the frozen weights as an argument, as the engine's round does.
  def loss_fn(t, f, x):
    logits = model.apply({"params": peft.merge(t, f)}, x, train=True, rngs={"dropout": key})
    return masked_cross_entropy(logits, labels, mask, w.num_classes)

  prep = jax.jit(lambda images, i: fdata.preprocess(images[i], key, image_size=w.image_size,
                                                    augment=w.augment, train=True))
  fwd = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
  opt_only = jax.jit(lambda g, o, t: (lambda u: (optax.apply_updates(t, u[0]), u[1]))(
      tx.update(g, o, t)))
  step_fn = make_local_step(model, tx, w)
  step = jax.jit(lambda t, o, f, images, i: step_fn(t, o, f, images[i], labels, mask, key))
  evalb = jax.jit(make_eval_batch(model, w))
  x = prep(data.images, idx)
  grads = fwd_bwd(trainable, frozen, x)[1]
  eval_x = jnp.asarray(test_x[:w.eval_batch_size])
  rows = [
      ("data: gather + preprocess", _best_ms(prep, data.images, idx)),
      ("forward (loss)", _best_ms(fwd, trainable, frozen, x)),
      ("forward + backward", _best_ms(fwd_bwd, trainable, frozen, x)),
      ("optimizer update only", _best_ms(opt_only, grads, opt, trainable)),
      ("whole local step", _best_ms(step, trainable, opt, frozen, data.images, idx)),
      (f"eval batch ({w.eval_batch_size} images)",
       _best_ms(evalb, peft.merge(trainable, frozen), eval_x) if w.eval_examples else 0.0),
  ]
  out = {"impl": "jax", "workload": w.name, "method": w.method,
         "jax_ms": {k: v for k, v in rows}}
  out.update(step_cost(w, with_hlo=True))
  if with_torch:
    try:
      out["torch_ms"] = torch_reference().torch_profile(w, test_x)
    except ImportError as e:
      out["torch_ms"] = {"skipped": str(e)}
  return out


# ------------------------------------------------------------------------------------------------
# Jobs (each in a fresh process) and the report
# ------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(job: dict) -> dict:
  kind = job["kind"]
  w = Workload.from_json(job["workload"]) if "workload" in job else None
  if kind == "peak":
    return device_peaks()
  if kind == "cost":
    return step_cost(w, with_hlo=True)
  if kind == "engine":
    out = measure_engine(w, job["chunk"], job["rounds"])
  elif kind == "torch":
    out = torch_reference().measure_torch(w, job["rounds"], job["backend"])
  elif kind == "profile":
    out = measure_profile(w, job["torch"])
  else:
    raise ValueError(f"unknown job {kind!r}")
  if kind != "torch":
    out.update(peak_memory_mb())
  else:
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def child(job: dict, env: Optional[dict] = None) -> dict:
  """`job` in a fresh Python process (its own peak RSS / device memory); stderr passes through."""
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_round",
                         f"--single={json.dumps(job)}"], stdout=subprocess.PIPE, text=True,
                        cwd=ROOT, env={**os.environ, **(env or {})})
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    out = {"error": f"job {job['kind']} exited with {proc.returncode}",
           "stdout_tail": "\n".join(lines[-5:])}
  else:
    out = json.loads(lines[-1])
  out["job_seconds"] = time.perf_counter() - t
  return out


def _f(x: Any, spec: str = ".2f", none: str = "-") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return none
  return format(x, spec)


def _steps(x: Any) -> str:
  return _f(x, ".0f")


def rounds_table(rows: list[dict]) -> str:
  head = ("| workload | impl | method | chunk | s/round (train + eval) | train img/s | steps useful "
          "/ executed | GFLOP/step (XLA) | achieved GFLOP/s | MFU executed / useful | XLA round "
          "args + temp MB | peak MB (RSS; device) | speed-up (PyTorch s / JAX s) |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in rows:
    if "error" in r or "skipped" in r:
      lines.append(f"| {r.get('workload', '?')} | {r.get('impl', '?')} | "
                   f"{r.get('method', '')} | | {r.get('error') or r.get('skipped')} |"
                   + " |" * 8)
      continue
    impl = "JAX engine" if r["impl"] == "jax" else (
        f"PyTorch sequential (timm, {r.get('device')}, {r.get('torch_threads')} threads)")
    mem = ""
    if "xla_temp_mb" in r:
      mem = f"{r['xla_argument_mb']:.0f} + {r['xla_temp_mb']:.0f}"
    peak = _f(r.get("peak_rss_mb"), ".0f")
    if r.get("device_peak_mb") is not None:
      peak += f"; {r['device_peak_mb']:.0f}"
    mfu = f"{_f(r.get('mfu'), '.1%')} / {_f(r.get('mfu_useful'), '.1%')}"
    lines.append(
        f"| {r['workload']} | {impl} | {r['method']} | {r.get('clients_per_chunk', '-')} | "
        f"{r['seconds_per_round']:.2f} ({r['train_seconds']:.2f} + {r['eval_seconds']:.2f}) | "
        f"{r['train_images_per_s']:.1f} | {_steps(r['useful_steps'])} / "
        f"{_steps(r['executed_steps'])} | {_f(r.get('step_gflop'))} | "
        f"{_f(r.get('achieved_gflops'), '.1f')} | {mfu} | {mem} | {peak} | "
        f"{_f(r.get('speedup_vs_torch'), '.2f')}{'x' if r.get('speedup_vs_torch') else ''} |")
  return "\n".join(lines)


def profile_tables(p: dict, w: Workload) -> str:
  jms, tms = p["jax_ms"], p.get("torch_ms") or {}
  step = jms["whole local step"]
  out = [f"Step breakdown, {w.name} / {w.method}, batch {w.batch_size} (time: best of 5 of "
         "separately jitted variants, so parts need not add up to the step; backward = "
         "(forward + backward) - forward):", "",
         "| part | JAX ms | share of JAX step | PyTorch ms |", "|---|---|---|---|"]
  derived = dict(jms)
  derived["backward (derived)"] = jms["forward + backward"] - jms["forward (loss)"]
  tder = dict(tms) if "skipped" not in tms else {}
  if tder:
    tder["backward (derived)"] = tms["forward + backward"] - tms["forward (loss)"]
  order = ["data: gather + preprocess", "forward (loss)", "backward (derived)",
           "forward + backward", "optimizer update only", "whole local step"]
  order += [k for k in jms if k.startswith("eval batch")]
  for k in order:
    out.append(f"| {k} | {derived[k]:.1f} | {derived[k] / step:.0%} | "
               f"{_f(tder.get(k), '.1f')} |")
  hlo = p["step_hlo"]
  total = p["step_flops"]
  dots = sum(hlo[k] for k in ("matmul_fwd", "matmul_bwd", "attention_fwd", "attention_bwd"))
  hand = vit_matmul_flops(w) if w.method in ("full", "head", "bias") else None
  out += ["", f"FLOPs by op class of the compiled step (XLA HLO: {hlo['dots']} dots, "
          f"{hlo['convolutions']} convolutions; 'other' = cost analysis total - dot FLOPs: "
          "norms, GELU, softmax, preprocessing, loss, optimizer):", "",
          "| op class | GFLOP | share |", "|---|---|---|"]
  for k, label in (("matmul_fwd", "dense matmuls, forward"), ("matmul_bwd",
                   "dense matmuls, backward"), ("attention_fwd", "attention dots, forward"),
                   ("attention_bwd", "attention dots, backward")):
    out.append(f"| {label} | {hlo[k] / 1e9:.2f} | {hlo[k] / total:.0%} |")
  out.append(f"| other (elementwise / reduce) | {(total - dots) / 1e9:.2f} | "
             f"{(total - dots) / total:.0%} |")
  out.append(f"| total (cost analysis) | {total / 1e9:.2f} | 100% |")
  if hand:
    out.append(f"| hand formula, matmuls only (2MNK) | {hand['total'] / 1e9:.2f} | "
               f"{hand['total'] / total:.0%} |")
  return "\n".join(out)


def study_flops_text(cost: dict, w: Workload) -> str:
  step, evalb = cost["step_flops"], cost["eval_batch_flops"]
  useful = w.useful_steps
  executed = {c: executed_steps_sorted(w, c) for c in (1, 2, 4, 8)}
  train = step * useful
  ev = evalb * w.eval_batches
  hand = vit_matmul_flops(w)["total"]
  return (
      f"Full study round (XLA cost analysis, compiled on this host): ViT-{w.variant} at "
      f"{w.image_size} px ({w.dtype}), batch {w.batch_size}, {w.method} tuning, 8 clients of "
      f"{', '.join(map(str, w.client_sizes))} examples (CIFAR-100 Dirichlet 0.1 over 64 clients,"
      f" seed 1, round 0), {w.local_epochs} local epoch:\n"
      f"  one local step {step / 1e12:.3f} TFLOP (hand matmul formula {hand / 1e12:.3f}); "
      f"useful steps {useful}; executed steps (clients sorted into chunks, each chunk runs "
      f"its longest client's steps) by clients_per_chunk: "
      + ", ".join(f"{c}: {n}" for c, n in executed.items()) + "\n"
      f"  training {train / 1e12:.1f} TFLOP useful + evaluation of {w.eval_examples:,} images "
      f"{ev / 1e12:.1f} TFLOP = {(train + ev) / 1e12:.1f} TFLOP per round (training x10 for "
      f"the study's 10 local epochs)\n"
      f"  On a GPU/TPU (MFU against the bf16 matmul peak measured there): {STUDY_COMMAND}")


def torch_reference() -> Any:
  """`experiments.torch_reference`, loaded on first use: only a job that runs PyTorch imports
  torch, so a JAX job's peak RSS never counts it."""
  return importlib.import_module("experiments.torch_reference")


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None and \
      importlib.util.find_spec("timm") is not None


def main(argv: list[str]) -> None:
  del argv
  if _SINGLE.value:
    print(json.dumps(run_job(json.loads(_SINGLE.value))))
    return
  preset = _PRESET.value
  peaks = child({"kind": "peak"})
  if "error" in peaks:
    raise SystemExit(f"peak job failed: {peaks}")
  backend = peaks["backend"]
  print(f"backend {backend} ({peaks['device_kind']}, {peaks['num_devices']} device(s), "
        f"{peaks['cpu_threads']} CPU threads); matmul peak f32 "
        f"{peaks['peak_float32'] / 1e9:.1f} GFLOP/s"
        + (f", bf16 {peaks['peak_bfloat16'] / 1e9:.1f} GFLOP/s" if "peak_bfloat16" in peaks
           else ""), flush=True)
  use_torch = _TORCH.value and torch_available()
  if _TORCH.value and not use_torch:
    print("torch/timm not importable: no PyTorch reference")
  torch_env = {"JAX_PLATFORMS": "cpu"}  # its JAX (weights init only) must not take the GPU
  rows: list[dict] = []
  result: dict[str, Any] = {"preset": preset, "peaks": peaks, "rows": rows, "profiles": [],
                            "command_accelerator": STUDY_COMMAND}
  workloads = {}
  for method in _METHODS.value:
    if preset == "cpu":
      w = cpu_workload(method)
    else:
      w = study_workload(method) if backend != "cpu" else study_cpu_workload(method)
    workloads[method] = w
    jax_rows = []
    for chunk in _CHUNKS.value:
      c = resolve_chunk(chunk, w, backend)
      row = child({"kind": "engine", "workload": w.to_json(), "chunk": c,
                   "rounds": _ROUNDS.value})
      row.setdefault("workload", w.name)
      row.setdefault("impl", "jax")
      row.setdefault("method", method)
      if "error" not in row:
        add_flop_rates(row, w, peaks, row)
      print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}),
            flush=True)
      jax_rows.append(row)
      rows.append(row)
    if use_torch and method in ("full", "head", "bias"):
      trow = child({"kind": "torch", "workload": w.to_json(), "rounds": _ROUNDS.value,
                    "backend": backend}, torch_env)
      trow.setdefault("workload", w.name)
      trow.setdefault("impl", "torch")
      trow.setdefault("method", method)
      ok = [r for r in jax_rows if "error" not in r]
      if "error" not in trow and "skipped" not in trow and ok:
        add_flop_rates(trow, w, peaks, ok[0])
        for r in ok:
          r["speedup_vs_torch"] = trow["seconds_per_round"] / r["seconds_per_round"]
      print(json.dumps({k: v for k, v in trow.items() if not isinstance(v, (dict, list))}),
            flush=True)
      rows.append(trow)
  if preset == "cpu" and _UNEVEN.value:
    even, uneven = uneven_workloads(_METHODS.value[0])
    pair = []
    for w in (even, uneven):
      row = child({"kind": "engine", "workload": w.to_json(), "chunk": 4,
                   "rounds": _ROUNDS.value})
      row.setdefault("workload", w.name)
      row.setdefault("impl", "jax")
      row.setdefault("method", w.method)
      if "error" not in row:
        add_flop_rates(row, w, peaks, row)
      rows.append(row)
      pair.append(row)
    if all("error" not in r for r in pair):
      result["uneven"] = {
          "train_time_ratio_uneven_over_even": pair[1]["train_seconds"] / pair[0]["train_seconds"],
          "executed": [pair[0]["executed_steps"], pair[1]["executed_steps"]],
          "useful": [pair[0]["useful_steps"], pair[1]["useful_steps"]],
          "executed_source": pair[1]["executed_source"]}
  # Step breakdown where JAX is slower than PyTorch (or when asked).
  for method, w in workloads.items():
    slow = any(r.get("speedup_vs_torch", 2.0) < 1.0 for r in rows
               if r.get("method") == method and r.get("impl") == "jax" and r["workload"] == w.name)
    if _PROFILE.value == "on" or (_PROFILE.value == "auto" and slow):
      p = child({"kind": "profile", "workload": w.to_json(),
                 "torch": bool(use_torch and backend == "cpu")},
                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
      p["method"] = method
      result["profiles"].append(p)
  # The peak again at the end (a shared machine's load changes): the best of both counts.
  again = child({"kind": "peak"})
  for k in ("peak_float32", "peak_bfloat16"):
    if k in again and again[k] > peaks.get(k, 0.0):
      peaks[k] = again[k]
  for r in rows:
    if "error" not in r and "skipped" not in r and "step_gflop" in r:
      add_flop_rates(r, Workload.from_json(r["workload_json"]), peaks,
                     {"step_flops": r["step_gflop"] * 1e9,
                      "eval_batch_flops": r["eval_batch_gflop"] * 1e9})
  study_cost = None
  if preset == "study":
    sw = study_workload(_METHODS.value[0])
    study_cost = child({"kind": "cost", "workload": sw.to_json()}, torch_env)
    result["study_flops"] = study_cost

  # The report.
  w0 = next(iter(workloads.values()))
  print(f"\n## bench_round --preset={preset}: backend {backend} ({peaks['device_kind']}), "
        f"{peaks['cpu_threads']} CPU threads\n")
  print(f"Round: {len(w0.client_sizes)} clients of {', '.join(map(str, w0.client_sizes))} "
        f"examples, batch {w0.batch_size}, {w0.local_epochs} local epoch, ViT-{w0.variant} at "
        f"{w0.image_size} px ({w0.dtype}), {w0.num_classes} classes, SGD lr {w0.lr} Nesterov "
        f"momentum 0.9 wd 1e-4, FedAvg by examples, then evaluation of {w0.eval_examples} "
        f"test images (batch {w0.eval_batch_size}). Times: best of {_ROUNDS.value} rounds after "
        f"a warm-up round. Matmul peak measured in this run: f32 "
        f"{peaks['peak_float32'] / 1e9:.1f} GFLOP/s"
        + (f", bf16 {peaks['peak_bfloat16'] / 1e9:.1f} GFLOP/s" if "peak_bfloat16" in peaks
           else "") + ". FLOPs = XLA cost analysis of one local step x steps + eval batches; "
        "MFU executed counts every step the compiled round ran, MFU useful only real steps; "
        "PyTorch runs only real steps (its FLOPs: the same XLA count).\n")
  print(rounds_table(rows))
  if "uneven" in result:
    u = result["uneven"]
    print(f"\nUneven clients (chunks of 4): uneven / even training time = "
          f"{u['train_time_ratio_uneven_over_even']:.2f}x; executed steps {_steps(u['executed'][1])}"
          f" vs {_steps(u['executed'][0])} ({u['executed_source']}), useful "
          f"{_steps(u['useful'][1])} vs {_steps(u['useful'][0])}.")
  for p in result["profiles"]:
    if "error" in p:
      print(f"\nprofile failed: {p['error']}")
    else:
      print("\n" + profile_tables(p, workloads[p["method"]]))
  if preset == "study" and study_cost and "error" not in study_cost:
    sw = study_workload(_METHODS.value[0])
    print("\n" + study_flops_text(study_cost, sw))
  else:
    print(f"\nFor the study's MFU on a GPU/TPU: {STUDY_COMMAND}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
