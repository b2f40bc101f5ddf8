"""Exact communication accounting: what each round moves, in the dtype actually sent."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fedpeft_jax.peft.partition import count, nbytes

# config.federated.wire_dtype: the dtype parameters travel in.
WIRE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CommCost:
  """Bytes of one transfer of the trainable subtree and of the full model."""
  trainable_params: int
  total_params: int
  trainable_bytes: int  # one one-way transfer of the trainable subtree
  full_bytes: int  # the same transfer for full fine-tuning (every parameter)

  def round_bytes(self, num_sampled: int, num_reporting: int) -> dict[str, int]:
    """Download to every sampled client, upload from every client that reported."""
    down = self.trainable_bytes * num_sampled
    up = self.trainable_bytes * num_reporting
    full = self.full_bytes * (num_sampled + num_reporting)
    return {"bytes_down": down, "bytes_up": up, "bytes_full_equivalent": full}


def comm_cost(trainable: Any, all_params: Any, dtype: Optional[Any] = None) -> CommCost:
  """`dtype`: the wire dtype (None: each leaf's own dtype)."""
  return CommCost(trainable_params=count(trainable), total_params=count(all_params),
                  trainable_bytes=nbytes(trainable, dtype), full_bytes=nbytes(all_params, dtype))
