"""Segmentation models."""

from hairseg_jax.models.deeplab import DeepLabV3Plus, build_model

__all__ = ["DeepLabV3Plus", "build_model"]
