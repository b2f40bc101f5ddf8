"""Central pre-training of a ViT backbone: `python -m fedpeft_jax.pretrain --config=... --workdir=...`.

The study fine-tunes an ImageNet-21k backbone; offline, this command makes a small one on
a source domain (e.g. Fashion-MNIST) and saves it as a Linen-layout `.npz` that
`load_pretrained` reads. The result is cached: a finished workdir with the same config is
reused without training.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from fedpeft_jax import peft
from fedpeft_jax.data import load_dataset, preprocess
from fedpeft_jax.scoring import make_evaluate, masked_cross_entropy
from fedpeft_jax.files import atomic_write_bytes, atomic_write_json
from fedpeft_jax.models import build_model

CHECKPOINT_NAME = "pretrained.npz"


def save_npz(params: Any, path: str) -> None:
  """Atomically write params as a Linen-layout npz ('/'-joined keys)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in peft.flatten(params).items()})
  atomic_write_bytes(path, buffer.getvalue())


def pretrain(config: ml_collections.ConfigDict, workdir: str, verbose: bool = True) -> str:
  """Trains (or reuses) the backbone; returns the checkpoint path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CHECKPOINT_NAME)
  summary_path = os.path.join(workdir, "pretrain_summary.json")
  # The cache key: only what shapes the backbone (not peft/federated/privacy fields).
  full = json.loads(config.to_json_best_effort())
  resolved = {k: full[k] for k in ("seed", "model", "data", "pretrain") if k in full}
  if os.path.exists(path) and os.path.exists(summary_path):
    with open(summary_path) as f:
      previous = json.load(f)
    if previous.get("config") == resolved:
      if verbose:
        print(f"Pre-trained backbone cached at {path} (test accuracy "
              f"{previous['test_accuracy']:.4f}); skipping pre-training.")
      return path

  t0 = time.time()
  d = config.data
  kw = {"resolution": d.resolution} if d.dataset in ("digits", "synthetic") else {}
  dataset = load_dataset(d.dataset, data_dir=d.data_dir or None, train_size=d.train_size or None,
                         seed=config.seed, classes=d.classes, **kw)
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.peft = peft.method_config("full")
  model = build_model(cfg, dataset.num_classes)
  size = config.model.image_size
  rng = jax.random.PRNGKey(config.seed)
  params = model.init(rng, jnp.zeros((1, size, size, 3)))["params"]
  # A random (not zero) head so the backbone gets gradients from the first step.
  params["head"]["kernel"] = 0.02 * jax.random.normal(jax.random.fold_in(rng, 1),
                                                      params["head"]["kernel"].shape)
  batch = config.pretrain.batch_size
  steps_per_epoch = dataset.num_train // batch
  total = steps_per_epoch * config.pretrain.epochs
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.pretrain.lr,
                                                min(200, total // 10), total)
  tx = optax.adamw(schedule, weight_decay=config.pretrain.weight_decay)
  images = jnp.asarray(dataset.train_images)
  labels = jnp.asarray(dataset.train_labels)
  augment = dataset.augment
  num_classes = dataset.num_classes

  def loss_fn(p, x, y, key):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
    return masked_cross_entropy(logits, y, jnp.ones(y.shape, bool), num_classes)

  @jax.jit
  def epoch(p, opt_state, key):
    perm = jax.random.permutation(key, images.shape[0])[:steps_per_epoch * batch]
    keys = jax.random.split(jax.random.fold_in(key, 1), steps_per_epoch)

    def step(carry, xs):
      p, s = carry
      idx, k = xs
      k_aug, k_drop = jax.random.split(k)
      x = preprocess(images[idx], k_aug, image_size=size, augment=augment, train=True)
      loss, g = jax.value_and_grad(loss_fn)(p, x, labels[idx], k_drop)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, opt_state), losses = jax.lax.scan(step, (p, opt_state),
                                          (perm.reshape(steps_per_epoch, batch), keys))
    return p, opt_state, jnp.mean(losses)

  opt_state = tx.init(params)
  evaluate = make_evaluate(model, 500, size)
  test_images, test_labels = jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels)
  for e in range(config.pretrain.epochs):
    params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(rng, 100 + e))
    if verbose:
      acc = float(evaluate(params, test_images, test_labels)["accuracy"])
      print(f"pretrain epoch {e + 1}/{config.pretrain.epochs}: loss {float(loss):.4f} "
            f"test accuracy {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
  ev = evaluate(params, test_images, test_labels)
  save_npz(params, path)
  atomic_write_json(summary_path, {
      "config": resolved, "dataset": d.dataset, "test_accuracy": float(ev["accuracy"]),
      "test_loss": float(ev["loss"]), "seconds": time.time() - t0, "checkpoint": path})
  return path


def _define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing this module (the
  quickstart does) adds no flags that could clash with the importer's own."""
  config_flags.DEFINE_config_file("config", None, "Pre-training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (cached).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  pretrain(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
  sys.exit(0)
