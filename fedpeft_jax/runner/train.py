"""Run one federated experiment from a config: data, model, rounds, outputs, resume.

Everything a run produces derives from (config, seed): client sampling from (seed, round),
client randomness from the server state's key folded with (round, client id). A run
killed at any moment and resumed from its latest checkpoint therefore ends with the same
params and metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedpeft_jax import peft
import fedpeft_jax.data as fdata
from fedpeft_jax.federated import (ClientDP, ClientSpec, RoundSpec, ServerDP,
                                   auto_clients_per_chunk, build_algorithm, comm_cost,
                                   make_client_optimizer, make_evaluate, make_mesh,
                                   make_server_optimizer, plan_round, replicate,
                                   resolve_clients_per_round)
from fedpeft_jax.models import ViT
from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.checkpointing import RunCheckpointer

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ViT:
  m = config.model
  return ViT(
      variant=None if m.hidden_size else m.variant,
      num_classes=num_classes,
      image_size=m.image_size,
      hidden_size=m.hidden_size or None,
      depth=m.depth or None,
      num_heads=m.num_heads or None,
      mlp_dim=m.mlp_dim or None,
      patch_size=m.patch_size or None,
      pool=m.pool,
      representation_size=m.representation_size or None,
      dropout=m.dropout,
      attention_dropout=m.attention_dropout,
      dtype=DTYPES[m.dtype],
      peft=config.peft,
  )


def load_data(config: ml_collections.ConfigDict):
  from fedpeft_jax import data as data_lib
  d = config.data
  kw = {}
  if d.dataset in ("digits", "synthetic"):
    kw["resolution"] = d.resolution
  dataset = data_lib.load_dataset(d.dataset, data_dir=d.data_dir or None,
                                  train_size=d.train_size or None,
                                  sample_with_replacement=d.sample_with_replacement,
                                  seed=config.seed, **kw)
  part = data_lib.partition(dataset.train_labels, config.federated.num_clients,
                            method=d.partition, alpha=d.alpha, min_size=d.min_size,
                            seed=config.seed, shards_per_client=d.shards_per_client)
  return dataset, part


def init_params(config: ml_collections.ConfigDict, model: ViT) -> dict:
  """Random init (from scratch) or the pre-trained backbone with fresh PEFT leaves and head."""
  size = config.model.image_size
  rng = jax.random.PRNGKey(config.seed)
  if config.model.pretrained:
    from fedpeft_jax.models.checkpoints import load_pretrained
    return load_pretrained(config.model.pretrained, model, rng=rng,
                           cache_dir=config.model.cache_dir or None)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3))))(rng)["params"]
  return jax.tree_util.tree_map(np.asarray, params)


class _Privacy:
  """Builds the client/server DP pieces and keeps the accountant for a run."""

  def __init__(self, config: ml_collections.ConfigDict, sizes: np.ndarray,
               clients_per_round: int, steps_of: dict):
    from fedpeft_jax.privacy import config as pcfg
    p = config.privacy
    pcfg.validate_privacy(p)
    self.mechanism = p.mechanism
    self.client = ClientDP()
    self.server = ServerDP()
    self.ledger = None
    self.clip_norm = 0.0
    fed = config.federated
    if p.mechanism == "paper_gaussian":
      from fedpeft_jax.privacy.mechanisms import paper_sigma
      sigma = paper_sigma(p.epsilon, p.delta, p.clip_norm)
      self.client = ClientDP("paper_gaussian", p.clip_norm, sigma)
    elif p.mechanism == "dp_sgd":
      from fedpeft_jax.privacy.accounting import PrivacyLedger
      self.client = ClientDP("dp_sgd", p.clip_norm, p.noise_multiplier,
                             poisson=p.sampling == "poisson")
      self.ledger = PrivacyLedger(mechanism="dp_sgd", delta=p.delta, accountant=p.accountant)
    elif p.mechanism == "dp_fedavg":
      from fedpeft_jax.privacy.accounting import PrivacyLedger
      self.clip_norm = p.clip_norm
      self.server = ServerDP(True, p.noise_multiplier, clients_per_round, p.adaptive_clip,
                             p.target_quantile, p.clip_lr, p.count_noise_multiplier
                             * clients_per_round / 20.0 if p.adaptive_clip else 0.0)
      self.ledger = PrivacyLedger(mechanism="dp_fedavg", delta=p.delta, accountant=p.accountant)
    self.sizes = sizes
    self.batch = fed.batch_size
    self.q_round = clients_per_round / fed.num_clients
    self.noise = p.noise_multiplier
    self.steps_of = steps_of

  def record(self, reporting: np.ndarray) -> None:
    if self.ledger is None:
      return
    if self.mechanism == "dp_sgd":
      for c in reporting.tolist():
        n = int(self.sizes[c])
        self.ledger.record_client(c, min(1.0, self.batch / n), self.noise, self.steps_of(n))
    else:
      self.ledger.record_round(self.q_round, self.noise)

  def metrics(self) -> dict:
    if self.mechanism == "paper_gaussian":
      return {"privacy": "paper_gaussian: no formal privacy accounting applies"}
    if self.ledger is None:
      return {}
    return self.ledger.report()


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        stop_after_round: Optional[int] = None) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the summary dict."""
  from fedpeft_jax.runner.validate import validate_config
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, "summary.json")
  resolved = json.loads(config.to_json_best_effort())
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      previous = json.load(f)
    if previous != resolved:
      raise ValueError(f"workdir {workdir} holds a run of a different config; use a new "
                       "--workdir (diff the two with config.json)")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    print(f"Run in {workdir} already finished; summary:")
    print(outputs.format_table([summary_row(summary)], SUMMARY_COLUMNS))
    return summary
  outputs.atomic_write_json(config_path, resolved)

  t_start = time.time()
  fed = config.federated
  dataset, part = load_data(config)
  outputs.atomic_write_json(os.path.join(workdir, "partition.json"), part.to_json())
  model = build_model(config, dataset.num_classes)
  params = init_params(config, model)
  mask = peft.trainable_mask(params, config.peft)
  trainable, frozen = peft.split(params, mask)
  cost = comm_cost(trainable, params, dtype=jnp.dtype(fed.wire_dtype))

  num_devices = len(jax.devices())
  per_round = resolve_clients_per_round(fed.num_clients, fed.clients_per_round, fed.participation)
  chunk = (auto_clients_per_chunk(per_round, num_devices) if fed.clients_per_chunk == "auto"
           else int(fed.clients_per_chunk))
  augment = dataset.augment if config.data.augment == "auto" else config.data.augment
  max_n = int(max(part.sizes))

  def steps_of(n: int) -> int:
    steps = fed.local_epochs * math.ceil(n / fed.batch_size)
    return min(steps, fed.local_steps) if fed.local_steps > 0 else steps

  privacy = _Privacy(config, np.asarray(part.sizes), per_round, steps_of)
  local_epochs = fed.local_epochs
  if fed.local_steps > 0:  # enough epochs for the smallest client to reach local_steps
    local_epochs = math.ceil(fed.local_steps / math.ceil(min(part.sizes) / fed.batch_size))
  cspec = ClientSpec(batch_size=fed.batch_size, local_epochs=local_epochs, max_examples=max_n,
                     image_size=config.model.image_size, augment=augment,
                     local_steps=fed.local_steps, label_smoothing=fed.label_smoothing,
                     fedprox_mu=fed.fedprox_mu, dp=privacy.client)
  rspec = RoundSpec(clients_per_chunk=chunk, num_devices=num_devices, weighting=fed.weighting,
                    max_update_norm=fed.max_update_norm, dp=privacy.server)
  client_tx = make_client_optimizer(fed.client_optimizer, fed.client_lr, fed.client_momentum,
                                    fed.client_nesterov, fed.client_weight_decay)
  server_tx = make_server_optimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum,
                                    fed.server_b1, fed.server_b2, fed.server_eps)
  mesh = make_mesh()
  algo = build_algorithm(model, client_tx, server_tx, cspec, rspec, dataset.num_classes,
                         mesh=mesh)
  client_data = replicate(fdata.client_data(dataset, part), mesh)
  frozen_dev = replicate(frozen, mesh)
  evaluate = make_evaluate(model, fed.eval_batch_size, config.model.image_size)
  test_images = jnp.asarray(dataset.test_images)
  test_labels = jnp.asarray(dataset.test_labels)

  state = algo.init(trainable, seed=config.seed, clip_norm=privacy.clip_norm)
  ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  metrics_log = outputs.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
  tb = outputs.TensorBoardLogger(os.path.join(workdir, "tensorboard"))
  restored = ckpt.restore_latest(state)
  cumulative = {"bytes": 0, "bytes_full": 0, "seconds": 0.0}
  if restored is not None:
    state, meta = restored
    cumulative = meta["cumulative"]
    if privacy.ledger is not None and meta.get("ledger") is not None:
      privacy.ledger = type(privacy.ledger).from_dict(meta["ledger"])
    metrics_log.truncate_after(int(state.round))
    print(f"Resumed from round {int(state.round)} in {workdir}")
  else:
    metrics_log.truncate_after(0)

  header = (f"{config.data.dataset} | {'+'.join(peft.parse_methods(config.peft.method))} | "
            f"trainable {cost.trainable_params:,} / {cost.total_params:,} params | "
            f"{cost.trainable_bytes / 1e6:.3f} MB per transfer | {per_round} of "
            f"{fed.num_clients} clients per round | {num_devices} device(s), chunk {chunk}")
  print(header)
  bar = _progress(fed.rounds, int(state.round), progress)
  last_eval: dict = {}
  for r in range(int(state.round), fed.rounds):
    t0 = time.time()
    plan = plan_round(config.seed, r, fed.num_clients, per_round, fed.dropout)
    state, m = algo.apply(state, frozen_dev, client_data, plan)
    privacy.record(plan.reporting)
    row: dict[str, Any] = {"round": r + 1}
    if (r + 1) % fed.eval_every == 0 or r + 1 == fed.rounds:
      ev = evaluate(peft.merge(state.trainable, frozen_dev), test_images, test_labels)
      last_eval = {"test_accuracy": float(ev["accuracy"]), "test_loss": float(ev["loss"])}
      row.update(last_eval)
    b = cost.round_bytes(plan.num_sampled, plan.num_reporting)
    cumulative["bytes"] += b["bytes_down"] + b["bytes_up"]
    cumulative["bytes_full"] += b["bytes_full_equivalent"]
    seconds = time.time() - t0
    cumulative["seconds"] += seconds
    row.update({
        "train_loss": float(m["train_loss"]),
        "clients_sampled": plan.num_sampled,
        "clients_reporting": plan.num_reporting,
        "clients_contributed": int(m["clients_contributed"]),
        "clients_nonfinite": int(m["clients_nonfinite"]),
        "bytes_up": b["bytes_up"],
        "bytes_down": b["bytes_down"],
        "cumulative_bytes": cumulative["bytes"],
        "cumulative_bytes_full_equivalent": cumulative["bytes_full"],
        "seconds": seconds,
    })
    if "clip_norm" in m:
      row["clip_norm"] = float(m["clip_norm"])
    row.update(privacy.metrics())
    metrics_log.append(row)
    tb.log(row, step=r + 1)
    if bar is not None:
      bar.set_postfix(acc=f"{last_eval.get('test_accuracy', float('nan')):.4f}",
                      MB=f"{cumulative['bytes'] / 1e6:.2f}")
      bar.update(1)
    done = r + 1 == fed.rounds
    if done or (config.checkpoint_every and (r + 1) % config.checkpoint_every == 0):
      ckpt.save(r + 1, state, {"cumulative": cumulative,
                               "ledger": privacy.ledger.to_dict() if privacy.ledger else None})
    if stop_after_round is not None and r + 1 >= stop_after_round and not done:
      ckpt.close()
      tb.close()
      return {}
  if bar is not None:
    bar.close()
  ckpt.close()
  tb.close()

  rows = metrics_log.read()
  accs = [x["test_accuracy"] for x in rows if "test_accuracy" in x]
  summary = {
      "dataset": config.data.dataset,
      "method": config.peft.method,
      "pretrained": config.model.pretrained or "scratch",
      "rounds": fed.rounds,
      "final_accuracy": accs[-1] if accs else None,
      "best_accuracy": max(accs) if accs else None,
      "trainable_params": cost.trainable_params,
      "total_params": cost.total_params,
      "bytes_per_transfer": cost.trainable_bytes,
      "total_bytes": cumulative["bytes"],
      "total_bytes_full_equivalent": cumulative["bytes_full"],
      "train_seconds": cumulative["seconds"],
      "wall_seconds_this_session": time.time() - t_start,
      "partition": part.summary(),
      "versions": outputs.versions(),
  }
  summary.update({k: v for k, v in privacy.metrics().items()})
  outputs.write_plots(rows, workdir, title=header)
  outputs.atomic_write_json(summary_path, summary)
  print(outputs.format_table([summary_row(summary)], SUMMARY_COLUMNS))
  return summary


SUMMARY_COLUMNS = ["method", "final_accuracy", "best_accuracy", "trainable_params",
                   "MB_per_round", "total_MB"]


def summary_row(summary: dict) -> dict:
  per_round = summary["total_bytes"] / max(summary["rounds"], 1)
  return {
      "method": summary["method"],
      "final_accuracy": summary["final_accuracy"],
      "best_accuracy": summary["best_accuracy"],
      "trainable_params": summary["trainable_params"],
      "MB_per_round": round(per_round / 1e6, 4),
      "total_MB": round(summary["total_bytes"] / 1e6, 3),
  }


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc="rounds", unit="round", dynamic_ncols=True)
