"""Partitioners: every example once, determinism, the study's Dirichlet rule and its
statistics against the Dirichlet distribution, iid/shards, and bad inputs; per-client test
sets (`partition_test`) against an exact Fraction re-derivation of largest-remainder rounding."""

import functools
import json
from fractions import Fraction

import numpy as np
import pytest

from fedpeft_jax.data import (
  Partition,
  as_test_source,
  client_data,
  load_dataset,
  partition,
  partition_test,
)
from fedpeft_jax.data.partitioning import largest_remainder

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
  with pytest.raises(ValueError, match="data.partition: 'pathological'; allowed: iid, dirichlet, shards"):
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


# ----------------------------------------------------------------------------- partition_test


def _lr_ref(total: int, weights) -> np.ndarray:
  """Largest remainder with exact rationals: floors of total * w / W, then +1 to the largest
  fractional parts, ties to the lower index."""
  w = [int(v) for v in weights]
  big = sum(w)
  if not total:
    return np.zeros(len(w), np.int64)
  share = [Fraction(total * v, big) for v in w]
  q = [int(s // 1) for s in share]
  order = sorted(range(len(w)), key=lambda c: (-(share[c] - q[c]), c))
  for c in order[:total - sum(q)]:
    q[c] += 1
  return np.array(q, np.int64)


def _expected_sizes(train: Partition, n_test: int, size_per_client: int) -> np.ndarray:
  n = train.sizes
  if size_per_client:
    return np.where(n > 0, size_per_client, 0)
  return np.where(n > 0, np.maximum(_lr_ref(n_test, n), 1), 0)


def _check_test_partition(test: Partition, train: Partition, y_test: np.ndarray,
                          size_per_client: int) -> None:
  sizes = _expected_sizes(train, len(y_test), size_per_client)
  np.testing.assert_array_equal(test.sizes, sizes)
  assert test.num_clients == train.num_clients and test.num_classes == train.num_classes
  for i, idx in enumerate(test.client_indices):
    want = _lr_ref(int(sizes[i]), train.class_histograms[i]) if sizes[i] else 0 * sizes[:0]
    got = np.bincount(y_test[idx], minlength=train.num_classes)
    if sizes[i]:
      np.testing.assert_array_equal(got, want)
      p = train.class_histograms[i] / train.sizes[i]
      assert np.abs(got - sizes[i] * p).max() < 1  # the closest integers to size * p
    else:
      assert idx.size == 0 and idx.dtype == np.int64
    np.testing.assert_array_equal(test.class_histograms[i], got)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats in a client
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < len(y_test))


def test_largest_remainder_exact_and_ties():
  assert largest_remainder(2, [1, 1, 1]).tolist() == [1, 1, 0]  # round() would give 3
  assert largest_remainder(1, [1, 1]).tolist() == [1, 0]
  assert largest_remainder(10, [3, 0, 7]).tolist() == [3, 0, 7]
  assert largest_remainder(0, [0, 0]).tolist() == [0, 0]
  rng = np.random.default_rng(0)
  for _ in range(300):
    w = rng.integers(0, 50, rng.integers(1, 12)) * rng.integers(0, 2, 1)
    w[rng.integers(len(w))] += 1
    t = int(rng.integers(0, 200))
    np.testing.assert_array_equal(largest_remainder(t, w), _lr_ref(t, w))
  with pytest.raises(ValueError, match="total=3"):
    largest_remainder(3, [0, 0])


@functools.lru_cache(maxsize=1)
def _digits():
  return load_dataset("digits")


@pytest.mark.parametrize("size_per_client", [0, 9])
def test_partition_test_digits_dirichlet(size_per_client):
  ds = _digits()
  train = partition(ds.train_labels, 20, alpha=0.1, seed=3, min_size=5)
  test = partition_test(ds.test_labels, train, size_per_client=size_per_client, seed=1)
  _check_test_partition(test, train, ds.test_labels, size_per_client)
  if not size_per_client:
    assert abs(test.num_examples - len(ds.test_labels)) <= train.num_clients
  assert test.method == "test" and test.params["train"] == "dirichlet"
  assert test.summary().startswith(f"test(size_per_client={size_per_client}")
  # Personalised: each client's test mix is its training mix, not the global one.
  assert test.stats()["tv_to_global"] > 0.4
  assert abs(test.stats()["tv_to_global"] - train.stats()["tv_to_global"]) < 0.1


@pytest.mark.parametrize("size_per_client", [0, 25])
def test_partition_test_synthetic_labels_and_seeds(size_per_client):
  rng = np.random.default_rng(4)
  y_train, y_test = rng.integers(0, 7, 4000), rng.integers(0, 7, 900)
  train = partition(y_train, 30, alpha=0.1, seed=2, min_size=3)
  a = partition_test(y_test, train, size_per_client=size_per_client, seed=5)
  _check_test_partition(a, train, y_test, size_per_client)
  b = partition_test(y_test, train, size_per_client=size_per_client, seed=5)
  assert all(np.array_equal(u, v) for u, v in zip(a.client_indices, b.client_indices))
  c = partition_test(y_test, train, size_per_client=size_per_client, seed=6)
  _check_test_partition(c, train, y_test, size_per_client)
  assert not all(np.array_equal(u, v) for u, v in zip(a.client_indices, c.client_indices))
  assert sum(not np.array_equal(u, v) for u, v in zip(a.client_indices, c.client_indices)) > 20
  d = json.loads(json.dumps(a.to_json(include_indices=True)))
  assert all(np.array_equal(u, v) for u, v in zip(a.client_indices,
                                                  Partition.from_json(d).client_indices))


def _manual(y: np.ndarray, parts: list, k: int) -> Partition:
  parts = [np.asarray(p, np.int64) for p in parts]
  hist = np.stack([np.bincount(y[p], minlength=k) for p in parts]).astype(np.int64)
  return Partition(parts, k, "manual", {}, hist)


def test_partition_test_empty_clients_and_independent_draws():
  y_train = np.repeat(np.arange(4), 50)
  y_test = np.repeat(np.arange(4), 30)
  a = _manual(y_train, [np.arange(0, 40), [], np.arange(40, 43), np.arange(43, 200)], 4)
  for spc in (0, 6):
    t = partition_test(y_test, a, size_per_client=spc, seed=0)
    _check_test_partition(t, a, y_test, spc)
    assert t.sizes[1] == 0 and t.sizes[2] >= 1
  # Client 0's test set depends only on (seed, 0) and its own counts, not on the others.
  b = _manual(y_train, [np.arange(0, 40), np.arange(60, 200)], 4)
  ta = partition_test(y_test, a, size_per_client=10, seed=3)
  tb = partition_test(y_test, b, size_per_client=10, seed=3)
  np.testing.assert_array_equal(ta.client_indices[0], tb.client_indices[0])
  tc = partition_test(y_test, _manual(y_train, [[], np.arange(60, 200)], 4), 10, seed=3)
  np.testing.assert_array_equal(tb.client_indices[1], tc.client_indices[1])
  # A client whose proportional share rounds to 0 still gets one example.
  small = _manual(y_train, [np.arange(0, 199), [199]], 4)
  t = partition_test(y_test[::3], small, seed=0)
  _check_test_partition(t, small, y_test[::3], 0)
  assert t.sizes.tolist() == [40, 1]
  # Every client with nothing: all test sets empty (proportional sizes of nothing).
  z = Partition([np.zeros(0, np.int64)] * 3, 4, "manual", {}, np.zeros((3, 4), np.int64))
  assert partition_test(y_test, z).sizes.tolist() == [0, 0, 0]


def test_partition_test_replace_and_errors():
  y_train = np.repeat(np.arange(3), 40)
  y_test = np.array([0] * 5 + [1] * 20 + [2] * 20)
  one_class = _manual(y_train, [np.arange(0, 40), np.arange(40, 120)], 3)
  with pytest.raises(ValueError, match="client 0 needs 12 test examples of class 0 but the "
                     "test split holds 5.*size_per_client.*replace=True"):
    partition_test(y_test, one_class, size_per_client=12)
  t = partition_test(y_test, one_class, size_per_client=12, replace=True, seed=0)
  idx = t.client_indices[0]
  assert len(idx) == 12 and set(idx.tolist()) <= set(range(5))  # repeats: only 5 exist
  np.testing.assert_array_equal(t.class_histograms[0], [12, 0, 0])
  with pytest.raises(ValueError, match="class 2 is in 1 clients' training data but not in the "
                     r"test split \(classes missing: \[2\]\)"):
    partition_test(np.array([0, 1, 1, 0]), one_class)
  with pytest.raises(ValueError, match="data.partition_test: size_per_client"):
    partition_test(y_test, one_class, size_per_client=-1)
  with pytest.raises(ValueError, match="data.partition_test: size_per_client"):
    partition_test(y_test, one_class, size_per_client=2.5)
  with pytest.raises(ValueError, match=r"data.partition_test: test_labels must lie in \[0, 3\)"):
    partition_test(np.array([0, 3]), one_class)
  with pytest.raises(ValueError, match="data.partition_test: train_partition"):
    partition_test(y_test, one_class.client_indices)


def test_partition_test_client_data_layout():
  """The padded device layout of the training engine serves the test sets unchanged."""
  ds = _digits()
  train = partition(ds.train_labels, 8, alpha=0.1, seed=0, min_size=5)
  test = partition_test(ds.test_labels, train, seed=0)
  cd = client_data(as_test_source(ds), test)
  assert cd.images.shape == ds.test_images.shape and cd.num_clients == 8
  np.testing.assert_array_equal(np.asarray(cd.sizes), test.sizes)
  for i, idx in enumerate(test.client_indices):
    x, y = cd.batch(i, np.arange(len(idx)))
    np.testing.assert_array_equal(np.asarray(y), ds.test_labels[idx])
    np.testing.assert_array_equal(np.asarray(x), ds.test_images[idx])
    np.testing.assert_array_equal(np.bincount(np.asarray(y), minlength=10),
                                  test.class_histograms[i])
