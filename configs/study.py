"""The study's presets (Sun et al., arXiv 2210.01708): one command per table row.

  python -m fedpeft_jax.main --config=configs/study.py:cifar100,bias --workdir=runs/c100_bias
  python -m fedpeft_jax.main --workdir=runs/r45_prompt_16_full_iid \
      --config=configs/study.py:resisc45,prompt,clients=16,participation=1.0,split=iid

The argument is comma-separated `key=value` pairs; the first two items may be bare
(`dataset,method`). Keys (default in brackets):
  dataset        cifar100 | resisc45 | patch_camelyon                        [cifar100]
  method         full | head | bias | adapter | adapter_paper | prompt | lora | ssf |
                 scratch                                                     [full]
  clients        number of clients; the study: 16 or 64                      [64]
  participation  fraction sampled per round, in (0, 1] (or a percentage, '12.5%');
                 the study: 1.0 or 0.125                                     [0.125]
  split          dirichlet (non-IID; 'noniid' too) | iid                     [dirichlet]
  seed           the study used 1, 42 and 3407                               [1]
  train_size     subsample the training set (0 = the dataset's study default; the
                 data-scarcity analysis: PCam 1000/1500/2000, CIFAR-100 1k/5k/10k)

What every preset sets (docs/study.md):
  * ViT-B/16 at 224x224 from the ImageNet-21k release ('vit_b16_in21k'), class-token
    pooling, no pre-logits layer (the study's 102,912-bias count has none), a new head.
  * 50 rounds, 10 local epochs, batch 64; SGD momentum 0.9, Nesterov, weight decay 1e-4,
    constant learning rate; FedAvg of the trainable parameters weighted by client size.
  * Learning rates: full 1e-3, head 5e-3, bias 1e-2 (5e-3 on resisc45), adapter 5e-3,
    prompt 1e-2, scratch 1e-2. lora and ssf are not in the study: 5e-3 (as adapter,
    the other inserted-module method), not tuned.
  * Dirichlet alpha 0.1 (cifar100, resisc45) or 0.5 (patch_camelyon), every client
    holding at least 10 examples; PCam subsampled to 20,000 training images.
  * adapter = one sequential bottleneck adapter (768 -> 96 -> 768, GELU) per block, as
    the study intends; adapter_paper = the authors' code (one adapter shared by every
    block, both projections zero-initialised: it degenerates to a shared bias).
  * scratch = full fine-tuning of a randomly initialised ViT-B/16 (lr 1e-2).
Any field can still be overridden on the command line (--config.federated.rounds=5).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import ml_collections

from fedpeft_jax.config_files import sibling

DATASETS = ("cifar100", "resisc45", "patch_camelyon")
METHODS = ("full", "head", "bias", "adapter", "adapter_paper", "prompt", "lora", "ssf",
           "scratch")
SPLITS = ("dirichlet", "iid")
STUDY_SEEDS = (1, 42, 3407)
PRETRAINED = "vit_b16_in21k"

# Client learning rates (SGD); per-dataset exceptions in LR_OVERRIDES.
LR = {"full": 1e-3, "head": 5e-3, "bias": 1e-2, "adapter": 5e-3, "adapter_paper": 5e-3,
      "prompt": 1e-2, "lora": 5e-3, "ssf": 5e-3, "scratch": 1e-2}
LR_OVERRIDES = {("resisc45", "bias"): 5e-3}
ALPHA = {"cifar100": 0.1, "resisc45": 0.1, "patch_camelyon": 0.5}
TRAIN_SIZE = {"patch_camelyon": 20000}

_KEYS = ("dataset", "method", "clients", "participation", "split", "seed", "train_size")
_POSITIONAL = ("dataset", "method")
_SPLIT_ALIASES = {"dirichlet": "dirichlet", "noniid": "dirichlet", "non-iid": "dirichlet",
                  "non_iid": "dirichlet", "iid": "iid"}


def _participation(text: str) -> float:
  text = text.strip()
  return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)


def positive_int(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise ValueError("must be > 0")
  return value


def nonnegative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise ValueError("must be >= 0")
  return value


def one_of(allowed: tuple[str, ...], aliases: Optional[dict[str, str]] = None
            ) -> Callable[[str], str]:
  def parse(text: str) -> str:
    value = (aliases or {}).get(text.lower(), text.lower())
    if value not in allowed:
      raise ValueError(f"allowed: {', '.join(allowed)}")
    return value
  return parse


def parse_arg(arg: str, keys: tuple[str, ...], positional: tuple[str, ...],
              parsers: dict[str, Callable[[str], Any]], defaults: dict[str, Any],
              preset: str) -> dict[str, Any]:
  """'a,b,k=v,...' -> {key: parsed value}; bare items fill `positional` keys in order.

  Errors name the preset, the key and what is allowed, e.g. "configs/study.py: clients
  'x' is invalid (invalid literal for int()...); arg keys: ...".
  """
  out = dict(defaults)
  seen: set[str] = set()
  bare = 0
  for item in (p.strip() for p in (arg or "").split(",")):
    if not item:
      continue
    if "=" in item:
      key, text = (s.strip() for s in item.split("=", 1))
    else:
      if bare >= len(positional):
        raise ValueError(f"{preset}: unexpected bare item {item!r}; only "
                         f"{', '.join(positional)} may be given without 'key='")
      key, text = positional[bare], item
      bare += 1
    if key not in keys:
      raise ValueError(f"{preset}: unknown arg key {key!r}; keys: {', '.join(keys)}")
    if key in seen:
      raise ValueError(f"{preset}: arg key {key!r} given twice")
    seen.add(key)
    try:
      out[key] = parsers[key](text)
    except ValueError as e:
      raise ValueError(f"{preset}: {key} {text!r} is invalid ({e})") from None
  return out


PARSERS: dict[str, Callable[[str], Any]] = {
    "dataset": one_of(DATASETS),
    "method": one_of(METHODS),
    "clients": positive_int,
    "participation": _participation,
    "split": one_of(SPLITS, _SPLIT_ALIASES),
    "seed": nonnegative_int,
    "train_size": nonnegative_int,
}
DEFAULTS = {"dataset": "cifar100", "method": "full", "clients": 64, "participation": 0.125,
            "split": "dirichlet", "seed": 1, "train_size": 0}


def client_lr(dataset: str, method: str) -> float:
  """The study's client learning rate for (dataset, method) without DP."""
  return LR_OVERRIDES.get((dataset, method), LR[method])


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
  """Sets config.peft / config.model.pretrained for a study method name."""
  if method == "scratch":
    c.peft.method = "full"
    c.model.pretrained = ""
    return
  c.model.pretrained = PRETRAINED
  if method in ("adapter", "adapter_paper"):
    c.peft.method = "adapter"
    c.peft.adapter.kind = "shared_zero_init" if method == "adapter_paper" else "sequential"
    c.peft.adapter.bottleneck = 96
    c.peft.adapter.activation = "gelu"
  else:
    c.peft.method = method
  if method == "prompt":  # VPT-deep, 10 tokens per layer, prompt dropout 0.1
    c.peft.prompt.kind = "deep"
    c.peft.prompt.num_tokens = 10
    c.peft.prompt.dropout = 0.1


def build(args: dict[str, Any]) -> ml_collections.ConfigDict:
  """The non-DP study config for parsed args (shared with configs/study_dp.py)."""
  c = sibling(__file__, "default").get_config()
  dataset, method = args["dataset"], args["method"]
  c.seed = args["seed"]

  c.model.variant = "B/16"
  c.model.image_size = 224
  c.model.pool = "token"
  c.model.representation_size = 0
  apply_method(c, method)

  c.data.dataset = dataset
  c.data.partition = args["split"]
  c.data.alpha = ALPHA[dataset]
  c.data.min_size = 10
  c.data.train_size = args["train_size"] or TRAIN_SIZE.get(dataset, 0)
  c.data.augment = "auto"  # cifar100: crop (pad 4) + flip; resisc45, pcam: flip
  # Resisc45 is 256 px; the study resizes to 224 anyway, so do it once on the host.
  c.data.host_resolution = 224 if dataset == "resisc45" else 0

  f = c.federated
  f.rounds = 50
  f.num_clients = args["clients"]
  f.clients_per_round = 0
  f.participation = args["participation"]
  f.local_epochs = 10
  f.local_steps = 0
  f.batch_size = 64
  f.client_optimizer = "sgd"
  f.client_lr = client_lr(dataset, method)
  f.client_momentum = 0.9
  f.client_nesterov = True
  f.client_weight_decay = 1e-4
  f.server_optimizer = "fedavg"
  f.server_lr = 1.0
  f.weighting = "examples"
  f.eval_every = 1
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: 'dataset,method[,key=value...]' or only key=value pairs (module docstring)."""
  return build(parse_arg(arg, _KEYS, _POSITIONAL, PARSERS, DEFAULTS, "configs/study.py"))
