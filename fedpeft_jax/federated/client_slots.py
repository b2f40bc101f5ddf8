"""Where a round's clients run: their [devices, chunks, clients_per_chunk] layout, and the
chunk size (how many clients one device vmaps at a time) from XLA's memory estimate.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import numpy as np

from fedpeft_jax.accelerators import aot

MEMORY_FRACTION = 0.75  # share of device memory a compiled round may plan to use


def auto_clients_per_chunk(clients_per_round: int, num_devices: int, batch_size: int = 64,
                           backend: Optional[str] = None, max_images: int = 256,
                           memory_of: Optional[Callable[[int], Optional[int]]] = None,
                           bytes_limit: Optional[int] = None) -> tuple[int, str]:
  """The clients vmapped per chunk, and why (a line for the log).

  CPU: 1 (a sequential loop measured fastest; every client runs exactly its own steps).
  Accelerators: the largest chunk (up to a device's share of the round) whose compiled
  round XLA plans to fit in MEMORY_FRACTION of `bytes_limit` (`device.memory_stats()`),
  `memory_of(chunk)` giving the compiled round's bytes (`compiled_round_bytes`). Where the
  backend reports neither, the rule of thumb: <= `max_images` images per chunk step.
  """
  backend = backend or jax.default_backend()
  per_device = max(1, math.ceil(clients_per_round / num_devices))
  if backend == "cpu":
    return 1, "cpu: one client at a time"
  if memory_of is not None and bytes_limit:
    budget = MEMORY_FRACTION * bytes_limit
    candidates = sorted({per_device} | {2 ** i for i in range(per_device.bit_length())},
                        reverse=True)
    tried = []
    for chunk in candidates:
      need = memory_of(chunk)
      if need is None:
        break
      tried.append(f"{chunk}: {need / 2**30:.2f} GiB")
      if need <= budget:
        return chunk, (f"largest chunk within {MEMORY_FRACTION:.0%} of {bytes_limit / 2**30:.1f}"
                       f" GiB by XLA's estimate ({'; '.join(tried)})")
    if tried:
      return 1, f"no chunk fits by XLA's estimate ({'; '.join(tried)}); using 1"
  chunk = max(1, min(per_device, max_images // max(1, batch_size)))
  return chunk, f"rule of thumb: <= {max_images} images per chunk step (no memory estimate)"


def compiled_round_bytes(lowered: Any) -> Optional[int]:
  """Device bytes XLA plans for a lowered round (`aot.CompiledStats.peak_bytes`); None where
  the backend gives no memory analysis or the round does not compile at this chunk (the
  caller then falls back to its rule of thumb)."""
  try:
    compiled = lowered.compile()
  except (NotImplementedError, RuntimeError):
    return None
  stats = aot.compiled_stats(compiled, custom_calls=False)
  return None if stats is None else stats.peak_bytes


def device_bytes_limit(device: Optional[Any] = None) -> Optional[int]:
  """`bytes_limit` of the device's memory stats, or None where the backend has none."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None



def layout_shape(num_clients: int, num_devices: int, clients_per_chunk: int,
                 min_slots: int = 0) -> tuple[int, int, int]:
  """[devices, chunks, clients_per_chunk] of a round of `num_clients` (at least `min_slots`)
  clients: the shape `layout_clients` fills, which alone fixes the compiled round."""
  chunks = max(1, math.ceil(max(num_clients, min_slots) / (num_devices * clients_per_chunk)))
  return num_devices, chunks, clients_per_chunk


def layout_clients(client_ids: np.ndarray, num_devices: int, clients_per_chunk: int,
                   min_slots: int = 0, steps: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The round's client slots as [devices, chunks, chunk]; padded slots are invalid.

  With `steps` (each client's real local steps, aligned with `client_ids`) the clients are
  ordered longest first (ties by position, so the layout is deterministic) before they are
  dealt out: client i of that order goes to device i % devices, chunk i // (chunk *
  devices). Chunk c therefore holds clients of similar length on every device, a chunk
  trains only as long as its longest client, and every device gets a similar share.
  Padding slots (id 0, invalid) come last and cost nothing.
  """
  client_ids = np.asarray(client_ids, np.int32)
  n = int(len(client_ids))
  _, chunks, _ = layout_shape(n, num_devices, clients_per_chunk, min_slots)
  total = chunks * num_devices * clients_per_chunk
  if steps is not None:
    client_ids = client_ids[np.argsort(-np.asarray(steps), kind="stable")]
  ids = np.zeros(total, np.int32)
  valid = np.zeros(total, bool)
  ids[:n] = client_ids
  valid[:n] = True
  order = np.arange(total).reshape(chunks, clients_per_chunk, num_devices).transpose(2, 0, 1)
  return ids[order], valid[order]
