"""Compressed uploads inside the round and in the byte accounting."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import peft
from fedpeft_jax.federated import RoundSpec, ServerDP, build_algorithm, comm_cost, plan_round
from fedpeft_jax.federated.compression import encoded_bytes
from fedpeft_jax.models import build_model
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import run
from tests.test_federated import affine_client, flat, setup


@pytest.mark.parametrize("method,levels", [("int8", 127), ("int4", 7)])
def test_quantized_round_is_within_a_step_of_the_exact_mean(method, levels):
  sizes = (6, 10, 4)
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  got = {}
  for m in ("none", method):
    algo = build_algorithm(model, client_tx, server_tx, cspec, RoundSpec(1, 1, compression=m),
                           4, client_update=affine_client)
    state, _ = algo.apply(algo.init(trainable, seed=0), frozen, data, plan_round(0, 0, 3, 3))
    got[m] = flat(state.trainable)
  w = np.asarray(sizes, np.float64) / sum(sizes)
  moved = 0
  for k, x in flat(trainable).items():
    updates = [0.37 * x + 0.01 * (i + 1) for i in range(3)]
    steps = [np.max(np.abs(u)) / levels for u in updates]  # per-tensor absmax scale
    bound = sum(wi * s for wi, s in zip(w, steps))
    diff = np.abs(got[method][k] - got["none"][k])
    assert np.all(diff <= bound * (1 + 1e-5) + 1e-7), k
    moved += int(np.any(diff > 0))
  assert moved > 0


def test_int8_bytes_by_hand_and_through_a_run(tmp_path):
  c = repo_config("tiny").get_config("bias,rounds=2")
  c.federated.compression = "int8"
  summary = run(c, str(tmp_path / "int8"), progress=False)
  rows = [json.loads(x) for x in open(os.path.join(tmp_path, "int8", "metrics.jsonl"))]
  model_params = summary["trainable_params"]
  from_run = rows[0]["bytes_up"] / rows[0]["clients_reporting"]
  # int8 values + one float32 scale per trainable tensor.
  model = build_model(c, 10)
  shapes = jax.eval_shape(lambda k: model.init(k, np.zeros((1, 16, 16, 3), np.float32)),
                          jax.random.PRNGKey(0))["params"]
  trainable, _ = peft.split(shapes, peft.trainable_mask(shapes, c.peft))
  mask_leaves = len(jax.tree_util.tree_leaves(trainable))
  assert from_run == model_params * 1 + 4 * mask_leaves
  assert encoded_bytes(trainable, "int8") == from_run
  assert rows[0]["bytes_down"] / rows[0]["clients_sampled"] == model_params * 4
  cost = comm_cost(trainable, shapes, shapes, "float32", upload_bytes=int(from_run))
  assert cost.round_bytes(3, 2)["bytes_up"] == 2 * from_run


def pattern_client(trainable, frozen, data, client_id, key, active=True):
  """Sends the same update every round: a per-client pattern of many magnitudes."""
  c = (client_id + 1).astype(jnp.float32)
  update = jax.tree_util.tree_map(
      lambda x: ((jnp.arange(x.size) % 7).reshape(x.shape) - 3.0) * 0.01 * c
      + 0.001 * jnp.arange(x.size).reshape(x.shape), trainable)
  return {"update": update, "num_examples": jnp.where(active, data.sizes[client_id], 0
                                                      ).astype(jnp.float32),
          "loss": jnp.zeros((), jnp.float32), "steps": jnp.where(active, 1, 0),
          "poisson_dropped": jnp.zeros((), jnp.int32)}


def test_topk_error_feedback_through_the_round():
  """Server model + weighted residuals = every update ever computed (Stich et al. 2018):
  x_T - x_0 = sum_i w_i (T u_i - e_i,T) when every client reports every round."""
  sizes, rounds = (6, 10, 4), 5
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  algo = build_algorithm(model, client_tx, server_tx, cspec,
                         RoundSpec(1, 1, compression="topk", compression_fraction=0.25,
                                   num_clients=3), 4, client_update=pattern_client)
  state = algo.init(trainable, seed=0)
  for r in range(rounds):
    state, _ = algo.apply(state, frozen, data, plan_round(0, r, 3, 3))
  w = np.asarray(sizes, np.float64) / sum(sizes)
  residual = flat(jax.tree_util.tree_map(np.asarray, state.clients["residual"]))
  updates = [flat(pattern_client(trainable, frozen, data, jnp.int32(i), None)["update"])
             for i in range(3)]
  got = flat(state.trainable)
  for k, x in flat(trainable).items():
    want = sum(wi * (rounds * u[k] - residual[k][i]) for i, (wi, u) in enumerate(zip(w, updates)))
    np.testing.assert_allclose(got[k] - x, want, rtol=1e-4, atol=1e-6, err_msg=k)
    assert np.any(residual[k] != 0) or x.size <= 4  # top-k held entries back


@pytest.mark.parametrize("rule", ["dp_fedavg", "max_update_norm"])
def test_topk_error_feedback_survives_the_server_clip(rule):
  """With a server-side clip C, each client sends top-k of m = clip(update + residual, C)
  (the clip re-derived here in NumPy, global L2 norm over the tree) and keeps m - sent: the
  sent vector is m on at most k entries per tensor and zero elsewhere, its norm is <= C so
  the server's clip cuts nothing, and the model moves by exactly the sum of what was sent
  (DP-FedAvg with zero noise: sum / expected clients; the weighted mean: by examples)."""
  sizes, rounds, clip, fraction = (6, 10, 4), 4, 0.05, 0.25
  model, params, trainable, frozen, data, _, cspec, client_tx, server_tx = setup(sizes=sizes)
  extra = ({"dp": ServerDP(True, 0.0, 3)} if rule == "dp_fedavg"
           else {"max_update_norm": clip})
  algo = build_algorithm(model, client_tx, server_tx, cspec,
                         RoundSpec(1, 1, compression="topk", compression_fraction=fraction,
                                   num_clients=3, **extra), 4, client_update=pattern_client)
  state = algo.init(trainable, seed=0, clip_norm=clip if rule == "dp_fedavg" else 0.0)
  updates = [flat(pattern_client(trainable, frozen, data, jnp.int32(i), None)["update"])
             for i in range(3)]
  coef = (np.full(3, 1 / 3) if rule == "dp_fedavg"
          else np.asarray(sizes, np.float64) / sum(sizes))
  clipped_any = False
  for r in range(rounds):
    before = flat(jax.tree_util.tree_map(np.asarray, state.clients["residual"]))
    x0 = flat(state.trainable)
    state, _ = algo.apply(state, frozen, data, plan_round(0, r, 3, 3))
    after = flat(jax.tree_util.tree_map(np.asarray, state.clients["residual"]))
    moved = {k: np.zeros_like(v) for k, v in x0.items()}
    for i in range(3):
      acc = {k: updates[i][k].astype(np.float64) + before[k][i] for k in x0}
      norm = np.sqrt(sum(np.sum(v ** 2) for v in acc.values()))
      clipped_any |= norm > clip
      m = {k: v * min(1.0, clip / norm) for k, v in acc.items()}
      sent = {k: m[k] - after[k][i] for k in x0}
      assert np.sqrt(sum(np.sum(v ** 2) for v in sent.values())) <= clip * (1 + 1e-5)
      for k, s in sent.items():
        on = np.abs(s) > 1e-9
        assert on.sum() <= int(np.ceil(fraction * s.size)), (k, r, i)
        np.testing.assert_allclose(s[on], m[k][on], rtol=1e-5, atol=1e-8)
        moved[k] += coef[i] * s
    for k, x in flat(state.trainable).items():
      np.testing.assert_allclose(x - x0[k], moved[k], rtol=1e-4, atol=1e-7, err_msg=k)
  assert clipped_any  # the clip was active
