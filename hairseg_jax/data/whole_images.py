"""Whole images resized to the model's square, in NumPy: the inputs of evaluation and
prediction.

No TensorFlow: evaluation and prediction also run on hosts that have only JAX. The resize is
the antialiased bilinear (triangle kernel) resampling of ``tf.image.resize(...,
antialias=True)`` and ``jax.image.resize``, as two matrix products; it matches TensorFlow's
to one grey level (rounding).
"""

import concurrent.futures
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from hairseg_jax.data.examples import Examples


def resize_weights(
    in_size: Any,
    out_size: Any,
    padded: int | None = None,
    xp: ModuleType = np,
    out_padded: int | None = None,
) -> Any:
    """The (out_size, in_size) float32 matrix of antialiased bilinear resampling along one axis.

    Output pixel centres map onto input pixel centres (half-pixel convention); on shrinking,
    the triangle kernel widens by the shrink factor, so every input pixel contributes. With
    ``padded``, the matrix has that many columns, those from ``in_size`` on all zero, and with
    ``out_padded`` that many rows, those from ``out_size`` on all zero (for sizes known only on
    a device, with ``xp=jax.numpy``).
    """
    columns = xp.arange(in_size if padded is None else padded)
    rows = xp.arange(out_size if out_padded is None else out_padded)
    scale = out_size / in_size
    kernel_scale = xp.maximum(1.0 / scale, 1.0)
    centres = (rows + 0.5) / scale - 0.5
    weights = xp.maximum(0.0, 1.0 - xp.abs(centres[:, None] - columns) / kernel_scale)
    weights = xp.where((columns < in_size) & (rows[:, None] < out_size), weights, 0.0)
    sums = weights.sum(axis=1, keepdims=True)
    return (weights / xp.where(sums > 0, sums, 1.0)).astype(xp.float32)


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """A uint8 (H, W, C) image resized to a uint8 (image_size, image_size, C) square."""
    height, width, channels = image.shape
    rows = resize_weights(height, image_size) @ image.reshape(height, -1).astype(np.float32)
    columns = rows.reshape(image_size, width, channels).transpose(1, 0, 2).reshape(width, -1)
    square = (resize_weights(width, image_size) @ columns).reshape(image_size, image_size, -1)
    return np.round(np.clip(square.transpose(1, 0, 2), 0.0, 255.0)).astype(np.uint8)


def eval_batches(
    examples: Examples, batch_size: int, image_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Whole images resized to ``image_size``, in order, the last batch padded with zeros.

    Resizing runs on a thread per CPU core (NumPy's matrix products release the GIL), one
    batch ahead of the batch yielded, so at most two batches of resized images are held.

    Yields:
      ``{"image": uint8 (B, S, S, 3), "index": int64 (B,)}`` where padding has index -1.
    """
    resize = lambda index: resize_image(examples.images[index], image_size)  # noqa: E731
    count = len(examples)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:

        def submit(start: int) -> list[concurrent.futures.Future]:
            """Starts resizing the batch from ``start`` on."""
            end = min(start + batch_size, count)
            return [pool.submit(resize, index) for index in range(start, end)]

        ahead = submit(0)
        for start in range(0, count, batch_size):
            resizing, ahead = ahead, submit(start + batch_size)
            images = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
            indices = np.full(batch_size, -1, np.int64)
            for row, future in enumerate(resizing):
                images[row], indices[row] = future.result(), start + row
            yield {"image": images, "index": indices}
