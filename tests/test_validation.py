"""The validation split (`data.val_size`): held out of the training pool before partitioning,
stratified, seeded by the seed alone, and the only thing a run selects on."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

import fedpeft_jax.data as fdata
from fedpeft_jax.runner import train as runner
from fedpeft_jax.runner.validate import ConfigError
from fedpeft_jax.config_files import repo_config


def test_hold_out_is_disjoint_stratified_and_counted():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), [50, 30, 15, 5])[rng.permutation(100)]
  kept, held = fdata.hold_out(labels, 20, seed=3)
  assert len(held) == 20 and len(kept) == 80
  assert not np.intersect1d(kept, held).size
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(100))
  # 20 of 100 from classes of 50, 30, 15, 5: 10, 6, 3, 1 (exact shares, no rounding).
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=4), [10, 6, 3, 1])
  # Shares that do not divide: 7 of 100 -> 3.5, 2.1, 1.05, 0.35 -> largest remainders 4, 2, 1, 0.
  _, held7 = fdata.hold_out(labels, 7, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[held7], minlength=4), [4, 2, 1, 0])
  # Seeded: the same seed gives the same split, another seed another one.
  np.testing.assert_array_equal(fdata.hold_out(labels, 20, seed=3)[1], held)
  assert not np.array_equal(fdata.hold_out(labels, 20, seed=4)[1], held)


@pytest.mark.parametrize("size, count", [(0.25, 25), (0.006, 1), (30, 30), (0, 0)])
def test_validation_count(size, count):
  assert fdata.validation_count(size, 100) == count


@pytest.mark.parametrize("size", [100, 150, 2.5, -0.1, 0.004])
def test_validation_count_rejects(size):
  with pytest.raises(ValueError, match="val_size"):
    fdata.validation_count(size, 100)


def _config(method: str = "bias", seed: int = 0, val_size: float = 0.2, rounds: int = 3):
  c = repo_config("tiny").get_config(f"method={method},rounds={rounds},seed={seed}")
  c.data.val_size = val_size
  return c


def test_split_is_the_seeds_for_every_method_and_no_client_holds_it():
  base, _ = runner.load_data(_config(val_size=0))
  splits = {}
  for method in ("bias", "full", "lora"):
    ds, part = runner.load_data(_config(method))
    splits[method] = ds
    assert ds.num_val == round(0.2 * base.num_train)
    assert ds.num_train + ds.num_val == base.num_train
    # Every client index points into what is left; together they cover it exactly once.
    held = np.concatenate([np.asarray(i) for i in part.client_indices])
    np.testing.assert_array_equal(np.sort(held), np.arange(ds.num_train))
  for method in ("full", "lora"):
    np.testing.assert_array_equal(splits[method].val_images, splits["bias"].val_images)
    np.testing.assert_array_equal(splits[method].val_labels, splits["bias"].val_labels)
  # The held-out images are training images, none of them left in the training split.
  rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}
  ds = splits["bias"]
  assert rows(ds.val_images) <= rows(base.train_images)
  assert not rows(ds.val_images) & rows(ds.train_images)
  other, _ = runner.load_data(_config(seed=1))
  assert not np.array_equal(other.val_images, ds.val_images)


def test_bad_val_size_is_one_config_error():
  with pytest.raises(ConfigError, match=r"config.data.val_size"):
    runner.validate_config(_config(val_size=2.5))
  # A pool drawn with replacement holds duplicates: a held-out example could be a client's.
  config = _config()
  config.data.sample_with_replacement = True
  with pytest.raises(ConfigError, match=r"config.data.val_size with config.data.sample_with"):
    runner.validate_config(config)
  config = _config(val_size=0.5)
  config.data.train_size = 30  # 15 held out leave 15 for 4 clients of at least 10
  config.data.partition = "dirichlet"
  config.data.min_size = 10
  with pytest.raises(ConfigError, match=r"after config.data.val_size holds out 15; need >= 55"):
    runner.validate_config(config)


def test_poisson_client_sampling_must_match_the_dp_accounting():
  config = _config()
  config.federated.client_sampling = "poisson"
  runner.validate_config(config)  # without DP: a Poisson-sampled reference
  config.privacy.mechanism = "dp_fedavg"
  config.privacy.sampling = "shuffle"
  with pytest.raises(ConfigError, match=r"config.privacy.sampling is 'shuffle' but "
                                        r"config.federated.client_sampling is 'poisson'"):
    runner.validate_config(config)
  config.privacy.sampling = "poisson"
  runner.validate_config(config)


def test_best_round_by_hand_where_validation_and_test_disagree():
  rows = [{"round": 1, "test_accuracy": 0.9, "val_accuracy": 0.5},
          {"round": 2, "test_accuracy": 0.6, "val_accuracy": 0.8},
          {"round": 3, "test_accuracy": 0.7, "val_accuracy": 0.8},  # a tie: the first wins
          {"round": 4, "train_loss": 0.1}]  # not evaluated
  assert runner.best_round(rows) == {
      "best_accuracy": 0.6, "best_round": 2, "best_selected_on": "validation",
      "best_val_accuracy": 0.8, "final_val_accuracy": 0.8}


def _poisoned(monkeypatch):
  """load_dataset with the test labels permuted: a run that selected on test would change."""
  real = fdata.load_dataset

  def load(*args, **kwargs):
    ds = real(*args, **kwargs)
    labels = np.random.default_rng(9).permutation(ds.test_labels)
    return dataclasses.replace(ds, test_labels=labels.astype(np.int32))
  monkeypatch.setattr(fdata, "load_dataset", load)


@pytest.mark.slow
def test_best_round_is_chosen_on_validation_never_on_test(tmp_path, monkeypatch):
  summaries, rows = {}, {}
  for name in ("clean", "poisoned"):
    if name == "poisoned":
      _poisoned(monkeypatch)
    workdir = str(tmp_path / name)
    summaries[name] = runner.run(_config(rounds=4), workdir, progress=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows[name] = [json.loads(line) for line in f if line.strip()]
  clean, poisoned = summaries["clean"], summaries["poisoned"]
  assert clean["best_selected_on"] == "validation" and clean["validation_examples"] > 0
  # By hand: the first round of the highest val_accuracy, and the test accuracy there.
  vals = [r["val_accuracy"] for r in rows["clean"]]
  best = int(np.argmax(vals))
  assert clean["best_round"] == rows["clean"][best]["round"]
  assert clean["best_accuracy"] == rows["clean"][best]["test_accuracy"]
  assert clean["best_val_accuracy"] == max(vals)
  # Poisoned test labels change every test number and no selection.
  assert [r["val_accuracy"] for r in rows["poisoned"]] == vals
  assert [r["test_accuracy"] for r in rows["poisoned"]] != [r["test_accuracy"]
                                                           for r in rows["clean"]]
  assert poisoned["best_round"] == clean["best_round"]


def test_without_validation_the_best_round_says_it_was_chosen_on_test():
  rows = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.7},
          {"round": 3, "test_accuracy": 0.6}]
  assert runner.best_round(rows) == {"best_accuracy": 0.7, "best_round": 2,
                                     "best_selected_on": "test"}
