"""The frozen-feature cache against the uncached path: same rounds, same evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.federated import (ClientSpec, RoundSpec, build_algorithm, build_cache,
                                   choose_input, make_evaluate, make_server_optimizer, plan_round)
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.models import ViT
from fedpeft_jax.runner.train import run

NUM_CLASSES = 5
IMAGE = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(method: str, last_blocks: int = 0):
  cfg = peft.method_config(method)
  cfg.last_blocks = last_blocks
  model = ViT(variant=None, hidden_size=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=IMAGE, num_classes=NUM_CLASSES, peft=cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                     params["head"]["kernel"].shape)
  return model, cfg, params


def _data(sizes, seed=0):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  images = rng.integers(0, 256, size=(n, IMAGE, IMAGE, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  indices = np.zeros((len(sizes), max(sizes)), np.int32)
  start = 0
  for c, s in enumerate(sizes):
    indices[c, :s] = np.arange(start, start + s)
    start += s
  return images, labels, indices, np.asarray(sizes, np.int32)


def _round(model, trainable, frozen, images, labels, indices, sizes, inputs, rounds=2):
  cspec = ClientSpec(batch_size=3, local_epochs=2, max_examples=int(sizes.max()),
                     image_size=IMAGE, augment="none", inputs=inputs)
  algo = build_algorithm(model, optax.sgd(0.2, momentum=0.9), make_server_optimizer("fedavg"),
                         cspec, RoundSpec(1, 1), NUM_CLASSES)
  data = fdata.ClientData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(indices),
                          jnp.asarray(sizes))
  state = algo.init(trainable, seed=4)
  for r in range(rounds):
    state, _ = algo.apply(state, frozen, data, plan_round(4, r, len(sizes), len(sizes)))
  return state.trainable


@pytest.mark.parametrize("method,last_blocks,kind", [("head", 0, "features"),
                                                      ("bias", 1, "tokens"),
                                                      ("prompt", 2, "tokens"),
                                                      ("lora", 1, "tokens")])
def test_cached_rounds_and_evaluation_equal_the_uncached_path(method, last_blocks, kind):
  model, cfg, params = _model(method, last_blocks)
  mask = peft.trainable_mask(params, cfg)
  trainable, frozen = peft.split(params, mask)
  inputs, note = choose_input("auto", peft.only_head_trainable(mask),
                              peft.first_trainable_block(mask, 3, last_blocks), 3, "none", True,
                              IMAGE)
  assert inputs.kind == kind and note.startswith("on"), note
  if kind == "tokens":
    assert inputs.start_block == 3 - last_blocks
  images, labels, indices, sizes = _data([7, 4, 9])
  cached = np.asarray(build_cache(model, params, images, inputs, batch_size=4))
  want_shape = (20, 16) if kind == "features" else (20, 1 + (IMAGE // 4) ** 2, 16)
  assert cached.shape == want_shape
  got = _round(model, trainable, frozen, cached, labels, indices, sizes, inputs)
  ref = _round(model, trainable, frozen, images, labels, indices, sizes, None)
  for k, v in peft.flatten(ref).items():
    np.testing.assert_allclose(np.asarray(peft.flatten(got)[k]), np.asarray(v), atol=2e-5,
                               err_msg=k)
  # Evaluation on the cached set equals evaluation on the images, at the trained params.
  trained = peft.merge(ref, frozen)
  ev_images = make_evaluate(model, 4, IMAGE)(trained, jnp.asarray(images), jnp.asarray(labels))
  ev_cached = make_evaluate(model, 4, IMAGE, inputs=inputs)(trained, jnp.asarray(cached),
                                                            jnp.asarray(labels))
  np.testing.assert_allclose(float(ev_cached["accuracy"]), float(ev_images["accuracy"]),
                             atol=1e-6)
  np.testing.assert_allclose(float(ev_cached["loss"]), float(ev_images["loss"]), rtol=1e-5)


def test_cache_refused_where_invalid_with_the_reason():
  spec, note = choose_input("auto", True, 3, 3, "crop_flip", True, IMAGE)
  assert spec.kind == "images" and "augmentation" in note
  spec, note = choose_input("auto", True, 3, 3, "none", False, IMAGE)
  assert spec.kind == "images" and "dropout" in note
  spec, note = choose_input("off", True, 3, 3, "none", True, IMAGE)
  assert spec.kind == "images" and note.startswith("off")
  spec, note = choose_input("auto", False, 0, 3, "none", True, IMAGE)
  assert spec.kind == "images" and "last_blocks" in note
  with pytest.raises(ValueError, match="feature_cache"):
    choose_input("always", True, 3, 3, "none", True, IMAGE)


@pytest.mark.slow
def test_sharded_evaluation_on_four_devices_equals_numpy():
  """The test set split over 4 CPU devices (13 rows: padded to 16) gives the NumPy count."""
  script = f"""
import sys; sys.path.insert(0, {ROOT!r})
import jax, jax.numpy as jnp, numpy as np
from tests.test_feature_cache import _model, _data, IMAGE
import fedpeft_jax.data as fdata
from fedpeft_jax.federated import make_evaluate, make_mesh, place_eval_set
model, cfg, params = _model("bias")
images, labels, _, _ = _data([13])
x = fdata.preprocess(images, None, image_size=IMAGE)
logits = np.asarray(model.apply({{"params": params}}, x), np.float64)
acc = np.mean(logits.argmax(-1) == labels)
logp = logits - logits.max(-1, keepdims=True)
logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
loss = -np.mean(logp[np.arange(13), labels])
mesh = make_mesh()
ex, lab = place_eval_set(images, labels, mesh)
assert ex.shape[0] == 16 and len(ex.sharding.device_set) == 4
out = make_evaluate(model, 2, IMAGE, mesh=mesh)(params, ex, lab)
np.testing.assert_allclose(float(out["accuracy"]), acc, atol=1e-6)
np.testing.assert_allclose(float(out["loss"]), loss, rtol=1e-5)
print("OK")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_runner_reports_the_cache(tmp_path):
  for mode, want in (("auto", "on: pooled features"), ("off", "off")):
    workdir = str(tmp_path / mode)
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft_jax.main", "--config=configs/tiny.py:head,rounds=2",
         f"--workdir={workdir}", "--no_progress", f"--config.federated.feature_cache={mode}"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    assert summary["feature_cache"].startswith(want), summary["feature_cache"]
    assert f"feature cache {want}" in proc.stdout
  accs = []
  for mode in ("auto", "off"):
    with open(os.path.join(str(tmp_path / mode), "metrics.jsonl")) as f:
      accs.append([json.loads(line)["test_accuracy"] for line in f])
  np.testing.assert_allclose(accs[0], accs[1], atol=1e-6)


def test_per_client_evaluation_reads_the_cached_test_features(tmp_path):
  """Head tuning caches the frozen prefix's features of the test split too; per-client
  evaluation must score those features (it once rebuilt a Dataset from them and failed its
  uint8 check). Equal to the uncached run's per-client accuracies."""
  rows = {}
  for mode in ("auto", "off"):
    c = repo_config("tiny").get_config("head,rounds=2")
    c.federated.eval_per_client = True
    c.federated.feature_cache = mode
    run(c, str(tmp_path / mode), progress=False)
    with open(tmp_path / mode / "summary.json") as f:
      assert ("on" in json.load(f)["feature_cache"]) == (mode == "auto")
    with open(tmp_path / mode / "metrics.jsonl") as f:
      rows[mode] = [json.loads(line) for line in f]
  for cached, plain in zip(rows["auto"], rows["off"]):
    for key in ("personalized_accuracy", "personalized_accuracy_min", "test_accuracy"):
      assert cached[key] == pytest.approx(plain[key], abs=1e-6), key
