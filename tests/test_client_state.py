"""Per-client persistent state inside the jitted round, against NumPy bookkeeping."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax.federated import (ClientStateSpec, RoundPlan, RoundSpec, build_algorithm,
                                   client_state_bytes, plan_round)
from fedpeft_jax.runner.checkpointing import RunCheckpointer
from tests.test_federated import run_on_cpu_devices, setup

NUM_CLIENTS = 6
SENTINEL = -999


def counting_client(poison: int = -1, poison_state: int = -1):
  """A stateful rule with a known effect: its state counts the rounds it reported and
  accumulates its id and example count; the update it sends is its running count (so the
  server model depends on the state, as with error feedback). Client `poison` sends NaN;
  client `poison_state` sends a finite update but its new state is NaN."""
  def client_update(trainable, frozen, data, client_id, key, active, client_state):
    n = data.sizes[client_id].astype(jnp.float32)
    # An inactive slot (padding, a client that did not report) returns a sentinel row, so a
    # write the engine should have skipped shows up in the state.
    count = jnp.where(active, client_state["count"] + 1, SENTINEL)
    acc = jnp.where(active, client_state["acc"] + jnp.stack([client_id.astype(jnp.float32), n]),
                    float(SENTINEL))
    acc = jnp.where(client_id == poison_state, jnp.nan, acc)
    bad = client_id == poison
    update = jax.tree_util.tree_map(
        lambda x: jnp.where(bad, jnp.nan, 0.01 * count.astype(x.dtype)) * jnp.ones_like(x),
        trainable)
    return {"update": update, "num_examples": jnp.where(active, n, 0.0),
            "loss": jnp.zeros((), jnp.float32), "steps": jnp.where(active, 1, 0),
            "poisson_dropped": jnp.zeros((), jnp.int32),
            "client_state": {"count": count, "acc": acc}}
  return client_update


STATE = ClientStateSpec(init=lambda t: {"count": jnp.zeros((), jnp.int32),
                                        "acc": jnp.zeros((2,), jnp.float32)},
                        num_clients=NUM_CLIENTS)
SIZES = (5, 7, 3, 6, 4, 2)


def build(chunk: int, poison: int = -1, devices: int = 1, mesh=None, poison_state: int = -1,
          **round_kw):
  model, params, trainable, frozen, data, _, cspec, ctx, stx = setup(sizes=SIZES)
  algo = build_algorithm(model, ctx, stx, cspec, RoundSpec(chunk, devices, **round_kw), 4,
                         mesh=mesh,
                         client_update=counting_client(poison, poison_state),
                         client_state=STATE)
  return algo, trainable, frozen, data


def plans(rounds: int = 4):
  return [plan_round(3, r, NUM_CLIENTS, 4, dropout=0.3) for r in range(rounds)]


def numpy_bookkeeping(round_plans, skip=()):
  count = np.zeros(NUM_CLIENTS, np.int64)
  acc = np.zeros((NUM_CLIENTS, 2))
  for plan in round_plans:
    for c in plan.reporting.tolist():
      if c in skip:
        continue
      count[c] += 1
      acc[c] += (c, SIZES[c])
  return count, acc


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_state_follows_each_reporting_client(chunk):
  algo, trainable, frozen, data = build(chunk)
  state = algo.init(trainable, seed=0)
  assert client_state_bytes(state) == NUM_CLIENTS * (4 + 8)
  round_plans = plans()
  for plan in round_plans:
    state, _ = algo.apply(state, frozen, data, plan)
  count, acc = numpy_bookkeeping(round_plans)
  assert any(p.num_reporting < p.num_sampled for p in round_plans)  # dropouts happened
  np.testing.assert_array_equal(np.asarray(state.clients["rule"]["count"]), count)
  np.testing.assert_array_equal(np.asarray(state.clients["rule"]["acc"]), acc)


def test_chunking_does_not_change_state_or_model():
  results = []
  for chunk in (1, 3):
    algo, trainable, frozen, data = build(chunk)
    state = algo.init(trainable, seed=0)
    for plan in plans():
      state, _ = algo.apply(state, frozen, data, plan)
    results.append(state)
  for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_padding_and_nonfinite_slots_never_write():
  # Client 0 is absent while padding slots (id 0) run; client 2 sends NaN and keeps its row.
  algo, trainable, frozen, data = build(chunk=4, poison=2)
  state = algo.init(trainable, seed=0)
  plan = RoundPlan(round=0, sampled=np.array([1, 2, 3], np.int32),
                   reporting=np.array([1, 2, 3], np.int32))
  state, m = algo.apply(state, frozen, data, plan)
  assert int(m["clients_nonfinite"]) == 1
  count, acc = numpy_bookkeeping([plan], skip=(2,))
  np.testing.assert_array_equal(np.asarray(state.clients["rule"]["count"]), count)
  np.testing.assert_array_equal(np.asarray(state.clients["rule"]["acc"]), acc)


def test_a_nonfinite_new_state_counts_as_a_nonfinite_client():
  """Client 3's update is finite but its new row is NaN: the row is not written and its
  update is left out of the mean, as for a NaN update."""
  algo, trainable, frozen, data = build(chunk=2, poison_state=3)
  state = algo.init(trainable, seed=0)
  plan = RoundPlan(round=0, sampled=np.array([1, 3], np.int32),
                   reporting=np.array([1, 3], np.int32))
  new, m = algo.apply(state, frozen, data, plan)
  assert int(m["clients_nonfinite"]) == 1 and int(m["clients_contributed"]) == 1
  count, acc = numpy_bookkeeping([plan], skip=(3,))
  np.testing.assert_array_equal(np.asarray(new.clients["rule"]["count"]), count)
  np.testing.assert_array_equal(np.asarray(new.clients["rule"]["acc"]), acc)
  # Only client 1's update (its count, 1, times 0.01) moved the model.
  for before, after in zip(jax.tree_util.tree_leaves(trainable),
                           jax.tree_util.tree_leaves(new.trainable)):
    np.testing.assert_allclose(np.asarray(after) - np.asarray(before), 0.01, atol=1e-6)


def test_state_is_checkpointed_and_resume_is_exact(tmp_path):
  round_plans = plans()
  algo, trainable, frozen, data = build(chunk=2)
  whole = algo.init(trainable, seed=0)
  for plan in round_plans:
    whole, _ = algo.apply(whole, frozen, data, plan)

  algo, trainable, frozen, data = build(chunk=2)
  state = algo.init(trainable, seed=0)
  for plan in round_plans[:2]:
    state, _ = algo.apply(state, frozen, data, plan)
  ckpt = RunCheckpointer(str(tmp_path / "ckpt"))
  ckpt.save(2, state, {})
  ckpt.wait()
  template = algo.init(trainable, seed=0)
  restored, _ = RunCheckpointer(str(tmp_path / "ckpt")).restore_latest(template)
  state = jax.device_put(restored)
  for plan in round_plans[2:]:
    state, _ = algo.apply(state, frozen, data, plan)
  for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


MULTI_DEVICE = textwrap.dedent("""
    import sys, tempfile
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from fedpeft_jax.federated import client_state_bytes
    from fedpeft_jax.mesh import make_mesh, replicate
    from fedpeft_jax.runner.checkpointing import RunCheckpointer
    from tests.test_client_state import NUM_CLIENTS, build, plans, numpy_bookkeeping

    def run(devices, chunk, state=None, rounds=plans()):
      mesh = make_mesh(jax.devices()[:devices])
      algo, trainable, frozen, data = build(chunk, devices=devices, mesh=mesh)
      state = algo.init(trainable, seed=0) if state is None else state(algo, trainable)
      frozen, data = replicate(frozen, mesh), replicate(data, mesh)
      for plan in rounds:
        state, _ = algo.apply(state, frozen, data, plan)
      return state

    count, acc = numpy_bookkeeping(plans())
    for devices, chunk, per in ((4, 1, 2), (2, 2, 3)):
      state = run(devices, chunk)
      table = np.asarray(state.clients["rule"]["count"])
      assert table.shape == (devices * per,), table.shape  # 6 clients, padded to the devices
      np.testing.assert_array_equal(table[:NUM_CLIENTS], count)
      np.testing.assert_array_equal(np.asarray(state.clients["rule"]["acc"])[:NUM_CLIENTS], acc)
      # Each device holds exactly its block of client ids, nothing else.
      want = np.zeros(devices * per, count.dtype)
      want[:NUM_CLIENTS] = count
      shards = state.clients["rule"]["count"].addressable_shards
      assert len(shards) == devices
      for shard in shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
        assert shard.data.shape == (per,)
      assert client_state_bytes(state) == per * (4 + 8)  # int32 count + 2 float32 per row

    # Resume across device counts: 4 devices' checkpoint (8 rows) on 1 device (6 rows), and
    # 1 device's on 4; both equal the uninterrupted run.
    whole = run(1, 1)
    for saved_on, resumed_on in ((4, 1), (1, 4)):
      half = run(saved_on, 1, rounds=plans()[:2])
      with tempfile.TemporaryDirectory() as d:
        ckpt = RunCheckpointer(d)
        ckpt.save(2, half, {{}})
        ckpt.close()
        restore = lambda algo, t: RunCheckpointer(d).restore_latest(algo.init(t, seed=0))[0]
        state = run(resumed_on, 1, state=restore, rounds=plans()[2:])
      for a, b in zip(jax.tree_util.tree_leaves(whole.trainable),
                      jax.tree_util.tree_leaves(state.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      np.testing.assert_array_equal(np.asarray(state.clients["rule"]["count"])[:NUM_CLIENTS],
                                    count)
      np.testing.assert_array_equal(np.asarray(state.clients["rule"]["acc"])[:NUM_CLIENTS], acc)

    # Two tables of different populations in one tree: the rule's 6 rows and top-k residuals
    # sized for 10 clients (blocks of 2 and 3 rows per device).
    mesh = make_mesh(jax.devices())
    algo, trainable, frozen, data = build(1, devices=4, mesh=mesh, compression="topk",
                                          compression_fraction=0.5, num_clients=10)
    state = algo.init(trainable, seed=0)
    frozen, data = replicate(frozen, mesh), replicate(data, mesh)
    for plan in plans():
      state, _ = algo.apply(state, frozen, data, plan)
    assert state.clients["rule"]["count"].shape == (8,)
    assert jax.tree_util.tree_leaves(state.clients["residual"])[0].shape[0] == 12
    np.testing.assert_array_equal(np.asarray(state.clients["rule"]["count"])[:NUM_CLIENTS], count)
    np.testing.assert_array_equal(np.asarray(state.clients["rule"]["acc"])[:NUM_CLIENTS], acc)
    print("OK", len(jax.devices()))
""")


@pytest.mark.slow
def test_state_on_four_cpu_devices():
  """The rows are split over the devices by client id (each device holds its block) and
  follow NumPy bookkeeping; a checkpoint resumes on another device count."""
  run_on_cpu_devices(MULTI_DEVICE)


TEN_THOUSAND = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from fedpeft_jax.federated import RoundSpec, build_algorithm, client_state_bytes, plan_round
    from fedpeft_jax.mesh import make_mesh, replicate
    from tests.test_federated import NUM_CLASSES, flat, setup
    N, PER_ROUND, ROUNDS = 10_001, 8, 3  # not a multiple of 4: the table is padded
    model, params, trainable, frozen, data, _, cspec, ctx, stx = setup(sizes=(2,) * N)
    plans = [plan_round(5, r, N, PER_ROUND) for r in range(ROUNDS)]
    out = {{}}
    for devices in (1, 4):
      mesh = make_mesh(jax.devices()[:devices])
      spec = RoundSpec(1, devices, compression="topk", compression_fraction=0.25, num_clients=N)
      algo = build_algorithm(model, ctx, stx, cspec, spec, NUM_CLASSES, mesh=mesh)
      state = algo.init(trainable, seed=0)
      f, d = replicate(frozen, mesh), replicate(data, mesh)
      for plan in plans:
        state, m = algo.apply(state, f, d, plan)
        assert int(m["clients_contributed"]) == PER_ROUND
      out[devices] = state
    # Bias tuning of the tiny ViT, by hand: head 16 x 4 + 4, the block's 7 width-16 biases
    # and fc1's 32, the patch embedding's and final LayerNorm's 16 each: one float32 residual.
    row = 4 * (16 * 4 + 4 + 7 * 16 + 32 + 2 * 16)
    assert client_state_bytes(out[1]) == N * row
    assert client_state_bytes(out[4]) == 2501 * row  # ceil(10,001 / 4) rows per device
    one, four = flat(out[1].trainable), flat(out[4].trainable)
    for k in one:
      np.testing.assert_allclose(four[k], one[k], atol=1e-6, err_msg=k)
    reported = np.zeros(N, bool)
    for plan in plans:
      reported[plan.reporting] = True
    for a, b in zip(jax.tree_util.tree_leaves(out[1].clients),
                    jax.tree_util.tree_leaves(out[4].clients)):
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(b[:N], a, atol=1e-6)
    # The residuals (top-k keeps 3/4 of each update back) sit in the rows of the clients
    # that reported, and only there.
    norms = sum(np.abs(np.asarray(x)[:N]).reshape(N, -1).sum(1)
                for x in jax.tree_util.tree_leaves(out[4].clients))
    np.testing.assert_array_equal(norms > 0, reported)
    print("OK", len(jax.devices()))
""")


@pytest.mark.slow
def test_ten_thousand_clients_split_over_four_devices():
  """10,001 clients keep a top-k residual each: split over 4 devices, each holds a quarter
  (2,501 rows, counted by hand), and 3 rounds equal one device's to 1e-6."""
  run_on_cpu_devices(TEN_THOUSAND)
