"""Prepare a dataset once, with internet: `python -m fedpeft_jax.data.prepare
--dataset=cifar100 --data_dir=~/tensorflow_datasets`.

Why a separate step: runs never download (offline `tfds.load` with downloads allowed hangs
for minutes retrying DNS), and TFDS generation needs TensorFlow while reading does not; so
TensorFlow is only an optional extra (`pip install 'fedpeft_jax[prepare]'`). Datasets are
written as ArrayRecord, the format `tfds.data_source` reads with random access.
`--dataset=fashion_mnist` instead fetches the four official IDX files (MD5-checked), for
machines without the Debian package `dataset-fashion-mnist`. `--list` prints the known names.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

from absl import app, flags

from fedpeft_jax.data import datasets, idx

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "TFDS name (e.g. cifar100, resisc45, eurosat/rgb) or "
                    "fashion_mnist.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets); for fashion_mnist the folder for the IDX files.")
flags.DEFINE_string("manual_dir", None, "Folder holding manually downloaded files, for TFDS "
                    "datasets that require them (resisc45).")
flags.DEFINE_string("mirror", idx.FASHION_MNIST_MIRROR, "fashion_mnist: base URL of the files.")
flags.DEFINE_bool("list", False, "Print the known dataset names and exit.")


def prepare_tfds(name: str, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None) -> str:
  """download_and_prepare `name` as ArrayRecord; returns the dataset's folder."""
  if importlib.util.find_spec("tensorflow") is None:
    raise RuntimeError(
        f"preparing the TFDS dataset {name!r} needs TensorFlow, which is not installed (reading "
        "prepared data does not). Install the optional extra: pip install "
        "'fedpeft_jax[prepare]' (or pip install tensorflow-cpu), then rerun:\n  "
        + datasets.prepare_command(name, data_dir or "<data_dir>"))
  tfds = datasets.tfds_module()
  builder = tfds.builder(name, data_dir=data_dir)
  if manual_dir is None and getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    raise RuntimeError(f"{name} needs a manual download first, then --manual_dir=...:\n"
                       f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config, file_format="array_record")
  return os.fspath(builder.data_path)


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.list:
    for n in datasets.list_datasets():
      note = datasets.LOCAL_DATASETS.get(n) or datasets.TFDS_DATASETS[n].note
      print(f"{n:<20} {note}")
    return
  if not FLAGS.dataset:
    raise app.UsageError("--dataset is required (or --list)")
  if FLAGS.dataset in ("digits", "synthetic"):
    print(f"{FLAGS.dataset} needs no preparation (it is bundled/generated)")
    return
  if FLAGS.dataset == "fashion_mnist":
    directory = FLAGS.data_dir or idx.FASHION_MNIST_DIR
    for p in idx.fetch_fashion_mnist(os.path.expanduser(directory), FLAGS.mirror):
      print("ok", p)
    return
  data_dir = FLAGS.data_dir and os.path.expanduser(FLAGS.data_dir)
  try:
    print("prepared", prepare_tfds(FLAGS.dataset, data_dir, FLAGS.manual_dir))
  except RuntimeError as e:  # missing TensorFlow / manual download: a message, not a traceback
    raise SystemExit(f"error: {e}") from None
  tfds = datasets.tfds_module()  # check it reads back the way runs read it
  for split, n in tfds.builder(FLAGS.dataset, data_dir=data_dir).info.splits.items():
    src = tfds.data_source(FLAGS.dataset, split=split, data_dir=data_dir, download=False)
    ex = src[0]
    print(f"  {split}: {len(src):,} examples ({n.num_examples:,}), first "
          f"{ {k: getattr(v, 'shape', v) for k, v in ex.items()} }")


if __name__ == "__main__":
  app.run(main)
