"""Tests of the segmentation losses against NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from hairseg_jax import losses


def reference_bce(logits: np.ndarray, masks: np.ndarray) -> float:
    """Mean of -y log(sigmoid(x)) - (1 - y) log(1 - sigmoid(x)), in float64."""
    x, y = logits[..., 0].astype(np.float64), masks.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    return float(np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p)))


def test_sigmoid_bce_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 7, 1)).astype(np.float32)
    masks = (rng.random((2, 5, 7)) < 0.4).astype(np.uint8)
    loss = losses.sigmoid_bce(jnp.asarray(logits), jnp.asarray(masks))
    assert loss.shape == () and loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(reference_bce(logits, masks), rel=1e-5)


def test_zero_logits_give_log_two():
    masks = np.random.default_rng(1).integers(0, 2, (3, 4, 4)).astype(np.uint8)
    loss = losses.sigmoid_bce(jnp.zeros((3, 4, 4, 1)), jnp.asarray(masks))
    assert float(loss) == pytest.approx(np.log(2), rel=1e-6)


def test_confident_logits_are_stable():
    masks = np.array([[[1, 0]]], np.uint8)
    right = jnp.array([[[[200.0], [-200.0]]]])
    wrong = -right
    assert float(losses.sigmoid_bce(right, masks)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.sigmoid_bce(wrong, masks)) == pytest.approx(200.0, rel=1e-5)


def test_bfloat16_logits_give_float32_loss():
    logits = jnp.full((1, 2, 2, 1), 0.5, jnp.bfloat16)
    loss = losses.sigmoid_bce(logits, jnp.ones((1, 2, 2), jnp.uint8))
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(np.log1p(np.exp(-0.5)), rel=1e-5)


def test_soft_dice_hand_values():
    """Zero logits (p = 0.5) on a 2x2 all-hair mask: 1 - (2 * 2 + 1) / (2 + 4 + 1) = 2 / 7."""
    logits = jnp.zeros((1, 2, 2, 1))
    masks = jnp.ones((1, 2, 2), jnp.uint8)
    np.testing.assert_allclose(losses.soft_dice(logits, masks), 2 / 7, rtol=1e-6)
    confident = jnp.where(masks[..., None] > 0, 30.0, -30.0)
    np.testing.assert_allclose(losses.soft_dice(confident, masks), 0.0, atol=1e-6)
    # A mean over images: with an empty mask met by confident logits (loss 0) beside the
    # first, 1/7; pooled over the batch, 2/7.
    pair = jnp.concatenate([logits, jnp.full((1, 2, 2, 1), -30.0)])
    pair_masks = jnp.concatenate([masks, jnp.zeros((1, 2, 2), jnp.uint8)])
    np.testing.assert_allclose(losses.soft_dice(pair, pair_masks), 1 / 7, rtol=1e-5)


def test_segmentation_loss_adds_weighted_dice():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 5, 1)), jnp.float32)
    masks = jnp.asarray(rng.integers(0, 2, (2, 5, 5)), jnp.uint8)
    bce, dice = losses.sigmoid_bce(logits, masks), losses.soft_dice(logits, masks)
    np.testing.assert_allclose(losses.segmentation_loss(logits, masks), bce, rtol=1e-6)
    np.testing.assert_allclose(
        losses.segmentation_loss(logits, masks, 0.5), bce + 0.5 * dice, rtol=1e-6
    )
