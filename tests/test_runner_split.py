"""`runner.train.run` against golden outputs: metrics.jsonl, summary.json, partition.json,
config.json and the printed lines of a few runs, byte for byte once the wall-clock fields
are dropped. The golden files were written by the runner before `run` was split into
set-up, loop and summary, so they pin that the split changed no output. Then the set-up
(`runner.experiment.build_experiment`) and the personalisation set-up it calls
(`federated.personal`) against independent computations.

Regenerate them (only on purpose, e.g. after a deliberate change of the outputs) with
  FEDPEFT_WRITE_GOLDEN=1 JAX_PLATFORMS=cpu python -m pytest -q tests/test_runner_split.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
from fedpeft_jax.federated import (ClientSpec, RoundSpec, build_algorithm, client_rows,
                                   make_mesh, make_server_optimizer, plan_round)
from fedpeft_jax.federated import personal as personal_lib
from fedpeft_jax.models.factory import build_model, init_params
from fedpeft_jax.privacy.accounting import dp_fedavg_epsilon
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.experiment import build_experiment, load_data
from fedpeft_jax.runner.train import run
from fedpeft_jax.runner.validate import ConfigError
from tests.test_federated import IMAGE, NUM_CLASSES, make_data, tiny_model
from tests.test_personal import LR, assert_trees_close, full_batch_grads, sgd

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "runner_split")
WRITE = os.environ.get("FEDPEFT_WRITE_GOLDEN") == "1"
# Wall-clock values and the installed versions: the only fields that differ between runs.
TIME_FIELDS = ("seconds",)
SUMMARY_TIME_FIELDS = ("train_seconds", "wall_seconds_this_session", "versions")


def _quickstart_bias() -> ml_collections.ConfigDict:
  # The quickstart's backbone file is not in the repo (experiments.quickstart pre-trains it):
  # from scratch instead, so the run is offline and derives from the seed alone.
  c = repo_config("quickstart").get_config("bias")
  c.model.pretrained = ""
  return c


def _tiny_head_cached() -> ml_collections.ConfigDict:
  # Head tuning: the frozen prefix is cached; with a validation split.
  c = repo_config("tiny").get_config("head,rounds=3")
  c.data.val_size = 0.2
  return c


def _tiny_personal(schedule: str, **federated: Any) -> Callable[[], ml_collections.ConfigDict]:
  def config() -> ml_collections.ConfigDict:
    c = repo_config("tiny").get_config("lora,rounds=3")
    c.federated.personal = "head"
    c.federated.personal_schedule = schedule
    for k, v in federated.items():
      c.federated[k] = v
    return c
  return config


def _tiny_dp_budget() -> ml_collections.ConfigDict:
  # DP-FedAvg with noise from the seed (reproducible), adaptive clipping, and a budget with
  # room for one round of three: the run stops early for the budget.
  c = repo_config("tiny").get_config("bias,rounds=3")
  c.privacy.mechanism = "dp_fedavg"
  c.privacy.noise_multiplier = 0.1
  c.privacy.clip_norm = 0.5
  c.privacy.delta = 1e-3
  c.privacy.adaptive_clip = True
  c.privacy.reproducible_noise = True
  c.privacy.max_epsilon = (dp_fedavg_epsilon(2, 4, 0.1, 1, 1e-3)
                           + dp_fedavg_epsilon(2, 4, 0.1, 2, 1e-3)) / 2
  return c


# name -> (config, the successive calls of `run` in one workdir: their keyword arguments).
CASES: dict[str, tuple[Callable[[], ml_collections.ConfigDict], list[dict]]] = {
    "quickstart_bias": (_quickstart_bias, [{}]),
    "tiny_head_cached": (_tiny_head_cached, [{}]),
    "tiny_fedbabu": (_tiny_personal("fedbabu"), [{}]),
    # Killed after round 1, resumed to the end, then started once more (already finished).
    "tiny_fedrep_resumed": (_tiny_personal("fedrep", personal_epochs=2),
                            [{"stop_after_round": 1}, {}, {}]),
    "tiny_dp_budget": (_tiny_dp_budget, [{}]),
}


def _drop(row: dict, fields: tuple[str, ...]) -> dict:
  return {k: v for k, v in row.items() if k not in fields}


def run_outputs(config: ml_collections.ConfigDict, workdir: str, calls: list[dict]
                ) -> dict[str, str]:
  """The run's outputs as the golden files hold them: the file name -> its text."""
  printed = io.StringIO()
  for kwargs in calls:
    with contextlib.redirect_stdout(printed):
      run(config, workdir, progress=False, **kwargs)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  out = {
      "metrics.jsonl": "".join(json.dumps(_drop(r, TIME_FIELDS)) + "\n" for r in rows),
      "summary.json": json.dumps(_drop(summary, SUMMARY_TIME_FIELDS), indent=2) + "\n",
      "stdout.txt": printed.getvalue().replace(workdir, "<WORKDIR>"),
      "files.txt": "".join(f"{name}\n" for name in sorted(os.listdir(workdir))),
  }
  for name in ("config.json", "partition.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        out[name] = f.read()
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_run_outputs_match_the_golden_files(tmp_path, name):
  config, calls = CASES[name]
  got = run_outputs(config(), str(tmp_path / "run"), calls)
  folder = os.path.join(GOLDEN, name)
  if WRITE:
    os.makedirs(folder, exist_ok=True)
    for file, text in got.items():
      with open(os.path.join(folder, file), "w") as f:
        f.write(text)
  want = {}
  for file in sorted(os.listdir(folder)):
    with open(os.path.join(folder, file)) as f:
      want[file] = f.read()
  assert sorted(got) == sorted(want)
  for file in want:
    assert got[file] == want[file], file


# ---------------------------------------------------------------------------
# build_experiment


def _independent_params(config: ml_collections.ConfigDict) -> tuple[dict, dict, int]:
  """(trainable, frozen, classes) of the config's model, split outside the runner."""
  dataset, _ = load_data(config)
  model = build_model(config, dataset.num_classes)
  params = init_params(config, model, jnp.asarray(rng_lib.stream_key_data(config.seed, "init")))
  trainable, frozen = peft.split(params, peft.trainable_mask(params, config.peft))
  return trainable, frozen, dataset.num_classes


def _init_key(config: ml_collections.ConfigDict) -> jax.Array:
  return jax.random.wrap_key_data(jnp.asarray(rng_lib.stream_key_data(config.seed, "init")))


def test_build_experiment_splits_like_peft_and_writes_nothing(tmp_path, monkeypatch):
  config = repo_config("tiny").get_config("bias")
  config.federated.num_clients, config.federated.clients_per_round = 6, 0
  config.federated.participation = 0.5
  monkeypatch.chdir(tmp_path)
  experiment = build_experiment(config)
  assert os.listdir(tmp_path) == []  # no workdir, no file: the loop makes them
  trainable, frozen, _ = _independent_params(config)
  assert peft.count(experiment.trainable) == peft.count(trainable) > 0
  assert peft.count(experiment.frozen) == peft.count(frozen) > 0
  assert experiment.comm_cost.trainable_params == peft.count(trainable)
  assert experiment.comm_cost.total_params == peft.count(trainable) + peft.count(frozen)
  assert experiment.clients_per_round == 3  # participation 0.5 of 6 clients
  assert experiment.personal_init is None and experiment.client_state_spec is None
  assert experiment.evaluate_clients is None and experiment.fixed_personal_rows is None
  assert experiment.validation_set is None
  assert experiment.round_frozen_on_device is experiment.frozen_on_device
  assert experiment.clients_per_chunk == 1  # one CPU device: one client at a time
  assert experiment.header().startswith("synthetic | bias | trainable ")


def test_build_experiment_keeps_fedper_heads_on_the_clients():
  config = repo_config("tiny").get_config("lora")
  config.federated.personal = "head"
  experiment = build_experiment(config)
  trainable, _, _ = _independent_params(config)
  want = peft.flatten(trainable)
  shared, personal = peft.flatten(experiment.trainable), peft.flatten(experiment.personal_init)
  assert sorted(personal) == sorted(k for k in want if k.startswith("head/"))
  assert sorted(shared) == sorted(k for k in want if not k.startswith("head/"))
  for k, v in {**shared, **personal}.items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  assert experiment.comm_cost.trainable_params == peft.count(experiment.trainable)
  spec = experiment.client_state_spec
  assert spec.num_clients == 4 and spec.init(None) is experiment.personal_init
  assert experiment.evaluate_clients is not None and experiment.fixed_personal_rows is None
  assert experiment.round_frozen_on_device is experiment.frozen_on_device


def test_build_experiment_draws_fedbabus_frozen_head_from_the_init_stream():
  config = repo_config("tiny").get_config("lora")
  config.federated.personal, config.federated.personal_schedule = "head", "fedbabu"
  experiment = build_experiment(config)
  trainable, _, _ = _independent_params(config)
  head = {k: v for k, v in peft.flatten(trainable).items() if k.startswith("head/")}
  assert not np.any(head["head/kernel"])  # the ViT's zero head, which FedBABU must redraw
  # fedbabu_init's LeCun normal draw of leaf i (here bias 0, kernel 1) from the init key
  # folded with 1.
  kernel = jax.nn.initializers.lecun_normal()(
      jax.random.fold_in(jax.random.fold_in(_init_key(config), 1), 1),
      head["head/kernel"].shape, head["head/kernel"].dtype)
  got = peft.flatten(experiment.personal_init)
  np.testing.assert_array_equal(got["head/kernel"], kernel)
  np.testing.assert_array_equal(got["head/bias"], head["head/bias"])
  assert experiment.client_state_spec is None  # frozen: no client keeps a row
  # The round holds the head fixed; every client's evaluation row starts at it.
  fixed = peft.flatten(experiment.round_frozen_on_device)
  np.testing.assert_array_equal(fixed["head/kernel"], kernel)
  rows = peft.flatten(experiment.fixed_personal_rows)
  for k, v in got.items():
    assert rows[k].shape == (4,) + v.shape
    for c in range(4):
      np.testing.assert_array_equal(rows[k][c], v, err_msg=f"{k} client {c}")


def test_build_experiment_names_a_personal_pattern_that_matches_nothing(tmp_path, monkeypatch):
  config = repo_config("tiny").get_config("lora")
  config.federated.personal = "pre_logits"
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match="matches no trainable parameter") as e:
    build_experiment(config)
  assert e.value.field == "config.federated.personal"
  config.federated.personal, config.federated.personal_schedule = "lora_b", "fedbabu"
  with pytest.raises(ConfigError, match="keeps the classifier head frozen") as e:
    build_experiment(config)
  assert e.value.field == "config.federated.personal_schedule"
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# federated.personal's set-up functions


def _tiny_parts(method: str = "bias") -> tuple[Any, dict, dict]:
  model, params = tiny_model(method)
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  return model, trainable, frozen


def test_split_for_schedule_by_path_and_fedbabu_head_only():
  _, trainable, _ = _tiny_parts("lora")
  shared, personal = personal_lib.split_for_schedule(trainable, "", "none")
  assert shared is trainable and personal is None
  flat_trainable = peft.flatten(trainable)
  for pattern, schedule, selected in [("head", "none", lambda k: k.startswith("head/")),
                                      ("lora_b", "fedrep", lambda k: k.endswith("lora_b")),
                                      ("head", "fedbabu", lambda k: k.startswith("head/"))]:
    shared, personal = personal_lib.split_for_schedule(trainable, pattern, schedule)
    assert sorted(peft.flatten(personal)) == sorted(k for k in flat_trainable if selected(k))
    assert sorted(peft.flatten(shared)) == sorted(k for k in flat_trainable if not selected(k))
  with pytest.raises(ValueError, match="^federated.personal_schedule 'fedbabu'"):
    personal_lib.split_for_schedule(trainable, "lora_b", "fedbabu")
  with pytest.raises(ValueError, match="^federated.personal 'nothing' matches no"):
    personal_lib.split_for_schedule(trainable, "nothing", "none")


def test_initial_personal_redraws_only_fedbabus_zero_matrices():
  head = {"head": {"bias": np.full(3, 0.5, np.float32), "kernel": np.zeros((8, 3), np.float32)}}
  key = jax.random.PRNGKey(3)
  assert personal_lib.initial_personal(None, "fedbabu", key) is None
  for schedule in ("none", "fedrep"):
    assert personal_lib.initial_personal(head, schedule, key) is head
  out = personal_lib.initial_personal(head, "fedbabu", key)
  np.testing.assert_array_equal(out["head"]["bias"], 0.5)
  kernel = np.asarray(out["head"]["kernel"])
  # LeCun normal (variance 1 / fan_in, truncated at 2 standard deviations), leaf 1 (the
  # kernel; leaf 0 is the bias) drawn from the key folded with 1.
  assert np.any(kernel) and np.all(np.abs(kernel) <= 2 * np.sqrt(1 / 8) / 0.8796 + 1e-6)
  np.testing.assert_array_equal(kernel, jax.nn.initializers.lecun_normal()(
      jax.random.fold_in(jax.random.fold_in(key, 1), 1), (8, 3), np.float32))
  assert personal_lib.freezes_personal("fedbabu")
  assert not any(personal_lib.freezes_personal(s) for s in ("none", "fedrep"))


def test_personal_client_rule_runs_fedper_like_sgd_and_keeps_each_clients_head():
  model, trainable, frozen = _tiny_parts("bias")
  shared, head = personal_lib.split_for_schedule(trainable, "head", "none")
  spec = ClientSpec(batch_size=4, local_epochs=1, max_examples=4, image_size=IMAGE,
                    augment="none")
  for schedule, personal_init in [("fedbabu", head), ("none", None)]:
    assert personal_lib.personal_client_rule(model, optax.sgd(LR), spec, NUM_CLASSES,
                                             personal_init, schedule, 1, 1) == (None, None)
  rule, state_spec = personal_lib.personal_client_rule(model, optax.sgd(LR), spec, NUM_CLASSES,
                                                       head, "none", 1, 1)
  assert state_spec.num_clients == 1 and state_spec.init(shared) is head
  data = make_data([4])
  algo = build_algorithm(model, optax.sgd(LR), make_server_optimizer("fedavg", 1.0), spec,
                         RoundSpec(1, 1), NUM_CLASSES, client_update=rule,
                         client_state=state_spec)
  state, _ = algo.apply(algo.init(shared, seed=0), frozen, data, plan_round(0, 0, 1, 1))
  # One full-batch SGD step on the whole model: the server gets the shared part, the
  # client keeps the head.
  stepped = sgd(peft.merge(shared, head),
                full_batch_grads(model, peft.merge(shared, head), frozen, data))
  want_shared, want_head = personal_lib.split_personal(stepped, "head")
  assert_trees_close(state.trainable, want_shared)
  assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], state.clients["rule"]), want_head)


def test_evaluation_finetune_is_fedbabus_head_sgd_and_nothing_else():
  model, trainable, frozen = _tiny_parts("bias")
  shared, head = personal_lib.split_for_schedule(trainable, "head", "fedbabu")
  spec = ClientSpec(batch_size=4, local_epochs=1, max_examples=4, image_size=IMAGE,
                    augment="none")
  for schedule in ("none", "fedrep"):
    assert personal_lib.evaluation_finetune(model, optax.sgd(LR), spec, NUM_CLASSES, schedule,
                                            2) is None
  tune = personal_lib.evaluation_finetune(model, optax.sgd(LR), spec, NUM_CLASSES, "fedbabu", 2)
  data = make_data([4])
  fixed = peft.merge(shared, frozen)
  got = tune(head, fixed, data, 0, jax.random.PRNGKey(0))
  want = head
  for _ in range(2):  # two epochs of one full batch each, the rest held still
    want = sgd(want, full_batch_grads(model, want, fixed, data))
  assert_trees_close(got, want)
  with pytest.raises(ValueError, match="personal_finetune_epochs"):
    personal_lib.evaluation_finetune(model, optax.sgd(LR), spec, NUM_CLASSES, "fedbabu", 0)


def test_fixed_personal_rows_copy_the_initial_head_for_every_client():
  head = {"head": {"bias": np.arange(3, dtype=np.float32),
                   "kernel": np.arange(24, dtype=np.float32).reshape(8, 3)}}
  mesh = make_mesh(jax.devices()[:1])
  assert personal_lib.fixed_personal_rows(head, "none", 5, mesh) is None
  assert personal_lib.fixed_personal_rows(None, "fedbabu", 5, mesh) is None
  rows = personal_lib.fixed_personal_rows(head, "fedbabu", 5, mesh)
  padded = client_rows.padded_rows(5, 1)
  for path, leaf in peft.flatten(head).items():
    got = np.asarray(peft.flatten(rows)[path])
    assert got.shape == (padded,) + leaf.shape
    np.testing.assert_array_equal(got, np.broadcast_to(leaf, (5,) + leaf.shape))
