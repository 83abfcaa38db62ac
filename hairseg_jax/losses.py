"""Segmentation losses on per-pixel logits (pure JAX)."""

import jax
import jax.numpy as jnp
import optax


def sigmoid_bce(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy of (B, H, W, 1) logits against (B, H, W) 0/1 masks."""
    labels = masks.astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits[..., 0].astype(jnp.float32), labels).mean()
