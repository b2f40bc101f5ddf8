"""Partitioners: every example once, determinism, the study's Dirichlet rule and its
statistics against the Dirichlet distribution, iid/shards, and bad inputs."""

import json

import numpy as np
import pytest

from fedpeft_jax.data import Partition, partition

Y10 = np.repeat(np.arange(10), 2000)  # 20,000 balanced labels, 10 classes


def _check_exact_cover(p: Partition, n: int) -> None:
  allidx = np.concatenate(p.client_indices)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
  assert p.sizes.sum() == n == p.num_examples
  assert all(np.all(np.diff(i) > 0) for i in p.client_indices)  # sorted, no duplicates


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_exact_cover_and_determinism(method):
  y = np.random.default_rng(0).integers(0, 7, 3001)
  p = partition(y, 13, method=method, alpha=0.3, seed=5)
  _check_exact_cover(p, len(y))
  for c, idx in enumerate(p.client_indices):
    np.testing.assert_array_equal(p.class_histograms[c], np.bincount(y[idx], minlength=7))
  q = partition(y, 13, method=method, alpha=0.3, seed=5)
  assert all(np.array_equal(a, b) for a, b in zip(p.client_indices, q.client_indices))
  r = partition(y, 13, method=method, alpha=0.3, seed=6)
  assert not all(np.array_equal(a, b) for a, b in zip(p.client_indices, r.client_indices))


def test_iid_equal_sizes_and_global_mix():
  p = partition(Y10, 16, method="iid")
  assert p.sizes.max() - p.sizes.min() <= 1
  assert p.stats()["tv_to_global"] < 0.06
  assert p.summary().startswith("iid(seed=0): 16 clients")


def test_dirichlet_large_alpha_close_to_global():
  p = partition(Y10, 50, alpha=1000.0, seed=0)
  _check_exact_cover(p, len(Y10))
  q = p.class_histograms / p.sizes[:, None]
  assert np.abs(q - 0.1).max() < 0.03  # every client ~ the global distribution
  s = p.stats()
  assert s["entropy"] > 0.99 * np.log(10) and s["classes_per_client"] == 10
  assert p.sizes.min() > 0.9 * 400 and p.sizes.max() < 1.1 * 400


def test_dirichlet_small_alpha_matches_dirichlet_concentration():
  """Without the balancing rule and with many clients, a client's class mix is ~ Dir(alpha)
  over classes, whose expected Simpson concentration is (a+1)/(K a+1) (0.55 for a=0.1, K=10)
  and expected top-1 share ~0.665 (Monte Carlo of Dir(0.1) draws)."""
  a, k = 0.1, 10
  conc = np.mean([partition(Y10, 50, alpha=a, seed=s, balance=False, min_size=0)
                  .stats()["concentration"] for s in range(4)])
  assert abs(conc - (a + 1) / (k * a + 1)) < 0.06
  mc = np.random.default_rng(0).dirichlet(np.full(k, a), 20000)
  top1 = np.mean([partition(Y10, 50, alpha=a, seed=s, balance=False, min_size=0)
                  .stats()["top1_share"] for s in range(4)])
  assert abs(top1 - mc.max(1).mean()) < 0.06
  # The study's rule (balance=True) keeps clients concentrated: most dominated by few classes.
  p = partition(Y10, 50, alpha=a, seed=0)
  q = p.class_histograms / p.sizes[:, None]
  assert np.mean(q.max(1) > 0.5) > 0.6
  assert p.stats()["concentration"] > 0.45
  assert p.stats()["entropy"] < 0.5 * np.log(k)


def test_dirichlet_balancing_rule_and_min_size():
  """A client already holding >= N/num_clients examples receives nothing of later classes."""
  y = np.repeat(np.arange(20), 300)
  for seed in range(3):
    p = partition(y, 16, alpha=0.1, seed=seed, min_size=10)
    _check_exact_cover(p, len(y))
    assert p.sizes.min() >= 10
    cap = len(y) / 16
    held = np.cumsum(p.class_histograms, axis=1) - p.class_histograms  # before class c
    assert np.all(p.class_histograms[held >= cap] == 0)
    unbal = partition(y, 16, alpha=0.1, seed=seed, balance=False)
    assert p.sizes.max() <= cap + 300 and unbal.sizes.max() >= p.sizes.max() * 0.8


def test_dirichlet_redraws_bounded():
  y = np.repeat(np.arange(10), 100)
  with pytest.raises(ValueError, match="max_redraws=3.*min_size=40"):
    partition(y, 25, alpha=0.01, min_size=40, max_redraws=3)
  with pytest.raises(ValueError, match="min_size=11 x num_clients=100"):
    partition(y, 100, alpha=0.5, min_size=11)


def test_shards_k_classes_per_client():
  y = np.repeat(np.arange(10), 100)  # 100 shards of 10: each shard is one class
  p = partition(y, 50, method="shards", shards_per_client=2, seed=1)
  _check_exact_cover(p, len(y))
  assert ((p.class_histograms > 0).sum(1) <= 2).all()
  assert (p.sizes == 20).all()
  with pytest.raises(ValueError, match="shards_per_client"):
    partition(y, 50, method="shards", shards_per_client=30)


def test_bad_inputs_name_the_parameter():
  y = np.arange(10) % 3
  with pytest.raises(ValueError, match="alpha"):
    partition(y, 2, alpha=0.0)
  with pytest.raises(ValueError, match="alpha"):
    partition(y, 2, alpha=-1.0)
  with pytest.raises(ValueError, match="num_clients=11"):
    partition(y, 11)
  with pytest.raises(ValueError, match="num_clients"):
    partition(y, 0)
  with pytest.raises(ValueError, match="method='pathological'"):
    partition(y, 2, method="pathological")
  with pytest.raises(ValueError, match="labels"):
    partition(np.zeros((3, 2), int), 2)
  with pytest.raises(ValueError, match="num_classes=2"):
    partition(y, 2, num_classes=2)


def test_json_summary_roundtrip():
  p = partition(Y10[::10], 8, alpha=0.5, seed=3)
  d = json.loads(json.dumps(p.to_json(include_indices=True)))
  assert d["sizes"] == p.sizes.tolist() and len(d["class_histograms"]) == 8
  assert "\n" not in p.summary() and "entropy" in p.summary()
  q = Partition.from_json(d)
  assert all(np.array_equal(a, b) for a, b in zip(p.client_indices, q.client_indices))
  np.testing.assert_array_equal(q.class_histograms, p.class_histograms)
  assert "client_indices" not in p.to_json()
