"""Cost of per-example gradients: DP-SGD vs plain gradients per PEFT method (ViT-Ti/4, 32x32).

  python -m experiments.bench_dp --methods=bias,lora,full --batch=32

Reports images/s of one jitted gradient computation and XLA's FLOP count of each, so the
comparison survives a noisy machine.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from fedpeft_jax import peft
from fedpeft_jax import privacy
from fedpeft_jax.models import ViT

_METHODS = flags.DEFINE_list("methods", ["bias", "lora", "full"], "PEFT methods.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (the best is reported).")


def bench(name: str, batch_size: int) -> dict:
  cfg = peft.method_config(name)
  model = ViT(variant="Ti/4", num_classes=100, image_size=32, peft=cfg)
  key = jax.random.PRNGKey(0)
  images = jax.random.uniform(key, (batch_size, 32, 32, 3), minval=-1, maxval=1)
  labels = jnp.arange(batch_size) % 100
  params = jax.jit(model.init)(key, images)["params"]
  trainable, frozen = peft.split(params, peft.trainable_mask(params, cfg))

  def loss_fn(tr, batch, frozen):
    logits = model.apply({"params": peft.merge(tr, frozen)}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  batch = {"x": images, "y": labels}
  mask = jnp.ones((batch_size,), bool)
  plain = jax.jit(lambda tr, fr, bt: jax.grad(loss_fn)(tr, bt, fr))
  dp = jax.jit(lambda tr, fr, bt, k: privacy.dp_sgd_grad(loss_fn, tr, bt, mask, k, 1.0, 1.0,
                                                         float(batch_size), fr)[0])
  res: dict = {"method": name, "trainable": peft.count(trainable)}
  for tag, f, args in [("plain", plain, (trainable, frozen, batch)),
                       ("dp_sgd", dp, (trainable, frozen, batch, jax.random.PRNGKey(1)))]:
    compiled = f.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    res[tag + "_gflops"] = cost.get("flops", float("nan")) / 1e9
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t)
    res[tag + "_img_s"] = batch_size / min(times)
  res["slowdown"] = res["plain_img_s"] / res["dp_sgd_img_s"]
  return res


def main(argv: list[str]) -> None:
  del argv
  rows = [bench(m, _BATCH.value) for m in _METHODS.value]
  print("| method | trainable | plain img/s | dp_sgd img/s | slowdown | GFLOPs plain / dp_sgd |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['trainable']:,} | {r['plain_img_s']:.1f} | "
          f"{r['dp_sgd_img_s']:.1f} | {r['slowdown']:.2f}x | "
          f"{r['plain_gflops']:.1f} / {r['dp_sgd_gflops']:.1f} |")
  print(json.dumps(rows))


if __name__ == "__main__":
  app.run(main)
