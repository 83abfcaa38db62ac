"""Tests of the NumPy resize of whole images and the evaluation batches."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from hairseg_jax.data import augment
from hairseg_jax.data.examples import Examples
from hairseg_jax.data.synthetic import make_examples
from hairseg_jax.data.whole_images import eval_batches, resize_image, resize_weights

SIZE = 32


@pytest.fixture(scope="module")
def examples() -> Examples:
    return make_examples(12, (48, 40), seed=3)


@pytest.mark.parametrize(("in_size", "out_size"), [(7, 7), (40, 13), (13, 40), (1000, 227)])
def test_resize_weights_rows_sum_to_one(in_size, out_size):
    weights = resize_weights(in_size, out_size)
    assert weights.shape == (out_size, in_size) and (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


def test_resize_weights_at_the_same_size_are_the_identity():
    np.testing.assert_array_equal(resize_weights(9, 9), np.eye(9, dtype=np.float32))


@pytest.mark.parametrize("size", [16, 40, 96])  # shrink, same height, enlarge
def test_resize_image_matches_tensorflow_and_jax_to_one_grey_level(size):
    image = np.random.default_rng(0).integers(0, 256, (40, 57, 3), np.uint8)
    ours = resize_image(image, size).astype(int)
    assert ours.shape == (size, size, 3)
    tensorflow = augment.resize_whole_image(tf.constant(image), size).numpy().astype(int)
    assert np.abs(ours - tensorflow).max() <= 1
    resized = jax.image.resize(image.astype(np.float32), (size, size, 3), "bilinear")
    assert np.abs(ours - np.round(np.asarray(resized))).max() <= 1


def test_resize_image_keeps_a_flat_image_flat():
    image = np.full((30, 50, 3), 77, np.uint8)
    assert (resize_image(image, 20) == 77).all()


def test_eval_batches_cover_every_example_in_order(examples):
    batches = list(eval_batches(examples, 5, SIZE))
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"image", "index"}
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (5, SIZE, SIZE, 3)
        assert batch["index"].dtype == np.int64 and batch["index"].shape == (5,)
    indices = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(indices, [*range(12), -1, -1, -1])
    images = np.concatenate([b["image"] for b in batches])
    for i in range(12):
        np.testing.assert_array_equal(images[i], resize_image(examples.images[i], SIZE))
    assert not images[12:].any(), "padding images are not zeros"


def test_eval_batches_without_padding(examples):
    batches = list(eval_batches(examples, 4, 24))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(b["image"].shape == (4, 24, 24, 3) for b in batches)


def test_eval_batches_of_images_of_different_sizes():
    data = Examples(
        ["a", "b", "c"],
        [
            np.full((20, 30, 3), 40, np.uint8),
            np.full((9, 7, 3), 90, np.uint8),
            np.zeros((5, 5, 3), np.uint8),
        ],
        [np.zeros((20, 30), np.uint8), np.zeros((9, 7), np.uint8), np.zeros((5, 5), np.uint8)],
    )
    (batch,) = list(eval_batches(data, 4, 16))
    np.testing.assert_array_equal(batch["index"], [0, 1, 2, -1])
    assert (batch["image"][0] == 40).all() and (batch["image"][1] == 90).all()
