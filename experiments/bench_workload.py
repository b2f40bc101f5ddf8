"""The benchmarks' round shapes and their synthetic data: one `Workload` per round shape
(the study's, scaled for a CPU, uneven clients), the model, data, optimizer and the local
step and evaluation batch they imply. Shared by `bench_round`, `flop_count` and the PyTorch
reference (`torch_reference`), so every side measures the same round.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.federated import (ClientSpec, make_client_optimizer, masked_cross_entropy,
                                   plan_round)
from fedpeft_jax.models import DTYPES, ViT

PyTree = Any

@dataclasses.dataclass(frozen=True)
class Workload:
  """One round's shape. Images are synthetic uint8 at `native_size`, resized on device."""
  name: str
  variant: str
  image_size: int
  native_size: int
  num_classes: int
  batch_size: int
  client_sizes: tuple
  method: str = "bias"
  local_epochs: int = 1
  eval_examples: int = 500
  eval_batch_size: int = 250
  dtype: str = "float32"
  augment: str = "none"
  lr: float = 0.01
  arch: Optional[dict] = None  # hidden_size, depth, num_heads, mlp_dim, patch_size overrides

  def replace(self, **kw) -> "Workload":
    return dataclasses.replace(self, **kw)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["client_sizes"] = [int(s) for s in self.client_sizes]
    return d

  @staticmethod
  def from_json(d: dict) -> "Workload":
    return Workload(**{**d, "client_sizes": tuple(d["client_sizes"])})

  @property
  def max_examples(self) -> int:
    return max(int(s) for s in self.client_sizes)

  def steps_of(self, size: int) -> int:
    return self.local_epochs * math.ceil(size / self.batch_size)

  @property
  def useful_steps(self) -> int:
    return sum(self.steps_of(int(s)) for s in self.client_sizes)

  @property
  def train_images(self) -> int:
    return self.local_epochs * sum(int(s) for s in self.client_sizes)

  @property
  def eval_batches(self) -> int:
    return math.ceil(self.eval_examples / self.eval_batch_size) if self.eval_examples else 0


def cpu_workload(method: str = "bias") -> Workload:
  """The study code's round: 8 clients x 320 images (20 steps of 16), ViT-Ti/4 at 32x32."""
  return Workload(name="cpu", variant="Ti/4", image_size=32, native_size=32, num_classes=10,
                  batch_size=16, client_sizes=(320,) * 8, method=method, eval_examples=500,
                  eval_batch_size=250)


def uneven_workloads(method: str = "bias") -> tuple[Workload, Workload]:
  """8 clients of 1,1,2,2,6,6,7,7 batches vs 8 of 4 each: the same 32 real steps."""
  base = cpu_workload(method)
  b = base.batch_size
  even = base.replace(name="even 8x4 batches", client_sizes=(4 * b,) * 8)
  uneven = base.replace(name="uneven 1,1,2,2,6,6,7,7 batches",
                        client_sizes=tuple(n * b for n in (1, 1, 2, 2, 6, 6, 7, 7)))
  return even, uneven


def study_client_sizes(seed: int = 1, clients: int = 64, per_round: int = 8) -> tuple:
  """Client sizes of the study's first round: CIFAR-100's 50,000 labels (500 per class)
  split Dirichlet(0.1) over 64 clients (min 10, the study config's seed 1), 8 sampled."""
  labels = np.repeat(np.arange(100), 500)
  part = fdata.partition(labels, clients, method="dirichlet", alpha=0.1, min_size=10, seed=seed)
  plan = plan_round(seed, 0, clients, per_round)
  return tuple(int(part.sizes[c]) for c in plan.reporting)


def study_workload(method: str = "bias") -> Workload:
  """The study's row: ViT-B/16 at 224 (CIFAR's 32 px resized on device), batch 64, bf16."""
  return Workload(name="study", variant="B/16", image_size=224, native_size=32,
                  num_classes=100, batch_size=64, client_sizes=study_client_sizes(),
                  method=method, eval_examples=10_000, eval_batch_size=256, dtype="bfloat16",
                  augment="crop_flip")


def study_cpu_workload(method: str = "bias") -> Workload:
  """The study's round scaled down for a CPU: ViT-Ti/16 at 64 px, batch 16, sizes / 16."""
  sizes = tuple(max(16, s // 16) for s in study_client_sizes())
  return Workload(name="study (CPU-scaled)", variant="Ti/16", image_size=64, native_size=32,
                  num_classes=100, batch_size=16, client_sizes=sizes, method=method,
                  eval_examples=500, eval_batch_size=250, augment="crop_flip")


# ------------------------------------------------------------------------------------------------
# Model, data, the local step
# ------------------------------------------------------------------------------------------------

def make_model(w: Workload) -> ViT:
  a = w.arch or {}
  return ViT(variant=None if a else w.variant, num_classes=w.num_classes,
             image_size=w.image_size, dtype=DTYPES[w.dtype], peft=peft.method_config(w.method),
             **a)


def init_split(w: Workload, model: ViT, abstract: bool = False) -> tuple[PyTree, PyTree, PyTree]:
  """(trainable, frozen, mask) from a seeded init (abstract: ShapeDtypeStructs only)."""
  x = jnp.zeros((1, w.image_size, w.image_size, 3))
  init = lambda: model.init(jax.random.PRNGKey(0), x)["params"]  # noqa: E731
  params = jax.eval_shape(init) if abstract else jax.jit(init)()
  mask = peft.trainable_mask(params, peft.method_config(w.method))
  trainable, frozen = peft.split(params, mask)
  return trainable, frozen, mask


def cast_frozen(frozen: PyTree, w: Workload) -> PyTree:
  """The frozen backbone in the compute dtype, as the runner stores it (bf16 on GPU/TPU)."""
  dt = DTYPES[w.dtype]
  cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  return jax.tree_util.tree_map(cast, frozen)


def make_images(w: Workload, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, w.native_size, w.native_size, 3), dtype=np.uint8)
  return images, rng.integers(0, w.num_classes, n).astype(np.int32)


def make_data(w: Workload) -> tuple[fdata.ClientData, np.ndarray, np.ndarray, tuple]:
  """Client data (client c holds a contiguous block of the synthetic training set) and the
  test set, both deterministic from the workload; also the host copies for PyTorch."""
  sizes = np.array(w.client_sizes, np.int64)
  images, labels = make_images(w, int(sizes.sum()), seed=0)
  indices = np.zeros((len(sizes), int(sizes.max())), np.int32)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  for c, (s, n) in enumerate(zip(starts, sizes)):
    indices[c, :n] = np.arange(s, s + n)
  data = fdata.ClientData(images=jnp.asarray(images), labels=jnp.asarray(labels),
                          indices=jnp.asarray(indices), sizes=jnp.asarray(sizes, jnp.int32))
  test_x, test_y = make_images(w, max(w.eval_examples, 1), seed=1)
  clients = tuple((images[s:s + n], labels[s:s + n]) for s, n in zip(starts, sizes))
  return data, test_x, test_y, clients


def client_tx_of(w: Workload) -> optax.GradientTransformation:
  return make_client_optimizer("sgd", w.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def client_spec_of(w: Workload) -> ClientSpec:
  return ClientSpec(batch_size=w.batch_size, local_epochs=w.local_epochs,
                    max_examples=w.max_examples, image_size=w.image_size, augment=w.augment)


def make_local_step(model: ViT, tx: optax.GradientTransformation, w: Workload):
  """One local train step exactly as the engine's scan body runs it (gather excluded):
  preprocess, forward, gradients w.r.t. the trainable subtree, optimizer, update."""

  def step(trainable, opt_state, frozen, images_u8, labels, mask, key):
    k_aug, k_grad = jax.random.split(key)
    x = fdata.preprocess(images_u8, k_aug, image_size=w.image_size, augment=w.augment,
                         train=True)

    def loss_fn(t):
      logits = model.apply({"params": peft.merge(t, frozen)}, x, train=True,
                           rngs={"dropout": k_grad})
      return masked_cross_entropy(logits, labels, mask, w.num_classes)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def make_eval_batch(model: ViT, w: Workload):
  """One batch of `make_evaluate`'s scan body (preprocess + forward)."""

  def f(params, images_u8):
    x = fdata.preprocess(images_u8, jax.random.PRNGKey(0), image_size=w.image_size,
                         augment="none", train=False)
    return model.apply({"params": params}, x, train=False)

  return f


def resolved_arch(w: Workload) -> dict:
  return make_model(w).arch()
