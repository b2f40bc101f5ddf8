"""Federated LoRA aggregation rules against float64 NumPy on small random matrices.

The reference everywhere is the exact weighted average of the client models,
sum_k w_k (W + s_k A_k B_k), computed in NumPy; on a tiny ViT the convention W + s A B
(reshaped to the kernel) is itself checked against the model's forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import peft
from fedpeft_jax.federated import lora_aggregation as la
from fedpeft_jax.models import ViT

K, D_IN, D_OUT, R = 3, 6, 5, 4


def _factors(seed: int = 0, k: int = K, r: int = R) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(k, D_IN, r))
  b = rng.normal(size=(k, r, D_OUT))
  w = rng.uniform(0.5, 2.0, size=k)
  return a, b, w / w.sum()


def _np_mean_of_products(a: np.ndarray, b: np.ndarray, w: np.ndarray, s: np.ndarray) -> np.ndarray:
  return sum(w[i] * s[i] * a[i] @ b[i] for i in range(len(w)))


def _j(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def test_fedit_is_the_weighted_mean_and_misses_the_mean_of_products():
  a, b, w = _factors(0)
  raw = w * 7.0  # unnormalised weights are normalised
  agg = la.fedit(_j(a), _j(b), _j(raw))
  np.testing.assert_allclose(agg.a, np.einsum("k,kir->ir", w, a), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(agg.b, np.einsum("k,kro->ro", w, b), rtol=1e-5, atol=1e-6)
  assert agg.delta_w is None
  # The gap FedEx-LoRA and FLoRA close: the product of means is not the mean of products.
  gap = np.asarray(agg.a, np.float64) @ np.asarray(agg.b, np.float64) - _np_mean_of_products(
      a, b, w, np.ones(K))
  assert np.abs(gap).max() > 0.1
  np.testing.assert_allclose(la.weighted_product(_j(a), _j(b), _j(raw), 0.5),
                             _np_mean_of_products(a, b, w, np.full(K, 0.5)), rtol=1e-5, atol=1e-5)


def test_ffa_with_a_shared_a_is_exact():
  a, b, w = _factors(1)
  a_shared = np.broadcast_to(a[:1], a.shape)
  agg = la.ffa(_j(a_shared), _j(b), _j(w))
  np.testing.assert_allclose(agg.a, a[0], rtol=1e-6)
  np.testing.assert_allclose(agg.b, np.einsum("k,kro->ro", w, b), rtol=1e-5, atol=1e-6)
  prod = np.asarray(agg.a, np.float64) @ np.asarray(agg.b, np.float64)
  np.testing.assert_allclose(prod, _np_mean_of_products(a_shared, b, w, np.ones(K)), atol=1e-6)


@pytest.mark.parametrize("per_client", [False, True])
def test_fedex_residual_recovers_the_average_model(per_client):
  a, b, w = _factors(2)
  s = 0.5
  s_k = np.array([2.0, 1.0, 0.5]) if per_client else np.full(K, s)
  wt = np.random.default_rng(3).normal(size=(D_IN, D_OUT))
  agg = la.fedex(_j(a), _j(b), _j(w), s, client_scaling=_j(s_k) if per_client else None)
  a_mean, b_mean = np.einsum("k,kir->ir", w, a), np.einsum("k,kro->ro", w, b)
  np.testing.assert_allclose(agg.a, a_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(agg.b, b_mean, rtol=1e-5, atol=1e-6)
  a_new, b_new = np.asarray(agg.a, np.float64), np.asarray(agg.b, np.float64)
  merged = wt + np.asarray(agg.delta_w, np.float64) + s * a_new @ b_new
  target = sum(w[i] * (wt + s_k[i] * a[i] @ b[i]) for i in range(K))
  np.testing.assert_allclose(merged, target, atol=1e-5)
  assert np.abs(np.asarray(agg.delta_w)).max() > 1e-2  # the residual is not trivially zero


def test_flora_heterogeneous_ranks_merge_exactly_and_padding_is_ignored():
  ranks = np.array([2, 4, 8])
  r_max = 8
  a, b, w = _factors(4, r=r_max)
  mask = np.asarray(la.rank_mask(ranks, r_max))
  np.testing.assert_array_equal(mask, (np.arange(r_max)[None] < ranks[:, None]).astype(np.float32))
  clean_a, clean_b = a * mask[:, None, :], b * mask[:, :, None]
  # Garbage where the padding is: the mask must remove it.
  garbage = np.random.default_rng(5)
  dirty_a = np.where(mask[:, None, :] > 0, a, garbage.normal(size=a.shape) * 100)
  dirty_b = np.where(mask[:, :, None] > 0, b, garbage.normal(size=b.shape) * 100)
  s_k = np.asarray(la.client_scalings(16.0, ranks))  # alpha / r_k per client
  np.testing.assert_allclose(s_k, 16.0 / ranks)
  target = _np_mean_of_products(clean_a, clean_b, w, s_k)

  key = jax.random.PRNGKey(0)
  agg = la.flora(_j(dirty_a), _j(dirty_b), _j(w), 16.0 / r_max, key, client_scaling=_j(s_k),
                 mask=_j(mask))
  np.testing.assert_allclose(agg.delta_w, target, rtol=1e-5, atol=1e-5)
  # Without the mask the garbage would show (the test can fail).
  unmasked = la.flora(_j(dirty_a), _j(dirty_b), _j(w), 1.0, key, client_scaling=_j(s_k))
  assert np.abs(np.asarray(unmasked.delta_w) - target).max() > 1.0

  a_stack, b_stack = la.stack_adapters(_j(dirty_a), _j(dirty_b), _j(w), 1.0, _j(s_k), _j(mask))
  assert a_stack.shape == (D_IN, K * r_max) and b_stack.shape == (K * r_max, D_OUT)
  np.testing.assert_allclose(a_stack[:, r_max:2 * r_max], w[1] * s_k[1] * clean_a[1], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(a_stack, np.float64) @ np.asarray(b_stack, np.float64),
                             target, rtol=1e-5, atol=1e-5)
  # LoRA restarts: a fresh A from the model's init rule, a zero B.
  bound = 1.0 / np.sqrt(D_IN)
  assert agg.a.shape == (D_IN, r_max) and np.abs(np.asarray(agg.a)).max() <= bound
  np.testing.assert_array_equal(agg.a, peft.layers.kaiming_uniform_a_sqrt5(key, (D_IN, r_max)))
  np.testing.assert_array_equal(agg.b, np.zeros((r_max, D_OUT)))


def test_rules_dispatched_by_name_under_jit_match_numpy():
  """Each rule, called by name inside jit, against float64 NumPy: FedIT's factor means, FFA's
  shared A and mean B, and the exact mean of the products that FedEx-LoRA (residual plus the
  new factors) and FLoRA (its folded delta) give the frozen weight."""
  a, b, w = _factors(6)
  s = 0.5
  key = jax.random.PRNGKey(1)
  mean_a, mean_b = np.einsum("k,kir->ir", w, a), np.einsum("k,kro->ro", w, b)
  exact = _np_mean_of_products(a, b, w, np.full(K, s))
  for rule in la.LORA_AGGREGATIONS:
    out = jax.jit(lambda a, b, w, k, rule=rule: la.aggregate(rule, a, b, w, s, k))(
        _j(a), _j(b), _j(w), key)
    close = lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=1e-5,
                                                    atol=1e-5, err_msg=rule)
    if rule in ("fedit", "fedex"):
      close(out.a, mean_a)
    if rule != "flora":
      close(out.b, mean_b)
    if rule == "ffa":
      close(out.a, a[0])
    if rule in ("fedit", "ffa"):
      assert out.delta_w is None
    if rule == "fedex":
      close(np.asarray(out.delta_w, np.float64)
            + s * np.asarray(out.a, np.float64) @ np.asarray(out.b, np.float64), exact)
    if rule == "flora":
      close(out.delta_w, exact)
  with pytest.raises(ValueError, match="lora_aggregation"):
    la.aggregate("fedavg", _j(a), _j(b), _j(w))
  with pytest.raises(ValueError, match="key"):
    la.aggregate("flora", _j(a), _j(b), _j(w))


# ----------------------------------------------------------------------------- tiny ViT

TARGETS = "query,key,value,out,mlp_fc1,mlp_fc2"


@pytest.fixture(scope="module")
def vit() -> tuple[ViT, dict, jax.Array, float]:
  cfg = peft.method_config("lora", targets=TARGETS, alpha=8.0, rank=4)  # scaling 2, not 1
  model = ViT(variant=None, hidden_size=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4,
              image_size=8, num_classes=4, peft=cfg)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  scaling = peft.to_spec(cfg).lora_scaling
  assert scaling == 2.0
  return model, params, images, scaling


def _clients(params: dict, num: int = 3, seed: int = 0) -> list[dict]:
  """`num` client copies whose LoRA factors (only) are perturbed."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    flat = {p: (np.asarray(v) + 0.3 * rng.normal(size=np.shape(v)).astype(np.float32)
                if la._PAIR.match(p) else np.asarray(v))
            for p, v in peft.flatten(params).items()}
    out.append(flat)
  return out


def _np_effective(flat: dict, scaling: float) -> dict[str, np.ndarray]:
  """W + s A B in float64, reshaped (row-major) to each kernel."""
  out = {}
  for p, a in flat.items():
    m = la._PAIR.match(p)
    if m and m.group(2) == "a":
      kernel = np.asarray(flat[f"{m.group(1)}/kernel"], np.float64)
      b = np.asarray(flat[f"{m.group(1)}_lora/lora_b"], np.float64)
      prod = np.asarray(a, np.float64) @ b
      out[f"{m.group(1)}/kernel"] = kernel + scaling * prod.reshape(kernel.shape)
  return out


def test_effective_weight_convention_matches_the_model(vit):
  model, params, images, s = vit
  client = peft.unflatten(_clients(params, 1, seed=7)[0])
  merged = peft.flatten(client)
  for path, w_eff in _np_effective(merged, s).items():
    merged[path] = jnp.asarray(w_eff, jnp.float32)
  for path in list(merged):
    if path.endswith("_lora/lora_b"):
      merged[path] = jnp.zeros_like(merged[path])
  # The pooled features: the zero-initialised head would hide any difference.
  y_lora = model.apply({"params": client}, images, return_features=True)
  y_merged = model.apply({"params": peft.unflatten(merged)}, images, return_features=True)
  assert np.abs(np.asarray(y_lora)).max() > 1e-3
  np.testing.assert_allclose(y_merged, y_lora, rtol=1e-4, atol=1e-5)
  ours = la.effective_weights(client, s)
  for path, w_eff in _np_effective(peft.flatten(client), s).items():
    np.testing.assert_allclose(ours[path], w_eff, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["fedex", "flora"])
def test_tree_rule_merges_to_the_average_of_client_models(vit, rule):
  _, params, _, s = vit
  clients = _clients(params, 3)
  w = np.array([0.2, 0.5, 0.3])
  stacked = peft.unflatten({p: jnp.stack([jnp.asarray(c[p]) for c in clients])
                            for p in clients[0]})
  targets = la.lora_targets(stacked)
  assert len(targets) == 2 * 6  # depth 2 x every target
  assert {t.rsplit("/", 1)[1] for t in targets} == {"query", "key", "value", "out", "Dense_0",
                                                   "Dense_1"}
  lora, deltas = la.aggregate_lora_tree(stacked, jnp.asarray(w), rule, s,
                                        key=jax.random.PRNGKey(3))
  assert set(peft.flatten(deltas)) == {v["kernel"] for v in targets.values()}
  fl = peft.flatten(lora)
  assert set(fl) == {p for v in targets.values() for p in (v["a"], v["b"])}
  # The new global model: the (shared) frozen kernels plus the residuals, with the new factors.
  merged = peft.flatten(la.fold_into(params, deltas))
  merged.update(fl)
  got = _np_effective({p: np.asarray(v) for p, v in merged.items()}, s)
  want = {p: sum(w[i] * e for i, e in enumerate(_np_effective(c, s)[p] for c in clients))
          for p in got}
  assert len(got) == 12
  for p in got:
    np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-5, err_msg=p)
  # FedIT on the same clients does not reach the average (what the residual repairs).
  lora_fedit, none = la.aggregate_lora_tree(stacked, jnp.asarray(w), "fedit", s)
  assert none == {}
  plain = peft.flatten(params)
  plain.update(peft.flatten(lora_fedit))
  fedit_eff = _np_effective({p: np.asarray(v) for p, v in plain.items()}, s)
  assert max(np.abs(fedit_eff[p] - want[p]).max() for p in want) > 1e-3


def test_tree_ffa_averages_b_alone(vit):
  _, params, _, _ = vit
  clients = _clients(params, 3, seed=2)
  w = np.array([1.0, 2.0, 1.0])
  only_b = {p: jnp.stack([jnp.asarray(c[p]) for c in clients])
            for p in clients[0] if p.endswith("_lora/lora_b")}
  lora, deltas = la.aggregate_lora_tree(peft.unflatten(only_b), jnp.asarray(w), "ffa")
  assert deltas == {}
  for p, v in peft.flatten(lora).items():
    np.testing.assert_allclose(v, np.einsum("k,k...->...", w / w.sum(), np.asarray(only_b[p])),
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="ffa"):
    la.aggregate_lora_tree(peft.unflatten(only_b), jnp.asarray(w), "fedex")


def test_tree_errors(vit):
  _, params, _, _ = vit
  with pytest.raises(ValueError, match="lora_aggregation"):
    la.aggregate_lora_tree(params, jnp.ones(3), "mean")
  with pytest.raises(ValueError, match="no '<target>_lora"):
    la.aggregate_lora_tree({"head": {"kernel": jnp.ones((3, 2, 2))}}, jnp.ones(3), "fedit")
  with pytest.raises(ValueError, match="no kernel"):
    la.fold_into({"head": {"kernel": jnp.ones((2, 2))}}, {"x": {"kernel": jnp.ones((2, 2))}})


# ----------------------------------------------------------------------------- ranks


def test_client_ranks_parsing():
  np.testing.assert_array_equal(la.client_ranks([2, 4, 8], 3, seed=0), [2, 4, 8])
  np.testing.assert_array_equal(la.client_ranks("2,4,8", 3, seed=0), [2, 4, 8])
  np.testing.assert_array_equal(la.client_ranks(4, 3, seed=0), [4, 4, 4])
  u1 = la.client_ranks("uniform:2,4,8", 50, seed=1)
  np.testing.assert_array_equal(u1, la.client_ranks("uniform:2,4,8", 50, seed=1))
  assert u1.dtype == np.int32 and set(u1.tolist()) == {2, 4, 8}
  assert not np.array_equal(u1, la.client_ranks("uniform:2,4,8", 50, seed=2))
  for bad in ["uniform:", "uniform:2,x", "normal:2,4", "2,4", "0,4,8", "a,b,c", [2, 4.5, 8]]:
    with pytest.raises(ValueError, match=r"peft\.lora\.client_ranks"):
      la.client_ranks(bad, 3, seed=0)
  with pytest.raises(ValueError, match=r"peft\.lora\.client_ranks.*exceeds"):
    la.client_ranks([2, 4, 16], 3, seed=0, max_rank=8)
  with pytest.raises(ValueError, match="rank_mask"):
    la.rank_mask([2, 9], 8)
