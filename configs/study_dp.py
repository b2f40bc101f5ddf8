"""The study's differential-privacy runs, plus real DP-SGD and DP-FedAvg to compare.

  python -m fedpeft_jax.main --config=configs/study_dp.py:cifar100,bias --workdir=runs/dp_bias
  python -m fedpeft_jax.main --workdir=runs/dp_sgd_prompt \
      --config=configs/study_dp.py:dataset=patch_camelyon,method=prompt,mechanism=dp_sgd,epsilon=10

The argument is comma-separated `key=value` pairs; the first two items may be bare
(`dataset,method`). Keys (default in brackets):
  dataset     cifar100 | patch_camelyon (the study's DP datasets) | resisc45   [cifar100]
  method      full | head | bias | adapter | adapter_paper | prompt | lora | ssf  [bias]
  mechanism   paper_gaussian | dp_sgd | dp_fedavg | none               [paper_gaussian]
  epsilon     paper_gaussian: input of the authors' sigma formula (the study: 5 or 10);
              dp_sgd / dp_fedavg: the target the noise multiplier is calibrated to  [5]
  delta       [1e-3 for paper_gaussian (the study) and dp_fedavg (a client is the unit,
              64 clients); 1e-5 for dp_sgd (an example is the unit)]
  noise       dp_sgd / dp_fedavg: a fixed noise multiplier instead of calibrating to
              epsilon (the reported epsilon is then what it spends)
  clip        clip norm C: per tensor of the batch gradient (paper_gaussian), per
              example (dp_sgd), per client update (dp_fedavg)                   [1.0]
  adaptive    dp_fedavg: adaptive clipping to the median update norm (0/1)      [0]
              (off: a fixed clip norm. With 8 clients per round the count noise is
              too small for the calibrated multiplier below epsilon ~8 at delta 1e-3;
              the run then stops at start-up naming the epsilon, clients_per_round or
              count_noise_multiplier that would work)
  seed        [1]

Fixed as in the study: 64 clients, 12.5% participation (8 per round), Dirichlet non-IID
(alpha 0.1 for cifar100 / resisc45, 0.5 for patch_camelyon), everything else as in
configs/study.py, and the DP learning rates: full 5e-4, head 1e-3, bias 5e-3, adapter
1e-3, prompt 5e-3 (lora and ssf, not in the study: 1e-3, as adapter; not tuned).

CAUTION (docs/study.md): paper_gaussian is the authors' mechanism: each local step clips
every trainable tensor's batch gradient to C and adds N(0, sigma^2) with
sigma = 2C sqrt(2 ln(1.25/delta) / epsilon) (~3.38 at epsilon 5, delta 1e-3). Its
epsilon is only an input of that formula. What it does guarantee is accounted as
Gaussian steps of sensitivity 2C sqrt(k) (k trainable tensors) without amplification
and reported as epsilon (per example) and epsilon_client: for bias tuning (k = 100)
at the nominal epsilon 5, about 9.2e3 per example if a client joined all 50 rounds
(1.2e3 for the expected 6 of them). dp_sgd (per-example clipping, Poisson sampling,
RDP accountant) and dp_fedavg (client-level, Poisson-sampled clients) report the
epsilon actually spent.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from fedpeft_jax.config_files import sibling

DP_DATASETS = ("cifar100", "patch_camelyon", "resisc45")
DP_METHODS = ("full", "head", "bias", "adapter", "adapter_paper", "prompt", "lora", "ssf")
MECHANISMS = ("paper_gaussian", "dp_sgd", "dp_fedavg", "none")
DP_LR = {"full": 5e-4, "head": 1e-3, "bias": 5e-3, "adapter": 1e-3, "adapter_paper": 1e-3,
         "prompt": 5e-3, "lora": 1e-3, "ssf": 1e-3}
DEFAULT_DELTA = {"paper_gaussian": 1e-3, "dp_fedavg": 1e-3, "dp_sgd": 1e-5, "none": 1e-3}

_KEYS = ("dataset", "method", "mechanism", "epsilon", "delta", "noise", "clip", "adaptive",
         "seed")
_POSITIONAL = ("dataset", "method")


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise ValueError("must be > 0")
  return value


def _flag(text: str) -> bool:
  value = text.strip().lower()
  if value not in ("0", "1", "true", "false", "yes", "no"):
    raise ValueError("allowed: 0, 1, true, false")
  return value in ("1", "true", "yes")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: 'dataset,method[,key=value...]' or only key=value pairs (module docstring)."""
  study = sibling(__file__, "study")
  parsers: dict[str, Callable[[str], Any]] = {
      "dataset": study.one_of(DP_DATASETS),
      "method": study.one_of(DP_METHODS),
      "mechanism": study.one_of(MECHANISMS),
      "epsilon": _positive_float,
      "delta": _positive_float,
      "noise": _positive_float,
      "clip": _positive_float,
      "adaptive": _flag,
      "seed": study.nonnegative_int,
  }
  defaults = {"dataset": "cifar100", "method": "bias", "mechanism": "paper_gaussian",
              "epsilon": 5.0, "delta": None, "noise": None, "clip": 1.0, "adaptive": False,
              "seed": 1}
  a = study.parse_arg(arg, _KEYS, _POSITIONAL, parsers, defaults, "configs/study_dp.py")
  mech = a["mechanism"]
  if a["noise"] is not None and mech not in ("dp_sgd", "dp_fedavg"):
    raise ValueError(f"configs/study_dp.py: noise applies to dp_sgd / dp_fedavg, not {mech!r}")
  if a["adaptive"] and mech != "dp_fedavg":
    raise ValueError(f"configs/study_dp.py: adaptive applies to dp_fedavg, not {mech!r}")

  c = study.build({"dataset": a["dataset"], "method": a["method"], "clients": 64,
                   "participation": 0.125, "split": "dirichlet", "seed": a["seed"],
                   "train_size": 0})
  c.federated.client_lr = DP_LR[a["method"]]

  p = c.privacy
  p.mechanism = mech
  p.clip_norm = a["clip"]
  p.epsilon = a["epsilon"]
  p.delta = a["delta"] if a["delta"] is not None else DEFAULT_DELTA[mech]
  if mech in ("dp_sgd", "dp_fedavg"):
    p.sampling = "poisson"  # what the accountant assumes: a formal guarantee
    p.accountant = "rdp"
    p.calibrate = a["noise"] is None
    if a["noise"] is not None:
      p.noise_multiplier = a["noise"]
    p.adaptive_clip = a["adaptive"]
  return c
