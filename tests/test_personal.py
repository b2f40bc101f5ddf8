"""Personalised federated PEFT (FedPer, FedSA-LoRA, FedRep, FedBABU) against hand-derived
gradient steps, independent client loops with NumPy means, and NumPy per-client accuracy."""

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

from experiments import frontier
from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
import fedpeft_jax.data as fdata
from fedpeft_jax.federated import (ClientSpec, ClientStateSpec, RoundPlan, RoundSpec,
                                   build_algorithm, make_client_evaluate, make_client_update,
                                   make_finetune, make_personal_update, make_server_optimizer,
                                   plan_round, split_personal)
from fedpeft_jax.federated.personal import fedbabu_init
from fedpeft_jax.privacy.plan import NON_PRIVATE_METRICS
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import run
from fedpeft_jax.runner.validate import ConfigError, validate_config
from tests.test_federated import (IMAGE, NUM_CLASSES, flat, make_data, run_on_cpu_devices,
                                  tiny_model)
from tests.test_runner import _final_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 0.1


def personal_round(method: str, personal: str, sizes, schedule: str = "none", chunk: int = 1,
                   batch: int = 4, personal_epochs: int = 1):
  model, params = tiny_model(method)
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  shared, personal_init = split_personal(trainable, personal)
  data = make_data(list(sizes))
  cspec = ClientSpec(batch_size=batch, local_epochs=1, max_examples=max(sizes),
                     image_size=IMAGE, augment="none")
  client_tx = optax.sgd(LR)
  rule = make_personal_update(model, client_tx, cspec, NUM_CLASSES, schedule, personal_epochs)
  algo = build_algorithm(model, client_tx, make_server_optimizer("fedavg", 1.0), cspec,
                         RoundSpec(chunk, 1), NUM_CLASSES, client_update=rule,
                         client_state=ClientStateSpec(lambda _: personal_init, len(sizes)))
  return model, shared, personal_init, frozen, data, algo, cspec, client_tx


def full_batch_grads(model, tree, fixed, data):
  """Gradient of the mean cross-entropy over every example of `data` (one full batch)."""
  images = fdata.preprocess(data.images, jax.random.PRNGKey(0), image_size=IMAGE,
                            augment="none", train=False)

  def loss(t):
    logits = model.apply({"params": peft.merge(t, fixed)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data.labels).mean()

  return jax.grad(loss)(tree)


def sgd(tree, grads):
  return jax.tree_util.tree_map(lambda p, g: np.asarray(p) - LR * np.asarray(g), tree, grads)


def assert_trees_close(got, want, atol=1e-6):
  got, want = flat(got), flat(want)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=1e-5, err_msg=k)


def test_split_personal_selects_by_regex_and_names_bad_patterns():
  _, params = tiny_model("lora")
  trainable, _ = peft.split(params, peft.trainable_mask(params, peft.method_config("lora")))
  shared, personal = split_personal(trainable, "lora_b")
  assert all(p.endswith("lora_b") for p in peft.flatten(personal))
  assert not any(p.endswith("lora_b") for p in peft.flatten(shared))
  assert set(peft.flatten(shared)) | set(peft.flatten(personal)) == set(peft.flatten(trainable))
  with pytest.raises(ValueError, match="federated.personal 'pre_logits' matches no trainable"):
    split_personal(trainable, "pre_logits")
  with pytest.raises(ValueError, match="matches every trainable parameter"):
    split_personal(trainable, "head, lora")
  with pytest.raises(ValueError, match="federated.personal: '\\(' is not a valid regex"):
    split_personal(trainable, "(")


def test_fedper_one_step_is_sgd_on_both_parts_and_only_shared_reaches_the_server():
  """One client, one full-batch step: the server's shared leaves and the client's personal
  row both take the SGD step of jax.grad on the whole model; only the shared update moves
  the server."""
  model, shared, personal, frozen, data, algo, *_ = personal_round("bias", "head", (4,))
  state = algo.init(shared, seed=0)
  new_state, metrics = algo.apply(state, frozen, data, plan_round(0, 0, 1, 1))
  grads = full_batch_grads(model, peft.merge(shared, personal), frozen, data)
  want_shared, want_personal = split_personal(sgd(peft.merge(shared, personal), grads), "head")
  assert_trees_close(new_state.trainable, want_shared)
  assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], new_state.clients["rule"]),
                     want_personal)
  assert "head" not in new_state.trainable
  assert int(metrics["local_steps"]) == 1


def test_fedrep_trains_the_personal_part_first_then_the_shared_part():
  """FedRep, two full-batch steps on the personal part (personal_epochs=2), then one on the
  shared part: personal'' from g_p(shared, .) twice, then shared' = shared - lr
  g_s(shared, personal'') (the body sees the new head)."""
  model, shared, personal, frozen, data, algo, *_ = personal_round(
      "bias", "head", (4,), schedule="fedrep", personal_epochs=2)
  state = algo.init(shared, seed=0)
  new_state, metrics = algo.apply(state, frozen, data, plan_round(0, 0, 1, 1))
  new_personal = personal
  for _ in range(2):
    new_personal = sgd(new_personal, full_batch_grads(model, new_personal,
                                                      peft.merge(shared, frozen), data))
  g_shared = full_batch_grads(model, shared, peft.merge(new_personal, frozen), data)
  assert_trees_close(new_state.trainable, sgd(shared, g_shared))
  assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], new_state.clients["rule"]),
                     new_personal)
  assert int(metrics["local_steps"]) == 3  # two personal steps, then one shared step


def test_fedrep_default_is_the_published_schedule():
  """FedRep (Collins et al. 2021) trains the head for 10 local epochs, then the representation
  for 1; its code takes local_ep - local_rep_ep head epochs, run with local_ep 11 and
  local_rep_ep 1. The default personal_epochs and the frontier's FedRep row give exactly that:
  on a 4-example client at batch 4, 10 head steps then 1 body step."""
  local_ep, local_rep_ep = 11, 1  # the authors' run command (github.com/lgcollins/FedRep)
  default = repo_config("default").get_config()
  assert default.federated.personal_epochs == local_ep - local_rep_ep
  fedrep = frontier.SCHEMES["FedRep"]
  assert fedrep["federated.personal_epochs"] == local_ep - local_rep_ep
  assert fedrep["federated.local_epochs"] == local_rep_ep
  _, shared, _, frozen, data, algo, *_ = personal_round(
      "bias", "head", (4,), schedule="fedrep", personal_epochs=default.federated.personal_epochs)
  _, metrics = algo.apply(algo.init(shared, seed=0), frozen, data, plan_round(0, 0, 1, 1))
  assert int(metrics["local_steps"]) == local_ep


@pytest.mark.parametrize("chunk", [1, 2])
def test_fedsa_lora_rows_follow_reporting_clients_and_the_mean_excludes_them(chunk):
  """FedSA-LoRA (personal lora_b) over two rounds with dropouts, against independent clients
  (the default rule on shared + own row, outside the engine) and a NumPy weighted mean."""
  sizes = (5, 7, 3, 6)
  model, shared, personal, frozen, data, algo, cspec, client_tx = personal_round(
      "lora", "lora_b", sizes, chunk=chunk)
  state = algo.init(shared, seed=2)
  plain = jax.jit(make_client_update(model, client_tx, cspec, NUM_CLASSES))
  want_shared = flat(shared)
  want_rows = [flat(personal) for _ in sizes]
  plans = [RoundPlan(0, np.array([0, 1, 3], np.int32), np.array([0, 3], np.int32)),
           RoundPlan(1, np.array([1, 2, 3], np.int32), np.array([1, 2, 3], np.int32))]
  for r, plan in enumerate(plans):
    sent = peft.unflatten({k: jnp.asarray(v) for k, v in want_shared.items()})
    round_key = jax.random.fold_in(jnp.asarray(rng_lib.stream_key_data(2, "train")), r)
    total, mean = 0.0, {k: np.zeros_like(v, np.float64) for k, v in want_shared.items()}
    for c in plan.reporting.tolist():
      row = peft.unflatten({k: jnp.asarray(v) for k, v in want_rows[c].items()})
      out = plain(peft.merge(sent, row), frozen, data, jnp.int32(c),
                  jax.random.fold_in(round_key, c))
      update = flat(out["update"])
      for k in want_rows[c]:
        want_rows[c][k] = want_rows[c][k] + update[k]
      for k in mean:
        mean[k] += sizes[c] * update[k]
      total += sizes[c]
    want_shared = {k: want_shared[k] + mean[k] / total for k in want_shared}
    state, _ = algo.apply(state, frozen, data, plan)
  got = flat(state.trainable)
  for k in want_shared:
    np.testing.assert_allclose(got[k], want_shared[k], atol=1e-6, rtol=1e-5, err_msg=k)
  rows = flat(state.clients["rule"])
  for c in range(len(sizes)):
    for k in want_rows[c]:
      np.testing.assert_allclose(rows[k][c], want_rows[c][k], atol=1e-6, rtol=1e-5,
                                 err_msg=f"client {c} {k}")
  # Client 0 reported only in round 0: its B moved away from the (zero) init.
  first = next(iter(rows))
  assert not np.allclose(rows[first][0], flat(personal)[first])


def numpy_accuracy(model, params_of, test, num_clients):
  """Per-client accuracy by a plain loop: model.apply on each client's test rows, argmax in
  NumPy."""
  accs = []
  for c in range(num_clients):
    n = int(test.sizes[c])
    if n == 0:
      accs.append(np.nan)
      continue
    idx = np.asarray(test.indices[c, :n])
    images = fdata.preprocess(test.images[idx], jax.random.PRNGKey(0), image_size=IMAGE,
                              augment="none", train=False)
    logits = np.asarray(model.apply({"params": params_of(c)}, images))
    accs.append(float(np.mean(logits.argmax(-1) == np.asarray(test.labels)[idx])))
  return np.array(accs)


def test_client_evaluate_scores_each_client_with_its_own_row_like_numpy():
  model, params = tiny_model("bias")
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  shared, personal = split_personal(trainable, "head")
  num = 5
  rows = jax.tree_util.tree_map(
      lambda x: x[None] + 0.5 * jax.random.normal(jax.random.PRNGKey(3), (num,) + x.shape),
      personal)
  test = make_data([9, 0, 13, 4, 7], seed=5)  # client 1 has no test data
  evaluate = make_client_evaluate(model, 4, IMAGE, clients_per_chunk=2)
  got = evaluate(shared, frozen, rows, test, test, jax.random.PRNGKey(0))
  row = lambda c: jax.tree_util.tree_map(lambda x: x[c], rows)
  want = numpy_accuracy(model, lambda c: peft.merge(peft.merge(shared, row(c)), frozen),
                        test, num)
  np.testing.assert_allclose(np.asarray(got["accuracy"]), want, atol=1e-6)
  assert np.isnan(float(got["accuracy"][1]))
  assert float(got["mean"]) == pytest.approx(np.nanmean(want), abs=1e-6)
  assert float(got["min"]) == pytest.approx(np.nanmin(want))
  assert float(got["max"]) == pytest.approx(np.nanmax(want))
  assert len(set(np.round(want[~np.isnan(want)], 6))) > 1  # the rows differ in effect
  # Without personal rows every client scores the one global model.
  glob = evaluate(trainable, frozen, None, test, test, jax.random.PRNGKey(0))
  want = numpy_accuracy(model, lambda c: peft.merge(trainable, frozen), test, num)
  np.testing.assert_allclose(np.asarray(glob["accuracy"]), want, atol=1e-6)


def test_fedbabu_finetunes_each_clients_head_before_scoring():
  """FedBABU's adaptation with one full-batch epoch is one SGD step of jax.grad on the head
  with the body held still; each client adapts on its own training data."""
  model, params = tiny_model("bias")
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  shared, head = split_personal(trainable, "head")
  sizes = [4, 4, 4]
  train = make_data(sizes, seed=1)
  test = make_data([6, 5, 8], seed=2)
  cspec = ClientSpec(batch_size=4, local_epochs=3, max_examples=4, image_size=IMAGE,
                     augment="none")
  finetune = make_finetune(model, optax.sgd(LR), cspec, NUM_CLASSES, epochs=1)
  evaluate = make_client_evaluate(model, 4, IMAGE, adapt=finetune)
  rows = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), head)
  got = evaluate(shared, frozen, rows, test, train, jax.random.PRNGKey(0))
  fixed = peft.merge(shared, frozen)

  def adapted(c):
    one = fdata.ClientData(train.images[4 * c:4 * c + 4], train.labels[4 * c:4 * c + 4],
                           jnp.arange(4, dtype=jnp.int32)[None], jnp.array([4], jnp.int32))
    return peft.merge(sgd(head, full_batch_grads(model, head, fixed, one)), fixed)

  want = numpy_accuracy(model, adapted, test, 3)
  np.testing.assert_allclose(np.asarray(got["accuracy"]), want, atol=1e-6)


def test_fedbabu_init_draws_zero_matrices_and_keeps_the_rest():
  tree = {"head": {"kernel": np.zeros((16, 4), np.float32), "bias": np.zeros(4, np.float32)},
          "other": {"kernel": np.ones((2, 2), np.float32)}}
  out = fedbabu_init(tree, jax.random.PRNGKey(0))
  k = np.asarray(out["head"]["kernel"])
  assert np.std(k) == pytest.approx(np.sqrt(1 / 16), rel=0.25)  # LeCun normal: var 1/fan_in
  np.testing.assert_array_equal(out["head"]["bias"], 0.0)
  np.testing.assert_array_equal(out["other"]["kernel"], 1.0)


def _tiny(tmp_path, name, **federated):
  config = repo_config("tiny").get_config("lora,rounds=3")
  for k, v in federated.items():
    config.federated[k] = v
  return config, str(tmp_path / name)


@pytest.mark.slow
def test_fedper_run_sends_only_shared_leaves_and_resumes_exactly(tmp_path):
  config, workdir = _tiny(tmp_path, "fedper", personal="head")
  summary = run(config, workdir, progress=False)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  # Shared: LoRA A [32, 2] and B [2, 32] on query and value of 2 blocks, float32; the head
  # (32 x 10 + 10) stays on the clients.
  shared_bytes = 2 * 2 * (32 * 2 + 2 * 32) * 4
  for row in rows:
    assert row["bytes_up"] == row["clients_reporting"] * shared_bytes
    assert row["bytes_down"] == row["clients_sampled"] * shared_bytes
  assert summary["personal_params_per_client"] == 32 * 10 + 10
  assert summary["client_state_bytes"] == 4 * (32 * 10 + 10) * 4
  assert summary["client_state_bytes_per_device"] == 4 * (32 * 10 + 10) * 4  # one device
  assert summary["final_personalized_accuracy"] == rows[-1]["personalized_accuracy"]
  # Killed after round 1 and resumed: the same params, personal rows and metrics.
  config2, workdir2 = _tiny(tmp_path, "fedper_resumed", personal="head")
  config2.checkpoint_every = 1
  config.checkpoint_every = 1
  run(config2, workdir2, progress=False, stop_after_round=1)
  run(config2, workdir2, progress=False)
  a, b = _final_params(workdir), _final_params(workdir2)
  assert any("clients" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  rows2 = [json.loads(line) for line in open(os.path.join(workdir2, "metrics.jsonl"))]
  for x, y in zip(rows, rows2):
    assert x["personalized_accuracy"] == y["personalized_accuracy"]
    # The resumed run replays rounds 0..1's draws to know who has reported.
    assert x["personalized_accuracy_trained"] == y["personalized_accuracy_trained"]
  # Over clients that reported at least once: the mean over all of them once all have.
  fed = config.federated
  reported = set()
  for r, row in enumerate(rows):
    reported |= set(plan_round(rng_lib.stream_seed(config.seed, "sampling"), r,
                               fed.num_clients, fed.clients_per_round, fed.dropout
                               ).reporting.tolist())
    if len(reported) == fed.num_clients:
      assert row["personalized_accuracy_trained"] == pytest.approx(row["personalized_accuracy"])
  assert summary["final_personalized_accuracy_trained"] == rows[-1][
      "personalized_accuracy_trained"]


@pytest.mark.parametrize("fields,named", [
    ({"personal": "("}, "config.federated.personal"),
    ({"personal_schedule": "fedrep"}, "config.federated.personal_schedule"),
    ({"personal_schedule": "perfedavg"}, "config.federated.personal_schedule"),
    ({"personal": "head", "personal_epochs": 0}, "config.federated.personal_epochs"),
    ({"personal": "head", "local_test_size": -1}, "config.federated.local_test_size"),
    ({"personal": "head", "lora_aggregation": "fedex"}, "config.federated.personal"),
])
def test_bad_personal_fields_are_named(fields, named):
  config = repo_config("tiny").get_config("lora")
  for k, v in fields.items():
    config.federated[k] = v
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  assert e.value.field == named, str(e.value)


def test_personal_under_dp_is_refused():
  config = repo_config("tiny").get_config("lora")
  config.federated.personal = "head"
  config.privacy.mechanism = "dp_fedavg"
  with pytest.raises(ConfigError, match="not in the privacy accounting") as e:
    validate_config(config)
  assert e.value.field == "config.federated.personal"


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", [
    (["--config.federated.personal=pre_logits"],
     "config.federated.personal 'pre_logits' matches no trainable parameter"),
    (["--config.federated.personal=lora_b", "--config.federated.personal_schedule=fedbabu"],
     "config.federated.personal_schedule 'fedbabu' keeps the classifier head frozen"),
    (["--config.federated.personal=head", "--config.federated.local_test_size=100000"],
     "config.federated.local_test_size (100000): "),
])
def test_personal_checked_against_the_model_is_one_line_at_the_cli(tmp_path, overrides,
                                                                   message):
  """These need the model's param paths or the test split, so the runner checks them, before
  the workdir is made."""
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "fedpeft_jax.main",
                         "--config=configs/tiny.py:lora,rounds=1", f"--workdir={workdir}",
                         "--no_progress", *overrides],
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  lines = proc.stderr.splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert message in lines[0], lines[0]
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    {"personal": "head", "personal_schedule": "fedrep", "personal_epochs": 2},
    {"personal": "head", "personal_schedule": "fedbabu"},
    {"eval_per_client": True},
])
def test_schedules_run_from_the_runner(tmp_path, fields):
  """One tiny round of each path the runner wires: the per-client metric is there, the
  server never holds a personal head, and FedBABU's frozen head is a random draw."""
  config, workdir = _tiny(tmp_path, "run", **fields)
  config.federated.rounds = 1
  summary = run(config, workdir, progress=False)
  row = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert summary["final_personalized_accuracy"] == row["personalized_accuracy"]
  assert row["personalized_accuracy_min"] <= row["personalized_accuracy_max"]
  params = _final_params(workdir)
  held = [k for k in params if k.startswith("trainable/head")]
  if fields.get("personal"):
    assert not held  # the server never holds the personal head
  if fields.get("personal_schedule") == "fedbabu":
    # A zero head would pass no gradient: the loss would stay at ln(10) for 10 classes.
    assert abs(row["train_loss"] - np.log(10)) > 1e-2, row["train_loss"]


FOUR_DEVICES = """
import sys; sys.path.insert(0, {root!r})
import jax, numpy as np
from fedpeft_jax import peft
from fedpeft_jax.federated import make_client_evaluate, make_finetune, make_mesh, split_personal
from fedpeft_jax.federated import ClientSpec
import optax
from tests.test_federated import IMAGE, NUM_CLASSES, make_data, tiny_model
model, params = tiny_model("bias")
trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
shared, head = split_personal(trainable, "head")
rows = jax.tree_util.tree_map(  # a distinct head per client: rows must follow client ids
    lambda x: x[None] + 0.5 * jax.random.normal(jax.random.PRNGKey(3), (5,) + x.shape), head)
train, test = make_data([4, 3, 6, 2, 5], seed=1), make_data([5, 0, 7, 3, 6], seed=2)
spec = ClientSpec(batch_size=4, local_epochs=1, max_examples=6, image_size=IMAGE, augment="none")
tune = make_finetune(model, optax.sgd(0.1), spec, NUM_CLASSES, epochs=2)
out = []
for devices in (jax.devices()[:1], jax.devices()):
  ev = make_client_evaluate(model, 4, IMAGE, mesh=make_mesh(devices), adapt=tune)
  out.append(np.asarray(ev(shared, frozen, rows, test, train, jax.random.PRNGKey(4))["accuracy"]))
np.testing.assert_allclose(out[0], out[1], atol=1e-6)
assert np.isnan(out[1][1]) and not np.isnan(out[1][0])
print("OK", len(jax.devices()))
"""


@pytest.mark.slow
def test_client_evaluate_on_four_cpu_devices_matches_one():
  """Clients split over 4 devices (5 clients: one padding slot), FedBABU adaptation keyed
  by client id: the same accuracies as on one device."""
  run_on_cpu_devices(FOUR_DEVICES)


def test_per_client_accuracy_is_not_private():
  """Each client's test set follows its training class mix: under every DP mechanism the
  per-client accuracies are data statistics no epsilon covers, dropped unless asked."""
  for mechanism in ("paper_gaussian", "dp_sgd", "dp_fedavg"):
    assert {"personalized_accuracy", "personalized_accuracy_min", "personalized_accuracy_max",
            "final_personalized_accuracy"} <= set(NON_PRIVATE_METRICS[mechanism])
