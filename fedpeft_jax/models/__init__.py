"""Vision Transformer and pre-trained checkpoint loading."""

from fedpeft_jax.models.checkpoint_files import CheckpointError, read_checkpoint
from fedpeft_jax.models.checkpoint_layout import convert_checkpoint, resample_posemb
from fedpeft_jax.models.checkpoint_registry import (REGISTRY, CheckpointInfo, default_cache_dir,
                                                    download, list_checkpoints, load_pretrained,
                                                    register_checkpoint)
from fedpeft_jax.models.factory import (DTYPES, MODEL_DTYPES, attention_choice, base_param_shapes,
                                        build_model, compute_dtype, init_params)
from fedpeft_jax.models.vit import (ATTENTION_IMPLEMENTATIONS, POOLS, VARIANTS, ViT,
                                    choose_attention, parse_variant)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "attention_choice", "choose_attention",
    "DTYPES", "MODEL_DTYPES", "base_param_shapes", "build_model", "compute_dtype", "init_params", "POOLS",
    "VARIANTS", "ViT", "parse_variant", "REGISTRY", "CheckpointError", "CheckpointInfo",
    "convert_checkpoint", "default_cache_dir", "download", "list_checkpoints", "load_pretrained",
    "read_checkpoint", "register_checkpoint", "resample_posemb",
]
