"""Tests of the joint image/mask augmentation (TensorFlow, eager)."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from hairseg_jax.data import augment
from tests.data.conftest import assert_crops_and_rotations_span_their_ranges, checkerboard

SHAPE_COLOUR = np.array([230, 40, 20], np.uint8)
BACKGROUND = np.array([20, 60, 200], np.uint8)
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def augment_config(**overrides) -> ml_collections.ConfigDict:
    """An augment config with no spatial change and no colour jitter, then ``overrides``."""
    values = {
        "enabled": True,
        "scale": (1.0, 1.0),
        "ratio": (1.0, 1.0),
        "rotation": 0.0,
        "hflip": False,
        "vflip": False,
        **NO_JITTER,
    }
    return ml_collections.ConfigDict({**values, **overrides})


STRONG = augment_config(scale=(0.1, 1.0), ratio=(0.5, 2.0), rotation=45.0, hflip=True, vflip=True)


def transform(image, mask, seed, size, cfg) -> tuple[np.ndarray, np.ndarray]:
    """``augment.train_transform`` on NumPy arrays with seed ``(7, seed)``."""
    image, mask = augment.train_transform(
        tf.constant(image), tf.constant(mask), tf.constant([7, seed], tf.int64), size, cfg
    )
    return image.numpy(), mask.numpy()


def shape_picture(height: int = 120, width: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse, a thin diagonal bar and a rectangle in one colour on another; and its mask."""
    y, x = np.mgrid[:height, :width]
    shape = (y - 50) ** 2 / 30**2 + (x - 40) ** 2 / 20**2 <= 1
    shape |= (np.abs((x - 5) - 0.6 * (y - 10)) <= 1.5) & (y > 10) & (y < 110)
    shape |= (y >= 90) & (y < 105) & (x >= 55) & (x < 80)
    image = np.where(shape[..., None], SHAPE_COLOUR, BACKGROUND).astype(np.uint8)
    return image, shape.astype(np.uint8)


def recovered_shape(image: np.ndarray) -> np.ndarray:
    """The shape as seen in an augmented picture: pixels nearer the shape's colour."""
    return (image[..., 0] > (int(SHAPE_COLOUR[0]) + int(BACKGROUND[0])) // 2).astype(np.uint8)


def blended(image: np.ndarray) -> np.ndarray:
    """Pixels whose red is at least a fifth of the way from either colour's to the other's."""
    low, high = sorted((int(SHAPE_COLOUR[0]), int(BACKGROUND[0])))
    margin = (high - low) // 5
    return (image[..., 0] > low + margin) & (image[..., 0] < high - margin)


def colour_edges(shape: np.ndarray) -> np.ndarray:
    """Pixels with a differently classified pixel among their eight neighbours."""
    padded = np.pad(shape, 1, mode="edge")
    height, width = shape.shape
    neighbours = [
        padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    return np.any([n != shape for n in neighbours], axis=0)


@pytest.fixture(scope="module")
def picture() -> tuple[np.ndarray, np.ndarray]:
    return shape_picture()


def test_mask_stays_on_the_shape_it_labels(picture):
    """Under strong crops, rotations and flips the mask follows the image it came with.

    Antialiased bilinear resampling of the image and nearest-neighbour resampling of the mask
    may only disagree on the outline of the shape or where the image blends both colours (the
    thin bar, shrunk); a mask warped with another seed misses badly.
    """
    image, mask = picture
    other_seed_agreement = []
    for seed in range(30):
        out_image, out_mask = transform(image, mask, seed, 64, STRONG)
        assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64)
        shape = recovered_shape(out_image)
        agreement = (shape == out_mask).mean()
        assert agreement >= 0.99, f"seed {seed}: mask matches the image on {agreement:.2%}"
        off_edge = (shape != out_mask) & ~colour_edges(shape) & ~blended(out_image)
        assert not off_edge.any(), f"seed {seed}: {off_edge.sum()} mismatches off the outline"
        _, other_mask = transform(image, mask, seed + 1000, 64, STRONG)
        other_seed_agreement.append((shape == other_mask).mean())
    # The tolerance above is tight enough to notice a mask from other draws.
    assert min(other_seed_agreement) < 0.9
    assert np.mean(np.array(other_seed_agreement) < 0.99) > 0.5


def test_identity_settings_reproduce_the_input():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    mask = (np.random.default_rng(1).random((32, 32)) < 0.5).astype(np.uint8)
    for seed in range(3):
        out_image, out_mask = transform(image, mask, seed, 32, augment_config())
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_mask, mask)


def test_whole_image_crop_is_evaluations_resize_and_the_mask_samples_pixel_centres():
    """scale 1 at the input's aspect ratio is a plain resize: the image is shrunk as
    evaluation shrinks whole images (antialiased, not 4 pixels sampled per output pixel);
    with integer odd factors (3 down, 5 across) each output pixel centre lies on an input
    pixel centre, which the nearest-neighbour mask picks."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (60, 100, 3), np.uint8)
    mask = (rng.random((60, 100)) < 0.5).astype(np.uint8)
    cfg = augment_config(ratio=(100 / 60, 100 / 60))
    out_image, out_mask = transform(image, mask, 0, 20, cfg)
    expected = augment.resize_whole_image(tf.constant(image), 20).numpy()
    assert np.abs(out_image.astype(int) - expected).max() <= 1
    assert np.abs(out_image.astype(int) - image[1::3, 2::5]).mean() > 20  # not point samples
    np.testing.assert_array_equal(out_mask, mask[1::3, 2::5])


def test_shrinking_crops_do_not_alias():
    """A 1-pixel checkerboard cropped, rotated and shrunk 3-6x comes out an even grey, as
    evaluation's antialiased resize makes it; sampling 4 pixels per output pixel would leave
    it black and white."""
    board = checkerboard(192)
    cfg = augment_config(scale=(0.3, 1.0), rotation=15.0)
    for seed in range(5):
        out_image, _ = transform(board, np.zeros((192, 192), np.uint8), seed, 32, cfg)
        assert np.abs(out_image.astype(int) - 128).max() <= 4, seed


def test_hflip_only_flips_image_and_mask_together():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3), np.uint8)
    mask = (rng.random((24, 24)) < 0.5).astype(np.uint8)
    flipped = []
    for seed in range(12):
        out_image, out_mask = transform(image, mask, seed, 24, augment_config(hflip=True))
        if np.array_equal(out_image, image):
            np.testing.assert_array_equal(out_mask, mask)
            flipped.append(False)
        else:
            np.testing.assert_array_equal(out_image, image[:, ::-1])
            np.testing.assert_array_equal(out_mask, mask[:, ::-1])
            flipped.append(True)
    assert any(flipped) and not all(flipped)


def test_vflip_only_flips_image_and_mask_together():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (24, 24, 3), np.uint8)
    mask = (rng.random((24, 24)) < 0.5).astype(np.uint8)
    outcomes = set()
    for seed in range(12):
        out_image, out_mask = transform(image, mask, seed, 24, augment_config(vflip=True))
        flipped = not np.array_equal(out_image, image)
        expected_image, expected_mask = (image[::-1], mask[::-1]) if flipped else (image, mask)
        np.testing.assert_array_equal(out_image, expected_image)
        np.testing.assert_array_equal(out_mask, expected_mask)
        outcomes.add(flipped)
    assert outcomes == {False, True}


def test_disabled_resizes_whole_image_and_mask_like_evaluation(picture):
    image, mask = picture
    cfg = augment_config(**{**STRONG.to_dict(), "enabled": False, "brightness": 0.5, "hue": 0.2})
    out_image, out_mask = transform(image, mask, 0, 48, cfg)
    again_image, again_mask = transform(image, mask, 1, 48, cfg)
    expected = augment.resize_whole_image(tf.constant(image), 48).numpy()
    np.testing.assert_array_equal(out_image, expected)
    np.testing.assert_array_equal(again_image, out_image)
    np.testing.assert_array_equal(again_mask, out_mask)
    assert out_mask.dtype == np.uint8 and out_mask.shape == (48, 48)
    # The mask is the whole mask scaled to the square: on the image's shape, not beside it.
    assert np.mean(out_mask == recovered_shape(out_image)) > 0.97


def test_output_types_and_mask_values(picture):
    image, mask = picture
    cfg = augment_config(**{**STRONG.to_dict(), "brightness": 0.2, "contrast": 0.2, "hue": 0.05})
    for seed in range(3):
        out_image, out_mask = transform(image, mask, seed, 40, cfg)
        assert out_image.dtype == np.uint8 and out_image.shape == (40, 40, 3)
        assert out_mask.dtype == np.uint8 and out_mask.shape == (40, 40)
        assert set(np.unique(out_mask)) <= {0, 1}


def test_same_seed_same_output_other_seed_differs(picture):
    image, mask = picture
    cfg = augment_config(**{**STRONG.to_dict(), "brightness": 0.2, "saturation": 0.2})
    first = transform(image, mask, 3, 48, cfg)
    again = transform(image, mask, 3, 48, cfg)
    other = transform(image, mask, 4, 48, cfg)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


def test_int32_seed_is_accepted_and_deterministic(picture):
    image, mask = picture
    seed = tf.constant([7, 5], tf.int32)
    a = augment.train_transform(tf.constant(image), tf.constant(mask), seed, 32, STRONG)
    b = augment.train_transform(tf.constant(image), tf.constant(mask), seed, 32, STRONG)
    assert a[0].shape == (32, 32, 3) and a[1].shape == (32, 32)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())


def test_colour_jitter_changes_image_not_mask(picture):
    image, mask = picture
    jitter = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}
    plain_cfg = augment_config(**{**STRONG.to_dict(), **NO_JITTER})
    jitter_cfg = augment_config(**{**STRONG.to_dict(), **jitter})
    changed = 0
    for seed in range(4):
        plain_image, plain_mask = transform(image, mask, seed, 48, plain_cfg)
        jitter_image, jitter_mask = transform(image, mask, seed, 48, jitter_cfg)
        np.testing.assert_array_equal(jitter_mask, plain_mask)
        changed += not np.array_equal(jitter_image, plain_image)
    assert changed == 4


@pytest.mark.parametrize("size", [16, 50])
def test_resize_whole_image_resizes_to_square_uint8(picture, size):
    image, _ = picture
    out = augment.resize_whole_image(tf.constant(image), size).numpy()
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    # Only the two colours of the picture and blends of them appear.
    assert out.min() >= 20 and out.max() <= 230


def test_resize_whole_image_keeps_constant_images():
    image = np.full((30, 20, 3), (12, 200, 99), np.uint8)
    out = augment.resize_whole_image(tf.constant(image), 24).numpy()
    np.testing.assert_array_equal(out, np.full((24, 24, 3), (12, 200, 99), np.uint8))


def seeds_of(s: int) -> tf.Tensor:
    """The 11 stateless seeds ``train_transform`` splits an example's seed [7, s] into."""
    return tf.random.experimental.stateless_split(tf.constant([7, s], tf.int64), num=11)


def crop_fraction(cfg, s: int, side: int = 100, size: int = 10) -> float:
    """The crop's area over the image's, from the drawn map's determinant."""
    m = augment.sample_affine(seeds_of(s)[:7], side, side, size, cfg).numpy()
    return abs(np.linalg.det(m[:2, :2])) * size * size / (side * side)


def test_crop_scale_spans_the_configured_range():
    cfg = augment_config(scale=(0.1, 1.0))
    fractions = [crop_fraction(cfg, s) for s in range(24)]
    assert min(fractions) >= 0.1 - 1e-4 and max(fractions) <= 1.0 + 1e-4
    assert min(fractions) < 0.3 and max(fractions) > 0.7, fractions


def test_rotations_turn_both_ways_and_aspects_are_drawn_apart_from_areas():
    cfg = augment_config(scale=(0.1, 0.5), ratio=(0.75, 4 / 3), rotation=15.0)
    maps = [augment.sample_affine(seeds_of(s)[:7], 1000, 1000, 10, cfg).numpy() for s in range(40)]
    assert_crops_and_rotations_span_their_ranges(maps, 1000, 10, cfg.scale, cfg.ratio, 15.0)


def test_colour_draws_are_independent_of_the_crop_draws():
    cfg = augment_config(scale=(0.1, 1.0), brightness=0.2)
    grey = tf.fill([40, 40, 3], tf.constant(128, tf.uint8))
    mask = tf.zeros([40, 40], tf.uint8)
    shifts, fractions = [], []
    for s in range(32):
        image, _ = augment.train_transform(grey, mask, tf.constant([7, s], tf.int64), 16, cfg)
        shifts.append(image.numpy().astype(float).mean() - 128)
        fractions.append(crop_fraction(cfg, s, side=40, size=16))
    assert abs(np.corrcoef(shifts, fractions)[0, 1]) < 0.8


def test_contrast_jitter_both_lowers_and_raises_contrast():
    y, x = np.mgrid[:32, :32]
    image = tf.constant(np.stack([4 * y + 40, 3 * x + 60, 2 * (x + y) + 30], -1).astype(np.uint8))
    mask = tf.zeros([32, 32], tf.uint8)
    cfg = augment_config(contrast=0.5)
    before = image.numpy().astype(float).std()
    ratios = [
        augment.train_transform(image, mask, tf.constant([7, s], tf.int64), 32, cfg)[0]
        .numpy()
        .astype(float)
        .std()
        / before
        for s in range(16)
    ]
    assert min(ratios) < 0.9 and max(ratios) > 1.1, ratios
