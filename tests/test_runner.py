"""The experiment runner end to end: CLI outputs, exact kill-and-resume, invalid configs,
and every privacy mechanism through the federated engine."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy import optimize, stats

from fedpeft_jax import peft
from fedpeft_jax import rng as rng_lib
from fedpeft_jax.data import load_dataset, preprocess
from fedpeft_jax.federated import plan_round
from fedpeft_jax.models import CheckpointError, ViT, build_model, load_pretrained
from fedpeft_jax.peft import flatten, unflatten
from fedpeft_jax.pretrain import pretrain, save_npz
from fedpeft_jax.privacy import PrivacyBudgetError, dp_fedavg_epsilon
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import load_data, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_FIELDS = {"round", "test_accuracy", "test_loss", "train_loss", "clients_sampled",
                 "clients_contributed", "bytes_up", "bytes_down", "cumulative_bytes", "seconds"}


def _cli(workdir: str, *overrides: str, config: str = "configs/tiny.py:bias,rounds=4",
         wait: bool = True):
  cmd = [sys.executable, "-m", "fedpeft_jax.main", f"--config={config}", f"--workdir={workdir}",
         "--no_progress", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _final_params(workdir: str) -> dict:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), "state"))
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(state)}


def _with_backbone(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
  """Points config.model.pretrained at a random backbone saved to `path`, so that every frozen
  leaf of the run is known outside the runner ('bias' adds no randomly initialised leaf and
  the head starts at zero): `_reevaluate` can then rebuild the final model."""
  # A backbone file holds no PEFT leaves; load_pretrained replaces the head with a fresh one.
  model = build_model(config, 10, with_peft=False)
  size = config.model.image_size
  save_npz(model.init(jax.random.PRNGKey(7), jnp.zeros((1, size, size, 3)))["params"], path)
  config.model.pretrained = path
  return config


def _accuracy(model: ViT, params: dict, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy from one model.apply over the whole test set, argmax and mean in NumPy."""
  x = preprocess(images, image_size=model.image_size, augment="none", train=False)
  logits = np.asarray(model.apply({"params": params}, x))
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def _reevaluate(config: ml_collections.ConfigDict, workdir: str) -> float:
  """Test accuracy of the run's final checkpoint, recomputed without the runner's evaluator
  (its batching, padding, device split and psum): the checkpoint's trainable leaves over the
  backbone file of `_with_backbone`."""
  dataset, _ = load_data(config)
  model = build_model(config, dataset.num_classes)
  params = flatten(load_pretrained(config.model.pretrained, model))
  trained = {k[len("trainable/"):]: v for k, v in _final_params(workdir).items()
             if k.startswith("trainable/")}
  assert trained and set(trained) <= set(params), sorted(set(trained) - set(params))
  params.update(trained)
  return _accuracy(model, unflatten(params), dataset.test_images, dataset.test_labels)


@pytest.mark.slow
def test_cli_run_writes_every_output_and_resume_is_exact(tmp_path):
  full = str(tmp_path / "full")
  proc = _cli(full)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "partition.json", "metrics.jsonl", "summary.json",
               "accuracy_vs_round.png", "accuracy_vs_communication.png"):
    path = os.path.join(full, name)
    assert os.path.getsize(path) > 0, name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(full, "tensorboard")))
  rows = _rows(full)
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert METRIC_FIELDS <= set(r), METRIC_FIELDS - set(r)
  summary = json.load(open(os.path.join(full, "summary.json")))
  for key in ("final_accuracy", "best_accuracy", "total_bytes", "total_bytes_full_equivalent",
              "trainable_params", "total_params", "train_seconds", "versions"):
    assert key in summary, key
  assert summary["final_accuracy"] == rows[-1]["test_accuracy"]
  assert rows[-1]["cumulative_bytes"] == summary["total_bytes"]
  partition = json.load(open(os.path.join(full, "partition.json")))
  assert sum(partition["sizes"]) > 0

  # Re-running a finished run is a no-op that prints the summary.
  again = _cli(full)
  assert again.returncode == 0 and "already finished" in again.stdout
  assert _rows(full) == rows

  # Kill with SIGKILL mid-run, resume with the same command: identical results. Checkpoints
  # are written in the background, so wait for round 1's to be committed (renamed into
  # place) as well as for round 2 to be logged.
  killed = str(tmp_path / "killed")
  proc = _cli(killed, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline:
    path = os.path.join(killed, "metrics.jsonl")
    if (os.path.exists(path) and len(_rows(killed)) >= 2
        and os.path.isdir(os.path.join(killed, "checkpoints", "1"))):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert len(_rows(killed)) < 4, "the run finished before it could be killed"
  resumed = _cli(killed)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from round" in resumed.stdout
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(_rows(killed)) == strip(rows)
  a, b = _final_params(full), _final_params(killed)
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("override,field", [
    ("--config.federated.clients_per_round=9", "clients_per_round"),
    ("--config.federated.batch_size=0", "batch_size"),
    ("--config.federated.participation=1.5", "participation"),
    ("--config.peft.method=loraa", "peft.method"),
    ("--config.federated.server_optimizer=fedsgd", "server_optimizer"),
    ("--config.federated.client_sampling=binomial", "client_sampling"),
])
def test_invalid_config_fails_before_any_output(tmp_path, override, field):
  workdir = str(tmp_path / "bad")
  # participation only counts when clients_per_round is 0.
  extra = ["--config.federated.clients_per_round=0"] if "participation" in override else []
  proc = _cli(workdir, override, *extra)
  assert proc.returncode != 0
  assert field in proc.stderr
  assert not os.path.exists(workdir) or not os.listdir(workdir)


def test_poisson_client_sampling_without_dp(tmp_path):
  """federated.client_sampling='poisson' draws each client with probability k / n every round
  without any DP mechanism (a no-DP reference sampled like DP-FedAvg): the counts vary, an
  empty round trains no one, and the draws come from the seed's sampling stream."""
  c = repo_config("tiny").get_config("bias,rounds=8")
  c.federated.num_clients, c.federated.clients_per_round = 4, 2
  c.federated.client_sampling = "poisson"
  c.federated.eval_every, c.checkpoint_every = 8, 8
  run(c, str(tmp_path / "poisson"), progress=False)
  counts = [r["clients_sampled"] for r in _rows(str(tmp_path / "poisson"))]
  # Each client drawn with probability 1/2, independently: Binomial(4, 1/2) per round, from
  # a generator seeded by (the sampling stream's seed, round) as sampling.plan_round states.
  seed = rng_lib.stream_seed(c.seed, "sampling")
  expected = [int((np.random.default_rng([seed, r, 0x5A3]).random(4) < 0.5).sum())
              for r in range(8)]
  assert counts == expected
  assert len(set(counts)) > 1
  c.federated.client_sampling = "uniform"
  c.federated.rounds = c.federated.eval_every = c.checkpoint_every = 3
  run(c, str(tmp_path / "uniform"), progress=False)
  assert {r["clients_sampled"] for r in _rows(str(tmp_path / "uniform"))} == {2}


def _tiny(method: str = "bias"):
  return repo_config("tiny").get_config(f"{method},rounds=2")


def _rdp_epsilon(event, delta):
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(event)
  return acc.get_epsilon(delta)


def _gaussian_epsilon(z: float, steps: int, delta: float) -> float:
  """Epsilon at delta of `steps` Gaussian mechanisms of noise multiplier z: one Gaussian
  mechanism with mu = sqrt(steps) / z, exact delta(eps) of Balle & Wang (2018), Thm 8."""
  mu = math.sqrt(steps) / z
  gap = lambda e: (stats.norm.cdf(-e / mu + mu / 2)
                   - math.exp(e + stats.norm.logcdf(-e / mu - mu / 2)) - delta)
  return optimize.brentq(gap, 0.0, 10 * mu * mu + 50)


@pytest.mark.slow
def test_privacy_mechanisms_through_the_engine(tmp_path):

  # The study's mechanism: each step is a Gaussian mechanism of sensitivity 2C sqrt(k) (k
  # clipped tensors), composed without amplification; compare with the analytic Gaussian
  # mechanism (Balle & Wang 2018) over the steps that touch an example / a client.
  c = _tiny()
  c.privacy.mechanism = "paper_gaussian"
  c.privacy.epsilon, c.privacy.delta = 5.0, 1e-3
  c.privacy.log_non_private_metrics = True
  run(c, str(tmp_path / "paper"), progress=False)
  row = _rows(str(tmp_path / "paper"))[-1]
  sigma = 2 * math.sqrt(2 * math.log(1.25 / 1e-3) / 5.0)
  assert abs(row["paper_sigma"] - sigma) < 1e-9
  assert row["formal_guarantee"] is True and row["nominal_epsilon"] == 5.0
  model = build_model(c, 10)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3))),
                          jax.random.PRNGKey(0))["params"]
  k = sum(flatten(peft.trainable_mask(shapes, c.peft)).values())
  z = sigma / (2 * c.privacy.clip_norm * math.sqrt(k))
  sizes = json.load(open(tmp_path / "paper" / "partition.json"))["sizes"]
  uses, steps = {}, {}
  for r in range(2):
    for cid in plan_round(rng_lib.stream_seed(c.seed, "sampling"), r, c.federated.num_clients,
                          c.federated.clients_per_round).reporting.tolist():
      uses[cid] = uses.get(cid, 0) + c.federated.local_epochs  # one batch per epoch
      steps[cid] = steps.get(cid, 0) + c.federated.local_epochs * math.ceil(
          sizes[cid] / c.federated.batch_size)
  assert row["epsilon"] == pytest.approx(_gaussian_epsilon(z, max(uses.values()), 1e-3), rel=2e-2)
  assert row["epsilon_client"] == pytest.approx(_gaussian_epsilon(z, max(steps.values()), 1e-3),
                                                rel=2e-2)
  assert row["epsilon"] > 5.0  # the nominal epsilon is not what the mechanism gives

  # DP-SGD: the reported epsilon equals dp_accounting on the same per-client events.
  c = _with_backbone(_tiny(), str(tmp_path / "backbone.npz"))
  c.privacy.mechanism = "dp_sgd"
  c.privacy.noise_multiplier = 1.0
  c.privacy.delta = 1e-5
  c.privacy.log_non_private_metrics = True  # the test reads partition.json
  run(c, str(tmp_path / "dpsgd"), progress=False)
  rows = _rows(str(tmp_path / "dpsgd"))
  part = json.load(open(tmp_path / "dpsgd" / "partition.json"))
  sizes = part["sizes"]
  steps = {}
  for r in range(2):
    for cid in plan_round(rng_lib.stream_seed(c.seed, "sampling"), r, c.federated.num_clients,
                          c.federated.clients_per_round, c.federated.dropout).reporting.tolist():
      n = sizes[cid]
      steps[cid] = steps.get(cid, 0) + c.federated.local_epochs * math.ceil(n / c.federated.batch_size)
  eps = max(_rdp_epsilon(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(min(1.0, c.federated.batch_size / sizes[cid]),
                                          dp_accounting.GaussianDpEvent(1.0)), s), 1e-5)
      for cid, s in steps.items())
  assert abs(rows[-1]["epsilon"] - eps) < 1e-6
  assert rows[-1]["formal_guarantee"] is True
  # The logged accuracy is that of the final (noised) model.
  assert rows[-1]["test_accuracy"] == pytest.approx(_reevaluate(c, str(tmp_path / "dpsgd")),
                                                    abs=1e-6)

  # DP-FedAvg with adaptive clipping: one Poisson-sampled Gaussian event per round.
  c = _tiny()
  c.privacy.mechanism = "dp_fedavg"
  c.privacy.noise_multiplier = 0.1
  c.privacy.clip_norm = 0.5
  c.privacy.adaptive_clip = True
  c.privacy.delta = 1e-3
  run(c, str(tmp_path / "dpfedavg"), progress=False)
  rows = _rows(str(tmp_path / "dpfedavg"))
  q = c.federated.clients_per_round / c.federated.num_clients
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(0.1)), 2)
  assert abs(rows[-1]["epsilon"] - _rdp_epsilon(event, 1e-3)) < 1e-6
  assert rows[0]["clip_norm"] == pytest.approx(0.5)
  assert rows[1]["clip_norm"] != pytest.approx(0.5)  # the clip norm adapts


@pytest.mark.slow
def test_dp_sgd_ledger_counts_local_steps(tmp_path):
  """With federated.local_steps every reporting client runs exactly local_steps DP-SGD
  steps (local_epochs is raised to reach them), and the ledger must count those."""
  c = _tiny()
  c.federated.local_epochs = 0
  c.federated.local_steps = 3
  c.privacy.mechanism = "dp_sgd"
  c.privacy.noise_multiplier = 1.0
  c.privacy.delta = 1e-5
  c.privacy.log_non_private_metrics = True  # the test reads partition.json
  run(c, str(tmp_path / "steps"), progress=False)
  rows = _rows(str(tmp_path / "steps"))
  sizes = json.load(open(tmp_path / "steps" / "partition.json"))["sizes"]
  steps = {}
  for r in range(2):
    for cid in plan_round(rng_lib.stream_seed(c.seed, "sampling"), r, c.federated.num_clients,
                          c.federated.clients_per_round, c.federated.dropout).reporting.tolist():
      steps[cid] = steps.get(cid, 0) + 3
  eps = max(_rdp_epsilon(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(min(1.0, c.federated.batch_size / sizes[cid]),
                                          dp_accounting.GaussianDpEvent(1.0)), s), 1e-5)
      for cid, s in steps.items())
  assert rows[-1]["epsilon"] == pytest.approx(eps, abs=1e-6)


@pytest.mark.slow
def test_tfds_dataset_through_the_runner_with_mock_data(tmp_path):
  """The TFDS read path of a run (cifar100, 100 classes) on data tfds makes itself, offline."""
  import tensorflow_datasets as tfds  # lazy: seconds to import, two tests need it
  c = _with_backbone(_tiny(), str(tmp_path / "backbone.npz"))
  c.federated.rounds = 1
  c.data.dataset = "cifar100"
  c.data.partition = "iid"
  with tfds.testing.mock_data(num_examples=64):
    summary = run(c, str(tmp_path / "c100"), progress=False)
    reevaluated = _reevaluate(c, str(tmp_path / "c100"))
  assert summary["final_accuracy"] == pytest.approx(reevaluated, abs=1e-6)
  # bias + a fresh 100-way head on the tiny ViT (hidden 32).
  assert summary["trainable_params"] > 32 * 100
  partition = json.load(open(tmp_path / "c100" / "partition.json"))
  assert sum(partition["sizes"]) == 64


def test_missing_dataset_leaves_no_workdir(tmp_path):
  c = _tiny()
  c.data.dataset = "fashion_mnist"
  c.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(Exception, match="dataset-fashion-mnist|fashion"):
    run(c, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_study_preset_runs_end_to_end_on_mock_cifar100(tmp_path):
  """A study row (configs/study.py:cifar100,bias: crop+flip augmentation, Dirichlet 0.1,
  the study's SGD) runs through the runner once the backbone is shrunk for a CPU test."""
  import tensorflow_datasets as tfds  # lazy: seconds to import, two tests need it
  c = repo_config("study").get_config("cifar100,bias,clients=4,participation=0.5")
  assert c.data.augment == "auto" and c.federated.client_lr == 1e-2
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  c.model.mlp_dim, c.model.patch_size, c.model.image_size = 64, 8, 32
  _with_backbone(c, str(tmp_path / "backbone.npz"))  # the ImageNet-21k one, shrunk
  c.federated.rounds, c.federated.local_epochs, c.federated.batch_size = 1, 1, 8
  c.data.min_size = 2
  with tfds.testing.mock_data(num_examples=64):
    summary = run(c, str(tmp_path / "row"), progress=False)
    reevaluated = _reevaluate(c, str(tmp_path / "row"))
  assert summary["rounds"] == 1
  assert summary["final_accuracy"] == pytest.approx(reevaluated, abs=1e-6)
  rows = _rows(str(tmp_path / "row"))
  assert rows[0]["clients_sampled"] == 2


def test_checkpoint_that_does_not_fit_names_the_field(tmp_path):
  other = ViT(variant=None, hidden_size=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=16, num_classes=10)
  save_npz(other.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"],
           str(tmp_path / "other.npz"))
  c = _tiny()
  c.model.pretrained = str(tmp_path / "other.npz")
  with pytest.raises(CheckpointError, match="config.model.pretrained"):
    run(c, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_pretrain_command_writes_a_loadable_checkpoint_and_caches(tmp_path):
  c = _tiny()
  c.pretrain = ml_collections.ConfigDict({"epochs": 1, "batch_size": 50, "lr": 1e-3,
                                          "weight_decay": 0.0})
  path = pretrain(c, str(tmp_path / "pre"), verbose=False)
  summary = json.load(open(tmp_path / "pre" / "pretrain_summary.json"))
  # The reported accuracy is the saved model's: recomputed from the .npz on the same test set
  # (pre-training loads its dataset with config.seed), and well above chance (0.1) on this
  # easy synthetic task.
  dataset = load_dataset(c.data.dataset, resolution=c.data.resolution, seed=c.seed)
  saved = np.load(path)
  full = build_model(c, dataset.num_classes)
  acc = _accuracy(full, unflatten({k: saved[k] for k in saved.files}), dataset.test_images,
                  dataset.test_labels)
  assert summary["test_accuracy"] == pytest.approx(acc, abs=1e-6)
  assert acc > 0.3, acc
  c.peft.method = "lora"  # the backbone loads under a PEFT model, with fresh LoRA leaves
  params = load_pretrained(path, build_model(c, 10))
  np.testing.assert_array_equal(
      params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
      saved["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"])
  mtime = os.path.getmtime(path)
  c.peft.method = "full"
  assert pretrain(c, str(tmp_path / "pre"), verbose=False) == path  # cached: not retrained
  assert os.path.getmtime(path) == mtime


@pytest.mark.slow
def test_privacy_budget_stop_refuse_and_calibration(tmp_path):

  def dp_config(rounds):
    c = _tiny()
    c.federated.rounds = rounds
    c.privacy.mechanism = "dp_fedavg"
    c.privacy.noise_multiplier = 1.0
    c.privacy.delta = 1e-3
    return c

  one_round = dp_fedavg_epsilon(2, 4, 1.0, 1, 1e-3)
  two_rounds = dp_fedavg_epsilon(2, 4, 1.0, 2, 1e-3)
  budget = (one_round + two_rounds) / 2  # room for one round, not two

  c = dp_config(3)
  c.privacy.max_epsilon = budget
  c.privacy.budget_action = "refuse"
  with pytest.raises(PrivacyBudgetError, match="max_epsilon"):
    run(c, str(tmp_path / "refused"), progress=False)
  assert not os.path.exists(tmp_path / "refused")

  c = dp_config(3)
  c.privacy.max_epsilon = budget
  c.privacy.budget_action = "stop"
  summary = run(c, str(tmp_path / "stopped"), progress=False)
  assert summary["stopped_early_for_privacy_budget"] is True
  assert summary["rounds"] == 1
  assert summary["epsilon"] == pytest.approx(one_round, abs=1e-6) and summary["epsilon"] <= budget

  # Calibration: the noise multiplier is chosen so the planned rounds spend the target.
  c = dp_config(2)
  c.privacy.calibrate = True
  c.privacy.epsilon = 3.0
  run(c, str(tmp_path / "calibrated"), progress=False)
  row = _rows(str(tmp_path / "calibrated"))[-1]
  assert row["epsilon"] == pytest.approx(3.0, abs=0.01)
  assert dp_fedavg_epsilon(2, 4, row["noise_multiplier"], 2, 1e-3) == pytest.approx(row["epsilon"])
