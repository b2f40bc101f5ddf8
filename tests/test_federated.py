"""The federated engine against textbook FedAvg/FedOpt computed independently."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
import fedpeft_jax.data as fdata
from fedpeft_jax.federated import (MEMORY_FRACTION, ClientDP, ClientSpec, RoundPlan, RoundSpec,
                                   ServerDP, auto_clients_per_chunk, build_algorithm, comm_cost,
                                   compiled_round_bytes, layout_clients, make_client_update,
                                   make_server_optimizer, plan_round, to_wire)
from fedpeft_jax.runner.checkpointing import RunCheckpointer
from fedpeft_jax.scoring import make_evaluate
from fedpeft_jax.models import ViT, compute_dtype

NUM_CLASSES = 4
IMAGE = 8


def tiny_model(method: str = "bias") -> tuple[ViT, dict]:
  cfg = peft.method_config(method)
  model = ViT(variant=None, hidden_size=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=IMAGE, num_classes=NUM_CLASSES, peft=cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  # A non-zero head so that every bias receives a gradient.
  params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                     params["head"]["kernel"].shape)
  return model, params


def make_data(sizes: list[int], seed: int = 0) -> fdata.ClientData:
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  images = rng.integers(0, 256, size=(n, IMAGE, IMAGE, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  max_n = max(sizes)
  indices = np.zeros((len(sizes), max_n), np.int32)
  start = 0
  for c, s in enumerate(sizes):
    indices[c, :s] = np.arange(start, start + s)
    start += s
  return fdata.ClientData(images=jnp.asarray(images), labels=jnp.asarray(labels),
                             indices=jnp.asarray(indices), sizes=jnp.asarray(sizes, jnp.int32))


def setup(method="bias", sizes=(6, 10, 4), batch=4, epochs=1, chunk=1, server="fedavg",
          server_lr=1.0, client_tx=None, schedule="constant", rounds=0, **round_kw):
  model, params = tiny_model(method)
  mask = peft.trainable_mask(params, model.peft)
  trainable, frozen = peft.split(params, mask)
  data = make_data(list(sizes))
  client_tx = client_tx or optax.sgd(0.1)
  cspec = ClientSpec(batch_size=batch, local_epochs=epochs, max_examples=max(sizes),
                     image_size=IMAGE, augment="none")
  rspec = RoundSpec(clients_per_chunk=chunk, num_devices=1, **round_kw)
  server_tx = make_server_optimizer(server, server_lr, schedule=schedule, rounds=rounds)
  algo = build_algorithm(model, client_tx, server_tx, cspec, rspec, NUM_CLASSES)
  return model, params, trainable, frozen, data, algo, cspec, client_tx, server_tx


def flat(tree):
  return {k: np.asarray(v) for k, v in peft.flatten(tree).items()}


def test_one_client_one_step_equals_centralised_sgd():
  model, params, trainable, frozen, data, algo, *_ = setup(sizes=(4,), batch=4)
  state = algo.init(trainable, seed=0)
  new_state, metrics = algo.apply(state, frozen, data, plan_round(0, 0, 1, 1))
  # Centralised: one SGD step (lr 0.1) on the client's whole batch.
  images = fdata.preprocess(data.images, jax.random.PRNGKey(0), image_size=IMAGE,
                               augment="none", train=False)

  def loss(t):
    logits = model.apply({"params": peft.merge(t, frozen)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data.labels).mean()

  grads = jax.grad(loss)(trainable)
  expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, trainable, grads)
  got, want = flat(new_state.trainable), flat(expected)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-5, err_msg=k)
  assert int(metrics["clients_contributed"]) == 1
  assert int(metrics["local_steps"]) == 1


def test_weighted_fedavg_equals_numpy_mean_of_independent_clients():
  sizes = (6, 10, 3)
  model, params, trainable, frozen, data, algo, cspec, client_tx, _ = setup(sizes=sizes)
  state = algo.init(trainable, seed=3)
  new_state, _ = algo.apply(state, frozen, data, plan_round(3, 0, 3, 3))
  # Independently: each client alone (same per-client key rule), then a NumPy mean.
  client_update = jax.jit(make_client_update(model, client_tx, cspec, NUM_CLASSES))
  round_key = jax.random.fold_in(jnp.asarray(rng_lib.stream_key_data(3, "train")), 0)
  updates = []
  for c in range(3):
    out = client_update(trainable, frozen, data, jnp.int32(c), jax.random.fold_in(round_key, c))
    updates.append(flat(out["update"]))
    assert int(out["steps"]) == -(-sizes[c] // 4)
  w = np.asarray(sizes, np.float64) / sum(sizes)
  before = flat(trainable)
  got = flat(new_state.trainable)
  for k in before:
    mean = sum(wi * u[k] for wi, u in zip(w, updates))
    np.testing.assert_allclose(got[k], before[k] + mean, atol=1e-6, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("chunk", [2, 3])
def test_chunk_layouts_agree(chunk):
  results = []
  for c in (1, chunk):
    _, _, trainable, frozen, data, algo, *_ = setup(sizes=(5, 7, 3), chunk=c)
    state = algo.init(trainable, seed=1)
    for r in range(2):
      state, _ = algo.apply(state, frozen, data, plan_round(1, r, 3, 3))
    results.append(flat(state.trainable))
  for k in results[0]:
    np.testing.assert_allclose(results[0][k], results[1][k], atol=1e-5, err_msg=k)


def test_cosine_server_schedule_scales_each_rounds_mean_update_and_resumes(tmp_path):
  """Round t moves the model by eta_t = (1 + cos(pi t / R)) / 2 times the round's mean update
  (the move of a constant-rate FedAvg round from the same state), and the schedule's count
  survives a checkpoint: a resumed run equals the uninterrupted one bit for bit."""
  rounds = 4
  *_, trainable, frozen, data, cosine, _, _, _ = setup(schedule="cosine", rounds=rounds)
  *_, constant, _, _, _ = setup()
  plans = [plan_round(0, r, 3, 3) for r in range(rounds)]
  state = cosine.init(trainable, seed=0)
  states = [state]
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # apply donates its state
  for t, plan in enumerate(plans):
    reference, _ = constant.apply(copy(state).replace(
        opt_state=constant.init(state.trainable, seed=0).opt_state), frozen, data, plan)
    new, _ = cosine.apply(copy(state), frozen, data, plan)
    eta = 0.5 * (1.0 + math.cos(math.pi * t / rounds))
    for before, moved, mean in zip(*(jax.tree_util.tree_leaves(x.trainable)
                                     for x in (state, new, reference))):
      np.testing.assert_allclose(np.asarray(moved) - np.asarray(before),
                                 eta * (np.asarray(mean) - np.asarray(before)),
                                 rtol=1e-4, atol=1e-7, err_msg=f"round {t}")
    state = new
    states.append(state)
  ckpt = RunCheckpointer(str(tmp_path / "ckpt"))
  ckpt.save(2, states[2], {})
  ckpt.wait()
  restored, _ = RunCheckpointer(str(tmp_path / "ckpt")).restore_latest(
      cosine.init(trainable, seed=0))
  resumed = jax.device_put(restored)
  for plan in plans[2:]:
    resumed, _ = cosine.apply(resumed, frozen, data, plan)
  for a, b in zip(jax.tree_util.tree_leaves(states[-1]), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_untouched_trainable_moves_over_rounds():
  model, params, trainable, frozen, data, algo, *_ = setup(method="lora", sizes=(6, 6))
  state = algo.init(trainable, seed=0)
  for r in range(3):
    state, _ = algo.apply(state, frozen, data, plan_round(0, r, 2, 2))
  merged = flat(peft.merge(state.trainable, frozen))
  original = flat(params)
  mask = peft.flatten(peft.trainable_mask(params, model.peft))
  moved = 0
  for k, v in original.items():
    if mask[k]:
      moved += int(not np.array_equal(merged[k], v))
    else:
      assert np.array_equal(merged[k], v), k
  assert moved > 0


def test_nan_client_excluded_and_weights_renormalise(max_update_norm=0.0):
  sizes = (6, 10, 4)
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  base = make_client_update(model, client_tx, cspec, NUM_CLASSES)

  def poisoned(t, f, d, cid, key, active):
    out = base(t, f, d, cid, key, active)
    bad = cid == 1
    out["update"] = jax.tree_util.tree_map(lambda u: jnp.where(bad, jnp.nan, u), out["update"])
    return out

  algo = build_algorithm(model, client_tx, server_tx, cspec,
                         RoundSpec(1, 1, max_update_norm=max_update_norm), NUM_CLASSES,
                         client_update=poisoned)
  clean = setup(sizes=sizes, max_update_norm=max_update_norm)[5]
  state = algo.init(trainable, seed=0)
  got, metrics = algo.apply(state, frozen, data, plan_round(0, 0, 3, 3))
  assert int(metrics["clients_nonfinite"]) == 1 and int(metrics["clients_contributed"]) == 2
  # local_steps counts the NaN client's steps too (ceil(n / 4) for n = 6, 10, 4): counting
  # only usable updates would reveal clients_nonfinite, which DP-SGD's epsilon does not cover.
  assert int(metrics["local_steps"]) == 2 + 3 + 1
  # Same as a round in which client 1 never reported.
  plan = RoundPlan(round=0, sampled=np.arange(3, dtype=np.int32),
                   reporting=np.array([0, 2], np.int32))
  want, _ = clean.apply(clean.init(trainable, seed=0), frozen, data, plan)
  for k, v in flat(want.trainable).items():
    np.testing.assert_allclose(flat(got.trainable)[k], v, atol=1e-6, err_msg=k)
    assert np.all(np.isfinite(flat(got.trainable)[k]))


def test_dropout_plan_deterministic_and_excludes_clients():
  plans = [plan_round(7, r, 64, 8, dropout=0.5) for r in range(20)]
  again = [plan_round(7, r, 64, 8, dropout=0.5) for r in range(20)]
  assert all(np.array_equal(a.reporting, b.reporting) for a, b in zip(plans, again))
  assert all(np.all(np.isin(p.reporting, p.sampled)) for p in plans)
  dropped = sum(p.num_sampled - p.num_reporting for p in plans)
  assert 40 < dropped < 120  # ~80 expected from 160 Bernoulli(0.5)
  other = [plan_round(8, r, 64, 8) for r in range(5)]
  assert any(not np.array_equal(a.sampled, b.sampled) for a, b in zip(plans, other))
  assert all(p.num_sampled == 8 and len(set(p.sampled.tolist())) == 8 for p in plans)


def test_same_seed_bitwise_identical():
  outs = []
  for _ in range(2):
    _, _, trainable, frozen, data, algo, *_ = setup(sizes=(5, 6))
    state = algo.init(trainable, seed=11)
    for r in range(2):
      state, m = algo.apply(state, frozen, data, plan_round(11, r, 2, 2))
    outs.append((flat(state.trainable), float(m["train_loss"])))
  for k in outs[0][0]:
    assert np.array_equal(outs[0][0][k], outs[1][0][k]), k
  assert outs[0][1] == outs[1][1]


def vit_param_count(width: int, depth: int, mlp: int, patch: int, image: int, classes: int,
                    channels: int = 3) -> int:
  """Parameters of a ViT with a class token (Dosovitskiy et al. 2021), counted by hand:
  patch embedding, class token, position embeddings, per block two LayerNorms, q/k/v/out
  projections and the MLP, the final LayerNorm and the head."""
  tokens = (image // patch) ** 2 + 1
  block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
  return (patch * patch * channels * width + width + width + tokens * width + depth * block
          + 2 * width + width * classes + classes)


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["full", "head", "bias", "prompt", "adapter", "lora", "ssf"])
def test_communication_bytes_are_those_of_the_arrays_sent(method, wire):
  model, params = tiny_model(method)
  trainable, _ = peft.split(params, peft.trainable_mask(params, model.peft))
  plain = ViT(variant=None, hidden_size=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=IMAGE, num_classes=NUM_CLASSES)
  base = jax.eval_shape(lambda k: plain.init(k, jnp.zeros((1, IMAGE, IMAGE, 3))),
                        jax.random.PRNGKey(0))["params"]
  cost = comm_cost(trainable, params, base, wire)
  sent = to_wire(trainable, wire)  # the payload the engine sends
  assert cost.trainable_bytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(sent))
  # By hand (width 16, MLP 32, one block, NUM_CLASSES classes): the head is 16 x C + C; bias
  # tuning adds the block's 8 biases (2 LayerNorms, q, k, v, out, fc2: 16 each; fc1: 32), the
  # patch embedding's and the final LayerNorm's (16 each).
  head = 16 * NUM_CLASSES + NUM_CLASSES
  by_hand = {"head": head, "bias": head + 7 * 16 + 32 + 2 * 16}
  if method in by_hand:
    assert cost.trainable_bytes == by_hand[method] * (2 if wire == "bfloat16" else 4)
  b = cost.round_bytes(num_sampled=8, num_reporting=6)
  assert b["bytes_down"] == cost.trainable_bytes * 8 and b["bytes_up"] == cost.trainable_bytes * 6
  # Full fine-tuning of the same model without PEFT modules: backbone + head, by hand.
  itemsize = 2 if wire == "bfloat16" else 4
  full = vit_param_count(16, 1, 32, 4, IMAGE, NUM_CLASSES) * itemsize
  assert cost.full_bytes == full
  assert b["bytes_full_equivalent"] == full * 14
  if method in ("prompt", "adapter", "lora", "ssf"):  # their modules are not in the baseline
    assert peft.count(params) * itemsize > full


def bf16_round(x: np.ndarray) -> np.ndarray:
  """float32 -> nearest bfloat16 (ties to even), returned as float32: bit arithmetic."""
  bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
  return bits.astype(np.uint32).view(np.float32)


def affine_client(trainable, frozen, data, client_id, key, active=True):
  """A client rule whose update is a known function of the model it received."""
  c = (client_id + 1).astype(jnp.float32)
  update = jax.tree_util.tree_map(lambda x: 0.37 * x + 0.01 * c, trainable)
  n = data.sizes[client_id].astype(jnp.float32)
  return {"update": update, "num_examples": jnp.where(active, n, 0.0),
          "loss": jnp.zeros((), jnp.float32), "steps": jnp.where(active, 1, 0),
          "poisson_dropped": jnp.zeros((), jnp.int32)}


def test_bfloat16_wire_rounds_model_and_updates_like_numpy():
  sizes = (6, 10, 4)
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  results = {}
  for wire in ("float32", "bfloat16"):
    algo = build_algorithm(model, client_tx, server_tx, cspec,
                           RoundSpec(1, 1, wire_dtype=wire), NUM_CLASSES,
                           client_update=affine_client)
    state, _ = algo.apply(algo.init(trainable, seed=0), frozen, data, plan_round(0, 0, 3, 3))
    results[wire] = flat(state.trainable)
  w = np.asarray(sizes, np.float64) / sum(sizes)
  for k, x in flat(trainable).items():
    x = x.astype(np.float32)
    received = bf16_round(x)  # the model the clients start from
    sent = [bf16_round(np.float32(0.37) * received + np.float32(0.01 * (i + 1)))
            for i in range(3)]
    want = x + sum(wi * u for wi, u in zip(w, sent))  # server keeps float32 master weights
    np.testing.assert_allclose(results["bfloat16"][k], want, rtol=2e-6, atol=1e-7, err_msg=k)
    exact = x + sum(wi * (0.37 * x + 0.01 * (i + 1)) for i, wi in enumerate(w))
    np.testing.assert_allclose(results["float32"][k], exact, rtol=2e-6, atol=1e-7, err_msg=k)
  assert any(not np.allclose(results["bfloat16"][k], results["float32"][k], rtol=1e-4, atol=0)
             for k in results["float32"])


def test_max_update_norm_clips_each_update_like_numpy():
  sizes = (6, 10, 4)
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  bound = 0.05
  algo = build_algorithm(model, client_tx, server_tx, cspec,
                         RoundSpec(1, 1, max_update_norm=bound), NUM_CLASSES,
                         client_update=affine_client)
  state, _ = algo.apply(algo.init(trainable, seed=0), frozen, data, plan_round(0, 0, 3, 3))
  x = flat(trainable)
  updates = [{k: 0.37 * v + 0.01 * (i + 1) for k, v in x.items()} for i in range(3)]
  norms = [math.sqrt(sum(float(np.sum(np.square(u[k], dtype=np.float64))) for k in u))
           for u in updates]
  assert min(norms) > 2 * bound  # the bound binds for every client
  w = np.asarray(sizes, np.float64) / sum(sizes)
  for k in x:
    want = x[k] + sum(wi * u[k] * bound / n for wi, u, n in zip(w, updates, norms))
    np.testing.assert_allclose(flat(state.trainable)[k], want, rtol=1e-5, atol=1e-7, err_msg=k)


def test_uniform_weighting_counts_only_clients_with_data():
  sizes = (5, 0, 7)
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  algo = build_algorithm(model, client_tx, server_tx, cspec,
                         RoundSpec(1, 1, weighting="uniform"), NUM_CLASSES,
                         client_update=affine_client)
  state, _ = algo.apply(algo.init(trainable, seed=0), frozen, data, plan_round(0, 0, 3, 3))
  for k, x in flat(trainable).items():
    want = x + 0.5 * sum(0.37 * x + 0.01 * (i + 1) for i in (0, 2))  # client 1 has no data
    np.testing.assert_allclose(flat(state.trainable)[k], want, rtol=2e-6, atol=1e-7, err_msg=k)


def scaled_client(scales):
  """Every client sends the all-ones update times its own scale (known norms)."""
  def client_update(trainable, frozen, data, client_id, key, active=True):
    s = jnp.asarray(scales, jnp.float32)[client_id]
    update = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, s, x.dtype), trainable)
    return {"update": update, "num_examples": jnp.where(active, 1.0, 0.0),
            "loss": jnp.zeros((), jnp.float32), "steps": jnp.where(active, 1, 0),
            "poisson_dropped": jnp.zeros((), jnp.int32)}
  return client_update


def test_dp_fedavg_round_clips_and_adapts_like_numpy():
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=(3, 3, 3))
  dim = peft.count(trainable)
  scales = np.array([0.5, 1.0, 1.5]) / math.sqrt(dim)  # update norms 0.5, 1.0, 1.5
  dp = ServerDP(True, noise_multiplier=0.0, expected_clients=3, adaptive=True,
                target_quantile=0.5, clip_lr=0.2, count_noise_std=0.0)
  algo = build_algorithm(model, client_tx, server_tx, cspec, RoundSpec(1, 1, dp=dp), NUM_CLASSES,
                         client_update=scaled_client(scales))
  state, metrics = algo.apply(algo.init(trainable, seed=0, clip_norm=1.0), frozen, data,
                              plan_round(0, 0, 3, 3))
  clipped = scales * np.minimum(1.0, 1.0 / np.array([0.5, 1.0, 1.5]))
  for k, x in flat(trainable).items():
    np.testing.assert_allclose(flat(state.trainable)[k], x + clipped.sum() / 3, rtol=1e-5,
                               atol=1e-7, err_msg=k)
  # Andrew et al.: 2 of 3 clients within C; C <- C exp(-lr (2/3 - 1/2)).
  np.testing.assert_allclose(float(state.clip_norm), math.exp(-0.2 * (2 / 3 - 0.5)), rtol=1e-6)
  assert float(metrics["unclipped_fraction"]) == pytest.approx(2 / 3)


def test_dp_fedavg_noisy_fraction_is_clamped_to_unit_interval():
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=(3, 3, 3))
  dp = ServerDP(True, noise_multiplier=0.5, expected_clients=3, adaptive=True,
                target_quantile=0.5, clip_lr=0.2, count_noise_std=1e4)
  algo = build_algorithm(model, client_tx, server_tx, cspec, RoundSpec(1, 1, dp=dp), NUM_CLASSES,
                         client_update=scaled_client([0.1, 0.1, 0.1]))
  clips = []
  for seed in range(6):
    key = np.asarray([100 + seed, 7, 11, seed], np.uint32)  # the dp stream's 128-bit key
    state, _ = algo.apply(algo.init(trainable, seed=0, clip_norm=1.0, dp_key=key), frozen, data,
                          plan_round(0, 0, 3, 3))
    clips.append(float(state.clip_norm))
  # The noised fraction lies in [0, 1], so C moves by at most exp(+-lr/2) from 1.
  lo, hi = math.exp(-0.2 * 0.5), math.exp(0.2 * 0.5)
  assert all(lo - 1e-6 <= c <= hi + 1e-6 for c in clips), clips
  assert any(abs(c - lo) < 1e-6 for c in clips) and any(abs(c - hi) < 1e-6 for c in clips)


def test_dp_noise_comes_from_the_secret_stream():
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=(3, 3, 3))
  dp = ServerDP(True, noise_multiplier=1.0, expected_clients=3)
  algo = build_algorithm(model, client_tx, server_tx, cspec, RoundSpec(1, 1, dp=dp), NUM_CLASSES,
                         client_update=scaled_client([0.1, 0.1, 0.1]))

  def run(dp_key=None):
    state = algo.init(trainable, seed=0, clip_norm=1.0, dp_key=dp_key)
    key = np.asarray(state.dp_rng)
    state, _ = algo.apply(state, frozen, data, plan_round(0, 0, 3, 3))
    return key, flat(state.trainable)

  (k1, a), (k2, b) = run(), run()  # same seed, keys from the OS
  assert not np.array_equal(k1, k2)
  assert any(not np.array_equal(a[k], b[k]) for k in a)
  _, c = run(k1)  # the same dp key (as restored from a checkpoint) repeats the round exactly
  assert all(np.array_equal(a[k], c[k]) for k in a)
  assert not np.array_equal(k1, rng_lib.stream_key_data(0, "dp"))


def test_evaluate_matches_direct_computation():
  model, params = tiny_model("bias")
  data = make_data([13])
  evaluate = make_evaluate(model, batch_size=4, image_size=IMAGE)
  out = evaluate(params, data.images, data.labels)
  x = fdata.preprocess(data.images, jax.random.PRNGKey(0), image_size=IMAGE, augment="none",
                          train=False)
  logits = np.asarray(model.apply({"params": params}, x))
  acc = np.mean(logits.argmax(-1) == np.asarray(data.labels))
  np.testing.assert_allclose(float(out["accuracy"]), acc, atol=1e-6)


MULTI_DEVICE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from tests.test_federated import setup, flat, plan_round
    from fedpeft_jax.federated import RoundSpec, build_algorithm
    from fedpeft_jax.mesh import make_mesh, replicate
    results = []
    for devices, chunk in ((1, 1), (4, 1), (2, 2)):
      model, params, trainable, frozen, data, _, cspec, ctx, stx = setup(sizes=(5, 7, 3, 6, 4))
      mesh = make_mesh(jax.devices()[:devices])
      algo = build_algorithm(model, ctx, stx, cspec, RoundSpec(chunk, devices), 4, mesh=mesh)
      state = algo.init(trainable, seed=2)
      frozen, data = replicate(frozen, mesh), replicate(data, mesh)
      for r in range(2):
        state, m = algo.apply(state, frozen, data, plan_round(2, r, 5, 4))
      results.append(flat(state.trainable))
    for other in results[1:]:
      for k in results[0]:
        np.testing.assert_allclose(results[0][k], other[k], atol=1e-5, err_msg=k)
    print("OK", len(jax.devices()))
""")


def run_on_cpu_devices(script: str, count: int = 4) -> None:
  """Runs `script` (formatted with the repo root as {root}) in a fresh process with `count`
  forced CPU devices; it must exit 0 and print 'OK <count>'."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script.format(root=root)], env=env,
                        capture_output=True, text=True, timeout=600, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"OK {count}" in proc.stdout


@pytest.mark.slow
def test_four_cpu_devices_match_single_device():
  run_on_cpu_devices(MULTI_DEVICE)


def test_auto_clients_per_chunk_rule_of_thumb():
  assert auto_clients_per_chunk(8, 1, 64, backend="cpu")[0] == 1
  assert auto_clients_per_chunk(8, 1, 64, backend="gpu")[0] == 4
  assert auto_clients_per_chunk(8, 4, 16, backend="gpu")[0] == 2
  assert auto_clients_per_chunk(3, 1, 512, backend="tpu")[0] == 1


def test_auto_clients_per_chunk_from_xla_memory_analysis():
  """The chunk is the largest whose compiled round (XLA's own estimate, here from the CPU
  compiler) fits in the memory fraction of the device limit."""
  sizes = (8,) * 4
  measured = {}

  def compile_bytes(chunk):
    *_, trainable, frozen, data, algo, _, _, _ = (None, *setup(sizes=sizes, chunk=chunk))
    state = algo.init(trainable, seed=0)
    return compiled_round_bytes(algo.lower(state, frozen, data, 4))

  def memory_of(chunk):
    if chunk not in measured:
      measured[chunk] = compile_bytes(chunk)
    return measured[chunk]

  for chunk in (1, 2, 4):
    memory_of(chunk)
  assert measured[1] < measured[2] < measured[4]  # activations grow with the chunk
  limit = int((measured[2] + measured[4]) / 2 / MEMORY_FRACTION)
  chunk, note = auto_clients_per_chunk(4, 1, 4, backend="gpu", memory_of=memory_of,
                                       bytes_limit=limit)
  assert chunk == 2 and "XLA" in note
  chunk, note = auto_clients_per_chunk(4, 1, 4, backend="gpu", memory_of=memory_of,
                                       bytes_limit=measured[1] // 2)
  assert chunk == 1 and "no chunk fits" in note
  assert auto_clients_per_chunk(4, 1, 4, backend="gpu", memory_of=lambda c: None,
                                bytes_limit=10**9)[0] == 4  # no estimate: the rule of thumb


def test_bfloat16_round_stays_near_float32():
  """A bf16-compute round (frozen backbone stored in bf16, f32 trainable, optimizer and
  aggregation) moves the trainable params like the f32 round, to bf16 precision."""
  model, params = tiny_model("bias")
  model16 = model.clone(dtype=jnp.bfloat16)
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  data = make_data([8, 12])
  cspec = ClientSpec(batch_size=4, local_epochs=1, max_examples=12, image_size=IMAGE,
                     augment="none")
  out = {}
  for name, m, f in (("f32", model, frozen), ("bf16", model16, optax.tree.cast(frozen,
                                                                             jnp.bfloat16))):
    algo = build_algorithm(m, optax.sgd(0.1), make_server_optimizer("fedavg"), cspec,
                           RoundSpec(1, 1), NUM_CLASSES)
    state, _ = algo.apply(algo.init(trainable, seed=0), f, data, plan_round(0, 0, 2, 2))
    out[name] = state.trainable
  for leaf in jax.tree_util.tree_leaves(out["bf16"]):
    assert leaf.dtype == jnp.float32  # master weights stay f32
  before = flat(trainable)
  d32 = {k: v - before[k] for k, v in flat(out["f32"]).items()}
  d16 = {k: v - before[k] for k, v in flat(out["bf16"]).items()}
  scale = max(np.abs(v).max() for v in d32.values())
  assert scale > 1e-3  # the round really moved the params
  for k in d32:
    # bf16 keeps 8 bits of mantissa: the update agrees to a few percent of its scale.
    np.testing.assert_allclose(d16[k], d32[k], atol=0.03 * scale, err_msg=k)
  assert not np.array_equal(d16["head/kernel"], d32["head/kernel"])  # really ran in bf16


def test_compute_dtype_auto():
  assert compute_dtype("auto", "cpu") == jnp.float32
  assert compute_dtype("auto", "gpu") == jnp.bfloat16
  assert compute_dtype("auto", "tpu") == jnp.bfloat16
  assert compute_dtype("float32", "tpu") == jnp.float32


def test_fedprox_and_local_steps_against_hand_derived_sgd():
  """FedProx: w2 = w1 - lr (g(w1) + mu (w1 - w0)) after w1 = w0 - lr g(w0), with g the plain
  cross-entropy gradient on the client's one full batch; local_steps caps the real steps."""
  model, params = tiny_model("bias")
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  data = make_data([4])
  lr, mu = 0.1, 0.5
  spec = ClientSpec(batch_size=4, local_epochs=2, max_examples=4, image_size=IMAGE,
                    augment="none", fedprox_mu=mu)
  out = jax.jit(make_client_update(model, optax.sgd(lr), spec, NUM_CLASSES))(
      trainable, frozen, data, jnp.int32(0), jax.random.PRNGKey(0))
  images = fdata.preprocess(data.images, None, image_size=IMAGE, augment="none", train=False)

  def ce(t):
    logits = model.apply({"params": peft.merge(t, frozen)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data.labels).mean()

  g = jax.grad(ce)
  w1 = jax.tree_util.tree_map(lambda w, d: w - lr * d, trainable, g(trainable))
  w2 = jax.tree_util.tree_map(lambda w, d, w0: w - lr * (d + mu * (w - w0)), w1, g(w1), trainable)
  want = flat(jax.tree_util.tree_map(jnp.subtract, w2, trainable))
  got = flat(out["update"])
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-5, err_msg=k)
  assert int(out["steps"]) == 2

  capped = dataclasses.replace(spec, local_epochs=3, local_steps=1, fedprox_mu=0.0)
  out = jax.jit(make_client_update(model, optax.sgd(lr), capped, NUM_CLASSES))(
      trainable, frozen, data, jnp.int32(0), jax.random.PRNGKey(0))
  assert int(out["steps"]) == 1
  want = flat(jax.tree_util.tree_map(lambda d: -lr * d, g(trainable)))
  for k, v in flat(out["update"]).items():
    np.testing.assert_allclose(v, want[k], atol=1e-6, rtol=1e-5, err_msg=k)


def test_poisson_client_sampling_and_static_slots():
  sizes = [plan_round(5, r, 64, 8, poisson=True).num_sampled for r in range(400)]
  assert len(set(sizes)) > 3  # a random number of clients per round
  assert abs(np.mean(sizes) - 8) < 0.6  # Binomial(64, 1/8): mean 8, sd of the mean ~0.13
  again = [plan_round(5, r, 64, 8, poisson=True).num_sampled for r in range(400)]
  assert sizes == again
  for n in (3, 8, 11):
    ids, valid = layout_clients(np.arange(n, dtype=np.int32), 1, 1, min_slots=12)
    assert ids.shape == (1, 12, 1) and int(valid.sum()) == n
  ids, valid = layout_clients(np.arange(14, dtype=np.int32), 2, 2, min_slots=12)
  assert ids.shape == (2, 4, 2) and sorted(ids[valid].tolist()) == list(range(14))


@pytest.mark.slow
def test_sorted_chunks_run_only_real_steps_and_agree_across_layouts():
  """Clients of 1..8 batches: chunk sizes 1, 2, 4 and shuffled client orders give the same
  round to 1e-6; executed steps are the hand count of longest-first chunks."""
  batch = 2
  sizes = tuple(batch * b for b in (3, 8, 1, 6, 2, 7, 5, 4))  # 1..8 batches, unsorted
  steps = np.array(sizes) // batch
  want_executed = {1: steps.sum(),
                   2: 2 * sum(sorted(steps, reverse=True)[0::2]),
                   4: 4 * sum(sorted(steps, reverse=True)[0::4])}
  results = {}
  rng = np.random.default_rng(0)
  for chunk in (1, 2, 4):
    for shuffled in (False, True):
      _, _, trainable, frozen, data, algo, *_ = setup(sizes=sizes, batch=batch, chunk=chunk)
      ids = np.arange(len(sizes), dtype=np.int32)
      if shuffled:
        ids = rng.permutation(ids).astype(np.int32)
      plan = RoundPlan(round=0, sampled=ids, reporting=ids)
      state, metrics = algo.apply(algo.init(trainable, seed=2), frozen, data, plan)
      assert int(metrics["local_steps"]) == steps.sum()
      assert int(metrics["executed_steps"]) == want_executed[chunk], chunk
      results[(chunk, shuffled)] = flat(state.trainable)
  ref = results[(1, False)]
  for key, got in results.items():
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0, err_msg=f"{key} {k}")


def test_layout_sorts_longest_first_and_spreads_devices():
  ids, valid = layout_clients(np.array([10, 11, 12, 13, 14], np.int32), 2, 2,
                              steps=np.array([1, 5, 3, 5, 2]))
  # Longest first (ties keep their order): 11, 13, 12, 14, 10; dealt over 2 devices.
  assert ids.shape == (2, 2, 2)
  assert ids[0].tolist() == [[11, 12], [10, 0]] and ids[1].tolist() == [[13, 14], [0, 0]]
  assert valid.sum() == 5 and not valid[1, 1].any()


def test_dp_sgd_draws_a_dropout_mask_per_example():
  """A DP-SGD batch of B copies of one example: with a mask per example their clipped
  gradients differ, so their mean is shorter than the clip norm; one mask shared by the
  batch (the old behaviour) would give B equal gradients and a mean of norm exactly C."""
  batch, clip = 8, 1e-4
  model = ViT(variant=None, hidden_size=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=IMAGE, num_classes=NUM_CLASSES, peft=peft.method_config("bias"),
              dropout=0.5)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                     params["head"]["kernel"].shape)
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  image = np.random.default_rng(0).integers(0, 256, (1, IMAGE, IMAGE, 3), dtype=np.uint8)
  data = fdata.ClientData(images=jnp.asarray(np.repeat(image, batch, 0)),
                          labels=jnp.zeros((batch,), jnp.int32),
                          indices=jnp.arange(batch, dtype=jnp.int32)[None],
                          sizes=jnp.asarray([batch], jnp.int32))
  cspec = ClientSpec(batch_size=batch, local_epochs=1, max_examples=batch, image_size=IMAGE,
                     augment="none", dp=ClientDP("dp_sgd", clip_norm=clip, noise_std=0.0))
  update = jax.jit(make_client_update(model, optax.sgd(1.0), cspec, NUM_CLASSES))(
      trainable, frozen, data, jnp.int32(0), jax.random.PRNGKey(3))["update"]
  norm = float(optax.tree.norm(update))  # = |mean of the B clipped gradients|
  assert norm < 0.9 * clip, norm
  assert norm > 0.05 * clip  # still one example's gradient, only with different masks
