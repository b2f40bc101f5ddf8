"""Datasets (Fashion-MNIST IDX, digits, synthetic, TFDS via data_source: mocked and a real
ArrayRecord build), on-device preprocessing, device-resident client data and schedules.

No TensorFlow and no internet: TFDS reads go through tfds.testing.mock_data or a tiny builder
prepared here from NumPy features (writing ArrayRecord needs no TensorFlow).
"""

import gzip
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedpeft_jax import data as D
from fedpeft_jax.data import idx, prepare
from fedpeft_jax.data.preprocess import resize, resize_dense, resize_gathered, resize_taps

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed (.ci/run installs it)")


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_real_files():
  ds = D.load_dataset("fashion_mnist")
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.num_classes == 10 and ds.augment == "flip" and len(ds.class_names) == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  assert ds.train_images.min() == 0 and ds.train_images.max() == 255
  # Known first labels of the published files (train: Ankle boot, T-shirt, T-shirt, Dress).
  np.testing.assert_array_equal(ds.train_labels[:4], [9, 0, 0, 3])
  np.testing.assert_array_equal(ds.test_labels[:4], [9, 2, 1, 1])
  sub = D.load_dataset("fashion_mnist", train_size=1000, seed=1)
  assert sub.num_train == 1000 and len(np.unique(sub.train_images.reshape(1000, -1), axis=0)) > 990


def test_fashion_mnist_missing_dir_error(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as e:
    D.load_dataset("fashion_mnist", data_dir=missing)
  msg = str(e.value)
  assert "dataset-fashion-mnist" in msg and missing in msg and "train-images-idx3-ubyte.gz" in msg


def test_idx_reader_synthetic_file_and_truncation(tmp_path):
  arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  header = bytes([0, 0, 0x08, 3]) + np.array(arr.shape, ">u4").tobytes()
  p = tmp_path / "x-idx3-ubyte.gz"
  with gzip.open(p, "wb") as f:
    f.write(header + arr.tobytes())
  np.testing.assert_array_equal(idx.read_idx(str(p)), arr)
  q = tmp_path / "y-idx3-ubyte"
  q.write_bytes(header + arr.tobytes()[:-1])
  with pytest.raises(ValueError, match="truncated"):
    idx.read_idx(str(q))
  q.write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    idx.read_idx(str(q))


@needs_fmnist
def test_fetch_fashion_mnist_checks_md5(tmp_path):
  mirror = "file://" + FMNIST
  # The Debian package recompresses the files, so the official MD5 must reject them.
  with pytest.raises(ValueError, match="does not match the official"):
    idx.fetch_fashion_mnist(str(tmp_path / "a"), mirror)
  assert not any(f.endswith(".gz") for f in os.listdir(tmp_path / "a"))
  good = {f: idx.md5sum(os.path.join(FMNIST, f)) for f in idx.FASHION_MNIST_MD5}
  paths = idx.fetch_fashion_mnist(str(tmp_path / "b"), mirror, checksums=good)
  assert len(paths) == 4
  x, y, _, _ = idx.load_fashion_mnist(str(tmp_path / "b"))
  assert x.shape == (60000, 28, 28, 1) and y.shape == (60000,)


# ----------------------------------------------------------------------------- digits, synthetic


def test_digits_fixed_split_and_resolution():
  ds = D.load_dataset("digits")
  assert ds.train_images.shape == (1437, 32, 32, 1) and ds.test_images.shape == (360, 32, 32, 1)
  assert ds.num_classes == 10 and ds.augment == "none"
  assert abs(np.bincount(ds.test_labels) - 36).max() <= 1  # stratified
  other = D.load_dataset("digits", seed=7, resolution=16)
  assert other.train_images.shape[1:] == (16, 16, 1)
  np.testing.assert_array_equal(other.test_labels, ds.test_labels)  # split independent of seed
  sub = D.load_dataset("digits", train_size=100, seed=3)
  sub2 = D.load_dataset("digits", train_size=100, seed=3)
  np.testing.assert_array_equal(sub.train_images, sub2.train_images)
  rep = D.load_dataset("digits", train_size=2000, sample_with_replacement=True)
  assert rep.num_train == 2000
  with pytest.raises(ValueError, match="train_size=2000"):
    D.load_dataset("digits", train_size=2000)
  with pytest.raises(ValueError, match="train_size"):
    D.load_dataset("digits", train_size=0)


def test_synthetic_deterministic_and_learnable():
  a = D.load_dataset("synthetic", seed=4, num_classes=5, num_train=500, num_test=100,
                     resolution=16)
  b = D.load_dataset("synthetic", seed=4, num_classes=5, num_train=500, num_test=100,
                     resolution=16)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert a.train_images.shape == (500, 16, 16, 3) and a.num_classes == 5
  c = D.load_dataset("synthetic", seed=5, num_classes=5, num_train=500, num_test=100,
                     resolution=16)
  assert not np.array_equal(a.train_images, c.train_images)
  # Nearest class mean reaches high test accuracy: the classes carry real signal.
  x = a.train_images.reshape(500, -1).astype(np.float32)
  means = np.stack([x[a.train_labels == k].mean(0) for k in range(5)])
  xt = a.test_images.reshape(100, -1).astype(np.float32)
  pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), 1)
  assert (pred == a.test_labels).mean() > 0.9


def test_load_dataset_bad_inputs():
  with pytest.raises(TypeError, match="resolutoin"):
    D.load_dataset("digits", resolutoin=16)
  with pytest.raises(ValueError, match="name='no_such_dataset_xyz'"):
    D.load_dataset("no_such_dataset_xyz", data_dir="/tmp")
  with pytest.raises(ValueError, match="augment"):
    D.load_dataset("digits", augment="rotate")
  names = D.list_datasets()
  for n in ("digits", "fashion_mnist", "synthetic", "cifar100", "resisc45", "patch_camelyon",
            "eurosat/rgb", "oxford_flowers102", "cifar10"):
    assert n in names


# ----------------------------------------------------------------------------- class subsets


def _rederive(x, y, ids):
  """NumPy reference for a class subset: the kept examples in order, labels mapped to 0..k-1."""
  keep = np.isin(y, ids)
  new = np.searchsorted(np.sort(ids), y[keep])  # rank among the sorted ids ...
  new = np.argsort(ids)[new]  # ... -> position in the given order
  return x[keep], new.astype(np.int32)


def test_parse_classes():
  assert D.parse_classes(None) is None and D.parse_classes("") is None
  assert D.parse_classes("   ") is None
  assert D.parse_classes("5,6,7,8,9") == (5, 6, 7, 8, 9)
  assert D.parse_classes(" 7, 5 ") == (7, 5)  # order is kept: 7 -> 0, 5 -> 1
  assert D.parse_classes((3, 1)) == (3, 1) and D.parse_classes([0]) == (0,)
  assert D.parse_classes(np.array([2, 0])) == (2, 0)
  for bad in ("5,x", "5,,6", "5,6,", "1.5", "-1", "3,3", (), [1.5], [True], 5, b"1,2"):
    with pytest.raises(ValueError, match="data.classes"):
      D.parse_classes(bad)


@needs_fmnist
@pytest.mark.parametrize("ids", [(5, 6, 7, 8, 9), (0, 1, 2, 3, 4), (9, 2, 5)])
def test_classes_fashion_mnist_against_numpy(ids):
  full = D.load_dataset("fashion_mnist")
  ds = D.load_dataset("fashion_mnist", classes=",".join(map(str, ids)))
  assert ds.num_classes == len(ids) and ds.info["classes"] == list(ids)
  assert ds.class_names == tuple(full.class_names[c] for c in ids)
  for split, per_class in (("train", 6000), ("test", 1000)):
    x, y = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
    fx, fy = getattr(full, f"{split}_images"), getattr(full, f"{split}_labels")
    rx, ry = _rederive(fx, fy, ids)
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y, minlength=len(ids)), [per_class] * len(ids))
    # Relabelled labels are the original ones mapped: ids[new] == original.
    np.testing.assert_array_equal(np.asarray(ids)[y], fy[np.isin(fy, ids)])
  p = D.partition(ds.train_labels, 8, alpha=0.5, seed=0)
  assert p.num_classes == len(ids) and p.num_examples == len(ids) * 6000


@needs_fmnist
def test_classes_then_train_size_fashion_mnist():
  full = D.load_dataset("fashion_mnist")
  sub = D.load_dataset("fashion_mnist", classes=(5, 6, 7, 8, 9), train_size=1000, seed=3)
  assert sub.num_train == 1000 and sub.num_test == 5000 and sub.num_classes == 5
  rx, ry = _rederive(full.train_images, full.train_labels, (5, 6, 7, 8, 9))
  sel = D.subsample_indices(len(ry), 1000, False, 3)  # train_size counts kept examples
  np.testing.assert_array_equal(sub.train_images, rx[sel])
  np.testing.assert_array_equal(sub.train_labels, ry[sel])
  assert sub.info["train_size"] == 1000 and sub.info["classes"] == [5, 6, 7, 8, 9]


def test_classes_digits_against_numpy():
  full = D.load_dataset("digits")
  ids = (7, 3, 0)
  ds = D.load_dataset("digits", classes=list(ids))
  assert ds.num_classes == 3 and ds.class_names == ("7", "3", "0")
  for split in ("train", "test"):
    fx, fy = getattr(full, f"{split}_images"), getattr(full, f"{split}_labels")
    rx, ry = _rederive(fx, fy, ids)
    np.testing.assert_array_equal(getattr(ds, f"{split}_images"), rx)
    np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), ry)
    np.testing.assert_array_equal(np.bincount(getattr(ds, f"{split}_labels"), minlength=3),
                                  np.bincount(fy, minlength=10)[list(ids)])
  same = D.load_dataset("digits", classes="0,1,2,3,4,5,6,7,8,9")  # all, in order: no copy
  np.testing.assert_array_equal(same.train_labels, full.train_labels)
  assert same.num_classes == 10 and same.info["classes"] == list(range(10))
  assert "classes" not in D.load_dataset("digits", classes="").info


def test_classes_bad_ids_and_empty_selection():
  with pytest.raises(ValueError, match=r"data\.classes.*\[10\].*0\.\.9"):
    D.load_dataset("digits", classes="5,10")
  with pytest.raises(ValueError, match="data.classes"):
    D.load_dataset("digits", classes="5,5")
  x = np.zeros((4, 2, 2, 1), np.uint8)
  ds = D.Dataset("toy", x, np.array([0, 0, 1, 1], np.int32), x[:2], np.array([2, 1], np.int32),
                 3)
  with pytest.raises(ValueError, match="no example"):
    D.select_classes(ds, (2,))
  kept = D.select_classes(ds, (2, 1))  # class 2 only in test: allowed
  np.testing.assert_array_equal(kept.train_labels, [1, 1])
  np.testing.assert_array_equal(kept.test_labels, [0, 1])
  assert kept.class_names is None


def test_import_data_does_not_load_tensorflow():
  code = ("import sys, fedpeft_jax.data; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert out.strip() == "[]"


# ----------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name,shape,classes,augment", [
    ("cifar100", (32, 32, 3), 100, "crop_flip"), ("resisc45", (256, 256, 3), 45, "flip")])
def test_tfds_mock_end_to_end(name, shape, classes, augment):
  with tfds.testing.mock_data(num_examples=24):
    ds = D.load_dataset(name, data_dir="/nonexistent/tfds")
  assert ds.train_images.shape == (24,) + shape and ds.test_images.shape == (24,) + shape
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.num_classes == classes and ds.augment == augment
  assert 0 <= ds.train_labels.min() and ds.train_labels.max() < classes
  assert len(ds.class_names) == classes
  x = D.preprocess(ds.train_images[:8], jax.random.PRNGKey(0), image_size=shape[0],
                   augment=ds.augment, train=True)
  assert x.shape == (8,) + shape and x.dtype == jnp.float32
  assert float(x.min()) == -1.0 and 0.9 < float(x.max()) <= 1.0  # mock pixels span ~0..255
  x = D.preprocess(ds.test_images[:2], image_size=224, augment=ds.augment, train=False)
  assert x.shape == (2, 224, 224, 3) and -1.0 <= float(x.min()) < float(x.max()) <= 1.0
  # Partition + device data on the mocked set.
  p = D.partition(ds.train_labels, 3, method="iid")
  cd = D.client_data(ds, p)
  assert cd.images.shape == (24,) + shape and cd.indices.shape == (3, 8)


def test_tfds_mock_variable_size_and_options():
  with tfds.testing.mock_data(num_examples=10):
    ds = D.load_dataset("oxford_flowers102", data_dir="/nonexistent/tfds", resolution=40)
    coarse = D.load_dataset("cifar100", data_dir="/nonexistent/tfds", label_key="coarse_label")
  assert ds.train_images.shape == (10, 40, 40, 3) and ds.num_classes == 102
  assert coarse.num_classes == 20 and coarse.train_labels.max() < 20


def test_tfds_absent_dataset_prints_prepare_command(tmp_path):
  with pytest.raises(D.DatasetNotPreparedError) as e:
    D.load_dataset("cifar100", data_dir=str(tmp_path))
  assert f"python -m fedpeft_jax.data.prepare --dataset=cifar100 --data_dir={tmp_path}" in str(
      e.value)
  with pytest.raises(D.DatasetNotPreparedError, match="manual_dir"):
    D.load_dataset("resisc45", data_dir=str(tmp_path))


class FedpeftTinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (unmocked) TFDS dataset, prepared as ArrayRecord without TensorFlow."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40, 0), "test": self._generate_examples(12, 1)}

  def _generate_examples(self, n, seed):
    for i in range(n):
      yield i, {"image": np.full((8, 8, 3), 5 * i + seed, np.uint8), "label": i % 5}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  FedpeftTinyImages(data_dir=d, file_format="array_record").download_and_prepare(
      file_format="array_record")
  return d


def test_tfds_real_array_record(tiny_dir, tmp_path):
  ds = D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir)
  assert ds.train_images.shape == (40, 8, 8, 3) and ds.test_images.shape == (12, 8, 8, 3)
  assert ds.num_classes == 5 and ds.augment == "flip"
  # Records come back in key order: image value encodes the example id.
  assert sorted(ds.train_images[:, 0, 0, 0].tolist()) == [5 * i for i in range(40)]
  labels_by_id = {int(v) // 5: int(l) for v, l in zip(ds.train_images[:, 0, 0, 0],
                                                       ds.train_labels)}
  assert all(l == i % 5 for i, l in labels_by_id.items())
  sub = D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, train_size=10, seed=2,
                       test_size=5, cache_dir=str(tmp_path))
  assert sub.num_train == 10 and sub.num_test == 5
  assert len(np.unique(sub.train_images[:, 0, 0, 0])) == 10  # without replacement
  assert len(os.listdir(tmp_path)) == 2
  again = D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, train_size=10, seed=2,
                         test_size=5, cache_dir=str(tmp_path))  # from the cache
  np.testing.assert_array_equal(again.train_images, sub.train_images)
  rep = D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, train_size=60,
                       sample_with_replacement=True)
  assert rep.num_train == 60 and len(np.unique(rep.train_images[:, 0, 0, 0])) < 40
  with pytest.raises(ValueError, match="train_split='valid'"):
    D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, train_split="valid")
  with pytest.raises(ValueError, match="label_key='fine'"):
    D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, label_key="fine")
  # classes on a TFDS source: subsampling follows the class filter, labels follow the ids.
  sub = D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, classes="4,1", train_size=10,
                       seed=1)
  assert sub.num_classes == 2 and sub.num_train == 10 and sub.info["classes"] == [4, 1]
  original = (sub.train_images[:, 0, 0, 0] // 5) % 5  # the example id encodes its label
  np.testing.assert_array_equal(np.array([4, 1])[sub.train_labels], original)
  assert len(np.unique(sub.train_images[:, 0, 0, 0])) == 10
  test_orig = ((sub.test_images[:, 0, 0, 0] - 1) // 5) % 5
  np.testing.assert_array_equal(np.array([4, 1])[sub.test_labels], test_orig)
  assert sorted(test_orig.tolist()) == [1, 1, 1, 4, 4]  # test ids 0..11, label id % 5
  with pytest.raises(ValueError, match=r"0\.\.4"):
    D.load_dataset("fedpeft_tiny_images", data_dir=tiny_dir, classes=(5,))


def test_prepare_cli():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "fedpeft_jax.data.prepare", "--list"],
                       capture_output=True, text=True, env=env, check=True).stdout
  assert "cifar100" in out and "fashion_mnist" in out
  if prepare.importlib.util.find_spec("tensorflow") is None:
    with pytest.raises(RuntimeError, match=r"fedpeft_jax\[prepare\]"):
      prepare.prepare_tfds("cifar100", "/tmp/x")


# ----------------------------------------------------------------------------- preprocess


def _imgs(b=6, h=12, w=10, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)


def test_preprocess_eval_range_and_gray():
  x = _imgs()
  y = D.preprocess(x, image_size=24, augment="crop_flip", train=False)
  assert y.shape == (6, 24, 24, 3) and y.dtype == jnp.float32
  assert float(y.min()) >= -1 and float(y.max()) <= 1
  same = D.preprocess(_imgs(h=10), image_size=10, augment="none")
  np.testing.assert_allclose(same, _imgs(h=10) / 127.5 - 1.0, atol=1e-6)
  g = D.preprocess(_imgs(c=1, h=10), image_size=16)
  assert g.shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  const = D.preprocess(np.full((2, 8, 8, 3), 255, np.uint8), image_size=32)
  np.testing.assert_allclose(const, 1.0, atol=1e-6)


def test_preprocess_crop_flip_is_a_padded_crop():
  x = _imgs(b=16, h=8, w=8)
  key = jax.random.PRNGKey(3)
  y = np.asarray(D.preprocess(x, key, image_size=8, augment="crop_flip", train=True))
  y = np.round((y + 1) * 127.5).astype(np.int32)
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.int32)
  seen_offsets = set()
  for i in range(16):
    matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
               if np.array_equal(y[i], (padded[i, dy:dy + 8, dx:dx + 8][:, ::-1] if f else
                                        padded[i, dy:dy + 8, dx:dx + 8]))]
    assert matches, f"example {i} is not a flipped/unflipped crop of the padded image"
    seen_offsets.add(matches[0])
  assert len(seen_offsets) > 4  # per-example randomness
  y2 = np.asarray(D.preprocess(x, key, image_size=8, augment="crop_flip", train=True))
  np.testing.assert_array_equal(np.round((y2 + 1) * 127.5), y)  # deterministic from key
  y3 = D.preprocess(x, jax.random.PRNGKey(4), image_size=8, augment="crop_flip", train=True)
  assert not np.allclose(y3, y2)
  r = D.preprocess(x, key, image_size=8, augment="crop_flip", train=True, pad_mode="reflect")
  assert r.shape == (16, 8, 8, 3)


def test_preprocess_flip_jit_vmap():
  x = _imgs(b=32, h=6, w=6)
  key = jax.random.PRNGKey(0)
  y = np.asarray(D.preprocess(x, key, image_size=6, augment="flip", train=True))
  base = x / 127.5 - 1.0
  flipped = [np.allclose(y[i], base[i][:, ::-1], atol=1e-6) for i in range(32)]
  kept = [np.allclose(y[i], base[i], atol=1e-6) for i in range(32)]
  assert all(a or b for a, b in zip(flipped, kept)) and 4 < sum(flipped) < 28
  f = jax.jit(lambda im, k: D.preprocess(im, k, image_size=12, augment="crop_flip",
                                         train=True))
  xs = jnp.stack([x[:8], x[8:16]])
  ks = jax.random.split(key, 2)
  v = jax.vmap(f)(xs, ks)
  assert v.shape == (2, 8, 12, 12, 3)
  np.testing.assert_allclose(v[1], f(x[8:16], ks[1]), atol=1e-5)


def test_preprocess_bad_inputs():
  with pytest.raises(ValueError, match="augment"):
    D.preprocess(_imgs(), image_size=8, augment="mixup")
  with pytest.raises(ValueError, match="key"):
    D.preprocess(_imgs(), image_size=8, augment="flip", train=True)
  with pytest.raises(ValueError, match="images"):
    D.preprocess(np.zeros((8, 8, 3), np.uint8), image_size=8)


# ----------------------------------------------------------------------------- device data


def _visits(positions, example_mask, step_mask, size, batch, epochs):
  """Check one client's schedule; returns the per-epoch visit orders."""
  positions, example_mask, step_mask = map(np.asarray, (positions, example_mask, step_mask))
  spe = -(-size // batch)
  real = epochs * spe
  assert step_mask[:real].all() and not step_mask[real:].any()
  assert not example_mask[real:].any() and (positions[~example_mask] == 0).all()
  orders = []
  for e in range(epochs):
    m = example_mask[e * spe:(e + 1) * spe]
    p = positions[e * spe:(e + 1) * spe][m]
    assert sorted(p.tolist()) == list(range(size)), "each example exactly once per epoch"
    assert m.sum() == size
    if spe:
      assert m[:-1].all()  # only the last batch of an epoch may be partial
    orders.append(p)
  return orders


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 23])
def test_local_schedule_visits_each_example_once_per_epoch(size):
  max_n, batch, epochs = 23, 8, 3
  pos, em, sm = D.local_schedule(jax.random.PRNGKey(size), size, max_n, batch, epochs)
  assert pos.shape == (epochs * 3, batch) and pos.dtype == jnp.int32
  assert em.dtype == jnp.bool_ and sm.shape == (epochs * 3,)
  orders = _visits(pos, em, sm, size, batch, epochs)
  assert int(sm.sum()) == int(D.num_local_steps(size, batch, epochs))
  if size == 23:
    assert not np.array_equal(orders[0], orders[1])  # fresh shuffle per epoch


def test_local_schedule_jit_vmap_and_gather():
  ds = D.load_dataset("synthetic", num_classes=4, num_train=100, num_test=10, resolution=4)
  p = D.partition(ds.train_labels, 5, alpha=0.5, min_size=3, seed=1)
  cd = D.client_data(ds, p)
  assert cd.num_clients == 5 and cd.max_n == p.sizes.max()
  np.testing.assert_array_equal(cd.sizes, p.sizes)
  assert len(jax.tree_util.tree_leaves(cd)) == 4
  batch, epochs = 8, 2

  @jax.jit
  def round_batches(cd, key):
    keys = jax.random.split(key, cd.num_clients)
    sched = jax.vmap(lambda k, s: D.local_schedule(k, s, cd.max_n, batch, epochs))(keys,
                                                                                    cd.sizes)
    pos = sched[0]
    ex = jax.vmap(lambda row, ps: row[ps])(cd.indices, pos)  # dataset indices
    _, labels = jax.vmap(cd.batch)(jnp.arange(cd.num_clients), pos)
    return sched, ex, labels

  (pos, em, sm), ex, labels = round_batches(cd, jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  for c in range(5):
    eager = D.local_schedule(keys[c], int(p.sizes[c]), cd.max_n, batch, epochs)
    np.testing.assert_array_equal(eager[0], pos[c])
    _visits(pos[c], em[c], sm[c], int(p.sizes[c]), batch, epochs)
    spe = -(-int(p.sizes[c]) // batch)
    first = np.asarray(ex[c][:spe])[np.asarray(em[c][:spe])]
    np.testing.assert_array_equal(np.sort(first), p.client_indices[c])
    np.testing.assert_array_equal(np.asarray(labels[c])[np.asarray(em[c])],
                                  ds.train_labels[np.asarray(ex[c])[np.asarray(em[c])]])


def test_eval_schedule_and_bad_inputs():
  index, mask = D.eval_schedule(10, 4)
  assert index.shape == (3, 4) and mask.sum() == 10
  assert sorted(index[mask].tolist()) == list(range(10)) and (index[~mask] == 0).all()
  index, mask = D.eval_schedule(8, 4)
  assert mask.all()
  with pytest.raises(ValueError, match="batch_size"):
    D.eval_schedule(10, 0)
  with pytest.raises(ValueError, match="batch_size"):
    D.local_schedule(jax.random.PRNGKey(0), 3, 5, 0, 1)
  with pytest.raises(ValueError, match="local_epochs"):
    D.local_schedule(jax.random.PRNGKey(0), 3, 5, 2, 0)
  ds = D.load_dataset("synthetic", num_train=20, num_test=5, resolution=4)
  with pytest.raises(ValueError, match="outside"):
    D.client_data(ds, [np.array([0, 25])])


@pytest.mark.parametrize("size_in,size_out", [(32, 224), (96, 224), (256, 224), (224, 64)])
def test_resize_equals_torch_bilinear_antialias(size_in: int, size_out: int) -> None:
  # The banded gather resize against PyTorch's bilinear interpolate (half-pixel centres,
  # antialiased when shrinking): within float32 rounding of pixel values in [0, 255].
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(size_in).uniform(0, 255, (2, size_in, size_in, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(size_out, size_out), mode="bilinear",
      align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
  got = np.asarray(resize(jnp.asarray(x), size_out))
  np.testing.assert_allclose(got, want, rtol=0, atol=0.01)


def test_resize_kernels_match_jax_image_and_both_lowerings_agree() -> None:
  # Cubic and Lanczos taps against jax.image.resize (its weight rule, applied as a dot). The
  # GPU lowering holds no dot: tests/test_accelerators.py compiles it for an H100.
  x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
  for method in ("cubic", "lanczos3", "lanczos5"):
    with jax.default_matmul_precision("highest"):
      want = np.asarray(jax.image.resize(x, (2, 224, 224, 3), method))
    got = np.asarray(resize(jnp.asarray(x), 224, method))
    np.testing.assert_allclose(got, want, rtol=0, atol=0.01)
  indices, weights = resize_taps(32, 224)
  assert indices.shape == weights.shape == (224, 2)  # bilinear upsampling: two taps
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
  # Both lowerings (the accelerators' gathers, the CPU's dense dot) give the same result.
  for method in ("bilinear", "lanczos3"):
    for n in (32, 256):
      y = jnp.asarray(np.random.default_rng(n).uniform(0, 255, (2, n, n, 3)), jnp.float32)
      np.testing.assert_allclose(np.asarray(resize_gathered(y, 224, method)),
                                 np.asarray(resize_dense(y, 224, method)), rtol=0, atol=0.01)
  with pytest.raises(ValueError, match="resize method 'area'"):
    resize_taps(32, 224, "area")
