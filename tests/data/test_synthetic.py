"""Tests of the synthetic hair pictures."""

import numpy as np
import pytest

from hairseg_jax.data.synthetic import make_examples


@pytest.mark.parametrize(("size", "shape"), [(96, (96, 96)), ((64, 80), (64, 80))])
def test_shapes_and_masks(size: int | tuple[int, int], shape: tuple[int, int]):
    examples = make_examples(32, size, seed=1)
    assert len(examples) == 32
    assert examples.names[:2] == ["synthetic_00000", "synthetic_00001"]
    for image, mask in zip(examples.images, examples.masks, strict=True):
        assert image.shape == (*shape, 3) and image.dtype == np.uint8
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert 0.05 <= mask.mean() <= 0.6


def test_deterministic():
    first, second = make_examples(8, seed=4), make_examples(8, seed=4)
    assert first.names == second.names
    for a, b in zip(first.images + first.masks, second.images + second.masks, strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_examples(8, seed=5)
    assert not any(np.array_equal(a, b) for a, b in zip(first.images, other.images, strict=True))


def test_examples_differ():
    examples = make_examples(16)
    images = examples.images
    assert all(
        not np.array_equal(images[i], images[j]) for i in range(len(images)) for j in range(i)
    )
    assert len({mask.tobytes() for mask in examples.masks}) == len(examples)


def test_prefix():
    small, large = make_examples(3, seed=2), make_examples(6, seed=2)
    for a, b in zip(small.images + small.masks, large.images[:3] + large.masks[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_examples(-1)
    with pytest.raises(ValueError):
        make_examples(1, (0, 5))
    assert len(make_examples(0)) == 0
