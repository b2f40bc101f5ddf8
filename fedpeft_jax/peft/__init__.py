"""PEFT methods as parameter masks, and the partitioned-parameter utilities."""

from fedpeft_jax.peft.config import METHODS, default_config, method_config, parse_methods
from fedpeft_jax.peft.partition import (count, first_trainable_block, flatten, mask_from_patterns,
                                        merge, nbytes, num_blocks, only_head_trainable,
                                        optimizer, split, summary, trainable_mask, unflatten)
from fedpeft_jax.peft.spec import PeftSpec, to_spec

__all__ = [
    "METHODS", "default_config", "method_config", "parse_methods", "count", "flatten",
    "mask_from_patterns", "merge", "nbytes", "optimizer", "split", "summary", "trainable_mask",
    "unflatten", "PeftSpec", "to_spec", "first_trainable_block", "num_blocks",
    "only_head_trainable",
]
