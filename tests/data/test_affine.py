"""The affine map from output pixel centres to input pixel centres."""

import math

import numpy as np
import pytest

from hairseg_jax.data.affine import crop_map_rows, prefilter_size


def mapped(rows, x: float, y: float) -> tuple[float, float]:
    """Where the map sends the point (x, y)."""
    out = np.asarray(rows, np.float64) @ np.array([x, y, 1.0])
    return float(out[0]), float(out[1])


def test_a_crop_of_the_output_size_is_a_shift_to_its_corner():
    rows = crop_map_rows(10.0, 20.0, 8.0, 8.0, 1.0, 0.0, 1.0, 1.0, size=8)
    assert mapped(rows, 0.5, 0.5) == (10.5, 20.5)
    assert mapped(rows, 7.5, 3.5) == (17.5, 23.5)
    assert rows[2] == [0.0, 0.0, 1.0]


def test_a_crop_twice_the_size_scales_about_its_centre():
    rows = crop_map_rows(0.0, 0.0, 16.0, 8.0, 1.0, 0.0, 1.0, 1.0, size=8)
    assert mapped(rows, 4.0, 4.0) == (8.0, 4.0)  # centre to centre
    assert mapped(rows, 0.0, 0.0) == (0.0, 0.0) and mapped(rows, 8.0, 8.0) == (16.0, 8.0)


def test_flips_mirror_the_crop():
    rows = crop_map_rows(2.0, 3.0, 8.0, 8.0, 1.0, 0.0, -1.0, -1.0, size=8)
    assert mapped(rows, 0.5, 0.5) == (9.5, 10.5)  # the crop's far corner pixel
    assert mapped(rows, 4.0, 4.0) == (6.0, 7.0)


def test_a_rotation_turns_about_the_crop_centre():
    angle = math.pi / 2
    rows = crop_map_rows(0.0, 0.0, 8.0, 8.0, math.cos(angle), math.sin(angle), 1, 1, size=8)
    assert mapped(rows, 4.0, 4.0) == pytest.approx((4.0, 4.0))
    # Output +x points along input +y: a quarter turn.
    assert mapped(rows, 6.0, 4.0) == pytest.approx((4.0, 6.0))


@pytest.mark.parametrize("quarter_turns, expected", [(0, (600, 100)), (1, (100, 600))])
def test_the_prefilter_shrinks_each_input_axis_by_the_step_along_it(quarter_turns, expected):
    """A crop 6 times as wide as the output and as high: unturned, input x advances 6 pixels
    per output pixel and shrinks 6 times; turned a quarter, input y does."""
    angle = quarter_turns * math.pi / 2
    rows = crop_map_rows(0.0, 0.0, 600.0, 100.0, math.cos(angle), math.sin(angle), 1, 1, 100)
    height, width, _ = prefilter_size(600.0, 600.0, np.asarray(rows), np)
    assert (height, width) == expected
