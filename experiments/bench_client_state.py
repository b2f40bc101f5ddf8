"""What per-client state costs each device: a top-k residual for every client of a population.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      python -m experiments.bench_client_state [--clients=1000,10000,100000] [--rounds=5]

For each population size and for 1 and all devices, side by side in one process: a round of
`--per_round` clients with top-k compression (each client keeps its error-feedback residual,
a float32 copy of the trainable tree, in `ServerState.clients`) on a small ViT. Reported per
device: the client table's bytes (`client_state_bytes`), XLA's compiled argument and temporary
bytes of the round (`memory_analysis()`), and the median seconds per round after a warm-up.
On a GPU/TPU host run it without XLA_FLAGS (every local device is used).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
from absl import app, flags

import fedpeft_jax.data as fdata
from fedpeft_jax import peft
from fedpeft_jax.federated import (ClientSpec, RoundSpec, build_algorithm, client_state_bytes,
                                   make_mesh, make_server_optimizer, plan_round, replicate)
from fedpeft_jax.models import ViT

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_list("clients", ["1000", "10000", "100000"], "Population sizes.")
  flags.DEFINE_integer("per_round", 8, "Clients per round.")
  flags.DEFINE_integer("rounds", 5, "Timed rounds (after a warm-up round).")
  flags.DEFINE_string("method", "lora", "PEFT method (its trainable tree is the residual).")


def _population(num_clients: int, per_client: int = 4, image: int = 16) -> fdata.ClientData:
  rng = np.random.default_rng(0)
  n = num_clients * per_client
  return fdata.ClientData(
      images=rng.integers(0, 256, (n, image, image, 3), dtype=np.uint8),
      labels=rng.integers(0, 10, n).astype(np.int32),
      indices=np.arange(n, dtype=np.int32).reshape(num_clients, per_client),
      sizes=np.full(num_clients, per_client, np.int32))


def measure(num_clients: int, devices: int, method: str, per_round: int, rounds: int) -> dict:
  """One population on `devices` devices: bytes per device and seconds per round."""
  model = ViT(variant=None, hidden_size=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4,
              image_size=16, num_classes=10, peft=peft.method_config(method))
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  trainable, frozen = peft.split(params, peft.trainable_mask(params, model.peft))
  mesh = make_mesh(jax.devices()[:devices])
  spec = RoundSpec(1, devices, compression="topk", compression_fraction=0.1,
                   num_clients=num_clients)
  cspec = ClientSpec(batch_size=4, local_epochs=1, max_examples=4, image_size=16,
                     augment="none")
  algo = build_algorithm(model, optax.sgd(0.1), make_server_optimizer("fedavg", 1.0), cspec,
                         spec, 10, mesh=mesh)
  state = algo.init(trainable, seed=0)
  frozen, data = replicate(frozen, mesh), replicate(_population(num_clients), mesh)
  memory = algo.lower(state, frozen, data, per_round).compile().memory_analysis()
  times = []
  for r in range(rounds + 1):
    start = time.perf_counter()
    state, metrics = algo.apply(state, frozen, data, plan_round(0, r, num_clients, per_round))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return {"clients": num_clients, "devices": devices,
          "row_bytes": peft.count(trainable) * 4,
          "client_state_MB_per_device": client_state_bytes(state) / 1e6,
          "xla_argument_MB": memory.argument_size_in_bytes / 1e6,
          "xla_temp_MB": memory.temp_size_in_bytes / 1e6,
          "seconds_per_round": float(np.median(times[1:]))}


def main(argv: list[str]) -> None:
  del argv
  counts = sorted({1, jax.device_count()})
  print(f"{jax.device_count()} {jax.default_backend()} device(s); method {FLAGS.method}, "
        f"{FLAGS.per_round} clients per round, top-k residual per client")
  header = ("clients", "devices", "row_bytes", "client_state_MB_per_device", "xla_argument_MB",
            "xla_temp_MB", "seconds_per_round")
  print(" | ".join(header))
  for n in (int(c) for c in FLAGS.clients):
    for devices in counts:
      row = measure(n, devices, FLAGS.method, FLAGS.per_round, FLAGS.rounds)
      print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k])
                       for k in header), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
