"""Fashion-MNIST from its four IDX files, read with NumPy only.

Why not TFDS: the IDX files ship as a Debian/Ubuntu package (`dataset-fashion-mnist`), so
this dataset works on a fresh offline machine with no preparation step; it is the offline
source domain for pre-training.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from typing import Optional

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# MD5 of the files as published by Zalando Research (the Debian package recompresses them,
# so its .gz bytes differ while the decompressed content is the same dataset).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRROR = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                        "master/data/fashion/")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """One IDX file (gzipped or not) -> array in its native shape.

  Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32
  per dimension. Truncated or malformed files raise ValueError naming the path.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                     f"holds {len(data)} bytes (truncated or corrupt download?)")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: str, filename: str) -> Optional[str]:
  for name in (filename, filename[:-3]):  # .gz or already decompressed
    p = os.path.join(directory, name)
    if os.path.isfile(p):
      return p
  return None


def load_fashion_mnist(directory: Optional[str] = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images [60000,28,28,1] uint8, train_labels int32, test_images, test_labels)."""
  directory = os.path.expanduser(directory or os.environ.get("FASHION_MNIST_DIR",
                                                            FASHION_MNIST_DIR))
  paths = {k: _find(directory, f) for k, f in FASHION_MNIST_FILES.items()}
  missing = [FASHION_MNIST_FILES[k] for k, p in paths.items() if p is None]
  if missing:
    raise FileNotFoundError(
        f"fashion_mnist: {', '.join(missing)} not found in data_dir={directory!r}. "
        f"Install the Debian/Ubuntu package `{DEBIAN_PACKAGE}` "
        f"(apt-get install {DEBIAN_PACKAGE}; files go to {FASHION_MNIST_DIR}), or fetch the "
        "official files (MD5-checked) with: python -m fedpeft_jax.data.prepare "
        f"--dataset=fashion_mnist --data_dir={directory}")
  out = []
  for split in ("train", "test"):
    images = read_idx(paths[f"{split}_images"])
    labels = read_idx(paths[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f"fashion_mnist {split}: images {images.shape} and labels "
                       f"{labels.shape} do not match")
    out += [images[..., None].astype(np.uint8), labels.astype(np.int32)]
  return tuple(out)


def md5sum(path: str) -> str:
  h = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fetch_fashion_mnist(directory: str, mirror: str = FASHION_MNIST_MIRROR,
                        checksums: Optional[dict[str, str]] = None) -> list[str]:
  """Download the four official files into `directory`, verifying each MD5.

  For machines without the Debian package. A file failing its checksum is deleted and
  raises, so a corrupt download never gets read later. Existing good files are kept.
  """
  checksums = FASHION_MNIST_MD5 if checksums is None else checksums
  os.makedirs(directory, exist_ok=True)
  done = []
  for filename, md5 in checksums.items():
    dest = os.path.join(directory, filename)
    if not (os.path.isfile(dest) and md5sum(dest) == md5):
      url = mirror.rstrip("/") + "/" + filename
      tmp = dest + ".part"
      with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
      got = md5sum(tmp)
      if got != md5:
        os.remove(tmp)
        raise ValueError(f"{url}: MD5 {got} does not match the official {md5}; "
                         "file discarded (wrong mirror or corrupt download)")
      os.replace(tmp, dest)
    done.append(dest)
  return done
