"""Device-less GPU compiles (fedpeft_jax.accelerators, experiments/plan.py): the study's
round compiles for an H100 topology from shapes, with cuDNN attention, within the runner's
memory budget, and the planner's figures are what XLA reports. Skipped, with the reason,
where JAX's CUDA plugin is not installed.

The presets run at depth 1 (one ViT-B/16 block at 224 px: the study's per-layer shapes, 197
tokens, head dim 64) to keep the suite fast; the full-depth plans are experiments/plan.py's
(docs/accelerators.md).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import fedpeft_jax.data as fdata
from experiments import plan as plan_lib
from fedpeft_jax.accelerators import aot, targets
from fedpeft_jax.federated import MEMORY_FRACTION
from fedpeft_jax.mesh import make_mesh
from fedpeft_jax.models.vit import padded_attention
from fedpeft_jax.config_files import repo_config

MISSING = targets.cuda_compiler_missing()
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=str(MISSING)),
              pytest.mark.slow]  # the slow tier: device-less GPU/TPU compiles
H100 = targets.TARGETS["h100"]


def _mesh(target=H100, devices=1):
  return make_mesh(list(targets.topology(target, devices).devices))


def _config(spec: str, **fields):
  name, arg = spec.split(":", 1)
  config = repo_config(name).get_config(arg)
  config.model.pretrained = ""
  config.model.depth = 1
  for path, value in fields.items():
    node = config
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_targets_describe_their_cards() -> None:
  for name, target in targets.TARGETS.items():
    device = targets.topology(target).devices[0]
    assert device.device_kind == target.description, name
    assert target.bytes_limit == int(0.75 * target.memory_mib * 2**20)
  # Published dense bf16 peaks: H100 SXM 989.4 TFLOP/s = 132 SMs x 1.83 GHz x 4096 FLOP/clock
  # per SM (NVIDIA's Hopper whitepaper); A100 312 = 108 x 1.41 GHz x 2048.
  assert H100.peak_flops["bfloat16"] == pytest.approx(132 * 1.83e9 * 4096, rel=0.001)
  assert targets.TARGETS["a100-40"].peak_flops["bfloat16"] == pytest.approx(
      108 * 1.41e9 * 2048, rel=0.001)
  assert len(targets.topology(H100, 8).devices) == 8
  with pytest.raises(ValueError, match="--target 'v100' is unknown; known targets: h100"):
    targets.get_target("v100")


def test_hlo_flops_counts_a_dot_and_one_loop_body() -> None:
  # 2 M N K for one [M,K] x [K,N] dot; a scan of 5 counts its body once (the caveat the
  # planner relies on: a round's loops count one local step).
  mesh = _mesh()
  a = aot.abstract(jax.ShapeDtypeStruct((64, 128), jnp.float32), mesh)
  b = aot.abstract(jax.ShapeDtypeStruct((128, 32), jnp.float32), mesh)
  assert aot.hlo_flops(jax.jit(jnp.matmul).lower(a, b)) == 2 * 64 * 128 * 32
  c = aot.abstract(jax.ShapeDtypeStruct((128, 128), jnp.float32), mesh)
  looped = jax.jit(lambda x: jax.lax.scan(lambda h, _: (h @ x, None), x, None, length=5)[0])
  assert aot.hlo_flops(looped.lower(c)) == pytest.approx(2 * 128 ** 3, rel=0.01)


def test_cudnn_attention_forward_and_backward_and_their_flops() -> None:
  # 197 tokens (odd) are padded to 198: cuDNN's forward and backward both appear, and the
  # hand count is 4 B N T S H forward + 8 B N T S H backward at the padded length.
  mesh = _mesh()
  q = aot.abstract(jax.ShapeDtypeStruct((2, 197, 12, 64), jnp.bfloat16), mesh)
  loss = lambda q, k, v: jnp.sum(padded_attention(q, k, v).astype(jnp.float32))
  exe = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
  stats = aot.compiled_stats(exe)
  assert stats.cudnn_attention == (1, 1)
  assert aot.attention_flops(exe.as_text()) == 12 * 2 * 12 * 198 * 198 * 64


@pytest.mark.parametrize("spec,fields", [
    ("study:cifar100,full", {}),
    ("study:cifar100,head", {"federated__feature_cache": "off"}),
    ("study:cifar100,bias", {}),
    ("study:cifar100,adapter", {}),
    ("study:cifar100,prompt", {}),
    ("study:cifar100,lora", {}),
    ("study:cifar100,ssf", {}),
    ("study_dp:dataset=cifar100,method=bias,mechanism=dp_sgd", {}),
    ("study_dp:dataset=cifar100,method=bias,mechanism=dp_fedavg", {}),
    ("study_dp:dataset=cifar100,method=bias,mechanism=paper_gaussian", {}),
    ("study:cifar100,bias", {"federated__personal": "head"}),
    ("study:cifar100,lora", {"federated__lora_aggregation": "fedex"}),
    ("study:cifar100,bias", {"federated__compression": "int8"}),
])
def test_presets_compile_for_h100_with_default_flags(spec, fields) -> None:
  result = plan_lib.plan(_config(spec, **fields), H100, chunks=(1,))
  (row,) = result["chunks"]
  assert row["xla_flags"] == "default", row["xla_flags"]
  assert result["eval_xla_flags"] == "default"
  assert 0 < row["peak_bytes"] <= MEMORY_FRACTION * H100.bytes_limit
  assert row["peak_gib"] == pytest.approx(row["argument_gib"] + row["output_gib"]
                                          + row["temp_gib"] - row["alias_gib"])
  # bf16 on a GPU: cuDNN attention; a backward call wherever gradients must cross the
  # attention: not for the head, nor (in this one-block model) for an adapter after it.
  assert result["dtype"] == "bfloat16" and result["attention"] == "cudnn"
  fwd, bwd = row["cudnn_attention_calls"]["forward"], row["cudnn_attention_calls"]["backward"]
  crosses = not spec.endswith((",head", ",adapter"))
  assert fwd >= 1 and (bwd >= 1) == crosses, (fwd, bwd)


def test_planner_chunk_flops_and_bound() -> None:
  # The chunk is the largest within the budget; more clients per chunk plan more memory; the
  # per-client FLOPs of a chunk of 2 equal those of 1 (vmap adds no work); executed steps
  # cover useful ones; the bound is max(FLOPs / peak, bytes / bandwidth) of what it reports.
  result = plan_lib.plan(_config("study:cifar100,bias"), H100, chunks=(1, 2))
  one, two = result["chunks"]
  assert result["chunk"] == 2 and two["peak_bytes"] > one["peak_bytes"]
  assert two["chunk_step_flops"] / 2 == pytest.approx(one["chunk_step_flops"], rel=0.02)
  assert result["executed_client_steps"] >= result["useful_client_steps"] > 0
  executed = result["executed_client_steps"]
  want = max(result["flops_per_client_step"] * executed / H100.peak_flops["bfloat16"],
             two["chunk_step_bytes"] / 2 * executed / H100.memory_bandwidth)
  assert result["round_seconds_bound"] == pytest.approx(want)
  # One ViT-B/16 block, batch 64 at 197 tokens: forward 2 x (12 x 768^2 weights) per token
  # plus attention 4 T^2 D; bias tuning's backward at least as much again (input gradients).
  forward = 64 * (2 * 12 * 768 ** 2 * 197 + 4 * 197 ** 2 * 768)
  assert 2 * forward < result["flops_per_client_step"] < 3.5 * forward


def test_eight_gpus_compile_with_a_cross_device_reduction() -> None:
  result = plan_lib.plan(_config("study:cifar100,bias"), H100, num_devices=8,
                         chunks=(1,))
  assert result["devices"] == 8 and result["chunk"] == 1
  (row,) = result["chunks"]
  assert row["xla_flags"] == "default"
  assert row["all_reduce_ops"] >= 1  # the psum of the devices' update sums


def test_preprocessing_for_h100_holds_no_dot() -> None:
  # The accelerator lowering of the resize is gathers and multiply-adds (no float32 dot for
  # the Triton GEMM emitter to refuse), and it compiles with XLA's default flags.
  mesh = _mesh()
  from_shapes = aot.abstract(jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.uint8), mesh)
  key = aot.abstract(jax.ShapeDtypeStruct((2,), jnp.uint32), mesh)
  fn = jax.jit(lambda x, k: fdata.preprocess(x, jax.random.wrap_key_data(k), image_size=224,
                                             augment="crop_flip", train=True))
  exe, flags = aot.compile_with_fallback(fn.lower(from_shapes, key))
  assert flags == "default"
  assert not re.search(r"= \S+ dot\(|custom_call_target=\"__cublas", exe.as_text())


@pytest.mark.parametrize("method", ["bias", "ssf"])
def test_the_planners_chunk_compiles_with_default_flags(method) -> None:
  # At 8 clients per chunk (the H100's chunk for the study's rows), bias and SSF's gradient
  # reductions once made XLA lay the MLP's hidden activation out so that its Triton GEMM
  # found no tiling of the batch x 197-token rows; the MLP works on merged rows instead.
  result = plan_lib.plan(_config(f"study:cifar100,{method}"), H100, chunks=(8,))
  (row,) = result["chunks"]
  assert row["xla_flags"] == "default", row["xla_flags"]
  assert row["peak_bytes"] <= MEMORY_FRACTION * H100.bytes_limit


def test_feature_cache_build_plans_from_shapes() -> None:
  # Head tuning without augmentation caches the pooled features: the builder compiles from
  # shapes, stores [N, width], and its FLOPs are one forward pass per train and test image
  # (hand count for one block at 197 tokens plus the patch embedding); the round then runs
  # the head alone on the stored features.
  result = plan_lib.plan(_config("study:cifar100,head", data__augment="none"), H100,
                         chunks=(1,))
  cache = result["cache"]
  assert result["input"] == "features" and cache["kind"] == "features"
  assert cache["stored_shape"] == [50000, 768]
  assert cache["stored_gib"] == pytest.approx(60000 * 768 * 2 / 2**30)
  assert cache["xla_flags"] == "default"
  assert 0 < cache["peak_gib"] * 2**30 <= MEMORY_FRACTION * H100.bytes_limit
  per_image = (2 * 12 * 768 ** 2 * 197 + 4 * 197 ** 2 * 768) + 2 * 768 * (16 * 16 * 3) * 196
  # 196 + 40 batches of 256 (the last of each split padded), norms and GELUs on top.
  assert 1.0 <= cache["flops"] / ((196 + 40) * 256 * per_image) < 1.02
  head_step = 3 * 2 * 64 * 768 * 100  # forward + input/weight gradients of the head
  assert result["flops_per_client_step"] < 3 * head_step
  assert result["row_seconds_bound"] > result["rounds"] * result["round_seconds_bound"]


TPU_MISSING = targets.tpu_compiler_missing()


@pytest.mark.skipif(TPU_MISSING is not None, reason=str(TPU_MISSING))
def test_a_tpu_v5e_compiles_the_round_from_shapes() -> None:
  # libtpu's device-less v5e: one-host slices of 1, 4 and 8 chips, one TensorCore each; the
  # study round compiles with default flags within the chip's HBM, on the explicit attention
  # (cuDNN is a GPU library), and the bound divides by v5e's published 197 TFLOP/s.
  v5e = targets.get_target("v5e")
  for chips in (1, 4, 8):
    devices = targets.topology(v5e, chips).devices
    assert len(devices) == chips and devices[0].device_kind == v5e.description
  result = plan_lib.plan(_config("study:cifar100,bias"), v5e, chunks=(1,))
  (row,) = result["chunks"]
  assert row["xla_flags"] == "default" and result["attention"] == "explicit"
  assert row["cudnn_attention_calls"] == {"forward": 0, "backward": 0}
  assert 0 < row["peak_bytes"] <= MEMORY_FRACTION * v5e.bytes_limit
  executed = result["executed_client_steps"]
  assert result["round_seconds_bound"] >= result["flops_per_client_step"] * executed / 197e12
  with pytest.raises(ValueError, match="a one-host v5e slice has 1, 2, 4 or 8 chips"):
    targets.topology(v5e, 3)
