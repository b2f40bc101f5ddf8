"""Client partitioners (iid, the study's Dirichlet rule, label shards) with statistics, and
per-client local test sets distributed like each client's training data (`partition_test`).

Why host-side NumPy: a partition is drawn once per run, depends only on the labels, and its
histograms are saved with the run; the device only ever sees the padded index matrix
(`client_data`).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Optional

import numpy as np

from fedpeft_jax.choices import one_of

METHODS = ("iid", "dirichlet", "shards")


def check_method(method: str) -> str:
  """data.partition: one of METHODS."""
  return one_of("data.partition", method, METHODS)


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
  """One index array per client (sorted int64 into the split it was drawn from: the training
  set for `partition`, the test set for `partition_test`) plus statistics."""
  client_indices: list[np.ndarray]
  num_classes: int
  method: str
  params: dict[str, Any]
  class_histograms: np.ndarray  # int64 [clients, classes]
  redraws: int = 0  # Dirichlet draws rejected for violating min_size

  @property
  def num_clients(self) -> int:
    return len(self.client_indices)

  @property
  def sizes(self) -> np.ndarray:
    return np.array([len(i) for i in self.client_indices], np.int64)

  @property
  def num_examples(self) -> int:
    return int(self.sizes.sum())

  def stats(self) -> dict[str, float]:
    """Heterogeneity statistics of the per-client class distributions.

    entropy: mean per-client class entropy in nats (log K when every client sees all classes
    equally, 0 when each client holds one class); effective_classes: mean exp(entropy);
    top1_share: mean share of a client's most frequent class; concentration: mean sum of
    squared class shares (Simpson index; E = (a+1)/(K a+1) for a Dir(a) draw over K classes);
    tv_to_global: mean total-variation distance to the global class distribution.
    """
    h = self.class_histograms.astype(np.float64)
    sizes = h.sum(1)
    q = h / np.maximum(sizes, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
      ent = -np.where(q > 0, q * np.log(q), 0.0).sum(1)
    g = h.sum(0) / max(h.sum(), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
      g_ent = float(-np.where(g > 0, g * np.log(g), 0.0).sum())
    return {
        "num_clients": self.num_clients, "num_examples": self.num_examples,
        "size_min": int(sizes.min()), "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()), "entropy": float(ent.mean()), "global_entropy": g_ent,
        "effective_classes": float(np.exp(ent).mean()), "top1_share": float(q.max(1).mean()),
        "concentration": float((q ** 2).sum(1).mean()),
        "tv_to_global": float(0.5 * np.abs(q - g).sum(1).mean()),
        "classes_per_client": float((h > 0).sum(1).mean()),
    }

  def summary(self) -> str:
    """One line: the method, sizes and how heterogeneous the clients are."""
    s = self.stats()
    p = ", ".join(f"{k}={v}" for k, v in self.params.items())
    return (f"{self.method}({p}): {s['num_clients']} clients, {s['num_examples']} examples, "
            f"sizes {s['size_min']}/{s['size_median']:g}/{s['size_max']} (min/median/max), "
            f"class entropy {s['entropy']:.3f} nats (global {s['global_entropy']:.3f}), "
            f"{s['effective_classes']:.2f} effective / {s['classes_per_client']:.1f} present "
            f"classes per client, top-1 share {s['top1_share']:.2f}")

  def to_json(self, include_indices: bool = False) -> dict[str, Any]:
    """JSON-serialisable record for the run directory (indices optional: they can be big)."""
    d: dict[str, Any] = {
        "method": self.method, "params": dict(self.params), "num_classes": self.num_classes,
        "redraws": self.redraws, "sizes": self.sizes.tolist(),
        "class_histograms": self.class_histograms.tolist(), "stats": self.stats(),
        "summary": self.summary(),
    }
    if include_indices:
      d["client_indices"] = [i.tolist() for i in self.client_indices]
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Partition":
    if "client_indices" not in d:
      raise ValueError("this partition record was saved without include_indices=True")
    return cls([np.asarray(i, np.int64) for i in d["client_indices"]], int(d["num_classes"]),
               d["method"], dict(d["params"]), np.asarray(d["class_histograms"], np.int64),
               int(d.get("redraws", 0)))


def partition(labels: Any, num_clients: int, method: str = "dirichlet", alpha: float = 0.1,
              min_size: int = 10, seed: int = 0, shards_per_client: int = 2,
              num_classes: Optional[int] = None, balance: bool = True,
              max_redraws: int = 1000) -> Partition:
  """Split example indices 0..N-1 across `num_clients`; every example goes to exactly one.

  iid: shuffled equal split (sizes differ by at most one).
  dirichlet: the study's rule: for each class in turn, proportions ~ Dir(alpha) over clients,
    clients already holding more than N/num_clients get none of it (`balance`), redraw the
    whole partition until every client has >= min_size examples (at most `max_redraws` times).
  shards: sort by label, cut into num_clients * shards_per_client equal shards, give each
    client `shards_per_client` random shards (McMahan et al.'s pathological split).
  Deterministic from `seed`.
  """
  y = np.asarray(labels)
  if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
    raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
  n = len(y)
  if y.size and y.min() < 0:
    raise ValueError("labels must be >= 0")
  k = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if n else 0)
  if n and y.max() >= k:
    raise ValueError(f"num_classes={k} but labels go up to {int(y.max())}")
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
  if num_clients > n:
    raise ValueError(f"num_clients={num_clients} exceeds the number of examples ({n})")
  check_method(method)
  rng = np.random.default_rng(seed)
  redraws = 0
  if method == "iid":
    parts = np.array_split(rng.permutation(n), num_clients)
    params: dict[str, Any] = {"seed": seed}
  elif method == "shards":
    if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
      raise ValueError(f"shards_per_client must be a positive int, got {shards_per_client!r}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
      raise ValueError(f"num_clients * shards_per_client = {num_shards} shards exceed the "
                       f"{n} examples; lower shards_per_client")
    # Shuffle before the stable sort so the examples inside a class are in random order.
    perm = rng.permutation(n)
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, num_shards)
    pick = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    parts = [np.concatenate([shards[s] for s in row]) for row in pick]
    params = {"shards_per_client": shards_per_client, "seed": seed}
  else:
    parts, redraws = _dirichlet(y, k, num_clients, alpha, min_size, balance, max_redraws, rng)
    params = {"alpha": alpha, "min_size": min_size, "balance": balance, "seed": seed}
  parts = [np.sort(np.asarray(p, np.int64)) for p in parts]
  hist = np.stack([np.bincount(y[p], minlength=k) for p in parts]).astype(np.int64)
  return Partition(parts, k, method, params, hist, redraws)


def _dirichlet(y: np.ndarray, k: int, num_clients: int, alpha: float, min_size: int,
               balance: bool, max_redraws: int, rng: np.random.Generator
               ) -> tuple[list[np.ndarray], int]:
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be > 0 (smaller = more non-IID), got {alpha!r}")
  if not isinstance(min_size, (int, np.integer)) or min_size < 0:
    raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
  n = len(y)
  if min_size * num_clients > n:
    raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds the {n} "
                     "examples; no partition can satisfy it")
  by_class = [np.flatnonzero(y == c) for c in range(k)]
  cap = n / num_clients
  for attempt in range(max_redraws + 1):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    held = np.zeros(num_clients, np.int64)
    for c in range(k):  # classes in order, as in the study's code
      idx = rng.permutation(by_class[c])
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      if balance:
        p = np.where(held < cap, p, 0.0)
      total = p.sum()
      if not np.isfinite(total) or total <= 0:
        # Every open client drew ~0 (tiny alpha underflow): fall back to uniform over them.
        p = (held < cap).astype(np.float64) if balance else np.ones(num_clients)
        total = p.sum()
      cdf = np.cumsum(p) / total
      cdf[np.flatnonzero(p)[-1]:] = 1.0  # no round-off crumbs for trailing closed clients
      cuts = (cdf * len(idx)).astype(np.int64)[:-1]
      for j, chunk in enumerate(np.split(idx, cuts)):
        parts[j].append(chunk)
        held[j] += len(chunk)
    if held.min() >= min_size:
      return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts], attempt
  raise ValueError(
      f"dirichlet partition: after max_redraws={max_redraws} redraws some client still holds "
      f"fewer than min_size={min_size} examples (alpha={alpha}, num_clients={num_clients}, "
      f"N={n}); lower min_size or num_clients, or raise alpha")


_TEST_STREAM = 0x7E57  # own RNG stream: a test draw never replays the train partition's draws


def largest_remainder(total: int, weights: Any) -> np.ndarray:
  """Integers q >= 0 summing to `total` with |q_c - total * w_c / sum(w)| < 1 (Hamilton's
  largest-remainder rounding): floors first, then +1 to the largest fractional parts, ties to
  the lower index.

  Why integer arithmetic: the weights are counts, so total * w_c // W and its remainder are
  exact; float shares could misorder equal remainders and make the result platform-dependent.
  """
  w = np.asarray(weights, np.int64)
  if w.ndim != 1 or (w.size and w.min() < 0):
    raise ValueError(f"weights must be a 1-D array of non-negative counts, got {w}")
  big = int(w.sum())
  if total < 0 or (total and not big):
    raise ValueError(f"cannot split total={total} over weights summing to {big}")
  if not total:
    return np.zeros(len(w), np.int64)
  q, rem = np.divmod(int(total) * w, big)
  short = int(total) - int(q.sum())
  q[np.argsort(-rem, kind="stable")[:short]] += 1
  return q


def validation_count(size: float, num_examples: int) -> int:
  """`data.val_size` as a number of examples: a fraction of `num_examples` in (0, 1) (rounded
  to the nearest), or a count >= 1; 0 = no validation split."""
  if size < 0 or (size >= 1 and size != int(size)):
    raise ValueError(f"val_size={size!r}: give a fraction in (0, 1), a whole count, or 0")
  count = int(round(size * num_examples)) if size < 1 else int(size)
  if size and not count:
    raise ValueError(f"val_size={size!r} holds out no example of {num_examples}: give a larger "
                     "fraction or a count")
  if count >= num_examples:
    raise ValueError(f"val_size={size!r} holds out {count} of {num_examples} training examples;"
                     " leave some for the clients")
  return count


def hold_out(labels: Any, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held_out): sorted indices of `labels`, `count` of them held out, stratified.

  Each class gives the held-out set its share of `count` (largest-remainder rounding of
  count x class size / N), drawn without replacement from the class's examples with
  `seed`. Held out before clients are partitioned, so no client ever holds a held-out
  example; it depends only on the labels and the seed, so every method of a seed sees the
  same split.
  """
  y = np.asarray(labels)
  if y.ndim != 1 or not 0 <= count < len(y):
    raise ValueError(f"cannot hold out {count} of {len(y)} examples")
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(y, return_counts=True)
  shares = largest_remainder(count, counts)
  held = [rng.choice(np.flatnonzero(y == c), size=int(k), replace=False)
          for c, k in zip(classes, shares)]
  held_out = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
  kept = np.setdiff1d(np.arange(len(y)), held_out)
  return kept, held_out


def partition_test(test_labels: Any, train_partition: Partition, size_per_client: int = 0,
                   seed: int = 0, replace: bool = False) -> Partition:
  """Per-client local test sets drawn from the test split with each client's training class
  proportions, for personalised evaluation (each client scored on data distributed like its
  own, as in the personalised-FL study).

  Sizes: with `size_per_client` = 0 (default) a client's share of the test split follows its
    share of the training set: the largest-remainder rounding of N_test * n_i / N_train
    (sums to N_test), raised to 1 for a client with any training data. With
    `size_per_client` > 0 every client with training data gets exactly that many. A client
    with no training data gets an empty test set.
  Classes: client i's class counts are the largest-remainder rounding of size_i * p_ic, p_ic
    its training class proportions (`train_partition.class_histograms`): the closest
    integers to size_i * p_ic that sum to size_i.
  Sampling: without replacement within a client (no example counted twice in one client's
    accuracy), independently across clients (test splits are small; clients may share test
    examples, so the union is not a partition of the test split). `replace=True` draws with
    replacement within a client, for sizes larger than the test split holds.
  Errors: a class some client trains on but the test split lacks, or (without replacement) a
    client asking more examples of a class than the test split holds.
  Deterministic from `seed`; client i's draw depends only on (seed, i) and its own counts.

  Returns a `Partition` over the test split (method "test"), so its statistics, JSON record
  and the padded device layout work unchanged: `client_data(as_test_source(dataset), part)`.
  """
  y = np.asarray(test_labels)
  if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
    raise ValueError(f"data.partition_test: test_labels must be a 1-D integer array, got "
                     f"{y.dtype} {y.shape}")
  if getattr(train_partition, "class_histograms", None) is None:
    raise ValueError("data.partition_test: train_partition must be the training Partition "
                     f"(from partition(...)), got {type(train_partition).__name__}")
  k = int(train_partition.num_classes)
  if y.size and (y.min() < 0 or y.max() >= k):
    raise ValueError(f"data.partition_test: test_labels must lie in [0, {k}) like the training "
                     f"partition's classes, got [{int(y.min())}, {int(y.max())}]; apply the "
                     "same class selection (data.classes) to both splits")
  if (not isinstance(size_per_client, (int, np.integer)) or isinstance(size_per_client, bool)
      or size_per_client < 0):
    raise ValueError(f"data.partition_test: size_per_client must be an int >= 0 (0 = "
                     f"proportional to the client's training size), got {size_per_client!r}")
  hist = np.asarray(train_partition.class_histograms, np.int64)
  n_train = hist.sum(1)
  avail = np.bincount(y, minlength=k).astype(np.int64)
  missing = np.flatnonzero((hist.sum(0) > 0) & (avail == 0))
  if missing.size:
    c = int(missing[0])
    raise ValueError(f"data.partition_test: class {c} is in {int((hist[:, c] > 0).sum())} "
                     f"clients' training data but not in the test split (classes missing: "
                     f"{missing.tolist()}); use the same class selection (data.classes) for "
                     "train and test, or a test split that holds every trained class")
  if size_per_client:
    sizes = np.where(n_train > 0, int(size_per_client), 0).astype(np.int64)
  else:
    sizes = largest_remainder(len(y), n_train) if n_train.sum() else np.zeros_like(n_train)
    sizes = np.where(n_train > 0, np.maximum(sizes, 1), 0)
  by_class = [np.flatnonzero(y == c) for c in range(k)]
  parts, test_hist = [], np.zeros_like(hist)
  for i in range(len(hist)):
    counts = largest_remainder(int(sizes[i]), hist[i]) if sizes[i] else np.zeros(k, np.int64)
    over = np.flatnonzero(counts > avail)
    if over.size and not replace:
      c = int(over[0])
      raise ValueError(f"data.partition_test: client {i} needs {int(counts[c])} test examples "
                       f"of class {c} but the test split holds {int(avail[c])}; lower "
                       "size_per_client or pass replace=True")
    rng = np.random.default_rng([seed, _TEST_STREAM, i])
    draw = [rng.choice(by_class[c], int(counts[c]), replace=replace)
            for c in np.flatnonzero(counts)]
    parts.append(np.sort(np.concatenate(draw).astype(np.int64)) if draw
                 else np.zeros(0, np.int64))
    test_hist[i] = counts
  params = {"size_per_client": int(size_per_client), "replace": bool(replace), "seed": seed,
            "train": train_partition.method}
  return Partition(parts, k, "test", params, test_hist)


def as_test_source(dataset: Any) -> Any:
  """The test split under the train_* names `client_data` reads, so per-client test sets
  reuse the padded device layout: `client_data(as_test_source(ds), partition_test(...))`."""
  return types.SimpleNamespace(train_images=dataset.test_images,
                               train_labels=dataset.test_labels)
