"""The affine map of a crop, rotation and flips: shared by the tf.data and the JAX augmentation.

Plain arithmetic (``prefilter_size`` takes its square roots and rounding from ``xp``: the module
``tensorflow`` or ``jax.numpy``), so one formula serves both; the maps come back as rows.
"""

from types import ModuleType
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


def prefilter_size(
    height: Any, width: Any, affine: Any, xp: ModuleType
) -> tuple[Any, Any, list[list[Any]]]:
    """The size a float32 (``height``, ``width``) image shrinks to before it is warped through
    ``affine``, as float32 scalars, and the rows of the 3x3 map from the image onto the shrunk
    one.

    Along each input axis the image shrinks by the input pixels one output pixel spans along
    it (the length of ``affine``'s x or y row: the crop's side over the output side when not
    rotated; a quarter turn swaps them) when that exceeds 1, to a whole number of pixels; it
    keeps its size otherwise. Continuous coordinates scale with the side.
    """

    def shrunk(side: Any, row: int) -> Any:
        step = xp.sqrt(affine[row, 0] ** 2 + affine[row, 1] ** 2)
        return xp.maximum(xp.round(side / xp.maximum(step, 1.0)), 1.0)

    new_height, new_width = shrunk(height, 1), shrunk(width, 0)
    rescale = [[new_width / width, 0.0, 0.0], [0.0, new_height / height, 0.0], [0.0, 0.0, 1.0]]
    return new_height, new_width, rescale
