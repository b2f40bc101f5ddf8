"""The offline quickstart: a small ViT pre-trained on Fashion-MNIST, fine-tuned federatedly
on scikit-learn's digits (a different domain), one PEFT method per run.

  python -m experiments.quickstart --workdir=runs/quickstart      # all methods + the table
  python -m fedpeft_jax.main --config=configs/quickstart.py:bias --workdir=runs/qs_bias \
      --config.model.pretrained=runs/quickstart/pretrain/pretrained.npz

arg: the PEFT method ('full', 'head', 'bias', 'adapter', 'prompt', 'lora', 'ssf', or
'scratch' = full fine-tuning of a randomly initialised model).
"""

import ml_collections

from fedpeft_jax.config_files import sibling

default = sibling(__file__, "default")

# Client learning rates tuned once on this task, in the study's spirit (small subsets
# take larger steps than full fine-tuning).
LEARNING_RATES = {"full": 0.01, "head": 0.05, "bias": 0.05, "adapter": 0.05, "prompt": 0.05,
                  "lora": 0.05, "ssf": 0.05, "scratch": 0.05}


def get_config(arg: str = "bias") -> ml_collections.ConfigDict:
  method = arg or "bias"
  if method not in LEARNING_RATES:
    raise ValueError(f"quickstart arg: unknown method {method!r}; allowed: "
                     f"{', '.join(LEARNING_RATES)}")
  c = default.get_config()
  c.seed = 0
  c.model.variant = "Ti/4"
  c.model.hidden_size = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.patch_size = 4
  c.model.image_size = 16
  c.model.pretrained = "runs/quickstart/pretrain/pretrained.npz" if method != "scratch" else ""
  c.peft.method = "full" if method == "scratch" else method
  c.peft.adapter.bottleneck = 16
  c.peft.lora.rank = 4
  c.peft.lora.alpha = 4.0
  c.peft.prompt.num_tokens = 4
  c.peft.prompt.dropout = 0.0
  c.data.dataset = "digits"
  c.data.resolution = 16
  c.data.partition = "dirichlet"
  c.data.alpha = 0.5
  c.data.min_size = 10
  c.federated.rounds = 20
  c.federated.num_clients = 10
  c.federated.clients_per_round = 5
  c.federated.local_epochs = 2
  c.federated.batch_size = 32
  c.federated.client_lr = LEARNING_RATES[method]
  c.federated.eval_every = 1
  c.federated.eval_batch_size = 360
  c.checkpoint_every = 5
  return c
