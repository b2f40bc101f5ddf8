"""Server optimizers (FedOpt: Reddi et al., ICLR 2021).

The server treats the negated weighted-mean client update as a pseudo-gradient and
hands it to an optax optimizer; FedAvg is SGD with learning rate 1.
"""

from __future__ import annotations

from typing import Any

import optax

PyTree = Any
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def make_server_optimizer(name: str, learning_rate: float = 1.0, momentum: float = 0.9,
                          b1: float = 0.9, b2: float = 0.99,
                          eps: float = 1e-3) -> optax.GradientTransformation:
  """Server optimizers with the defaults of Reddi et al. (beta1 0.9, beta2 0.99, tau 1e-3).

  optax's adam applies bias correction, which Reddi et al.'s Algorithm 2 omits; the
  difference vanishes after a few rounds and is kept for optax compatibility.
  """
  if learning_rate <= 0:
    raise ValueError(f"federated.server_lr must be > 0, got {learning_rate}")
  if name == "fedavg":
    return optax.sgd(learning_rate)
  if name == "fedavgm":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "fedadam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "fedyogi":
    # optax's yogi starts its second moment at 1e-6 = tau**2 for Reddi et al.'s tau = 1e-3.
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "fedadagrad":
    return optax.adagrad(learning_rate, initial_accumulator_value=eps**2, eps=eps)
  raise ValueError(f"federated.server_optimizer: unknown {name!r}; allowed: "
                   f"{', '.join(SERVER_OPTIMIZERS)}")
