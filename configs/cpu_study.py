"""The study's analyses at CPU scale (experiments/cpu_study.py): one cell per config.

  python -m fedpeft_jax.main --workdir=runs/cs_bias \
      --config=configs/cpu_study.py:close,bias,clients=64,participation=0.125,seed=42 \
      --config.model.pretrained=runs/cpu_study/pretrain/pretrained.npz
  python -m fedpeft_jax.pretrain --config=configs/cpu_study.py:pretrain --workdir=runs/cs_pt

The argument is comma-separated `key=value` pairs; the first two items may be bare
(`target,method`). Keys (default in brackets):
  target             close (Fashion-MNIST classes 5-9: new classes of the backbone's own
                     domain) | far (scikit-learn digits: another domain) | pretrain (the
                     backbone's own config: Fashion-MNIST classes 0-4, central training)  [close]
  method             full | head | bias | adapter | prompt | lora | scratch (full training
                     from random init)                                                    [full]
  clients            [16]     participation  fraction per round [1.0]
  clients_per_round  > 0 wins over participation (equal-communication cells) [0]
  split              dirichlet (alpha 0.3, below) | iid                    [dirichlet]
  train_size         close target: training examples kept (0 = the scale's base) [0]
  rounds             0 = the scale's                                              [0]
  mechanism          none | dp_fedavg | paper_gaussian                            [none]
  epsilon            dp_fedavg: the calibration target; paper_gaussian: the nominal
                     epsilon of the study's sigma formula                          [5]
  seed               the study: 1, 42, 3407                                        [1]
  scale              full | quick (a smoke-test model, for --quick and the tests)  [full]

What is scaled down from the study (docs/study.md), and why: two CPU cores must run ~180 cells
in under an hour, so a cell gets seconds, most of it JIT compilation.
  * backbone: ViT hidden 64, depth 4, 4 heads, MLP 128, patch 4 at 16x16 (16 tokens; the
    quickstart's), pre-trained 3 epochs on Fashion-MNIST classes 0-4 instead of ViT-B/16 on
    ImageNet-21k. Its full fine-tuning moves ~50x the bytes of bias tuning (ViT-B: ~480x).
  * federated: 10 rounds of 1 local epoch (the study: 50 x 10), batch 32, the quickstart's
    learning rates (tuned once on digits), evaluation every 2 rounds (the close target's test
    split has 5,000 images and the runner has no test subset; 'best' is over those rounds).
  * data: the close target keeps 1,500 of its 30,000 training images (5%), so the
    data-scarcity cells at 1% and 20% bracket it; digits keeps all 1,437.
  * DP: 64 clients, 8 per round. dp_fedavg: Poisson-sampled clients, delta = 1 / clients^2,
    clip 0.1 (full fine-tuning's median client update norm; PEFT's is ~0.2), the
    noise calibrated to epsilon over 10 rounds. paper_gaussian: the study's own setting
    (per-tensor clip 1, delta 1e-3, sigma from the nominal epsilon).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from fedpeft_jax.runner.config_files import sibling

study = sibling(__file__, "study")
study_dp = sibling(__file__, "study_dp")
quickstart = sibling(__file__, "quickstart")

TARGETS = ("close", "far", "pretrain")
METHODS = ("full", "head", "bias", "adapter", "prompt", "lora", "scratch")
MECHANISMS = ("none", "dp_fedavg", "paper_gaussian")
SCALES = ("full", "quick")
STUDY_SEEDS = study.STUDY_SEEDS
# The backbone learns classes 0-4; the close target is the other five, relabelled 0-4.
SOURCE_CLASSES = "0,1,2,3,4"
CLOSE_CLASSES = "5,6,7,8,9"
CLOSE_TRAIN_EXAMPLES = 30000  # Fashion-MNIST's training images of classes 5-9
# Per scale: model size, federated schedule, data and pre-training budget.
SCALE = {
    "full": {"hidden": 64, "depth": 4, "heads": 4, "mlp": 128, "rounds": 10, "eval_every": 2,
             "close_train": 1500, "pretrain_epochs": 3, "pretrain_train": 0},
    "quick": {"hidden": 32, "depth": 2, "heads": 4, "mlp": 64, "rounds": 2, "eval_every": 1,
              "close_train": 1500, "pretrain_epochs": 1, "pretrain_train": 3000},
}
IMAGE_SIZE = 16
PATCH_SIZE = 4
# The study's Dirichlet 0.1 (min 10 per client) is for 100 classes; over 5 classes and ~23
# images per client (64 clients) no draw satisfies it even with min 1. 0.3 with min 5 is the
# most skewed split every cell here can draw (top class ~2/3 of a client's images).
DIRICHLET_ALPHA = 0.3
MIN_CLIENT_SIZE = 5
# dp_fedavg: the bound C on a client's update norm. Adaptive clipping measured the median
# update norm here at ~0.1 for full fine-tuning and ~0.2 for bias and prompt; one C for all,
# at full fine-tuning's median, clips PEFT harder: a choice that favours full fine-tuning.
DP_CLIP_NORM = 0.1
PAPER_CLIP_NORM = 1.0  # paper_gaussian: per-tensor batch-gradient bound C (the study's)

_KEYS = ("target", "method", "clients", "participation", "clients_per_round", "split",
         "train_size", "rounds", "mechanism", "epsilon", "seed", "scale")
_POSITIONAL = ("target", "method")


def _fraction(text: str) -> float:
  value = float(text)
  if not 0 < value <= 1:
    raise ValueError("must be in (0, 1]")
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise ValueError("must be > 0")
  return value


PARSERS: dict[str, Callable[[str], Any]] = {
    "target": study.one_of(TARGETS),
    "method": study.one_of(METHODS),
    "clients": study.positive_int,
    "participation": _fraction,
    "clients_per_round": study.nonnegative_int,
    "split": study.one_of(study.SPLITS),
    "train_size": study.nonnegative_int,
    "rounds": study.nonnegative_int,
    "mechanism": study.one_of(MECHANISMS),
    "epsilon": _positive_float,
    "seed": study.nonnegative_int,
    "scale": study.one_of(SCALES),
}
DEFAULTS: dict[str, Any] = {
    "target": "close", "method": "full", "clients": 16, "participation": 1.0,
    "clients_per_round": 0, "split": "dirichlet", "train_size": 0, "rounds": 0,
    "mechanism": "none", "epsilon": 5.0, "seed": 1, "scale": "full"}


def parse(arg: str) -> dict[str, Any]:
  """The arg's keys with defaults filled in (the experiment names cells from it)."""
  return study.parse_arg(arg, _KEYS, _POSITIONAL, PARSERS, DEFAULTS, "configs/cpu_study.py")


def _model(c: ml_collections.ConfigDict, scale: dict[str, Any]) -> None:
  c.model.variant = "Ti/4"  # every size field below overrides it
  c.model.hidden_size = scale["hidden"]
  c.model.depth = scale["depth"]
  c.model.num_heads = scale["heads"]
  c.model.mlp_dim = scale["mlp"]
  c.model.patch_size = PATCH_SIZE
  c.model.image_size = IMAGE_SIZE


def pretrain_config(scale_name: str = "full", seed: int = 0) -> ml_collections.ConfigDict:
  """Central pre-training on Fashion-MNIST classes 0-4 (as configs/pretrain_fashion.py)."""
  scale = SCALE[scale_name]
  c = sibling(__file__, "default").get_config()
  c.seed = seed
  _model(c, scale)
  c.model.pretrained = ""
  c.data.dataset = "fashion_mnist"
  c.data.classes = SOURCE_CLASSES
  c.data.train_size = scale["pretrain_train"]
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.epochs = scale["pretrain_epochs"]
  c.pretrain.batch_size = 128
  c.pretrain.lr = 1e-3
  c.pretrain.weight_decay = 0.05
  return c


def build(a: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config of one cell from parsed args."""
  scale = SCALE[a["scale"]]
  if a["target"] == "pretrain":
    return pretrain_config(a["scale"], a["seed"])
  method = a["method"]
  c = sibling(__file__, "default").get_config()
  c.seed = a["seed"]
  _model(c, scale)
  # The experiment sets the path of the backbone it pre-trained; this is its default place.
  c.model.pretrained = "" if method == "scratch" else "runs/cpu_study/pretrain/pretrained.npz"
  c.peft.method = "full" if method == "scratch" else method
  c.peft.adapter.bottleneck = scale["hidden"] // 8  # the study's 768 -> 96
  c.peft.lora.rank = 4
  c.peft.lora.alpha = 4.0
  c.peft.prompt.kind = "deep"
  c.peft.prompt.num_tokens = 4
  c.peft.prompt.dropout = 0.0

  if a["target"] == "close":
    c.data.dataset = "fashion_mnist"
    c.data.classes = CLOSE_CLASSES
    c.data.train_size = a["train_size"] or scale["close_train"]
  else:
    if a["train_size"]:
      raise ValueError("configs/cpu_study.py: train_size applies to the close target only")
    c.data.dataset = "digits"
    c.data.resolution = IMAGE_SIZE
  c.data.augment = "none"  # no flips: lets 'head' cache features; digits have none anyway
  c.data.partition = a["split"]
  c.data.alpha = DIRICHLET_ALPHA
  c.data.min_size = MIN_CLIENT_SIZE

  f = c.federated
  f.rounds = a["rounds"] or scale["rounds"]
  f.num_clients = a["clients"]
  f.clients_per_round = a["clients_per_round"]
  f.participation = a["participation"]
  f.local_epochs = 1
  f.batch_size = 32
  f.client_lr = quickstart.LEARNING_RATES[method]
  f.eval_every = scale["eval_every"]
  f.eval_batch_size = 1000
  c.checkpoint_every = 5

  p = c.privacy
  p.mechanism = a["mechanism"]  # privacy.reproducible_noise stays False: noise from the OS
  p.epsilon = a["epsilon"]
  if a["mechanism"] == "dp_fedavg":
    p.delta = 1.0 / a["clients"] ** 2
    p.clip_norm = DP_CLIP_NORM
    p.calibrate = True
    p.sampling = "poisson"  # what the accountant assumes: a formal guarantee
    p.accountant = "rdp"
  elif a["mechanism"] == "paper_gaussian":  # the study's setting: sigma from (5, 1e-3, C=1)
    p.delta = study_dp.DEFAULT_DELTA["paper_gaussian"]
    p.clip_norm = PAPER_CLIP_NORM
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: 'target,method[,key=value...]' (module docstring)."""
  return build(parse(arg))
