"""Server optimizers: FedAvg, FedAvgM and FedOpt (Reddi et al., ICLR 2021, Algorithm 2).

The engine hands the server optimizer the pseudo-gradient g = -Delta, the negated
weighted-mean client update, so that any optax optimizer can run at the server; FedAvg
is SGD with learning rate 1 and FedAvgM is SGD with momentum (Hsu et al., 2019).

FedAdagrad, FedAdam and FedYogi are written out here rather than taken from optax,
because optax's optimizers are not Reddi et al.'s: `optax.adagrad` has no momentum and
adds eps inside the square root (an effective tau of sqrt(eps), ~0.03 for eps = 1e-3),
and `optax.adam`/`optax.yogi` always apply bias correction. Algorithm 2, with Delta_t
the round's averaged client update, reads

  m_t = b1 m_{t-1} + (1 - b1) Delta_t                                (all three)
  v_t = v_{t-1} + Delta_t^2                                          (FedAdagrad)
  v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                              (FedAdam)
  v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)       (FedYogi)
  x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

initialised with m_{-1} = 0 and v_{-1} = tau^2 (the paper asks for v_{-1} >= tau^2; we
take the bound, which keeps the first round's denominator away from zero).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax.choices import one_of

PyTree = Any
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def check_server_optimizer(name: str) -> str:
  """federated.server_optimizer: one of SERVER_OPTIMIZERS."""
  return one_of("federated.server_optimizer", name, SERVER_OPTIMIZERS)


# How the server learning rate moves over a run: 'constant' (the study's and FedAvg's) or
# 'cosine' (from server_lr down to 0 over the run's rounds; Loshchilov & Hutter's SGDR
# without restarts).
SERVER_LR_SCHEDULES = ("constant", "cosine")


def check_server_lr_schedule(name: str) -> str:
  """federated.server_lr_schedule: one of SERVER_LR_SCHEDULES."""
  return one_of("federated.server_lr_schedule", name, SERVER_LR_SCHEDULES)


def server_learning_rate(learning_rate: float, schedule: str = "constant",
                         rounds: int = 0) -> float | optax.Schedule:
  """The server step size, a number or an optax schedule of the rounds applied so far.

  'cosine' gives eta_t = server_lr * (1 + cos(pi t / rounds)) / 2 at the t-th applied
  round (t = 0, 1, ...): the model takes its full step at first and ever smaller ones
  towards the end, so a fixed budget of rounds ends at a settled model rather than in the
  middle of FedAvg's round-to-round swings under non-IID data (with a constant rate the
  global model keeps moving around its fixed point; Li et al., ICLR 2020, show that FedAvg
  on non-IID data needs a decaying step to converge). The count is the optimizer's own, kept
  in its state (checkpointed, so a resumed run continues the schedule exactly); a round in
  which no client contributed leaves the state, and hence the schedule, where it was.
  """
  check_server_lr_schedule(schedule)
  if schedule == "constant":
    return learning_rate
  if rounds < 1:
    raise ValueError(f"federated.rounds must be >= 1 for a cosine server schedule, got {rounds}")
  return optax.cosine_decay_schedule(learning_rate, decay_steps=rounds)
# The second-moment rules of Algorithm 2, keyed by the optimizer they come from.
FEDOPT_KINDS = ("adagrad", "adam", "yogi")
# Server optimizer name -> FedOpt kind.
_FEDOPT = {"fedadagrad": "adagrad", "fedadam": "adam", "fedyogi": "yogi"}


class ScaleByFedOptState(NamedTuple):
  """Plain arrays only, so the state checkpoints with orbax and replicates on a mesh."""
  count: jax.Array  # int32 scalar: rounds applied (the exponent of the bias correction)
  mu: PyTree  # first moment of the pseudo-gradient (= -m_t of Algorithm 2)
  nu: PyTree  # second moment v_t


def scale_by_fedopt(kind: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
                    bias_correction: bool = False) -> optax.GradientTransformation:
  """Rescales pseudo-gradients by Algorithm 2 of Reddi et al.: out = m / (sqrt(v) + tau).

  Chain it with `optax.scale_by_learning_rate(eta)` to get x + eta m_t / (sqrt(v_t) + tau)
  (the moments are taken of g = -Delta, so the sign flips back). `kind` picks the
  second-moment rule ('adagrad', 'adam' or 'yogi'); b2 is unused by 'adagrad'.

  bias_correction=False is the paper's algorithm (m_{-1} = 0, v_{-1} = tau^2). True is
  Adam's correction as optax applies it: the moments start at zero and are divided by
  (1 - b1^t) and (1 - b2^t). They start at zero rather than tau^2 because the correction
  is derived for a zero start: applied to tau^2 it would multiply it by b2 / (1 - b2)
  (99 for b2 = 0.99) in the first round, a tenfold effective tau. With True, 'adam'
  equals `optax.adam(eta, b1, b2, eps=tau)`. Adagrad's sum has no decay to correct for,
  so 'adagrad' rejects True.
  """
  if kind not in FEDOPT_KINDS:
    raise ValueError(f"scale_by_fedopt: unknown kind {kind!r}; allowed: {', '.join(FEDOPT_KINDS)}")
  if kind == "adagrad" and bias_correction:
    raise ValueError("scale_by_fedopt: FedAdagrad has no bias correction (its second moment "
                     "is a sum, not a decaying average)")
  if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
    raise ValueError(f"scale_by_fedopt: b1 and b2 must be in [0, 1), got {b1}, {b2}")
  if not tau > 0.0:
    raise ValueError(f"scale_by_fedopt: tau must be > 0, got {tau}")
  nu_start = 0.0 if bias_correction else tau**2

  def init_fn(params: PyTree) -> ScaleByFedOptState:
    return ScaleByFedOptState(count=jnp.zeros([], jnp.int32),
                              mu=jax.tree.map(jnp.zeros_like, params),
                              nu=jax.tree.map(lambda p: jnp.full_like(p, nu_start), params))

  def second_moment(g: jax.Array, v: jax.Array) -> jax.Array:
    g2 = jnp.square(g)
    if kind == "adagrad":
      return v + g2
    if kind == "adam":
      return b2 * v + (1.0 - b2) * g2
    return v - (1.0 - b2) * g2 * jnp.sign(v - g2)

  def update_fn(updates: PyTree, state: ScaleByFedOptState,
                params: PyTree = None) -> tuple[PyTree, ScaleByFedOptState]:
    del params
    mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)
    nu = jax.tree.map(second_moment, updates, state.nu)
    count = optax.safe_increment(state.count)
    if bias_correction:
      t = count.astype(jnp.float32)
      c1, c2 = 1.0 - b1**t, 1.0 - b2**t
      out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + tau), mu, nu)
    else:
      out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
    return out, ScaleByFedOptState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_server_optimizer(name: str, learning_rate: float = 1.0, momentum: float = 0.9,
                          b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
                          bias_correction: bool = False, schedule: str = "constant",
                          rounds: int = 0) -> optax.GradientTransformation:
  """The server optimizer `name`, with Reddi et al.'s defaults (b1 0.9, b2 0.99, tau 1e-3).

  `schedule` and `rounds` set how the learning rate moves over the run
  (`server_learning_rate`).

  eps is Reddi et al.'s tau. momentum is used by 'fedavgm' only; b1 by the three FedOpt
  optimizers (Algorithm 2 gives FedAdagrad momentum too; b1 = 0 removes it); b2 by
  'fedadam' and 'fedyogi'; bias_correction by 'fedadam' and 'fedyogi' only (the others
  ignore it, as they ignore the fields of other optimizers).

  bias_correction defaults to False, the published algorithm: this library reproduces
  published methods, and Reddi et al.'s tuned (eta, tau) grids and results are for the
  uncorrected form, whose v_{-1} = tau^2 start needs no correction. True gives optax's
  bias-corrected Adam/Yogi (this library's behaviour before the option existed).
  """
  check_server_optimizer(name)
  if learning_rate <= 0:
    raise ValueError(f"federated.server_lr must be > 0, got {learning_rate}")
  rate = server_learning_rate(learning_rate, schedule, rounds)
  if name == "fedavg":
    return optax.sgd(rate)
  if name == "fedavgm":
    return optax.sgd(rate, momentum=momentum)
  if name in _FEDOPT:
    kind = _FEDOPT[name]
    return optax.chain(
        scale_by_fedopt(kind, b1=b1, b2=b2, tau=eps,
                        bias_correction=bias_correction and kind != "adagrad"),
        optax.scale_by_learning_rate(rate))
  raise AssertionError(name)  # check_server_optimizer admits no other name
