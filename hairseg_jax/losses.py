"""Segmentation losses on per-pixel logits (pure JAX)."""

import jax
import jax.numpy as jnp
import optax


def sigmoid_bce(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy of (B, H, W, 1) logits against (B, H, W) 0/1 masks."""
    labels = masks.astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits[..., 0].astype(jnp.float32), labels).mean()


def soft_dice(logits: jax.Array, masks: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Mean over images of ``1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)``, p = sigmoid."""
    probabilities = jax.nn.sigmoid(logits[..., 0].astype(jnp.float32))
    labels = masks.astype(jnp.float32)
    overlap = jnp.sum(probabilities * labels, axis=(1, 2))
    total = jnp.sum(probabilities, axis=(1, 2)) + jnp.sum(labels, axis=(1, 2))
    return jnp.mean(1.0 - (2.0 * overlap + smooth) / (total + smooth))


def segmentation_loss(logits: jax.Array, masks: jax.Array, dice_weight: float = 0.0) -> jax.Array:
    """BCE plus ``dice_weight`` times the soft Dice loss."""
    loss = sigmoid_bce(logits, masks)
    return loss + dice_weight * soft_dice(logits, masks) if dice_weight else loss
