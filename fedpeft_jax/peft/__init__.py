"""PEFT methods as parameter masks, and the partitioned-parameter utilities."""

from fedpeft_jax.peft.config import METHODS, default_config, method_config, parse_methods
from fedpeft_jax.peft.partition import (count, flatten, mask_from_patterns, merge, nbytes,
                                        optimizer, split, summary, trainable_mask, unflatten)
from fedpeft_jax.peft.spec import PeftSpec, to_spec

__all__ = [
    "METHODS", "default_config", "method_config", "parse_methods", "count", "flatten",
    "mask_from_patterns", "merge", "nbytes", "optimizer", "split", "summary", "trainable_mask",
    "unflatten", "PeftSpec", "to_spec",
]
