"""The round's pieces called one by one (`engine.chunk_step`, `engine.upload`, the LoRA
folding plug), each against NumPy bookkeeping of what it must compute.

A stand-in client rule with a known update (client c sends (c + 1) * 0.1 everywhere, trained
on n_c examples) makes every sum a by-hand number; the engine's own tests
(tests/test_federated.py, tests/test_compression_round.py, tests/test_lora_round.py) check
the assembled round against full re-derivations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax.federated import aggregation, compression, engine, lora_aggregation
from fedpeft_jax.federated.engine import RoundPieces, RoundSpec
from fedpeft_jax.mesh import make_mesh

SIZES = np.array([5.0, 7.0, 3.0, 6.0], np.float32)
TRAINABLE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros((3,), np.float32)}


def known_client(nan_client: int = -1):
  """Client c sends (c + 1) * 0.1 in every entry (NaN for `nan_client`), loss c, c + 2
  steps, trained on SIZES[c] examples."""
  def client_update(trainable, frozen, data, client_id, key, active):
    value = jnp.where(client_id == nan_client, jnp.nan, (client_id + 1) * 0.1)
    return {"update": jax.tree_util.tree_map(lambda x: jnp.full_like(x, value), trainable),
            "num_examples": jnp.where(active, jnp.asarray(SIZES)[client_id], 0.0),
            "loss": client_id.astype(jnp.float32), "steps": jnp.where(active, client_id + 2, 0),
            "poisson_dropped": jnp.zeros((), jnp.int32)}
  return client_update


def pieces(nan_client: int = -1, codec=None, aggregator=None) -> RoundPieces:
  spec = RoundSpec(clients_per_chunk=2, num_devices=1)
  return RoundPieces(known_client(nan_client), codec or compression.upload_codec(),
                     aggregator or aggregation.weighted_mean("examples"),
                     lora_aggregation.lora_round("fedit", 1.0), optax.sgd(1.0), spec,
                     make_mesh(jax.devices()[:1]), private=False)


def one_chunk(p: RoundPieces, ids, valid):
  zero = jnp.zeros((), jnp.float32)
  carry = {"update": jax.tree_util.tree_map(jnp.zeros_like, TRAINABLE), "weight": zero,
           "loss": zero, "examples": zero, "contributed": zero, "nonfinite": zero,
           "steps": zero, "executed_steps": zero, "poisson_dropped": zero,
           "lora_products": None}
  keys = jax.vmap(lambda c: jax.random.key_data(jax.random.key(c)))(jnp.asarray(ids))
  return engine.chunk_step(p, TRAINABLE, {}, None, jnp.float32(0.0), carry,
                           (jnp.asarray(ids, jnp.int32), jnp.asarray(valid), keys, None))


def test_chunk_step_sums_weighted_updates_and_skips_padding_and_nan():
  """Slots: client 1, client 3 (NaN), client 2, a padding slot (valid False). The sums must
  be FedAvg's numerator and denominator over clients 1 and 2 only; client 3 counts as
  non-finite, the padding slot as nothing; executed steps = longest client x slots."""
  ids, valid = [1, 3, 2, 0], [True, True, True, False]
  carry, (norms, ok, rows) = one_chunk(pieces(nan_client=3), ids, valid)
  n1, n2 = SIZES[1], SIZES[2]
  np.testing.assert_allclose(carry["update"]["w"], np.full((2, 3), n1 * 0.2 + n2 * 0.3),
                             rtol=1e-6)
  np.testing.assert_allclose(carry["weight"], n1 + n2)
  np.testing.assert_allclose(carry["examples"], n1 + n2)
  np.testing.assert_allclose(carry["loss"], 1 * n1 + 2 * n2)
  assert float(carry["contributed"]) == 2 and float(carry["nonfinite"]) == 1
  # Steps every reporting client ran (the NaN one too), and what the vmapped chunk ran.
  assert float(carry["steps"]) == 3 + 5 + 4
  assert float(carry["executed_steps"]) == 5 * 4
  np.testing.assert_array_equal(ok, [True, False, True, False])
  np.testing.assert_allclose(np.asarray(norms)[[0, 2]], [0.2 * 3, 0.3 * 3], rtol=1e-6)  # sqrt(9 x^2)
  assert rows is None


def test_upload_round_trips_through_the_codec_and_reports_clip_norms():
  """`engine.upload` with an int8 codec decodes to within one step of each update; with
  top-k error feedback under DP-FedAvg's bound it returns the clients' pre-clip norms."""
  updates = {"w": jnp.stack([jnp.full((2, 3), 0.4), jnp.linspace(-1, 1, 6).reshape(2, 3)])}
  keys = jax.random.split(jax.random.key(0), 2)
  p = pieces(codec=compression.upload_codec("float32", "int8"))
  received, residuals, norms = engine.upload(p, updates, None, keys, jnp.float32(0.0))
  assert residuals is None and norms is None
  step = np.abs(np.asarray(updates["w"])).reshape(2, -1).max(1) / 127
  assert (np.abs(np.asarray(received["w"] - updates["w"])).reshape(2, -1)
          <= step[:, None] * (1 + 1e-6)).all()
  dp = aggregation.dp_fedavg(aggregation.ServerDP(noise_multiplier=1.0, expected_clients=2))
  p = pieces(codec=compression.upload_codec("float32", "topk", 0, 0.5), aggregator=dp)
  residual = {"w": jnp.stack([jnp.full((2, 3), -0.1), jnp.full((2, 3), 0.25)])}
  received, new_residual, norms = engine.upload(p, updates, residual, keys, jnp.float32(0.5))
  message = np.asarray(updates["w"] + residual["w"], np.float64).reshape(2, -1)
  length = np.sqrt((message ** 2).sum(1))
  np.testing.assert_allclose(norms, length, rtol=1e-6)  # update + residual, before the clip
  clipped = message * np.minimum(1.0, 0.5 / length)[:, None]
  sent = np.asarray(received["w"]).reshape(2, -1)
  # What was sent and what is kept back add up to the clipped message; half of it is sent.
  np.testing.assert_allclose(sent + np.asarray(new_residual["w"]).reshape(2, -1), clipped,
                             atol=1e-6)
  assert ((sent != 0).sum(1) == 3).all()


def test_flora_ranks_must_cover_the_rounds_clients():
  with pytest.raises(ValueError, match=r"2 ranks, but RoundSpec\.num_clients is 0"):
    lora_aggregation.lora_round("flora", 1.0, (1, 2), num_clients=0)
  assert lora_aggregation.lora_round("flora", 1.0, (1, 2), num_clients=2).init is not None


def test_ffa_plug_refuses_a_trainable_a():
  """FFA-LoRA keeps A frozen: its plug refuses a trainable tree holding an A factor."""
  b_only = {"blk": {"q_lora": {"lora_b": np.zeros((2, 3), np.float32)}}}
  with_a = {"blk": {"q_lora": {"lora_a": np.zeros((4, 2), np.float32), **b_only["blk"]["q_lora"]}}}
  plug = lora_aggregation.lora_round("ffa", 1.0)
  assert plug.init(b_only) is None
  with pytest.raises(ValueError, match="freeze_a=True"):
    plug.init(with_a)


def test_fedit_folding_plug_is_the_identity_and_fedex_folds_the_product_residual():
  """fedit's plug changes nothing; fedex's finalize returns, per target, the mean of the
  client products minus the product of the mean factors (Singhal et al.'s residual),
  re-derived in NumPy."""
  plug = lora_aggregation.lora_round("fedit", 1.0)
  tree = {"a": np.ones(3, np.float32)}
  assert plug.init(tree) is None and plug.client_start(tree, 0) is tree
  assert plug.contribute(tree, tree, None, None) is None
  assert plug.finalize(None, 1.0, tree, None) == (tree, None)
  rng = np.random.default_rng(0)
  r, d_in, d_out, scaling = 2, 4, 3, 0.5
  trainable = {"blk": {"q_lora": {"lora_a": rng.normal(size=(d_in, r)).astype(np.float32),
                                  "lora_b": rng.normal(size=(r, d_out)).astype(np.float32)}}}
  fedex = lora_aggregation.lora_round("fedex", scaling)
  ups = jax.tree_util.tree_map(lambda x: rng.normal(size=(2,) + x.shape).astype(np.float32),
                               trainable)
  coeff = jnp.asarray([1.0, 3.0])
  sums = fedex.contribute(trainable, ups, coeff, jnp.asarray([0, 1]))
  assert list(lora_aggregation.flatten(sums)) == ["blk/q/kernel"]
  a = np.asarray(trainable["blk"]["q_lora"]["lora_a"])[None] + ups["blk"]["q_lora"]["lora_a"]
  b = np.asarray(trainable["blk"]["q_lora"]["lora_b"])[None] + ups["blk"]["q_lora"]["lora_b"]
  mean_product = sum(c * scaling * a[k] @ b[k] for k, c in enumerate([1.0, 3.0])) / 4.0
  mean_a, mean_b = (a * np.array([1, 3], np.float32)[:, None, None]).sum(0) / 4, (
      b * np.array([1, 3], np.float32)[:, None, None]).sum(0) / 4
  server = {"blk": {"q_lora": {"lora_a": mean_a, "lora_b": mean_b}}}
  nxt, delta = fedex.finalize(sums, jnp.float32(4.0), server, None)
  assert nxt is server
  (got,) = jax.tree_util.tree_leaves(delta)
  np.testing.assert_allclose(np.asarray(got), mean_product - scaling * mean_a @ mean_b,
                             rtol=1e-4, atol=1e-5)
