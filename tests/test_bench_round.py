"""The round benchmark's core: executed-step counts, FLOPs per step (`flop_count`), and the
PyTorch reference (`torch_reference`).

Tiny shapes only (CPU, seconds): the benchmark's numbers are only as true as these checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_round as br
from experiments import bench_workload as bw
from experiments import flop_count as fc
from fedpeft_jax import peft
from fedpeft_jax.federated import RoundSpec, build_algorithm, make_server_optimizer, plan_round

TINY = dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)


def _uneven(batch: int = 2) -> bw.Workload:
  return bw.Workload(name="uneven", variant="Ti/4", image_size=8, native_size=8, num_classes=5,
                     batch_size=batch, client_sizes=tuple(n * batch for n in (1, 1, 2, 2, 6, 6, 7, 7)),
                     eval_examples=0, arch=TINY)


def test_executed_steps_match_hand_count_for_uneven_layout() -> None:
  w = _uneven()
  # By hand: 1+1+2+2+6+6+7+7 = 32 real steps. Chunks of 4, sorted by steps: {7,7,6,6} runs
  # 7 iterations x 4 slots, {2,2,1,1} runs 2 x 4: 36. Without sorting / early exit every
  # slot runs the longest client's 7 steps: 8 x 7 = 56. One client per chunk: 32.
  assert w.useful_steps == 32
  assert fc.executed_steps_sorted(w, 4) == 36
  assert fc.executed_steps_sorted(w, 1) == 32
  assert fc.executed_steps_fallback(w, np.arange(8), 4) == 56
  assert fc.executed_steps_fallback(w, np.arange(8), 1) == 32
  assert fc.executed_steps_fallback(w, np.arange(6), 4) == 8 * 7  # padded slots run too

  row = br.measure_engine(w, 4, rounds=0, memory=False, flops=False)
  assert row["useful_steps"] == 32
  if row["executed_source"] == "engine metrics":
    assert row["executed_steps"] == 36
  else:
    assert row["executed_steps"] == 56


def test_step_flops_agree_with_hand_formula() -> None:
  w = bw.Workload(name="flops", variant="Ti/4", image_size=16, native_size=16, num_classes=10,
                  batch_size=8, client_sizes=(8,), eval_examples=8, eval_batch_size=8,
                  arch=dict(hidden_size=128, depth=2, num_heads=4, mlp_dim=512, patch_size=4))
  cost = fc.step_cost(w)
  hand = fc.vit_matmul_flops(w)
  hlo = cost["step_hlo"]
  # The dots of the compiled step, forward and backward, are exactly the hand count: bias
  # tuning has no weight-gradient matmuls for frozen weights, only the head's.
  fwd = hlo["matmul_fwd"] + hlo["attention_fwd"]
  bwd = hlo["matmul_bwd"] + hlo["attention_bwd"]
  assert fwd == pytest.approx(hand["forward"], rel=0.02)
  assert bwd == pytest.approx(hand["backward"], rel=0.02)
  assert hlo["attention_fwd"] == pytest.approx(hand["attention_forward"], rel=0.02)
  assert hlo["attention_bwd"] == pytest.approx(2 * hand["attention_forward"], rel=0.02)
  # XLA's total (dots + elementwise) is within 10% of the matmul formula.
  assert cost["step_flops"] == pytest.approx(hand["total"], rel=0.10)
  assert cost["step_flops"] >= hand["total"]
  # Full fine-tuning adds the weight-gradient matmuls: about 3x the forward.
  full = fc.vit_matmul_flops(w.replace(method="full"))
  assert full["backward"] > 1.8 * hand["forward"]
  # One eval batch is about the forward pass.
  assert cost["eval_batch_flops"] == pytest.approx(hand["forward"], rel=0.10)


def test_torch_simulator_round_equals_engine_round() -> None:
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from experiments import torch_reference as tr  # a broken reference fails, never skips
  # Two clients (4 and 3 examples, batch 4): one step each, FedAvg weighted 4:3.
  w = bw.Workload(name="eq", variant="Ti/4", image_size=8, native_size=8, num_classes=5,
                  batch_size=4, client_sizes=(4, 3), eval_examples=0, lr=0.5,
                  arch=TINY)
  model = bw.make_model(w)
  trainable, frozen, _ = bw.init_split(w, model)
  rng = np.random.default_rng(0)  # non-trivial biases and head
  trainable = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape), jnp.float32), trainable)
  before = jax.tree_util.tree_map(np.array, trainable)
  data, _, _, clients = bw.make_data(w)

  tm = tr.timm_model(w, peft.merge(trainable, frozen))
  x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  logits_jax = np.asarray(model.apply({"params": peft.merge(trainable, frozen)}, x))
  logits_torch = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
  np.testing.assert_allclose(logits_torch, logits_jax, atol=1e-4)

  algo = build_algorithm(model, bw.client_tx_of(w), make_server_optimizer("fedavg"),
                         bw.client_spec_of(w), RoundSpec(1, 1), w.num_classes)
  state, metrics = algo.apply(algo.init(trainable, seed=0), frozen, data, plan_round(0, 0, 2, 2))
  assert float(metrics["local_steps"]) == 2
  names = sorted({tr.timm_name(p)[0] for p in tr._flat(before)})
  assert "head.weight" in names and "blocks.0.attn.qkv.bias" in names
  assert not any(n.endswith("weight") and not n.startswith("head") for n in names)
  for n, p in tm.named_parameters():
    p.requires_grad_(n in names)
  out = tr.torch_round(tm, names, clients, w, torch.Generator().manual_seed(0))
  assert out["steps"] == 2
  after_torch = tr.read_timm_params(tm, before)
  upd_jax = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, state.trainable, before)
  upd_torch = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, after_torch, before)
  assert max(float(np.abs(u).max()) for u in jax.tree_util.tree_leaves(upd_jax)) > 1e-2
  for a, b in zip(jax.tree_util.tree_leaves(upd_torch), jax.tree_util.tree_leaves(upd_jax)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # Frozen weights stay where they were in torch too.
  sd = tr.timm_state_dict(peft.merge(before, frozen))
  for n, p in tm.state_dict().items():
    if n not in names:
      np.testing.assert_array_equal(p.numpy(), sd[n])
