"""Personalised federated PEFT: parameters that stay on the client.

`federated.personal` names trainable leaves by regex over their '/'-joined paths. Those
leaves are *personal*: each client keeps its own copy in the round's per-client state
(`engine.ClientStateSpec`), trains it locally, and never uploads it; the server averages
and sends only the *shared* rest, so the byte counts exclude the personal leaves.

* `personal="head"` with schedule "none" is FedPer (Arivazhagan et al. 2019): body shared,
  head local, both trained together each round.
* `personal="lora_b"` is FedSA-LoRA (Guo et al., ICLR 2025): LoRA's A matrices are shared,
  its B matrices stay local.
* schedule "fedrep" is FedRep (Collins et al., ICML 2021): each round a client first trains
  its personal part for `personal_epochs` epochs with the shared part fixed, then the
  shared part for `local_epochs` with its new personal part fixed. As published, many head
  epochs precede the body: the paper trains the head for 10 local epochs, then the
  representation for 1, and the authors' code (github.com/lgcollins/FedRep) computes the head
  epochs as local_ep - local_rep_ep, run with local_ep 11 and local_rep_ep 1
  (FEDREP_HEAD_EPOCHS, FEDREP_BODY_EPOCHS: the default `personal_epochs` is the former, and
  `local_epochs = FEDREP_BODY_EPOCHS` completes it).
* schedule "fedbabu" is FedBABU (Oh et al., ICLR 2022): the personal part (the head only)
  stays frozen at its initial value during federated training, so only the body learns;
  before personalised evaluation each client fine-tunes its own copy of the head for
  `personal_finetune_epochs` on its training data (`make_finetune`), as the paper's
  abstract describes. (Its experiments also fine-tune the body; that variant is not here.)

Personalised accuracy is computed by `evaluation.make_client_evaluate` on per-client test
sets (`data.partition_test`).

A run sets personalisation up from its config in this order: `split_for_schedule` (which
leaves are personal), `initial_personal` (where every client's copy starts),
`personal_client_rule` (what the round trains and keeps per client), and for evaluation
`evaluation_finetune` and `fixed_personal_rows` (FedBABU's per-client fine-tuning of its
frozen head).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh

from fedpeft_jax.choices import one_of
from fedpeft_jax.federated import client_rows
from fedpeft_jax.federated.client import ClientSpec, make_client_update
from fedpeft_jax.federated.engine import ClientStateSpec
from fedpeft_jax.peft.partition import flatten, mask_from_patterns, merge, split

PyTree = Any

# FedRep's published schedule per round (module docstring): head epochs, then body epochs.
FEDREP_HEAD_EPOCHS = 10
FEDREP_BODY_EPOCHS = 1
PERSONAL_SCHEDULES = ("none", "fedrep", "fedbabu")


def check_schedule(schedule: str) -> str:
  """federated.personal_schedule: one of PERSONAL_SCHEDULES."""
  return one_of("federated.personal_schedule", schedule, PERSONAL_SCHEDULES)
HEAD_PREFIX = "head/"  # the classifier's params (models.ViT's `head` Dense)


def parse_patterns(personal: str) -> tuple[str, ...]:
  """'head,lora_b' -> ('head', 'lora_b'); each a valid regex (else a named ValueError)."""
  if not isinstance(personal, str):
    raise ValueError(f"federated.personal must be a string of comma-separated regexes, got "
                     f"{personal!r}")
  patterns = tuple(p.strip() for p in personal.split(",") if p.strip())
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"federated.personal: {p!r} is not a valid regex ({e})") from e
  return patterns


def split_personal(trainable: PyTree, personal: str) -> tuple[dict, dict]:
  """(shared, personal) parts of the trainable subtree, by `federated.personal`'s regexes
  (re.search on each '/'-joined path). Errors name the field when the patterns select no
  trainable leaf (a typo would otherwise silently run plain FedAvg) or every one (nothing
  would be federated)."""
  patterns = parse_patterns(personal)
  if not patterns:
    raise ValueError("federated.personal is empty: give regexes over trainable param paths")
  mask = mask_from_patterns(trainable, include=patterns)
  chosen = [p for p, m in flatten(mask).items() if m]
  paths = list(flatten(trainable))
  if not chosen:
    raise ValueError(f"federated.personal {personal!r} matches no trainable parameter; "
                     f"trainable paths look like {paths[:3]} (e.g. 'head' or 'lora_b')")
  if len(chosen) == len(paths):
    raise ValueError(f"federated.personal {personal!r} matches every trainable parameter, so "
                     "nothing would be shared; narrow it (e.g. 'head') or train more leaves")
  personal_part, shared = split(trainable, mask)
  return shared, personal_part


def check_fedbabu(personal: PyTree) -> None:
  """FedBABU freezes the classifier head during training and fine-tunes it per client:
  its personal part must be head leaves only (a frozen random LoRA B, say, would distort
  the backbone for good)."""
  other = [p for p in flatten(personal) if not p.startswith(HEAD_PREFIX)]
  if other:
    raise ValueError(f"federated.personal_schedule 'fedbabu' keeps the classifier head "
                     f"frozen, so federated.personal must select only {HEAD_PREFIX} leaves; "
                     f"it also selects {other[:3]} (use federated.personal=head)")


def _split_like(tree: PyTree, shared: PyTree, personal: PyTree) -> tuple[dict, dict]:
  """`tree` (laid out like merge(shared, personal)) split back into those two parts."""
  mask = merge(jax.tree_util.tree_map(lambda _: True, shared),
               jax.tree_util.tree_map(lambda _: False, personal))
  return split(tree, mask)


def _epochs_update(model: Any, client_tx: optax.GradientTransformation, spec: ClientSpec,
                   num_classes: int, epochs: int) -> Callable[..., dict]:
  """The default client rule run for `epochs` local epochs (not capped by
  federated.local_steps, which is about the shared training): FedRep's personal phase and
  FedBABU's fine-tuning."""
  return make_client_update(model, client_tx,
                            dataclasses.replace(spec, local_epochs=epochs, local_steps=0),
                            num_classes)


def make_personal_update(model: Any, client_tx: optax.GradientTransformation,
                         spec: ClientSpec, num_classes: int, schedule: str = "none",
                         personal_epochs: int = 1) -> Callable[..., dict]:
  """The stateful client rule of FedPer / FedSA-LoRA ("none") or FedRep ("fedrep"):

    client_update(shared, frozen, data, client_id, key, active, personal_row) -> dict

  with the default rule's outputs (`make_client_update`) for the shared part (`update` is
  the shared update only, so only it is uploaded and averaged) and the client's new
  personal leaves as `client_state`. Local training itself is the default rule's, called on
  the parts it trains; nothing about steps, DP or optimisers is re-implemented here.
  """
  if schedule not in ("none", "fedrep"):
    raise ValueError(f"federated.personal_schedule {schedule!r}: the stateful rule is for "
                     "'none' (FedPer, FedSA-LoRA) or 'fedrep'; FedBABU keeps no client state")
  joint = make_client_update(model, client_tx, spec, num_classes)

  def together(shared, frozen, data, client_id, key, active, personal_row):
    out = joint(merge(shared, personal_row), frozen, data, client_id, key, active)
    shared_update, personal_update = _split_like(out["update"], shared, personal_row)
    return {**out, "update": shared_update,
            "client_state": optax.tree.add(personal_row, personal_update)}

  if schedule == "none":
    return together
  personal_only = _epochs_update(model, client_tx, spec, num_classes, personal_epochs)

  def fedrep(shared, frozen, data, client_id, key, active, personal_row):
    # Phase 1: the personal part with the (received) shared part fixed; phase 2: the shared
    # part with the new personal part fixed. Independent keys per phase.
    head = personal_only(personal_row, merge(shared, frozen), data, client_id,
                         jax.random.fold_in(key, 1), active)
    new_personal = optax.tree.add(personal_row, head["update"])
    body = joint(shared, merge(new_personal, frozen), data, client_id,
                 jax.random.fold_in(key, 2), active)
    steps = head["steps"] + body["steps"]
    loss = (head["loss"] * head["steps"] + body["loss"] * body["steps"]) / jnp.maximum(steps, 1)
    return {**body, "steps": steps, "loss": loss,
            "poisson_dropped": head["poisson_dropped"] + body["poisson_dropped"],
            "client_state": new_personal}

  return fedrep


def make_finetune(model: Any, client_tx: optax.GradientTransformation, spec: ClientSpec,
                  num_classes: int, epochs: int) -> Callable[..., PyTree]:
  """FedBABU's local adaptation: finetune(personal, fixed, data, client_id, key) -> the
  personal leaves after `epochs` local epochs on the client's training data, everything
  else (`fixed` = shared + frozen) held still. The default client rule does the training."""
  if epochs < 1:
    raise ValueError(f"federated.personal_finetune_epochs must be >= 1, got {epochs}")
  tune = _epochs_update(model, client_tx, spec, num_classes, epochs)

  def finetune(personal, fixed, data, client_id, key):
    out = tune(personal, fixed, data, client_id, key, True)
    return optax.tree.add(personal, out["update"])

  return finetune


def fedbabu_init(personal: PyTree, key: jax.Array) -> PyTree:
  """FedBABU's frozen head (`check_fedbabu`) must be random: a zero-initialised kernel (this
  ViT's head, as in big_vision) passes no gradient to the body, which would then never
  learn. Matrices that are identically zero are drawn from LeCun normal (Flax Dense's default
  init); everything else (biases, non-zero inits) is kept."""
  leaves, treedef = jax.tree_util.tree_flatten(personal)
  init = jax.nn.initializers.lecun_normal()
  out = [init(jax.random.fold_in(key, i), x.shape, x.dtype)
         if x.ndim >= 2 and not np.any(np.asarray(x)) else x
         for i, x in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


def freezes_personal(schedule: str) -> bool:
  """Whether the personal leaves stay frozen at their init during the rounds (FedBABU): they
  are then part of the fixed weights every client trains against, no client keeps a row of
  its own, and they are only adapted (`make_finetune`) before personalised evaluation."""
  return schedule == "fedbabu"


def split_for_schedule(trainable: PyTree, personal: str, schedule: str
                       ) -> tuple[PyTree, Optional[PyTree]]:
  """(shared, personal) parts of the trainable leaves as a run of `federated.personal` and
  `federated.personal_schedule` federates them: the server holds and sends only the shared
  part. With `personal` empty every trainable leaf is shared (personal is None). Under
  FedBABU the personal part must be head leaves only (`check_fedbabu`). Errors are
  ValueErrors whose message starts with the config field (`split_personal`)."""
  if not personal:
    return trainable, None
  shared, personal_part = split_personal(trainable, personal)
  if freezes_personal(schedule):
    check_fedbabu(personal_part)
  return shared, personal_part


def initial_personal(personal_part: Optional[PyTree], schedule: str, init_key: jax.Array
                     ) -> Optional[PyTree]:
  """Every client's personal leaves before its first round (None without personal leaves).
  They start at the model's init, except FedBABU's frozen head, which must be a random draw
  (`fedbabu_init`); it is drawn from `init_key` (the key of the model's own init) folded
  with 1, so the draw is independent of the model's init and fixed by the seed."""
  if personal_part is None or not freezes_personal(schedule):
    return personal_part
  return fedbabu_init(personal_part, jax.random.fold_in(init_key, 1))


def personal_client_rule(model: Any, client_tx: optax.GradientTransformation, spec: ClientSpec,
                         num_classes: int, personal_init: Optional[PyTree], schedule: str,
                         personal_epochs: int, num_clients: int
                         ) -> tuple[Optional[Callable[..., dict]], Optional[ClientStateSpec]]:
  """(client rule, per-client state) of the round. FedPer, FedSA-LoRA and FedRep train the
  personal leaves and keep them on each client: the stateful rule (`make_personal_update`)
  and one row per client, every row starting at `personal_init`. Without personal leaves, or
  under FedBABU (its personal leaves are frozen: nothing per client to keep), (None, None):
  the engine's default rule and no client state."""
  if personal_init is None or freezes_personal(schedule):
    return None, None
  rule = make_personal_update(model, client_tx, spec, num_classes, schedule, personal_epochs)
  return rule, ClientStateSpec(init=lambda _: personal_init, num_clients=num_clients)


def evaluation_finetune(model: Any, client_tx: optax.GradientTransformation, spec: ClientSpec,
                        num_classes: int, schedule: str, epochs: int
                        ) -> Optional[Callable[..., PyTree]]:
  """What each client does to its personal leaves before personalised evaluation: FedBABU
  fine-tunes its frozen head for `epochs` (`make_finetune`); under the other schedules None,
  as each client is scored with the rows it trained in the rounds."""
  if not freezes_personal(schedule):
    return None
  return make_finetune(model, client_tx, spec, num_classes, epochs)


def fixed_personal_rows(personal_init: Optional[PyTree], schedule: str, num_clients: int,
                        mesh: Mesh) -> Optional[PyTree]:
  """FedBABU's rows for personalised evaluation: every client's copy of the initial personal
  leaves (which `evaluation_finetune` adapts before scoring), one row per client placed
  over `mesh` by client id (`client_rows.place`). None under the other schedules, whose
  rows are the round's per-client state."""
  if personal_init is None or not freezes_personal(schedule):
    return None
  return client_rows.place(jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (num_clients,) + np.shape(x)), personal_init),
      mesh)
