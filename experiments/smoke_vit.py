"""Smoke run: build a small ViT, run a forward pass and print its parameter summary."""

import time

import jax
import jax.numpy as jnp

from fedpeft_jax import peft
from fedpeft_jax.models import ViT


def main() -> None:
  cfg = peft.method_config("bias")
  model = ViT(variant="Ti/4", num_classes=10, image_size=32, peft=cfg)
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  t = time.perf_counter()
  logits = jax.jit(model.apply)({"params": params}, images)
  logits.block_until_ready()
  print(f"ViT-Ti/4 forward on {images.shape}: logits {logits.shape} in {time.perf_counter() - t:.2f}s")
  print(peft.summary(params, peft.trainable_mask(params, cfg)))


if __name__ == "__main__":
  main()
