"""FedEx-LoRA, FLoRA and FFA-LoRA through the jitted round and the runner.

The reference is the exact examples-weighted average of the client models,
sum_k w_k (W + s A_k B_k) / sum_k w_k, computed in float64 NumPy from the factors each client
ends with (known, per-client pseudo-random updates from a custom client rule), never by calling
the library's own aggregation functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax import peft
from fedpeft_jax.federated import (
  ClientSpec,
  RoundPlan,
  RoundSpec,
  build_algorithm,
  make_client_optimizer,
  make_client_update,
  make_server_optimizer,
  payload_bytes,
)
from fedpeft_jax.federated import lora_aggregation as la
from fedpeft_jax.models import ViT, build_model, load_pretrained
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import load_data, lora_client_ranks, run, training_peft
from fedpeft_jax.runner.validate import ConfigError, validate_config
from tests.test_federated import IMAGE, NUM_CLASSES, make_data
from tests.test_runner import _accuracy, _final_params, _with_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 4, 8.0  # scaling s = 2: a missing or doubled s cannot hide
SCALING = ALPHA / RANK
TARGETS = "query,out,mlp_fc1"
SIZES = (5, 9, 7, 3)
PROBE = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"


def tiny_lora():
  cfg = peft.method_config("lora", targets=TARGETS, rank=RANK, alpha=ALPHA)
  model = ViT(variant=None, hidden_size=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=IMAGE, num_classes=NUM_CLASSES, peft=cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  # A non-zero head, so that the default client rule's gradients reach the LoRA factors.
  params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                     params["head"]["kernel"].shape)
  trainable, frozen = peft.split(params, peft.trainable_mask(params, cfg))
  return model, trainable, frozen


def build(rule: str, chunk: int, client_update=None, ranks=(), sizes=SIZES, client_tx=None):
  model, trainable, frozen = tiny_lora()
  cspec = ClientSpec(batch_size=4, local_epochs=1, max_examples=max(sizes), image_size=IMAGE,
                     augment="none")
  rspec = RoundSpec(clients_per_chunk=chunk, num_devices=1, lora_aggregation=rule,
                    client_ranks=tuple(ranks), num_clients=len(sizes))
  algo = build_algorithm(model, client_tx or optax.sgd(0.1), make_server_optimizer("fedavg", 1.0),
                         cspec, rspec, NUM_CLASSES, client_update=client_update)
  return algo, trainable, frozen, make_data(list(sizes))


def known_deltas(trainable: dict, num_clients: int, seed: int = 0, scale: float = 0.5) -> dict:
  """Per client id, a pseudo-random update of every trainable leaf: [num_clients, ...]."""
  rng = np.random.default_rng(seed)
  return {p: (scale * rng.normal(size=(num_clients,) + np.shape(v))).astype(np.float32)
          for p, v in peft.flatten(trainable).items()}


def known_client(deltas: dict, loss_of=None):
  """A client rule that sends deltas[client_id] and reports `loss_of(trainable, frozen, id)`
  as its loss (what it saw, read back through the round's train_loss)."""
  tree = peft.unflatten({p: jnp.asarray(d) for p, d in deltas.items()})

  def client_update(trainable, frozen, data, client_id, key, active):
    update = jax.tree_util.tree_map(lambda d: jnp.where(active, d[client_id], 0.0), tree)
    loss = (jnp.zeros((), jnp.float32) if loss_of is None
            else loss_of(trainable, frozen, client_id).astype(jnp.float32))
    return {"update": update,
            "num_examples": jnp.where(active, data.sizes[client_id], 0).astype(jnp.float32),
            "loss": loss, "steps": jnp.where(active, 1, 0),
            "poisson_dropped": jnp.zeros((), jnp.int32)}
  return client_update


def f64(tree) -> dict:
  return {p: np.asarray(v, np.float64) for p, v in peft.flatten(tree).items()}


def kernel_pairs(trainable: dict) -> dict[str, tuple[str, str]]:
  """{kernel path: (lora_a path, lora_b path)} by name, independently of la.lora_targets."""
  out = {}
  for p in peft.flatten(trainable):
    if p.endswith("_lora/lora_a"):
      prefix = p[:-len("_lora/lora_a")]
      out[f"{prefix}/kernel"] = (p, f"{prefix}_lora/lora_b")
  return out


def effective(frozen: dict, folded, trainable: dict) -> dict[str, np.ndarray]:
  """{kernel: W + folded + s A B} as [in, out] float64 matrices."""
  fz, ft = f64(frozen), f64(trainable)
  fd = f64(folded) if folded is not None else {}
  out = {}
  for kernel, (a, b) in kernel_pairs(trainable).items():
    w = fz[kernel].reshape(ft[a].shape[0], ft[b].shape[1])
    out[kernel] = w + fd.get(kernel, 0.0) + SCALING * ft[a] @ ft[b]
  return out


def average_client_model(frozen, trainable, deltas, clients, ranks=None) -> dict:
  """sum_k w_k (W + s A_k B_k) / sum_k w_k with A_k, B_k = start + delta_k (only the first
  r_k rank slots under heterogeneous ranks), w_k = the client's examples."""
  fz, ft = f64(frozen), f64(trainable)
  w = np.asarray([SIZES[c] for c in clients], np.float64)
  out = {}
  for kernel, (a, b) in kernel_pairs(trainable).items():
    total = 0.0
    for wk, c in zip(w, clients):
      r = RANK if ranks is None else ranks[c]
      a_k = (ft[a] + deltas[a][c])[:, :r]
      b_k = (ft[b] + deltas[b][c])[:r, :]
      total = total + wk * SCALING * a_k @ b_k
    out[kernel] = fz[kernel].reshape(total.shape) + total / w.sum()
  return out


def plan(clients, round_=0) -> RoundPlan:
  ids = np.asarray(clients, np.int32)
  return RoundPlan(round=round_, sampled=ids, reporting=ids)


# ----------------------------------------------------------------------------- FedEx-LoRA


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_fedex_global_model_is_the_average_client_model(chunk):
  clients = [0, 1, 3]
  _, trainable, frozen = tiny_lora()
  deltas = known_deltas(trainable, len(SIZES))
  probe = np.random.default_rng(9).normal(size=np.shape(peft.flatten(frozen)[PROBE]))

  def seen(trainable, frozen, client_id):  # a fixed linear functional of one frozen kernel
    return jnp.sum(peft.flatten(frozen)[PROBE] * jnp.asarray(probe, jnp.float32))

  algo, trainable, frozen, data = build("fedex", chunk, known_client(deltas, seen))
  state = algo.init(trainable, seed=0)
  start = jax.tree_util.tree_map(np.asarray, state.trainable)
  state, m = algo.apply(state, frozen, data, plan(clients))
  want = average_client_model(frozen, start, deltas, clients)
  got = effective(frozen, state.folded, state.trainable)
  assert set(got) == set(want) and len(want) == 3
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
  # A' and B' are FedIT's weighted means of the clients' factors.
  w = np.asarray([SIZES[c] for c in clients], np.float64)
  ft = f64(state.trainable)
  for a, b in kernel_pairs(trainable).values():
    for p in (a, b):
      np.testing.assert_allclose(
          ft[p], f64(start)[p] + np.einsum("k,k...->...", w / w.sum(), deltas[p][clients]),
          atol=1e-6)
  # Round 2's clients compute with W + folded (round 1's train_loss read W alone).
  w_probe = np.asarray(peft.flatten(frozen)[PROBE], np.float64)
  np.testing.assert_allclose(float(m["train_loss"]), np.sum(w_probe * probe), rtol=1e-5)
  folded_probe = f64(state.folded)[PROBE].reshape(w_probe.shape)
  assert np.abs(folded_probe).max() > 1e-3
  _, m2 = algo.apply(state, frozen, data, plan([1, 2], 1))
  np.testing.assert_allclose(float(m2["train_loss"]), np.sum((w_probe + folded_probe) * probe),
                             rtol=1e-5)


def test_fedit_misses_the_average_client_model():
  clients = [0, 1, 3]
  _, trainable, _ = tiny_lora()
  deltas = known_deltas(trainable, len(SIZES))
  algo, trainable, frozen, data = build("fedit", 2, known_client(deltas))
  state = algo.init(trainable, seed=0)
  start = jax.tree_util.tree_map(np.asarray, state.trainable)
  assert state.folded is None
  state, _ = algo.apply(state, frozen, data, plan(clients))
  want = average_client_model(frozen, start, deltas, clients)
  got = effective(frozen, None, state.trainable)
  assert max(np.abs(got[k] - want[k]).max() for k in want) > 1e-2


# ----------------------------------------------------------------------------- FLoRA


def test_flora_heterogeneous_ranks_merge_exactly_and_restart():
  ranks = (1, 2, 4)
  sizes = SIZES[:3]
  clients = [0, 1, 2]
  _, trainable, _ = tiny_lora()
  # Large garbage everywhere, the padded rank slots included: the masks must remove it.
  deltas = known_deltas(trainable, 3, seed=1, scale=5.0)

  def padded_start(trainable, frozen, client_id):  # what the client got beyond its rank
    r = jnp.asarray(ranks)[client_id]
    total = jnp.zeros(())
    for a, b in kernel_pairs(trainable).values():
      fa, fb = peft.flatten(trainable)[a], peft.flatten(trainable)[b]
      total += jnp.sum(jnp.abs(jnp.where(jnp.arange(RANK)[None] >= r, fa, 0.0)))
      total += jnp.sum(jnp.abs(jnp.where(jnp.arange(RANK)[:, None] >= r, fb, 0.0)))
    return total

  algo, trainable, frozen, data = build("flora", 2, known_client(deltas, padded_start), ranks,
                                        sizes=sizes)
  state = algo.init(trainable, seed=0)
  start = jax.tree_util.tree_map(np.asarray, state.trainable)
  state, m = algo.apply(state, frozen, data, plan(clients))
  assert float(m["train_loss"]) == 0.0  # every client started from its masked factors
  want = average_client_model(frozen, start, deltas, clients, ranks)
  got = effective(frozen, state.folded, state.trainable)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-4, err_msg=k)
  # Without the masks the garbage would show (the check above can fail).
  unmasked = average_client_model(frozen, start, deltas, clients)
  assert max(np.abs(unmasked[k] - want[k]).max() for k in want) > 1.0
  # LoRA restarts: B zero, A a fresh draw from LoRA's init range; the head is averaged.
  ft, fs = f64(state.trainable), f64(start)
  w = np.asarray(sizes, np.float64)
  for a, b in kernel_pairs(trainable).values():
    assert np.all(ft[b] == 0)
    assert not np.allclose(ft[a], fs[a])
    assert np.abs(ft[a]).max() <= 1 / np.sqrt(ft[a].shape[0])
  for p in ("head/kernel", "head/bias"):
    np.testing.assert_allclose(ft[p], fs[p] + np.einsum("k,k...->...", w / w.sum(), deltas[p]),
                               atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_padded_rank_slots_stay_exactly_zero_under_the_default_rule(optimizer):
  """B = 0 at FLoRA's restart: a rank-1 client's padded A columns and B rows get zero
  gradients, so its update there is exactly 0 (weight decay included)."""
  model, trainable, frozen = tiny_lora()
  sizes = (8,)
  cspec = ClientSpec(batch_size=4, local_epochs=2, max_examples=8, image_size=IMAGE,
                     augment="none")
  rule = make_client_update(model, make_client_optimizer(optimizer, 0.05), cspec, NUM_CLASSES)
  start = la.lora_round("flora", SCALING, (1,)).client_start(trainable, jnp.int32(0))
  out = jax.jit(rule)(start, frozen, make_data(list(sizes)), jnp.int32(0),
                      jax.random.PRNGKey(3), True)
  fu = f64(out["update"])
  for a, b in kernel_pairs(trainable).values():
    assert np.all(fu[a][:, 1:] == 0) and np.all(fu[b][1:, :] == 0)
    assert np.abs(fu[a][:, :1]).max() > 0 and np.abs(fu[b][:1, :]).max() > 0


# ----------------------------------------------------------------------------- default rule


def test_default_rule_fedex_rounds_do_not_depend_on_chunking():
  sizes = (6, 10, 4, 8)
  results = []
  for chunk in (1, 2):
    algo, trainable, frozen, data = build("fedex", chunk, sizes=sizes)
    state = algo.init(trainable, seed=0)
    state, _ = algo.apply(state, frozen, data, plan([0, 1, 2, 3]))
    results.append(state)
  a, b = (f64({"t": s.trainable, "f": s.folded}) for s in results)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)
  assert max(np.abs(v).max() for k, v in a.items() if k.startswith("f/")) > 1e-6


# ----------------------------------------------------------------------------- runner and CLI


def _tiny(rule: str, **lora):
  c = repo_config("tiny").get_config("lora")
  c.federated.lora_aggregation = rule
  for k, v in lora.items():
    c.peft.lora[k] = v
  return c


def _folded_download_bytes(config) -> int:
  """By hand: one float32 [in, out] delta per LoRA target kernel (query and value:
  hidden x hidden) of every block."""
  hidden = config.model.hidden_size
  targets = len(config.peft.lora.targets.split(","))
  return config.model.depth * targets * hidden * hidden * 4


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_cli_flora_with_client_ranks_counts_the_folded_download(tmp_path):
  workdir = tmp_path / "flora"
  cmd = [sys.executable, "-m", "fedpeft_jax.main", "--config=configs/tiny.py:lora",
         f"--workdir={workdir}", "--no_progress", "--config.federated.lora_aggregation=flora",
         "--config.peft.lora.client_ranks=uniform:1,2"]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["lora_aggregation"] == "flora" and summary["rounds"] == 2
  extra = _folded_download_bytes(_tiny("flora"))
  assert extra == 2 * 2 * 32 * 32 * 4
  for row in _rows(str(workdir)):
    assert row["bytes_down"] == row["clients_sampled"] * (summary["bytes_per_transfer"] + extra)
    assert row["bytes_up"] == row["clients_reporting"] * summary["bytes_per_transfer"]


@pytest.mark.slow
def test_fedex_run_resumes_exactly_and_ffa_sends_only_b(tmp_path):
  config = _tiny("fedex")
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  summary = run(config, whole, progress=False)
  assert summary["lora_aggregation"] == "fedex"
  extra = _folded_download_bytes(config)
  for row in _rows(whole):
    assert row["bytes_down"] == row["clients_sampled"] * (summary["bytes_per_transfer"] + extra)
  assert run(config, killed, progress=False, stop_after_round=1) == {}
  run(config, killed, progress=False)
  a, b = _final_params(whole), _final_params(killed)
  assert a.keys() == b.keys()
  folded = [k for k in a if k.startswith("folded/")]
  assert len(folded) == 4 and max(np.abs(a[k]).max() for k in folded) > 0
  for k in a:
    assert np.array_equal(a[k], b[k]), k

  # FFA-LoRA: the runner's trainable mask drops A, so a transfer is fedit's minus every
  # lora_a [hidden, rank] (shapes only: the mask and the byte count, no run).
  ffa = _tiny("ffa")
  model = build_model(ffa, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 16, 16, 3)))["params"])
  trainable, _ = peft.split(params, peft.trainable_mask(params, training_peft(ffa)))
  assert any(p.endswith("lora_b") for p in peft.flatten(trainable))
  assert not any(p.endswith("lora_a") for p in peft.flatten(trainable))
  a_bytes = config.model.depth * 2 * config.model.hidden_size * config.peft.lora.rank * 4
  assert payload_bytes(trainable, "float32") == summary["bytes_per_transfer"] - a_bytes
  assert training_peft(config) is config.peft  # only ffa forces freeze_a


def test_flora_evaluation_sees_the_folded_weights(tmp_path):
  """After FLoRA's restart (B = 0) the model's LoRA path adds nothing: everything learned is
  in `folded`. The logged accuracy must be that of backbone + folded + trainable, recomputed
  here from the checkpoint and the backbone file (one model.apply, NumPy argmax)."""
  config = _with_backbone(_tiny("flora"), str(tmp_path / "backbone.npz"))
  workdir = str(tmp_path / "run")
  summary = run(config, workdir, progress=False)
  dataset, _ = load_data(config)
  model = build_model(config, dataset.num_classes)
  params = peft.flatten(load_pretrained(config.model.pretrained, model))
  ckpt = _final_params(workdir)
  for k, v in ckpt.items():
    if k.startswith("trainable/"):
      params[k[len("trainable/"):]] = v
  assert not any(np.any(v) for k, v in ckpt.items() if k.endswith("lora_b"))  # restarted
  unfolded = dict(params)
  folded = {k[len("folded/"):]: v for k, v in ckpt.items() if k.startswith("folded/")}
  assert folded and set(folded) <= set(params)
  for k, v in folded.items():
    params[k] = np.asarray(params[k], np.float32) + v.reshape(np.shape(params[k]))
  with_fold = _accuracy(model, peft.unflatten(params), dataset.test_images, dataset.test_labels)
  without = _accuracy(model, peft.unflatten(unfolded), dataset.test_images,
                      dataset.test_labels)
  n = len(dataset.test_labels)
  assert with_fold == pytest.approx(summary["final_accuracy"], abs=1.5 / n)
  assert without != pytest.approx(with_fold, abs=1.5 / n)


def test_blank_client_ranks_mean_every_client_at_the_model_rank():
  config = _tiny("flora", client_ranks="  ")
  validate_config(config)
  assert lora_client_ranks(config) == ()


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("change,field", [
    ({"federated.lora_aggregation": "fedsum"}, "config.federated.lora_aggregation"),
    ({"federated.lora_aggregation": "fedex", "peft.method": "bias"},
     "config.federated.lora_aggregation"),
    ({"federated.lora_aggregation": "fedex", "federated.server_optimizer": "fedadam"},
     "config.federated.server_optimizer"),
    ({"federated.lora_aggregation": "flora", "federated.server_lr": 0.5},
     "config.federated.server_lr"),
    ({"federated.lora_aggregation": "fedex", "federated.server_lr_schedule": "cosine"},
     "config.federated.server_lr_schedule"),
    ({"federated.lora_aggregation": "fedex", "privacy.mechanism": "dp_fedavg"},
     "config.privacy.mechanism"),
    ({"peft.lora.client_ranks": "1,2,2,1"}, "config.peft.lora.client_ranks"),  # with fedit
    ({"federated.lora_aggregation": "flora", "peft.lora.client_ranks": "1,2,3,1"},
     "config.peft.lora.client_ranks"),  # 3 > peft.lora.rank (2)
    ({"federated.lora_aggregation": "flora", "peft.lora.client_ranks": "uniform:1,3"},
     "config.peft.lora.client_ranks"),  # 3 is never drawn for 4 clients? checked anyway
    ({"federated.lora_aggregation": "flora", "peft.lora.client_ranks": "1,2"},
     "config.peft.lora.client_ranks"),  # 2 ranks for 4 clients
    ({"federated.lora_aggregation": "fedex", "peft.lora.freeze_a": True},
     "config.peft.lora.freeze_a"),
    ({"federated.lora_aggregation": "flora", "federated.compression": "topk"},
     "config.federated.compression"),
])
def test_config_errors_name_the_field(change, field):
  config = _tiny("fedit")
  for path, value in change.items():
    section, key = path.rsplit(".", 1)
    node = config
    for part in section.split("."):
      node = node[part]
    node[key] = value
  with pytest.raises(ConfigError) as err:
    validate_config(config)
  message = str(err.value)
  assert err.value.field == field, message
  assert message.startswith(field) and "\n" not in message, message


def test_valid_lora_aggregation_configs_pass():
  for rule in la.LORA_AGGREGATIONS:
    validate_config(_tiny(rule))
  validate_config(_tiny("flora", client_ranks="1,2,2,1"))
  validate_config(_tiny("flora", client_ranks="uniform:1,2"))
