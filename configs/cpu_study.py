"""The study's analyses at CPU scale (experiments/cpu_study.py): one cell per config.

  python -m fedpeft_jax.main --workdir=runs/cs_bias \
      --config=configs/cpu_study.py:close,bias,clients=64,participation=0.125,lr=0.1,seed=1 \
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
  split              dirichlet (alpha 0.3, below) | iid                    [dirichlet]
  train_size         close target: training examples, validation excluded (0 = the scale's)
  rounds             0 = the scale's rounds / participation (below)                  [0]
  lr                 client learning rate (0 = the quickstart's for the method; the study
                     passes the rate its sweep chose on validation)                     [0]
  mechanism          none | dp_fedavg | paper_gaussian                            [none]
  epsilon            dp_fedavg: the calibration target; paper_gaussian: the nominal
                     epsilon of the study's sigma formula                          [5]
  clip               dp_fedavg: the bound C on a client's update norm (0 = DP_CLIP_NORM)  [0]
  seed               seed 0 tunes (the sweeps), the study's runs use 1..5           [1]
  scale              full | quick (a smoke-test model, for --quick and the tests)  [full]

What is scaled down from the study (docs/study.md), and why: two CPU cores must run ~170 runs
(~89 of them sweeps) in about 80 minutes, so a run gets seconds.
  * backbone: ViT hidden 128, depth 2, 4 heads, MLP 512, patch 4 at 16x16 (16 tokens),
    pre-trained 3 epochs on Fashion-MNIST classes 0-4 instead of ViT-B/16 on ImageNet-21k.
    Width sets the byte ratio (weights grow as width^2, biases as width): at 128 wide, bias
    tuning moves ~110x fewer bytes than full fine-tuning (ViT-B: ~480x), so the study's
    ">= 100x" filter is meaningful; depth 2 keeps the runs affordable.
  * federated: 20 rounds of 3 local epochs at full participation (the study: 50 x 10), batch
    32; the server step decays by a cosine over the rounds that apply an update (the study:
    constant). At participation p a run gets 20 / p rounds, so every cell sees the same
    expected number of client updates (matched local steps) and trains to its plateau;
    evaluation every 2 / p rounds (10 evaluations per run), the final number the mean of the
    last 3.
  * validation: a quarter of the training count is held out on top (stratified, seeded:
    data.val_size); every learning rate and the DP clip are chosen on it, never on test.
  * data: the close target trains on 1,500 of its 30,000 training images (5%), so the
    data-scarcity cells at 1% and 10% bracket it; digits trains on 1,150 of 1,437.
  * sampling: participation < 1 draws clients by Poisson sampling (expected 8 of 64), with
    or without DP, so the DP cells and their no-DP reference sample alike.
  * DP: 64 clients, expected 8 per round. dp_fedavg: delta = 1 / clients^2, the clip C and
    the learning rate tuned on validation, the noise calibrated to epsilon over the run.
    paper_gaussian: the study's own setting (per-tensor clip 1, delta 1e-3, sigma from the
    nominal epsilon).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from fedpeft_jax.config_files import sibling

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
    "full": {"hidden": 128, "depth": 2, "heads": 4, "mlp": 512, "rounds": 20, "eval_every": 2,
             "close_train": 1500, "pretrain_epochs": 3, "pretrain_train": 0},
    "quick": {"hidden": 32, "depth": 2, "heads": 4, "mlp": 64, "rounds": 2, "eval_every": 1,
              "close_train": 1500, "pretrain_epochs": 1, "pretrain_train": 3000},
}
# Local epochs per round. At 1 epoch validation still rose steeply at round 20; at 2 (the
# study's first run) it still moved 2-8 points between the last 3 evaluations and the 3
# before; 3 buys 1.5x the local steps without more rounds, evaluations or per-round costs.
LOCAL_EPOCHS = 3
# The server's step over a run (federated.server_lr_schedule). The study (and the first two
# CPU runs) keep it constant; with a constant step full fine-tuning's validation curves were
# still climbing or swinging round to round at the end of the budget (the second run: +11.7
# points between the last 3 evaluations and the 3 before, non-IID). A cosine decay of the
# server step to 0 over the run settles every method within the same rounds (FedAvg on
# non-IID data needs a decaying step to converge: Li et al., ICLR 2020), for every cell
# alike; the clients' local SGD keeps the tuned constant rate. The schedule counts rounds
# that apply an update (federated.server.server_learning_rate): where Poisson sampling
# draws nobody (16 clients at 12.5%: 0.875^16, ~12% of rounds; 64 clients: ~0.02%) the
# step does not advance, so those runs end at a few percent of the step, not at 0.
SERVER_LR_SCHEDULE = "cosine"
# Validation held out on top of the training count: this fraction of it (digits: of the pool).
VAL_PER_TRAIN = 0.25
IMAGE_SIZE = 16
PATCH_SIZE = 4
# The study's Dirichlet 0.1 (min 10 per client) is for 100 classes; over 5 classes and ~23
# images per client (64 clients) no draw satisfies it even with min 1. 0.3 with min 5 is the
# most skewed split every cell here can draw (top class ~2/3 of a client's images).
DIRICHLET_ALPHA = 0.3
MIN_CLIENT_SIZE = 5
# dp_fedavg: the default bound C on a client's update norm; the study tunes C per method on
# validation (experiments/cpu_study.py), this is only the value without a `clip` key.
DP_CLIP_NORM = 0.1
PAPER_CLIP_NORM = 1.0  # paper_gaussian: per-tensor batch-gradient bound C (the study's)

_KEYS = ("target", "method", "clients", "participation", "split", "train_size", "rounds",
         "lr", "mechanism", "epsilon", "clip", "seed", "scale")
_POSITIONAL = ("target", "method")


def _fraction(text: str) -> float:
  value = float(text)
  if not 0 < value <= 1:
    raise ValueError("must be in (0, 1]")
  return value


def _nonnegative_float(text: str) -> float:
  value = float(text)
  if not value >= 0:
    raise ValueError("must be >= 0")
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
    "split": study.one_of(study.SPLITS),
    "train_size": study.nonnegative_int,
    "rounds": study.nonnegative_int,
    "lr": _nonnegative_float,
    "mechanism": study.one_of(MECHANISMS),
    "epsilon": _positive_float,
    "clip": _nonnegative_float,
    "seed": study.nonnegative_int,
    "scale": study.one_of(SCALES),
}
DEFAULTS: dict[str, Any] = {
    "target": "close", "method": "full", "clients": 16, "participation": 1.0,
    "split": "dirichlet", "train_size": 0, "rounds": 0, "lr": 0.0, "mechanism": "none",
    "epsilon": 5.0, "clip": 0.0, "seed": 1, "scale": "full"}


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
    train = a["train_size"] or scale["close_train"]
    c.data.dataset = "fashion_mnist"
    c.data.classes = CLOSE_CLASSES
    val = round(VAL_PER_TRAIN * train)  # a count, held out of the pool below
    c.data.val_size = val
    c.data.train_size = train + val
  else:
    if a["train_size"]:
      raise ValueError("configs/cpu_study.py: train_size applies to the close target only")
    c.data.dataset = "digits"
    c.data.resolution = IMAGE_SIZE
    c.data.val_size = VAL_PER_TRAIN / (1.0 + VAL_PER_TRAIN)  # of the pool: 287 of 1,437
  c.data.augment = "none"  # no flips: lets 'head' cache features; digits have none anyway
  c.data.partition = a["split"]
  c.data.alpha = DIRICHLET_ALPHA
  c.data.min_size = MIN_CLIENT_SIZE

  f = c.federated
  # Matched local steps: at participation p, 1 / p times the rounds (and the evaluation
  # interval), so every cell sees the same expected number of client updates.
  stretch = 1.0 / a["participation"]
  f.rounds = a["rounds"] or round(scale["rounds"] * stretch)
  f.num_clients = a["clients"]
  f.participation = a["participation"]
  # Partial participation draws by Poisson sampling with or without DP, so a DP cell and
  # its no-DP reference take part alike.
  f.client_sampling = "poisson" if a["participation"] < 1.0 else "uniform"
  f.local_epochs = LOCAL_EPOCHS
  f.batch_size = 32
  f.client_lr = a["lr"] or quickstart.LEARNING_RATES[method]
  f.server_lr_schedule = SERVER_LR_SCHEDULE
  f.eval_every = max(1, round(scale["eval_every"] * stretch))
  f.eval_batch_size = 1000
  c.checkpoint_every = max(5, f.rounds // 4)

  p = c.privacy
  p.mechanism = a["mechanism"]  # privacy.reproducible_noise stays False: noise from the OS
  p.epsilon = a["epsilon"]
  if a["mechanism"] == "dp_fedavg":
    p.delta = 1.0 / a["clients"] ** 2
    p.clip_norm = a["clip"] or DP_CLIP_NORM
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
