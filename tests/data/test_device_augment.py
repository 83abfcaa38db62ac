"""Tests of the training batches drawn and augmented on the device, in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from configs import figaro
from hairseg_jax import steps
from hairseg_jax.data import augment, device_augment, whole_images
from hairseg_jax.data.examples import Examples
from hairseg_jax.data.synthetic import make_examples
from tests.conftest import TinyNet
from tests.data.conftest import assert_crops_and_rotations_span_their_ranges, checkerboard


@pytest.fixture
def augment_config():
    return figaro.get_config().augment


def no_colour(cfg):
    cfg.brightness = cfg.contrast = cfg.saturation = cfg.hue = 0.0
    return cfg


def flat_examples(count: int, shape=(20, 30)) -> Examples:
    """Example i is a flat image of grey level 10 * i with an all-hair mask."""
    return Examples(
        [f"flat{i}" for i in range(count)],
        [np.full((*shape, 3), 10 * i, np.uint8) for i in range(count)],
        [np.ones(shape, np.uint8) for _ in range(count)],
    )


def test_pack_pads_into_one_array_and_shrinks_large_images():
    examples = Examples(
        ["a", "b"],
        [np.full((10, 40, 3), 200, np.uint8), np.full((12, 8, 3), 50, np.uint8)],
        [np.ones((10, 40), np.uint8), np.ones((12, 8), np.uint8)],
    )
    packed = device_augment.pack(examples, max_side=20)
    assert packed.images.shape == (2, 20, 20, 3) and packed.masks.shape == (2, 20, 20)
    np.testing.assert_array_equal(packed.sizes, [[5, 20], [12, 8]])  # a shrunk, aspect kept
    assert (packed.images[0, :5, :20] == 200).all() and (packed.masks[0, :5, :20] == 1).all()
    assert not packed.images[0, 5:].any() and not packed.masks[0, 5:].any()
    assert (packed.images[1, :12, :8] == 50).all() and not packed.images[1, :, 8:].any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_warp_matches_tensorflow_through_the_same_map(seed, augment_config):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (30, 45, 3), np.uint8)
    mask = (rng.random((30, 45)) > 0.5).astype(np.uint8)
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 1], tf.int64), 7)
    affine = augment.sample_affine(seeds, 30, 45, 24, augment_config)
    expected_image = augment.warp(tf.constant(image, tf.float32), affine, 24, "BILINEAR")
    expected_mask = augment.warp(tf.constant(mask)[..., None], affine, 24, "NEAREST")[..., 0]
    canvas, mask_canvas = np.zeros((50, 50, 3), np.uint8), np.zeros((50, 50), np.uint8)
    canvas[:30, :45], mask_canvas[:30, :45] = image, mask  # padding must never be read
    size_hw, matrix = jnp.array([30, 45]), jnp.asarray(affine.numpy())
    warped = device_augment.warp(jnp.asarray(canvas), size_hw, matrix, 24)
    warped_mask = device_augment.warp(
        jnp.asarray(mask_canvas)[..., None], size_hw, matrix, 24, True
    )
    np.testing.assert_allclose(warped, expected_image.numpy(), atol=2e-3)
    np.testing.assert_array_equal(warped_mask[..., 0], expected_mask.numpy())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prefilter_matches_tensorflow_from_a_padded_canvas(seed, augment_config):
    """Crops of 8-100% of a 90x120 image drawn for 16 px: both shrink it to the same size,
    antialiased the same way, and map the crop onto the same pixels of the shrunk image."""
    augment_config.scale = (0.08, 1.0)
    image = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), np.uint8)
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 2], tf.int64), 7)
    affine = augment.sample_affine(seeds, 90, 120, 16, augment_config)
    expected, expected_affine = augment.prefilter(tf.constant(image, tf.float32), affine)
    canvas = np.zeros((128, 128, 3), np.uint8)
    canvas[:90, :120] = image  # padding must never be read
    shrunk, size_hw, matrix = device_augment.prefilter(
        jnp.asarray(canvas), jnp.array([90, 120]), jnp.asarray(affine.numpy())
    )
    height, width = expected.shape[:2]
    assert height < 90 and width < 120
    np.testing.assert_array_equal(size_hw, [height, width])
    np.testing.assert_allclose(shrunk[:height, :width], expected.numpy(), atol=0.05)
    assert not np.asarray(shrunk[height:]).any() and not np.asarray(shrunk[:, width:]).any()
    np.testing.assert_allclose(matrix, expected_affine.numpy(), rtol=1e-6, atol=1e-6)


def test_shrinking_crops_do_not_alias_on_the_device(augment_config):
    """A 1-pixel checkerboard cropped, rotated and shrunk comes out an even grey, as in the
    tf.data pipeline (test_augment.test_shrinking_crops_do_not_alias)."""
    cfg = no_colour(augment_config)
    cfg.scale, cfg.rotation = (0.3, 1.0), 15.0
    board = checkerboard(192)
    for seed in range(5):
        image, _ = device_augment.augment_example(
            jax.random.key(seed),
            jnp.asarray(board),
            jnp.zeros((192, 192), jnp.uint8),
            jnp.array([192, 192]),
            32,
            cfg,
        )
        assert np.abs(np.asarray(image, int) - 128).max() <= 4, seed


def test_sample_affine_of_a_whole_crop_is_a_plain_resize(augment_config):
    cfg = augment_config
    cfg.scale, cfg.ratio, cfg.rotation, cfg.hflip = (1.0, 1.0), (1.5, 1.5), 0.0, False
    affine = device_augment.sample_affine(jax.random.key(0), jnp.array(20), jnp.array(30), 10, cfg)
    np.testing.assert_allclose(
        affine, [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], atol=1e-5
    )
    cfg.enabled = False
    affine = device_augment.sample_affine(jax.random.key(0), jnp.array(20), jnp.array(30), 10, cfg)
    np.testing.assert_allclose(affine, [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("shape", [(300, 400), (41, 23), (17, 17)])
def test_augmentation_off_resizes_as_evaluation_and_the_host_pipeline_do(shape, augment_config):
    """Noise shrunk (or enlarged) whole, antialiased: to a grey level of whole_images and of
    the tf.data path, from a padded canvas whose padding is never read."""
    augment_config.enabled = False
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), np.uint8)
    mask = np.ones(shape, np.uint8)
    canvas = np.full((400, 400, 3), 255, np.uint8)
    canvas[: shape[0], : shape[1]] = image
    resized, _ = device_augment.augment_example(
        jax.random.key(0),
        jnp.asarray(canvas),
        jnp.zeros((400, 400), jnp.uint8),
        jnp.array(shape),
        32,
        augment_config,
    )
    expected = whole_images.resize_image(image, 32)
    seed = tf.constant([0, 0], tf.int64)
    host, _ = augment.train_transform(
        tf.constant(image), tf.constant(mask), seed, 32, augment_config
    )
    for other in (expected, host.numpy()):
        assert np.abs(np.asarray(resized, int) - other).max() <= 1


def test_nearest_ties_take_the_pixel_the_host_pipeline_takes(augment_config):
    """An exact 2x shrink puts every output centre between two mask pixels: the device takes
    the one the tf.data path takes (ties rounded up), here the set odd rows and columns."""
    augment_config.enabled = False
    mask = np.zeros((64, 64), np.uint8)
    mask[1::2, 1::2] = 1
    _, device_mask = device_augment.augment_example(
        jax.random.key(0),
        jnp.zeros((64, 64, 3), jnp.uint8),
        jnp.asarray(mask),
        jnp.array([64, 64]),
        32,
        augment_config,
    )
    _, host_mask = augment.train_transform(
        tf.zeros((64, 64, 3), tf.uint8),
        tf.constant(mask),
        tf.constant([0, 0], tf.int64),
        32,
        augment_config,
    )
    np.testing.assert_array_equal(host_mask.numpy(), np.ones((32, 32)))
    np.testing.assert_array_equal(device_mask, host_mask.numpy())


@pytest.mark.parametrize(
    "hflip, vflip", [(True, False), (False, False), (False, True), (True, True)]
)
def test_sample_affine_flips_about_half_of_the_draws_of_each_flag_on(hflip, vflip, augment_config):
    """A flip negates its axis' scale (rotations of 15 degrees at most keep the cosine
    positive): about half of the draws with its flag on, none with it off."""
    augment_config.hflip, augment_config.vflip = hflip, vflip
    draws = [
        device_augment.sample_affine(
            jax.random.key(k), jnp.array(40), jnp.array(40), 16, augment_config
        )
        for k in range(40)
    ]
    for axis, on in ((0, hflip), (1, vflip)):
        mirrored = sum(float(d[axis, axis]) < 0 for d in draws)
        if on:
            assert 8 <= mirrored <= 32, (axis, mirrored)
        else:
            assert mirrored == 0, (axis, mirrored)


def test_rotations_turn_both_ways_and_aspects_are_drawn_apart_from_areas(augment_config):
    cfg = augment_config
    cfg.scale, cfg.ratio, cfg.rotation, cfg.hflip = (0.1, 0.5), (0.75, 4 / 3), 15.0, False
    side = jnp.array(1000)
    maps = [
        np.asarray(device_augment.sample_affine(jax.random.key(k), side, side, 10, cfg))
        for k in range(40)
    ]
    assert_crops_and_rotations_span_their_ranges(maps, 1000, 10, cfg.scale, cfg.ratio, 15.0)


def test_colour_jitter_off_is_the_identity_and_stays_in_range(augment_config):
    image = jax.random.uniform(jax.random.key(0), (8, 8, 3))
    plain = device_augment.colour_jitter(jax.random.key(1), image, no_colour(augment_config))
    np.testing.assert_allclose(plain, image, atol=1e-6)
    cfg = figaro.get_config().augment
    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue = 0.5, 0.5, 0.5, 0.5
    for k in range(5):
        jittered = device_augment.colour_jitter(jax.random.key(k), image, cfg)
        assert jittered.shape == image.shape and jittered.min() >= 0 and jittered.max() <= 1
        assert not np.allclose(jittered, image)


def test_saturation_and_hue_keep_grey_grey(augment_config):
    grey = jnp.full((4, 4, 3), 0.4)
    cfg = augment_config
    cfg.brightness = cfg.contrast = 0.0
    cfg.saturation, cfg.hue = 0.5, 0.5
    np.testing.assert_allclose(
        device_augment.colour_jitter(jax.random.key(0), grey, cfg), grey, atol=1e-5
    )


def test_batches_depend_on_seed_and_step_alone(augment_config):
    packed = jax.device_put(device_augment.pack(make_examples(6, (40, 30), seed=1), 64))
    batch = jax.jit(device_augment.batch_fn(4, 24, augment_config, seed=0))
    first = batch(packed, 3)
    assert first["image"].shape == (4, 24, 24, 3) and first["image"].dtype == jnp.uint8
    assert first["mask"].shape == (4, 24, 24) and first["mask"].dtype == jnp.uint8
    assert set(np.unique(first["mask"])) <= {0, 1}
    again = jax.jit(device_augment.batch_fn(4, 24, augment_config, seed=0))(packed, 3)
    np.testing.assert_array_equal(first["image"], again["image"])
    assert not np.array_equal(first["image"], batch(packed, 4)["image"])
    other_seed = jax.jit(device_augment.batch_fn(4, 24, augment_config, seed=1))(packed, 3)
    assert not np.array_equal(first["image"], other_seed["image"])


def test_the_seed_moves_both_the_order_and_the_augmentation(augment_config):
    """Each apart: copies of one image (the order cannot show), flat images unaugmented (the
    augmentation cannot)."""
    one = make_examples(1, (40, 30), seed=1)
    copies = Examples(["a", "b", "c", "d"], one.images * 4, one.masks * 4)
    packed = jax.device_put(device_augment.pack(copies, 64))
    drawn = [
        jax.jit(device_augment.batch_fn(4, 24, augment_config, seed))(packed, 0)["image"]
        for seed in (0, 1)
    ]
    assert not np.array_equal(*drawn)
    augment_config.enabled = False
    packed = jax.device_put(device_augment.pack(flat_examples(8), 32))
    epochs = [
        jax.jit(device_augment.batch_fn(8, 8, augment_config, seed))(packed, 0)["image"]
        for seed in (0, 1)
    ]
    orders = [[int(image[0, 0, 0]) for image in epoch] for epoch in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1], orders


def test_the_stream_has_keys_of_its_own():
    """Neither the train state's init or dropout key nor a step's dropout key (the order and
    draw keys were steps 0 and 1's dropout keys)."""
    seed_key = jax.random.PRNGKey(0)
    state = steps.create_train_state(seed_key, TinyNet(), 8, optax.identity())
    taken = [*jax.random.split(seed_key), *(jax.random.fold_in(state.rng, s) for s in range(16))]
    keys = [jax.random.key_data(key) for key in device_augment.stream_keys(0)]
    assert not np.array_equal(*keys)
    for key in keys:
        assert not any(np.array_equal(key, other) for other in [state.rng, *taken])


def test_every_example_once_per_epoch_in_a_new_order(augment_config):
    augment_config.enabled = False  # flat images stay flat: the grey level names the example
    packed = jax.device_put(device_augment.pack(flat_examples(8), 32))
    batch = jax.jit(device_augment.batch_fn(4, 8, augment_config, seed=0))
    epochs = [
        [
            int(image[0, 0, 0]) // 10
            for step in (2 * e, 2 * e + 1)
            for image in batch(packed, step)["image"]
        ]
        for e in range(3)
    ]
    for order in epochs:
        assert sorted(order) == list(range(8))
    assert len({tuple(order) for order in epochs}) == 3, epochs  # three different orders


def test_labels_stay_on_the_pixels_they_describe(augment_config):
    """The mask is drawn into the image: after the joint transforms they still agree."""
    examples = make_examples(4, (48, 40), seed=2)
    examples = Examples(
        examples.names,
        [np.repeat(mask[..., None] * 255, 3, axis=-1).astype(np.uint8) for mask in examples.masks],
        examples.masks,
    )
    packed = jax.device_put(device_augment.pack(examples, 64))
    batch = jax.jit(device_augment.batch_fn(4, 32, no_colour(augment_config), seed=0))
    for step in range(3):
        out = batch(packed, step)
        agree = (np.asarray(out["image"][..., 0]) > 127) == np.asarray(out["mask"]).astype(bool)
        assert agree.mean() > 0.97


def test_device_colour_draws_are_independent_of_the_crop_draws():
    cfg = figaro.get_config().augment
    cfg.scale, cfg.ratio, cfg.rotation, cfg.hflip, cfg.vflip = (
        (0.1, 1.0),
        (1.0, 1.0),
        0.0,
        False,
        False,
    )
    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue = 0.2, 0.0, 0.0, 0.0
    image = jnp.full((64, 64, 3), 128, jnp.uint8)
    mask = jnp.asarray((np.arange(64)[None, :] // 8 % 2).repeat(64, 0), jnp.uint8)  # stripes
    one = jax.jit(
        lambda k: device_augment.augment_example(k, image, mask, jnp.array([64, 64]), 16, cfg)
    )
    shifts, stripes = [], []
    for s in range(32):
        out_image, out_mask = one(jax.random.key(s))
        shifts.append(float(np.asarray(out_image, float).mean()) - 128)
        stripes.append(np.abs(np.diff(np.asarray(out_mask, int), axis=1)).sum())  # ~ crop width
    assert np.std(stripes) > 0 and np.std(shifts) > 0
    assert abs(np.corrcoef(shifts, stripes)[0, 1]) < 0.8


def test_device_contrast_keeps_each_channels_mean_as_tensorflow_does():
    cfg = figaro.get_config().augment
    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue = 0.0, 0.5, 0.0, 0.0
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, (8, 8, 3))
    image = jnp.asarray(np.array([0.3, 0.5, 0.7]) + noise, jnp.float32)
    for k in range(4):
        out = np.asarray(device_augment.colour_jitter(jax.random.key(k), image, cfg))
        np.testing.assert_allclose(
            out.mean(axis=(0, 1)), np.asarray(image).mean(axis=(0, 1)), atol=1e-5
        )
        # and it is tf.image.adjust_contrast at the drawn factor
        factor = out[..., 0].std() / np.asarray(image)[..., 0].std()
        expected = tf.image.adjust_contrast(tf.constant(np.asarray(image)), factor).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-4)


def test_device_saturation_alone_changes_colours_and_keeps_grey_levels():
    cfg = figaro.get_config().augment
    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue = 0.0, 0.0, 0.5, 0.0
    image = jax.random.uniform(jax.random.key(0), (8, 8, 3), minval=0.3, maxval=0.7)
    luma = np.asarray(image) @ np.array([0.299, 0.587, 0.114])
    changed = 0
    for k in range(4):
        out = np.asarray(device_augment.colour_jitter(jax.random.key(k), image, cfg))
        np.testing.assert_allclose(out @ np.array([0.299, 0.587, 0.114]), luma, atol=1e-4)
        changed += not np.allclose(out, image, atol=1e-3)
    assert changed == 4


def chroma(rgb) -> np.ndarray:
    """Each pixel's chroma (YIQ's I + iQ) as a complex number."""
    yiq = np.asarray(rgb, np.float64) @ device_augment._TO_YIQ.T
    return yiq[..., 1] + 1j * yiq[..., 2]


@pytest.mark.parametrize("saturation, hue", [(0.5, 0.0), (0.0, 0.1), (0.5, 0.1)])
def test_device_saturation_scales_and_hue_turns_the_chroma_within_their_strengths(saturation, hue):
    """Saturation multiplies every chroma by one factor in [1 - s, 1 + s], hue turns it by one
    angle within +-hue of the colour wheel: both ways, each from a draw of its own."""
    cfg = figaro.get_config().augment
    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue = 0.0, 0.0, saturation, hue
    image = jax.random.uniform(jax.random.key(0), (8, 8, 3), minval=0.4, maxval=0.6)
    before = chroma(image)
    factors, turns = [], []
    for k in range(24):
        after = chroma(device_augment.colour_jitter(jax.random.key(k), image, cfg))
        change = np.vdot(before, after) / np.vdot(before, before)  # factor * e^(i angle)
        np.testing.assert_allclose(after, change * before, atol=1e-4)
        factors.append(abs(change))
        turns.append(np.angle(change) / (2 * np.pi))  # a fraction of the colour wheel
    for values, spread, centre in ((factors, saturation, 1.0), (turns, hue, 0.0)):
        assert max(np.abs(np.subtract(values, centre))) <= spread + 1e-4, values
        if spread:
            assert min(values) < centre - spread / 2 and max(values) > centre + spread / 2
    if saturation and hue:
        assert abs(np.corrcoef(factors, turns)[0, 1]) < 0.8


def test_every_matrix_product_of_the_device_augmentation_is_full_float32(augment_config):
    """GPUs' default precision for float32 products (TF32) would move a large image's sample
    points by about a pixel: each product asks for HIGHEST."""
    packed = device_augment.pack(flat_examples(3, shape=(40, 30)), max_side=40)
    batch = device_augment.batch_fn(2, 32, augment_config, seed=0)
    text = jax.jit(batch).lower(packed, 0).as_text()
    products = [line for line in text.splitlines() if "dot_general" in line]
    assert len(products) >= 5  # the two resizes' pairs, the rescale, YIQ there and back
    assert all("precision = [HIGHEST, HIGHEST]" in line for line in products), products
