"""Datasets as in-memory uint8 arrays: TFDS (read without TensorFlow), Fashion-MNIST IDX
files, scikit-learn's digits, and a synthetic set.

Why whole arrays in host memory: the federated engine keeps the training set on device and
gathers client batches there, so every dataset is materialised once as uint8 (the study's
datasets fit: CIFAR-100 train is ~150 MB). Resizing to the model resolution happens per batch
on device (`preprocess`), never here, except for TFDS datasets whose images vary in size.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import os
import re
from typing import Any, Optional, Sequence, Union

import numpy as np
from absl import logging
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedpeft_jax.choices import one_of
from fedpeft_jax.data import idx, partitioning

AUGMENTS = ("none", "flip", "crop_flip")
ClassesArg = Union[None, str, Sequence[int]]  # load_dataset(classes=...): see parse_classes


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How the study (or common practice) splits and augments one TFDS dataset."""
  train_split: str
  test_split: str
  augment: str
  note: str = ""


# Datasets without a test split get a fixed 80/20 slice of `train` (TFDS slicing is
# deterministic), so the test set never overlaps the clients' data.
TFDS_DATASETS: dict[str, TfdsSpec] = {
    "cifar10": TfdsSpec("train", "test", "crop_flip", "50,000/10,000 32x32"),
    "cifar100": TfdsSpec("train", "test", "crop_flip", "50,000/10,000 32x32; the study"),
    "resisc45": TfdsSpec("train[:80%]", "train[80%:]", "flip",
                         "31,500 256x256, one split -> 25,200/6,300; the study"),
    "patch_camelyon": TfdsSpec("train", "test", "flip",
                               "262,144/32,768 96x96; the study used train_size=20000"),
    "eurosat/rgb": TfdsSpec("train[:80%]", "train[80%:]", "flip",
                            "27,000 64x64, one split -> 21,600/5,400"),
    "oxford_flowers102": TfdsSpec("train+validation", "test", "flip",
                                  "2,040/6,149, variable size -> resized on host"),
}
LOCAL_DATASETS = {
    "digits": "scikit-learn's bundled 8x8 handwritten digits (1,797), upsampled; offline",
    "fashion_mnist": f"Fashion-MNIST IDX files (Debian package {idx.DEBIAN_PACKAGE}); offline",
    "synthetic": "generated class prototypes + noise, deterministic from the seed; offline",
}
DEFAULT_AUGMENT = {"digits": "none", "fashion_mnist": "flip", "synthetic": "none"}
VARIABLE_SIZE_RESOLUTION = 224  # host resize for TFDS datasets whose images vary in size


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is absent from data_dir; the message holds the command that fixes it."""


def check_augment(augment: str, auto: bool = False) -> str:
  """data.augment: the train-time augmentation (AUGMENTS), or, where a config names it and
  `auto`, 'auto' (the dataset's own)."""
  return one_of("data.augment", augment, (("auto",) if auto else ()) + AUGMENTS)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset held as NumPy arrays.

  images uint8 [N, H, W, C] (C = 1 or 3), labels int32 [N] in [0, num_classes).
  `augment` is the study's train-time augmentation for it ("crop_flip", "flip", "none").
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  augment: str = "none"
  class_names: Optional[tuple[str, ...]] = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance, for run logs
  # A validation split held out of the training pool (`split_validation`), or None.
  val_images: Optional[np.ndarray] = None
  val_labels: Optional[np.ndarray] = None

  def __post_init__(self):
    splits = ("train", "test") + (("val",) if self.val_images is not None else ())
    for split in splits:
      x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
      if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{self.name}: {split}_images must be uint8 [N,H,W,1|3], got "
                         f"{x.dtype} {x.shape}")
      if y.dtype != np.int32 or y.shape != x.shape[:1]:
        raise ValueError(f"{self.name}: {split}_labels must be int32 [{len(x)}], got "
                         f"{y.dtype} {y.shape}")
      if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f"{self.name}: {split}_labels outside [0, {self.num_classes})")
    check_augment(self.augment)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_test(self) -> int:
    return len(self.test_labels)

  @property
  def num_val(self) -> int:
    return 0 if self.val_labels is None else len(self.val_labels)

  @property
  def nbytes(self) -> int:
    """Host (and, once placed, device) bytes of all its arrays."""
    return sum(a.nbytes for a in (self.train_images, self.train_labels, self.test_images,
                                  self.test_labels, self.val_images, self.val_labels)
               if a is not None)

  def summary(self) -> str:
    h, w, c = self.image_shape
    val = f" / {self.num_val:,} validation" if self.num_val else ""
    return (f"{self.name}: {self.num_train:,} train{val} / {self.num_test:,} test, "
            f"{h}x{w}x{c} uint8, "
            f"{self.num_classes} classes, augment={self.augment}, "
            f"{self.nbytes / 2**20:.1f} MiB")


def split_validation(ds: Dataset, size: float, seed: int) -> Dataset:
  """`ds` with `size` (a fraction of its training examples, or a count; 0 = none) held out of
  its training split as its validation split: stratified by class, drawn with `seed`
  (`partitioning.hold_out`). The clients are partitioned afterwards, from what is left."""
  count = partitioning.validation_count(size, ds.num_train)
  if not count:
    return ds
  kept, held = partitioning.hold_out(ds.train_labels, count, seed)
  return dataclasses.replace(
      ds, train_images=ds.train_images[kept], train_labels=ds.train_labels[kept],
      val_images=ds.train_images[held], val_labels=ds.train_labels[held],
      info={**ds.info, "validation": {"examples": count, "seed": seed}})


def list_datasets(all_tfds: bool = False) -> list[str]:
  """Names `load_dataset` knows; `all_tfds` adds every TFDS builder (any image
  classification one with `image`/`label` features loads too)."""
  names = list(LOCAL_DATASETS) + list(TFDS_DATASETS)
  if all_tfds:
    names += [n for n in tfds_module().list_builders(with_community_datasets=False)
              if n not in names]
  return names


def tfds_module() -> Any:
  """The `tensorflow_datasets` module, imported on first use (TFDS datasets and preparing)."""
  import tensorflow_datasets  # lazy: only TFDS needs it; a slow import that can load TensorFlow
  return tensorflow_datasets


def load_dataset(name: str, data_dir: Optional[str] = None, train_size: Optional[int] = None,
                 sample_with_replacement: bool = False, seed: int = 0,
                 classes: ClassesArg = None, **kw: Any) -> Dataset:
  """Load `name` as a `Dataset`.

  classes: keep only these original class ids, in train and test, relabelled 0..len-1 in the
  given order (`select_classes`); None or "" = every class; a string such as "5,6,7,8,9" is
  parsed with `parse_classes`. Applied before `train_size`, so train_size counts examples of
  the kept classes. For TFDS datasets that means decoding the whole train split once
  (`cache_dir` makes reloads fast); `test_size` is still drawn from the full test split.
  train_size: keep this many training examples (the study: PCam 20,000; data scarcity
  1k/5k/10k), drawn with `seed`, without replacement unless `sample_with_replacement` (what
  the authors' code did). Extra keywords per source:
    digits: resolution=32.  synthetic: num_classes=10, num_train=1000, num_test=200,
    resolution=32, channels=3, noise=0.25.  fashion_mnist: none (data_dir = the IDX folder,
    default /usr/share/datasets/fashion-mnist).  TFDS: train_split, test_split, image_key,
    label_key, resolution (host resize; default only for variable-size images), test_size,
    cache_dir (saves decoded arrays for fast reloads).
  All sources accept augment= to override the default augmentation.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a dataset name such as {list_datasets()}, got {name!r}")
  class_ids = parse_classes(classes)
  augment = kw.pop("augment", None)
  if name == "digits":
    ds = _digits(**_only(kw, name, ("resolution",)))
  elif name == "fashion_mnist":
    _only(kw, name, ())
    xtr, ytr, xte, yte = idx.load_fashion_mnist(data_dir)
    ds = Dataset(name, xtr, ytr, xte, yte, 10, "flip", idx.FASHION_MNIST_CLASSES,
                 {"source": "idx", "data_dir": data_dir or idx.FASHION_MNIST_DIR})
  elif name == "synthetic":
    ds = _synthetic(seed, **_only(kw, name, ("num_classes", "num_train", "num_test",
                                               "resolution", "channels", "noise")))
  else:
    # Without a class filter the TFDS reader subsamples before decoding (only the kept
    # records are decoded); with one, subsampling has to wait until the labels are known.
    ds = _load_tfds(name, data_dir, train_size if class_ids is None else None,
                    sample_with_replacement, seed, augment,
                    **_only(kw, name, ("train_split", "test_split", "image_key", "label_key",
                                       "resolution", "test_size", "cache_dir")))
    if class_ids is None:
      return ds
  if class_ids is not None:
    ds = select_classes(ds, class_ids)
  sel = subsample_indices(ds.num_train, train_size, sample_with_replacement, seed)
  changes: dict[str, Any] = {}
  if sel is not None:
    changes.update(train_images=ds.train_images[sel], train_labels=ds.train_labels[sel],
                   info={**ds.info, "train_size": train_size,
                         "sample_with_replacement": sample_with_replacement, "seed": seed})
  if augment is not None:
    changes["augment"] = augment
  return dataclasses.replace(ds, **changes) if changes else ds


def parse_classes(value: ClassesArg) -> Optional[tuple[int, ...]]:
  """`config.data.classes` -> the class ids `load_dataset(classes=...)` keeps, or None for all.

  Accepts "" / None (every class), a comma-separated string "5,6,7,8,9" (spaces allowed), or a
  sequence of ints. Why a string in the config: a ConfigDict field keeps the type of its
  default, and a string is what `--config.data.classes=5,6,7,8,9` gives on the command line.
  Checks what it can without the dataset (ints, >= 0, no repeats, at least one); the upper
  bound is checked against the dataset by `select_classes`. Errors are ValueErrors naming
  data.classes.
  """
  if value is None:
    return None
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return None
    items = [t.strip() for t in text.split(",")]
    try:
      ids = tuple(int(t) for t in items)
    except ValueError:
      raise ValueError(f"data.classes={value!r}: expected comma-separated class ids such as "
                       "'5,6,7,8,9' ('' for every class)") from None
  elif isinstance(value, (collections.abc.Sequence, np.ndarray)) and not isinstance(value, bytes):
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
           for v in value):
      raise ValueError(f"data.classes={value!r}: class ids must be ints")
    ids = tuple(int(v) for v in value)
  else:
    raise ValueError(f"data.classes={value!r}: expected None, a string such as '5,6,7,8,9' or "
                     "a sequence of ints")
  if not ids:
    raise ValueError(f"data.classes={value!r}: selects no class; use '' (None) for every class")
  negative = [c for c in ids if c < 0]
  if negative:
    raise ValueError(f"data.classes={value!r}: class ids must be >= 0, got {negative}")
  repeated = sorted({c for c in ids if ids.count(c) > 1})
  if repeated:
    raise ValueError(f"data.classes={value!r}: class ids {repeated} repeat")
  return ids


def select_classes(ds: Dataset, classes: ClassesArg) -> Dataset:
  """Keep only `classes` (original ids) in train and test, relabelled 0..len-1 in that order.

  Why: a transfer study splits one label set into a source task and a target task (e.g.
  pre-train on Fashion-MNIST classes 0-4, fine-tune federated on 5-9); the target then needs
  dense labels so its new head has len(classes) outputs. Example order within each split is
  kept. num_classes, class_names and info["classes"] (the original ids) follow.
  """
  ids = parse_classes(classes)
  if ids is None:
    return ds
  bad = [c for c in ids if c >= ds.num_classes]
  if bad:
    raise ValueError(f"data.classes={','.join(map(str, ids))}: class ids {bad} are outside "
                     f"the valid range 0..{ds.num_classes - 1} of {ds.name} "
                     f"({ds.num_classes} classes)")
  info = {**ds.info, "classes": list(ids)}
  if ids == tuple(range(ds.num_classes)):  # every class in its own order: nothing to copy
    return dataclasses.replace(ds, info=info)
  relabel = np.full(ds.num_classes, -1, np.int32)
  relabel[list(ids)] = np.arange(len(ids), dtype=np.int32)
  arrays: dict[str, np.ndarray] = {}
  for split in ("train", "test"):
    y = relabel[getattr(ds, f"{split}_labels")]
    keep = np.flatnonzero(y >= 0)
    arrays[f"{split}_images"] = getattr(ds, f"{split}_images")[keep]
    arrays[f"{split}_labels"] = y[keep]
  if not len(arrays["train_labels"]):
    raise ValueError(f"data.classes={','.join(map(str, ids))}: {ds.name}'s training set has no "
                     "example of these classes")
  names = tuple(ds.class_names[c] for c in ids) if ds.class_names else None
  return dataclasses.replace(ds, **arrays, num_classes=len(ids), class_names=names, info=info)


def _only(kw: dict[str, Any], name: str, allowed: Sequence[str]) -> dict[str, Any]:
  bad = sorted(set(kw) - set(allowed))
  if bad:
    raise TypeError(f"load_dataset({name!r}) got unexpected keyword(s) {bad}; it accepts "
                    f"{sorted(allowed) + ['augment']}")
  return kw


def subsample_indices(n: int, size: Optional[int], replace: bool, seed: int
                      ) -> Optional[np.ndarray]:
  """Sorted indices of a `size`-subset of range(n) (None = keep everything)."""
  if size is None:
    return None
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f"train_size must be a positive int or None, got {size!r}")
  if size > n and not replace:
    raise ValueError(f"train_size={size} exceeds the {n} training examples; lower it or pass "
                     "sample_with_replacement=True")
  rng = np.random.default_rng([seed, 0x5A3])  # own stream: independent of partition seeds
  sel = rng.integers(0, n, size) if replace else rng.choice(n, size, replace=False)
  return np.sort(sel)


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of uint8 [N,h,w,C] on the host."""
  if images.shape[1:3] == (resolution, resolution):
    return images
  out = np.empty((len(images), resolution, resolution, images.shape[-1]), np.uint8)
  for i, im in enumerate(images):
    out[i] = _resize_one(im, resolution)
  return out


def _resize_one(im: np.ndarray, resolution: int) -> np.ndarray:
  c = im.shape[-1]
  pil = Image.fromarray(im[..., 0] if c == 1 else im)
  r = np.asarray(pil.resize((resolution, resolution), Image.Resampling.BILINEAR))
  return r.reshape(resolution, resolution, c)


def _digits(resolution: int = 32) -> Dataset:
  """scikit-learn digits, 8x8 values 0..16 -> uint8, upsampled; a fixed stratified 80/20
  split (random_state 0, independent of `seed`) so results stay comparable across runs."""
  if not isinstance(resolution, int) or resolution < 8:
    raise ValueError(f"resolution must be an int >= 8 for digits, got {resolution!r}")
  d = load_digits()
  x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = d.target.astype(np.int32)
  x = _resize(x, resolution)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
  return Dataset("digits", xtr, ytr, xte, yte, 10, "none", tuple(str(i) for i in range(10)),
                 {"source": "sklearn", "resolution": resolution})


def _synthetic(seed: int, num_classes: int = 10, num_train: int = 1000, num_test: int = 200,
               resolution: int = 32, channels: int = 3, noise: float = 0.25) -> Dataset:
  """Each class is a smooth random prototype image; examples are prototype + Gaussian noise
  (std `noise` in [0,1] units). Learnable by any small model, deterministic from `seed`."""
  for k, v, lo in (("num_classes", num_classes, 2), ("num_train", num_train, 1),
                   ("num_test", num_test, 1), ("resolution", resolution, 4)):
    if not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{k} must be an int >= {lo} for synthetic, got {v!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  rng = np.random.default_rng([seed, 0x5E7])
  protos = rng.integers(0, 256, (num_classes, 4, 4, channels), dtype=np.uint8)
  protos = _resize(protos, resolution).astype(np.float32)

  def make(n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    x = protos[y] + rng.normal(0.0, 255.0 * noise, (n, resolution, resolution, channels))
    return np.clip(np.round(x), 0, 255).astype(np.uint8), y

  xtr, ytr = make(num_train)
  xte, yte = make(num_test)
  return Dataset("synthetic", xtr, ytr, xte, yte, num_classes, "none", None,
                 {"source": "synthetic", "seed": seed, "noise": noise})


# ----------------------------------------------------------------------------- TFDS


def prepare_command(name: str, data_dir: str) -> str:
  return f"python -m fedpeft_jax.data.prepare --dataset={name} --data_dir={data_dir}"


def _split_names(split: str) -> list[str]:
  """'train[:80%]+validation' -> ['train', 'validation']."""
  return [re.sub(r"\[.*\]$", "", s.strip()) for s in split.split("+")]


def _load_tfds(name: str, data_dir: Optional[str], train_size: Optional[int], replace: bool,
               seed: int, augment: Optional[str], train_split: Optional[str] = None,
               test_split: Optional[str] = None, image_key: str = "image",
               label_key: str = "label", resolution: Optional[int] = None,
               test_size: Optional[int] = None, cache_dir: Optional[str] = None) -> Dataset:
  """A TFDS dataset through `tfds.data_source` (random access, no TensorFlow at read time)."""
  tfds = tfds_module()
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset name={name!r}: not {list(LOCAL_DATASETS)} and not a "
                     f"TFDS builder. Known: {list_datasets()} (any TFDS image-classification "
                     "dataset works; see tfds.list_builders())") from e
  root = os.fspath(builder.data_dir_root)
  spec = TFDS_DATASETS.get(name)
  splits = dict(builder.info.splits)  # empty when not prepared (and under tfds mocks)
  if train_split is None:
    train_split = spec.train_split if spec else "train"
  if test_split is None:
    test_split = spec.test_split if spec else next(
        (s for s in ("test", "validation") if not splits or s in splits), "test")
  for param, split in (("train_split", train_split), ("test_split", test_split)):
    unknown = [s for s in _split_names(split) if splits and s not in splits]
    if unknown:
      raise ValueError(f"{param}={split!r}: {name} has no split {unknown}; it has "
                       f"{sorted(splits)}")
  features = builder.info.features
  for param, key in (("image_key", image_key), ("label_key", label_key)):
    if key not in features:
      raise ValueError(f"{param}={key!r} is not a feature of {name}; it has {list(features)}")
  if not hasattr(features[label_key], "num_classes"):
    raise ValueError(f"{name}: feature {label_key!r} is not a ClassLabel; not a "
                     "classification dataset (pass label_key=...)")
  num_classes = int(features[label_key].num_classes)
  shape = tuple(features[image_key].shape)
  if resolution is None and None in shape[:2]:
    resolution = VARIABLE_SIZE_RESOLUTION
    logging.info("%s: images vary in size; resizing to %d on the host", name, resolution)

  def source(split: str):
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises unrelated-looking errors for absent data
      if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in data_dir={root!r} (no "
            f"{builder.data_path}). Nothing is downloaded during a run; prepare it once "
            "(needs internet and TensorFlow: pip install 'fedpeft_jax[prepare]'):\n  "
            + prepare_command(name, root) + _manual_note(builder)) from e
      if "TFRECORD" in str(e):
        raise DatasetNotPreparedError(
            f"{name} in {root!r} was prepared as TFRecord, which has no random access; "
            "re-prepare it as ArrayRecord (into another data_dir, or delete "
            f"{builder.data_path} first):\n  " + prepare_command(name, root)) from e
      raise

  train_src, test_src = source(train_split), source(test_split)
  sel = subsample_indices(len(train_src), train_size, replace, seed)
  test_sel = None
  if test_size is not None:
    if not isinstance(test_size, (int, np.integer)) or not 0 < test_size <= len(test_src):
      raise ValueError(f"test_size must be in [1, {len(test_src)}], got {test_size!r}")
    test_sel = np.sort(np.random.default_rng([seed, 0x7E5]).choice(len(test_src), test_size,
                                                                     replace=False))
  common = dict(name=name, version=str(builder.info.version), image_key=image_key,
                label_key=label_key, resolution=resolution, cache_dir=cache_dir)
  xtr, ytr = _read_cached(train_src, train_split, sel, **common)
  xte, yte = _read_cached(test_src, test_split, test_sel, **common)
  names = getattr(features[label_key], "names", None)
  return Dataset(
      name, xtr, ytr, xte, yte, num_classes,
      augment if augment is not None else (spec.augment if spec else "flip"),
      tuple(names) if names else None,
      {"source": "tfds", "data_dir": root, "version": str(builder.info.version),
       "train_split": train_split, "test_split": test_split, "resolution": resolution,
       "train_size": train_size, "sample_with_replacement": replace, "seed": seed,
       "test_size": test_size})


def _manual_note(builder: Any) -> str:
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    return ("\n  (this dataset needs a manual download first; add --manual_dir=<folder>: "
            + " ".join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split()) + ")")
  return ""


def _read_cached(src: Any, split: str, sel: Optional[np.ndarray], *, name: str, version: str,
                 image_key: str, label_key: str, resolution: Optional[int],
                 cache_dir: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
  """Decoded arrays of `src[sel]`, optionally cached as .npz (decoding PNG/JPEG is the slow
  part: ~minutes for big sets; the cache reloads in seconds)."""
  path = None
  if cache_dir:
    h = hashlib.sha1(b"all" if sel is None else np.ascontiguousarray(sel).tobytes())
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{version}-{split}-{image_key}-{label_key}-"
                 f"{resolution}-{len(src)}-{h.hexdigest()[:12]}")
    path = os.path.join(cache_dir, tag + ".npz")
    if os.path.isfile(path):
      with np.load(path) as z:
        return z["images"], z["labels"]
  x, y = read_source(src, sel, image_key, label_key, resolution, f"{name}:{split}")
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=x, labels=y)
    os.replace(tmp, path)
  return x, y


def read_source(src: Any, sel: Optional[np.ndarray], image_key: str = "image",
                label_key: str = "label", resolution: Optional[int] = None, what: str = "",
                chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Random-access source (tfds.data_source) -> (uint8 [N,H,W,C], int32 [N]).

  `sel` may repeat indices (sampling with replacement): each distinct record is decoded once.
  """
  if sel is None:
    uniq, inverse = np.arange(len(src)), None
  else:
    uniq, inverse = np.unique(sel, return_inverse=True)
  n = len(uniq)
  images: Optional[np.ndarray] = None
  labels = np.empty(n, np.int32)
  for start in range(0, n, chunk):
    keys = [int(k) for k in uniq[start:start + chunk]]
    try:
      recs = src.__getitems__(keys)  # batched read: much faster on ArrayRecord
    except (TypeError, AttributeError):  # e.g. tfds.testing.mock_data's broken __getitems__
      recs = [src[k] for k in keys]
    for j, r in enumerate(recs):
      im = np.asarray(r[image_key])
      if im.ndim == 2:
        im = im[..., None]
      if resolution is not None:
        im = _resize_one(im, resolution)
      if images is None:
        images = np.empty((n,) + im.shape, np.uint8)
      elif im.shape != images.shape[1:]:
        raise ValueError(f"{what}: image {keys[j]} has shape {im.shape}, earlier ones "
                         f"{images.shape[1:]}; pass resolution=... to resize on the host")
      images[start + j] = im
      labels[start + j] = int(r[label_key])
    if n > 4 * chunk:
      logging.info("%s: decoded %d/%d", what, min(start + chunk, n), n)
  if images is None:
    raise ValueError(f"{what}: the split is empty")
  if inverse is not None:
    images, labels = images[inverse], labels[inverse]
  return images, labels
