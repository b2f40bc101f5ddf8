"""Central pre-training of the quickstart's small ViT on Fashion-MNIST (the source domain).

  python -m fedpeft_jax.pretrain --config=configs/pretrain_fashion.py --workdir=runs/pretrain
"""

import ml_collections

from fedpeft_jax.config_files import sibling

quickstart = sibling(__file__, "quickstart")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = quickstart.get_config("full")
  c.model.pretrained = ""
  c.data.dataset = "fashion_mnist"
  c.data.train_size = 0
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.epochs = 4
  c.pretrain.batch_size = 128
  c.pretrain.lr = 1e-3
  c.pretrain.weight_decay = 0.05
  return c
