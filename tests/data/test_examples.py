"""The in-memory form of a split."""

import numpy as np
import pytest

from hairseg_jax.data.examples import Examples


def examples(count: int) -> Examples:
    return Examples(
        names=[f"Frame{i:05d}" for i in range(1, count + 1)],
        images=[np.full((4 + i, 5, 3), i, np.uint8) for i in range(count)],
        masks=[np.full((4 + i, 5), i % 2, np.uint8) for i in range(count)],
    )


def test_take_keeps_the_first_examples_in_order():
    split = examples(3)
    assert len(split) == 3
    first = split.take(2)
    assert first.names == ["Frame00001", "Frame00002"]
    assert [image.shape for image in first.images] == [(4, 5, 3), (5, 5, 3)]
    assert [int(mask[0, 0]) for mask in first.masks] == [0, 1]
    every = split.take(None)
    assert every.names == split.names and len(every) == 3
    assert all(a is b for a, b in zip(every.images, split.images, strict=True))


def test_lists_of_different_lengths_are_refused():
    split = examples(2)
    with pytest.raises(ValueError, match="as many names, images and masks; got 2, 2 and 1"):
        Examples(split.names, split.images, split.masks[:1])
