"""The affine map of a crop, rotation and flips: shared by the tf.data and the JAX augmentation.

Plain arithmetic, so the scalars may be TensorFlow tensors, JAX arrays or floats.
"""

from typing import Any


def crop_map_rows(
    x0: Any,
    y0: Any,
    crop_w: Any,
    crop_h: Any,
    cos: Any,
    sin: Any,
    flip_x: Any,
    flip_y: Any,
    size: int,
) -> list[list[Any]]:
    """The rows of the 3x3 map from output pixel centres to input pixel centres.

    The output square [0, size]^2 is centred and flipped (``flip_x``, ``flip_y`` = +-1), scaled
    to the crop box (``crop_w`` x ``crop_h`` with its corner at ``x0``, ``y0``), rotated by the
    angle of ``cos`` and ``sin``, and shifted to the crop centre in the input. Continuous
    coordinates: pixel i covers [i, i + 1), x along width.
    """
    half = size / 2.0
    sx, sy = flip_x * crop_w / size, flip_y * crop_h / size
    cx, cy = x0 + crop_w / 2.0, y0 + crop_h / 2.0
    a0, a1 = cos * sx, -sin * sy
    b0, b1 = sin * sx, cos * sy
    return [
        [a0, a1, cx - (a0 + a1) * half],
        [b0, b1, cy - (b0 + b1) * half],
        [0.0, 0.0, 1.0],
    ]
