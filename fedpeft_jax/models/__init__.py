"""Vision Transformer and pre-trained checkpoint loading."""

from fedpeft_jax.models.vit import VARIANTS, ViT, parse_variant

__all__ = ["VARIANTS", "ViT", "parse_variant"]
