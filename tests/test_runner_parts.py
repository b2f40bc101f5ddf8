"""Runner parts without training: the study presets, config validation and run outputs.

Fast (no JAX compute): every preset of the study's grid resolves and validates, every
documented invalid config fails with a ConfigError naming the field, files are written
atomically, the metrics log survives torn appends and truncation, plots are real PNGs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import pytest

from fedpeft_jax.data import AUGMENTS, METHODS
from fedpeft_jax.federated import (CLIENT_OPTIMIZERS, SERVER_LR_SCHEDULES, SERVER_OPTIMIZERS,
                                   WEIGHTINGS, WIRE_DTYPES)
from fedpeft_jax.models import MODEL_DTYPES, POOLS
from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.experiment import optimizers
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.validate import ConfigError, parse_clients_per_chunk, validate_config



def load_preset(name: str) -> Any:
  return repo_config(name)


study = load_preset("study")
study_dp = load_preset("study_dp")
tiny = load_preset("tiny")
default = load_preset("default")

# ---------------------------------------------------------------------------
# Presets

STUDY_LR = {  # docs/study.md; lora/ssf are our choice (not in the study)
    ("cifar100", "full"): 1e-3, ("cifar100", "head"): 5e-3, ("cifar100", "bias"): 1e-2,
    ("cifar100", "adapter"): 5e-3, ("cifar100", "prompt"): 1e-2, ("cifar100", "scratch"): 1e-2,
    ("resisc45", "bias"): 5e-3, ("resisc45", "full"): 1e-3, ("patch_camelyon", "bias"): 1e-2,
}


def test_default_config_validates():
  validate_config(default.get_config())


def test_every_study_preset_resolves_and_validates():
  grid = itertools.product(study.DATASETS, study.METHODS, (16, 64), (1.0, 0.125),
                           ("dirichlet", "iid"))
  count = 0
  for dataset, method, clients, part, split in grid:
    arg = (f"dataset={dataset},method={method},clients={clients},participation={part},"
           f"split={split},seed=42")
    c = study.get_config(arg)
    validate_config(c)
    assert c.data.dataset == dataset and c.data.partition == split
    assert c.federated.num_clients == clients and c.federated.participation == part
    assert c.federated.rounds == 50 and c.federated.local_epochs == 10
    assert c.federated.batch_size == 64 and c.seed == 42
    assert c.federated.client_optimizer == "sgd" and c.federated.client_nesterov
    assert c.model.variant == "B/16" and c.model.image_size == 224
    assert c.model.pretrained == ("" if method == "scratch" else "vit_b16_in21k")
    assert c.data.alpha == (0.5 if dataset == "patch_camelyon" else 0.1)
    assert c.data.train_size == (20000 if dataset == "patch_camelyon" else 0)
    count += 1
  assert count == 3 * 9 * 8


def test_study_learning_rates_and_methods():
  for (dataset, method), lr in STUDY_LR.items():
    assert study.get_config(f"{dataset},{method}").federated.client_lr == lr, (dataset, method)
  a = study.get_config("cifar100,adapter")
  p = study.get_config("cifar100,adapter_paper")
  assert a.peft.method == p.peft.method == "adapter"
  assert (a.peft.adapter.kind, p.peft.adapter.kind) == ("sequential", "shared_zero_init")
  assert a.peft.adapter.bottleneck == 96
  s = study.get_config("patch_camelyon,scratch")
  assert s.peft.method == "full" and s.model.pretrained == ""
  pr = study.get_config("resisc45,prompt").peft.prompt
  assert (pr.kind, pr.num_tokens, pr.dropout) == ("deep", 10, 0.1)


def test_study_arg_syntax():
  base = study.get_config("")
  assert (base.data.dataset, base.peft.method, base.federated.num_clients) == ("cifar100",
                                                                                "full", 64)
  c = study.get_config("resisc45,lora,clients=16,participation=12.5%,split=noniid")
  assert (c.data.dataset, c.peft.method, c.federated.num_clients) == ("resisc45", "lora", 16)
  assert c.federated.participation == 0.125 and c.data.partition == "dirichlet"
  assert study.get_config("cifar100,bias,train_size=5000").data.train_size == 5000
  for bad, words in [("imagenet,bias", "dataset"), ("cifar100,bias,clients=x", "clients"),
                     ("cifar100,bias,foo=1", "foo"), ("cifar100,bias,extra", "extra"),
                     ("cifar100,bias,method=head", "twice"), ("cifar100,sgd", "method")]:
    with pytest.raises(ValueError, match=words):
      study.get_config(bad)


def test_every_dp_preset_resolves_and_validates():
  for dataset, method, mech in itertools.product(study_dp.DP_DATASETS, study_dp.DP_METHODS,
                                                 study_dp.MECHANISMS):
    for eps in (5, 10):
      c = study_dp.get_config(f"{dataset},{method},mechanism={mech},epsilon={eps}")
      validate_config(c)
      assert c.federated.num_clients == 64 and c.federated.participation == 0.125
      assert c.data.partition == "dirichlet"
      assert c.privacy.mechanism == mech and c.privacy.epsilon == eps
      assert c.federated.client_lr == study_dp.DP_LR[method]
  c = study_dp.get_config("cifar100,bias")
  assert (c.privacy.mechanism, c.privacy.delta, c.privacy.clip_norm) == ("paper_gaussian",
                                                                         1e-3, 1.0)
  assert [study_dp.get_config(f"cifar100,{m}").federated.client_lr
          for m in ("full", "head", "bias", "adapter", "prompt")] == [5e-4, 1e-3, 5e-3, 1e-3, 5e-3]
  fixed = study_dp.get_config("cifar100,head,mechanism=dp_sgd,noise=1.1")
  assert fixed.privacy.noise_multiplier == 1.1 and not fixed.privacy.calibrate
  assert study_dp.get_config("cifar100,head,mechanism=dp_fedavg").privacy.calibrate
  with pytest.raises(ValueError, match="noise"):
    study_dp.get_config("cifar100,bias,noise=1.0")
  with pytest.raises(ValueError, match="method"):
    study_dp.get_config("cifar100,scratch")


def test_tiny_preset():
  c = tiny.get_config("")
  validate_config(c)
  assert (c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.mlp_dim,
          c.model.patch_size, c.model.image_size) == (32, 2, 4, 64, 4, 16)
  assert (c.federated.num_clients, c.federated.clients_per_round, c.federated.rounds) == (4, 2, 2)
  assert c.data.dataset == "synthetic" and c.model.pretrained == ""
  for method in ("head", "bias", "prompt", "adapter", "lora", "ssf", "bias+lora"):
    validate_config(tiny.get_config(f"method={method},partition=iid"))


# ---------------------------------------------------------------------------

def test_the_runner_builds_the_configured_server_schedule():
  """config.federated.server_lr_schedule and rounds reach the server optimizer: with 'cosine'
  over 4 rounds the second round steps by 0.5 (1 + cos(pi / 4)) server_lr, with 'constant' by
  server_lr; the state's leaves are arrays (checkpointed and replicated)."""
  c = tiny.get_config("rounds=4")
  c.federated.server_lr = 0.8
  steps = []
  for schedule in ("cosine", "constant"):
    c.federated.server_lr_schedule = schedule
    _, server_tx = optimizers(c)
    params = {"w": jnp.zeros(3)}
    state = server_tx.init(params)
    for _ in range(2):
      updates, state = server_tx.update({"w": -jnp.ones(3)}, state, params)  # Delta = 1
    steps.append(float(updates["w"][0]))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(state))
  assert steps[0] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-6)
  assert steps[1] == pytest.approx(0.8, rel=1e-6)

# Invalid configs

def _set(path: str, value: Any) -> Callable[[Any], None]:
  def mutate(c: Any) -> None:
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return mutate


def _many(*fns: Callable[[Any], None]) -> Callable[[Any], None]:
  def mutate(c: Any) -> None:
    for fn in fns:
      fn(c)
  return mutate


def _del(section: str) -> Callable[[Any], None]:
  def mutate(c: Any) -> None:
    del c[section]
  return mutate


INVALID = [  # (name, mutation of the tiny config, field the error must name)
    ("dataset", _set("data.dataset", "imagenet_nope"), "config.data.dataset"),
    ("method", _set("peft.method", "lorax"), "config.peft.method"),
    ("lora rank", _many(_set("peft.method", "lora"), _set("peft.lora.rank", 0)),
     "config.peft.lora.rank"),
    ("peft field", _set("peft.lora.rnk", 4), "config.peft.lora.rnk"),
    ("client optimizer", _set("federated.client_optimizer", "rmsprop"),
     "config.federated.client_optimizer"),
    ("server optimizer", _set("federated.server_optimizer", "fedsgd"),
     "config.federated.server_optimizer"),
    ("server schedule", _set("federated.server_lr_schedule", "step"),
     "config.federated.server_lr_schedule"),
    ("partition", _set("data.partition", "quantity"), "config.data.partition"),
    ("alpha", _many(_set("data.partition", "dirichlet"), _set("data.alpha", 0.0)),
     "config.data.alpha"),
    ("augment", _set("data.augment", "mixup"), "config.data.augment"),
    ("train size", _set("data.train_size", 20), "config.data.train_size"),
    ("dtype", _set("model.dtype", "float64"), "config.model.dtype"),
    ("pool", _set("model.pool", "cls"), "config.model.pool"),
    ("variant", _many(_set("model.variant", "X/16"), _set("model.depth", 0)),
     "config.model.variant"),
    ("heads", _set("model.num_heads", 5), "config.model.num_heads"),
    ("image size", _set("model.image_size", 18), "config.model.image_size"),
    ("model dropout", _set("model.dropout", 1.0), "config.model.dropout"),
    ("pretrained name", _set("model.pretrained", "vit_nope"), "config.model.pretrained"),
    ("batch", _set("federated.batch_size", 0), "config.federated.batch_size"),
    ("rounds", _set("federated.rounds", 0), "config.federated.rounds"),
    ("local epochs", _set("federated.local_epochs", 0), "config.federated.local_epochs"),
    ("participation 0", _set("federated.participation", 0.0), "config.federated.participation"),
    ("participation 1.5", _set("federated.participation", 1.5),
     "config.federated.participation"),
    ("dropout 1", _set("federated.dropout", 1.0), "config.federated.dropout"),
    ("dropout -0.1", _set("federated.dropout", -0.1), "config.federated.dropout"),
    ("chunk word", _set("federated.clients_per_chunk", "many"),
     "config.federated.clients_per_chunk"),
    ("chunk 0", _set("federated.clients_per_chunk", "0"), "config.federated.clients_per_chunk"),
    ("client lr", _set("federated.client_lr", 0.0), "config.federated.client_lr"),
    ("eval every", _set("federated.eval_every", 0), "config.federated.eval_every"),
    ("checkpoint every", _set("checkpoint_every", -1), "config.checkpoint_every"),
    ("seed", _set("seed", -1), "config.seed"),
    ("server bias correction", _set("federated.server_bias_correction", None),
     "config.federated.server_bias_correction"),
    ("mechanism", _set("privacy.mechanism", "laplace"), "config.privacy.mechanism"),
    ("delta", _set("privacy.delta", 2.0), "config.privacy.delta"),
    ("missing section", _del("federated"), "config.federated"),
]


@pytest.mark.parametrize("name,mutate,field", INVALID, ids=[x[0] for x in INVALID])
def test_invalid_config_names_the_field(name: str, mutate: Callable[[Any], None], field: str):
  c = tiny.get_config("")
  mutate(c)
  with pytest.raises(ConfigError) as e:
    validate_config(c)
  assert field in str(e.value), str(e.value)
  assert e.value.field == field, (e.value.field, str(e.value))
  assert isinstance(e.value, ValueError)


def test_documented_messages():
  c = study.get_config("cifar100,bias")
  c.federated.clients_per_round = 80
  with pytest.raises(ConfigError, match=r"^config\.federated\.clients_per_round \(80\) exceeds "
                     r"config\.federated\.num_clients \(64\)$"):
    validate_config(c)
  c = study.get_config("cifar100,bias")
  c.model.variant = "S/16"  # vit_b16_in21k does not fit a ViT-S
  with pytest.raises(ConfigError, match="config.model.pretrained.*does not fit"):
    validate_config(c)
  c = tiny.get_config("")
  c.federated.client_optimizer = "rmsprop"
  with pytest.raises(ConfigError, match="allowed: sgd, adam, adamw"):
    validate_config(c)


def test_allowed_values_come_from_their_modules():
  """Every value the implementing module accepts validates, and the error lists them all."""
  owners = [("model.dtype", MODEL_DTYPES), ("model.pool", POOLS),
            ("data.augment", ("auto",) + tuple(AUGMENTS)), ("data.partition", METHODS),
            ("federated.client_optimizer", CLIENT_OPTIMIZERS),
            ("federated.server_optimizer", SERVER_OPTIMIZERS),
            ("federated.server_lr_schedule", SERVER_LR_SCHEDULES),
            ("federated.weighting", WEIGHTINGS), ("federated.wire_dtype", WIRE_DTYPES)]
  for field, allowed in owners:
    for value in allowed:
      c = tiny.get_config("")
      _set(field, value)(c)
      validate_config(c)
    c = tiny.get_config("")
    _set(field, "nope")(c)
    with pytest.raises(ConfigError, match="allowed: " + ", ".join(allowed) + "$"):
      validate_config(c)
  c = tiny.get_config("")
  c.federated.server_bias_correction = True
  validate_config(c)


def test_valid_edge_cases():
  c = tiny.get_config("")
  c.federated.local_epochs = 0
  c.federated.local_steps = 5  # fixed steps: epochs unused
  c.federated.clients_per_chunk = "4"  # as the command line gives it
  c.federated.participation = 1.0
  c.model.pretrained = "/some/checkpoint.npz"  # paths are checked when loaded
  validate_config(c)
  assert parse_clients_per_chunk("auto") is None
  assert parse_clients_per_chunk(3) == parse_clients_per_chunk("3") == 3


# ---------------------------------------------------------------------------
# Outputs

def _names(directory: str) -> list[str]:
  return sorted(os.listdir(directory))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
  path = tmp_path / "summary.json"
  outputs.atomic_write_json(path, {"a": 1})
  os.link(path, tmp_path / "old")  # an in-place write would change this link too
  outputs.atomic_write_json(path, {"a": 2, "b": [1.5, None]})
  assert json.loads(path.read_text()) == {"a": 2, "b": [1.5, None]}
  assert json.loads((tmp_path / "old").read_text()) == {"a": 1}
  assert _names(tmp_path) == ["old", "summary.json"]
  outputs.atomic_write_text(tmp_path / "t.txt", "hello")
  assert (tmp_path / "t.txt").read_text() == "hello"
  assert _names(tmp_path) == ["old", "summary.json", "t.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  outputs.atomic_write_json(path, {"v": 1})

  def broken(fd):
    raise OSError("disk full")

  monkeypatch.setattr(outputs.os, "fsync", broken)
  with pytest.raises(OSError):
    outputs.atomic_write_json(path, {"v": 2})
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"v": 1}
  assert _names(tmp_path) == ["config.json"]


def test_atomic_json_converts_numpy(tmp_path):
  import numpy as np
  outputs.atomic_write_json(tmp_path / "x.json", {"n": np.int64(3), "a": np.arange(2),
                                                  "f": np.float32(0.5)})
  assert json.loads((tmp_path / "x.json").read_text()) == {"n": 3, "a": [0, 1], "f": 0.5}


def test_metrics_log_append_truncate_read(tmp_path):
  log = outputs.MetricsLog(tmp_path / "metrics.jsonl")
  assert log.read() == [] and log.last_round() == 0
  log.truncate_after(0)  # no file yet: nothing to do
  for r in range(1, 6):
    log.append({"round": r, "test_accuracy": r / 10})
  assert [row["round"] for row in log.read()] == [1, 2, 3, 4, 5]
  log.truncate_after(3)
  assert [row["round"] for row in log.read()] == [1, 2, 3]
  assert _names(tmp_path) == ["metrics.jsonl"]
  # A kill mid-append leaves a torn last line: read skips it, append starts a new line,
  # truncate drops it.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"round": 4, "test_acc')
  assert [row["round"] for row in log.read()] == [1, 2, 3]
  log.append({"round": 4, "test_accuracy": 0.4})
  assert [row["round"] for row in log.read()] == [1, 2, 3, 4]
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"round": 5')
  log.truncate_after(4)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4]
  assert log.last_round() == 4


def _rows(n: int, scale: float = 1.0) -> list[dict]:
  rows = []
  for r in range(1, n + 1):
    row = {"round": r, "cumulative_bytes": int(r * 3e5 * scale), "train_loss": 1.0 / r}
    if r % 2 == 0 or r == n:
      row["test_accuracy"] = 0.1 + 0.8 * r / n
    rows.append(row)
  return rows


def _is_png(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(8)
  return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_plots_are_non_empty_pngs(tmp_path):
  paths = outputs.write_plots(_rows(7), tmp_path, title="cifar100 | bias")
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy_vs_communication.png",
                                                         "accuracy_vs_round.png"]
  assert all(_is_png(p) for p in paths)
  assert outputs.write_plots([], tmp_path / "empty")  # no rows: still valid images
  path = outputs.compare_plot({"full": _rows(5, 400.0), "bias": _rows(5), "none": []},
                              tmp_path / "compare.png")
  assert _is_png(path)
  assert not [n for n in _names(tmp_path) if n.endswith(".tmp")]


def test_tensorboard_logger(tmp_path):
  tb = outputs.TensorBoardLogger(tmp_path / "tb")
  tb.log({"round": 1, "test_accuracy": 0.5, "privacy": "note", "epsilon": None}, step=1)
  tb.log({"round": 2, "test_accuracy": 0.6, "flag": True}, step=2)
  tb.close()
  tb.close()  # idempotent
  tb.log({"test_accuracy": 0.7}, step=3)  # after close: a no-op
  assert any(n.startswith("events.out.tfevents") for n in _names(tmp_path / "tb"))


def test_format_table_and_versions():
  rows = [{"method": "full", "final_accuracy": 0.91234, "trainable_params": 85_900_000},
          {"method": "bias", "final_accuracy": None, "trainable_params": 179_812}]
  text = outputs.format_table(rows, ["method", ("final_accuracy", "acc", ".1%"),
                                     ("trainable_params", "params")])
  lines = text.splitlines()
  assert lines[0].split() == ["method", "acc", "params"]
  assert lines[2].split() == ["full", "91.2%", "85,900,000"]
  assert lines[3].split() == ["bias", "-", "179,812"]
  assert len({len(x) for x in lines[1:]}) == 1  # right-aligned numbers: equal widths
  v = outputs.versions()
  for key in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    assert key in v
  assert v["jax"]
