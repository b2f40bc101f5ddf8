"""Two processes x two CPU devices through jax.distributed on 127.0.0.1 give the
single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the slow tier: multi-process runs

WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if {nproc} > 1:
      jax.distributed.initialize(coordinator_address="127.0.0.1:{port}",
                                 num_processes={nproc}, process_id={pid})
    import numpy as np
    from tests.test_federated import setup, flat, plan_round
    from fedpeft_jax.federated import RoundSpec, build_algorithm
    from fedpeft_jax.mesh import make_mesh, replicate
    model, params, trainable, frozen, data, _, cspec, ctx, stx = setup(sizes=(5, 7, 3, 6, 4))
    mesh = make_mesh()
    algo = build_algorithm(model, ctx, stx, cspec, RoundSpec(1, len(jax.devices())), 4, mesh=mesh)
    state = algo.init(trainable, seed=2)
    frozen, data = replicate(frozen, mesh), replicate(data, mesh)
    for r in range(2):
      state, m = algo.apply(state, frozen, data, plan_round(2, r, 5, 4))
    out = {{k: np.asarray(v).tolist() for k, v in flat(state.trainable).items()}}
    print("RESULT" + json.dumps({{"devices": len(jax.devices()), "params": out}}))
    if {nproc} > 1:
      jax.distributed.shutdown()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(nproc: int, devices_per_process: int) -> list[dict]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(root=root, nproc=nproc,
                                                                 port=port, pid=pid)],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in range(nproc)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
    results.append(json.loads(line[len("RESULT"):]))
  return results


def test_two_process_distributed_matches_single_process():
  single = _launch(1, 1)[0]
  multi = _launch(2, 2)
  assert all(r["devices"] == 4 for r in multi)
  for r in multi:
    for k, v in single["params"].items():
      np.testing.assert_allclose(np.asarray(r["params"][k]), np.asarray(v), atol=1e-5, err_msg=k)


@pytest.mark.parametrize("extra", [(), ("--config.federated.compression=topk",)],
                         ids=["bias", "topk"])
def test_two_process_cli_run_matches_single_process(tmp_path, extra):
  """`python -m fedpeft_jax.main --coordinator_address=...` on two processes sharing a
  workdir: process 0 writes the outputs and the metrics equal a one-process run. With top-k,
  each process holds only its devices' rows of the clients' residuals (checkpointed shard by
  shard)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config, variant = "--config=configs/tiny.py:bias,rounds=2", extra

  def cli(workdir, *extra, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "fedpeft_jax.main", config, *variant,
                             f"--workdir={workdir}", "--no_progress", *extra],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

  single = cli(tmp_path / "single")
  out, err = single.communicate(timeout=600)
  assert single.returncode == 0, err[-3000:]
  port = _free_port()
  procs = [cli(tmp_path / "multi", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={pid}", devices=2) for pid in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  read = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl") if l.strip()]
  a, b = read(tmp_path / "single"), read(tmp_path / "multi")
  assert [r["round"] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    for key in ("test_accuracy", "test_loss", "train_loss"):
      np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert ra["cumulative_bytes"] == rb["cumulative_bytes"]
