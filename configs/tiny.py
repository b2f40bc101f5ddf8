"""A tiny CPU config for end-to-end tests: seconds per run, offline, no checkpoint.

  python -m fedpeft_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m fedpeft_jax.main --config=configs/tiny.py:lora --workdir=/tmp/tiny_lora
  python -m fedpeft_jax.main --config=configs/tiny.py:method=bias,partition=iid,rounds=3 ...

The argument is comma-separated `key=value` pairs; the first item may be a bare method.
Keys (default in brackets):
  method     any PEFT method or combination ('bias+lora')                      [full]
  partition  iid | dirichlet | shards                                      [dirichlet]
  rounds     [2]
  seed       [0]

The model is a from-scratch ViT (hidden 32, depth 2, 4 heads, MLP 64, patch 4) at 16x16 on
the 'synthetic' dataset (16x16 native, so nothing is resized); 4 clients, 2 per round,
1 local epoch, batch 8, evaluation and a checkpoint every round.
"""

from __future__ import annotations


import ml_collections

from fedpeft_jax.config_files import sibling

_KEYS = ("method", "partition", "rounds", "seed")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: '[method][,key=value...]' (module docstring)."""
  study = sibling(__file__, "study")
  parsers = {"method": str.strip, "partition": study.one_of(("iid", "dirichlet", "shards")),
             "rounds": study.positive_int, "seed": study.nonnegative_int}
  a = study.parse_arg(arg, _KEYS, ("method",), parsers,
                      {"method": "full", "partition": "dirichlet", "rounds": 2, "seed": 0},
                      "configs/tiny.py")
  c = sibling(__file__, "default").get_config()
  c.seed = a["seed"]

  c.model.variant = "Ti/4"  # every size field below overrides it
  c.model.hidden_size = 32
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 64
  c.model.patch_size = 4
  c.model.image_size = 16
  c.model.pretrained = ""

  c.peft.method = a["method"]
  c.peft.adapter.bottleneck = 8
  c.peft.lora.rank = 2
  c.peft.prompt.num_tokens = 2

  c.data.dataset = "synthetic"
  c.data.resolution = 16
  c.data.partition = a["partition"]
  c.data.alpha = 0.5
  c.data.augment = "none"

  f = c.federated
  f.rounds = a["rounds"]
  f.num_clients = 4
  f.clients_per_round = 2
  f.local_epochs = 1
  f.batch_size = 8
  f.client_lr = 0.05
  f.eval_every = 1
  c.checkpoint_every = 1
  return c
