"""Training batches drawn and augmented on the accelerator, in JAX (no TensorFlow).

For hosts that have only JAX, or too few CPU cores to feed a fast accelerator. The transforms
are those of ``augment.py``: one affine map per example folds a random resized crop, a
rotation and flips; the image is resampled through it bilinearly and the mask through the
same map with nearest neighbours, both reflected at the image's own edges; then the image
alone gets colour jitter. Brightness and contrast jitter as TensorFlow's do; saturation
scales each pixel's distance from its grey value and hue rotates its chroma (YIQ), the same
kinds of change as TensorFlow's HSV versions but not bit-identical.

The training images stay on the device, each in the top-left corner of one padded array
(``pack``). A step's batch depends on (seed, step) alone: its examples (a new permutation
every epoch, as in ``pipeline.train_batches``) and every draw, so a run resumes exactly and
nothing crosses from the host per step.
"""

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from hairseg_jax import sharding
from hairseg_jax.data import whole_images
from hairseg_jax.data.affine import crop_map_rows, prefilter_size
from hairseg_jax.data.examples import Examples

# Every matrix product here in full float32: GPUs' default (TF32, 10-bit mantissas) would move
# a 1000 px image's sample points by about a pixel and its grey levels by about 0.1.
FLOAT32 = jax.lax.Precision.HIGHEST


class Packed(NamedTuple):
    """Examples padded into one array: example i is ``images[i, :h, :w]``, ``(h, w) = sizes[i]``."""

    images: np.ndarray | jax.Array  # uint8 (N, S, S, 3)
    masks: np.ndarray | jax.Array  # uint8 (N, S, S), 0/1
    sizes: np.ndarray | jax.Array  # int32 (N, 2): height, width


def shrink(image: np.ndarray, mask: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """An example with its longer side shrunk to ``max_side`` if it is longer (image
    bilinearly, mask by nearest neighbour, aspect kept)."""
    height, width = mask.shape
    factor = max_side / max(height, width)
    if factor >= 1:
        return image, mask
    size = (max(round(width * factor), 1), max(round(height * factor), 1))
    return (
        np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)),
        np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)),
    )


def pack(examples: Examples, max_side: int) -> Packed:
    """Pads ``examples``, each shrunk to ``max_side`` at most (``shrink``), into one array."""
    shrunk = [
        shrink(image, mask, max_side)
        for image, mask in zip(examples.images, examples.masks, strict=True)
    ]
    side = max(max(mask.shape) for _, mask in shrunk)
    images = np.zeros((len(shrunk), side, side, 3), np.uint8)
    masks = np.zeros((len(shrunk), side, side), np.uint8)
    for i, (image, mask) in enumerate(shrunk):
        images[i, : mask.shape[0], : mask.shape[1]] = image
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    sizes = np.array([mask.shape for _, mask in shrunk], np.int32)
    return Packed(images, masks, sizes)


def sample_affine(
    key: jax.Array, height: jax.Array, width: jax.Array, size: int, cfg: ml_collections.ConfigDict
) -> jax.Array:
    """Draws a crop, rotation and flips; returns the 3x3 map output -> input pixel centres.

    ``augment.sample_affine`` in JAX (coordinates: see ``affine.crop_map_rows``). With
    ``cfg.enabled`` False the map is the whole image, nothing drawn.
    """
    height, width = height.astype(jnp.float32), width.astype(jnp.float32)
    if not cfg.enabled:
        return jnp.array([[width / size, 0.0, 0.0], [0.0, height / size, 0.0], [0.0, 0.0, 1.0]])
    keys = jax.random.split(key, 7)
    uniform = lambda k, low, high: jax.random.uniform(k, (), jnp.float32, low, high)  # noqa: E731
    area = height * width
    scale = uniform(keys[0], *cfg.scale)
    ratio = jnp.exp(uniform(keys[1], math.log(cfg.ratio[0]), math.log(cfg.ratio[1])))
    crop_w = jnp.minimum(jnp.sqrt(scale * area * ratio), width)
    crop_h = jnp.minimum(jnp.sqrt(scale * area / ratio), height)
    x0 = uniform(keys[2], 0.0, 1.0) * (width - crop_w)
    y0 = uniform(keys[3], 0.0, 1.0) * (height - crop_h)
    angle = uniform(keys[4], -cfg.rotation, cfg.rotation) * (math.pi / 180.0)
    flip_x = jnp.where(jax.random.bernoulli(keys[5], 0.5 if cfg.hflip else 0.0), -1.0, 1.0)
    flip_y = jnp.where(jax.random.bernoulli(keys[6], 0.5 if cfg.vflip else 0.0), -1.0, 1.0)
    return jnp.array(
        crop_map_rows(x0, y0, crop_w, crop_h, jnp.cos(angle), jnp.sin(angle), flip_x, flip_y, size)
    )


def _reflect(index: jax.Array, length: jax.Array) -> jax.Array:
    """Integer pixel indices reflected into [0, length) (d c b a | a b c d | d c b a)."""
    folded = jnp.mod(index, 2 * length)
    return jnp.where(folded >= length, 2 * length - 1 - folded, folded)


def warp(
    image: jax.Array, size_hw: jax.Array, affine: jax.Array, size: int, nearest: bool = False
) -> jax.Array:
    """Resamples the (h, w) = ``size_hw`` corner of a padded (S, S, C) array through
    ``affine`` to (size, size, C) float32: bilinearly, or by nearest neighbour."""
    centres = jnp.arange(size, dtype=jnp.float32) + 0.5
    xo, yo = jnp.meshgrid(centres, centres)
    # Continuous input coordinates, then pixel-index coordinates (centre of pixel i is i).
    x = affine[0, 0] * xo + affine[0, 1] * yo + affine[0, 2] - 0.5
    y = affine[1, 0] * xo + affine[1, 1] * yo + affine[1, 2] - 0.5
    height, width = size_hw[0], size_hw[1]
    if nearest:
        # Ties (an exact 2x shrink) rounded up, as TensorFlow's nearest-neighbour paths do,
        # not to even: the host pipeline's pixel.
        rows, columns = (jnp.floor(c + 0.5).astype(jnp.int32) for c in (y, x))
        return image[_reflect(rows, height), _reflect(columns, width)].astype(jnp.float32)
    top, left = jnp.floor(y), jnp.floor(x)
    dy, dx = (y - top)[..., None], (x - left)[..., None]
    top, left = top.astype(jnp.int32), left.astype(jnp.int32)
    rows = _reflect(top, height), _reflect(top + 1, height)
    columns = _reflect(left, width), _reflect(left + 1, width)
    pixel = lambda r, c: image[rows[r], columns[c]].astype(jnp.float32)  # noqa: E731
    upper = pixel(0, 0) * (1 - dx) + pixel(0, 1) * dx
    lower = pixel(1, 0) * (1 - dx) + pixel(1, 1) * dx
    return upper * (1 - dy) + lower * dy


_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_jitter(key: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """Brightness, contrast, saturation and hue jitter of a float (H, W, 3) image in [0, 1]."""
    keys = jax.random.split(key, 4)
    uniform = lambda k, spread: jax.random.uniform(k, (), jnp.float32, -spread, spread)  # noqa: E731
    if cfg.brightness:
        image = image + uniform(keys[0], cfg.brightness)
    if cfg.contrast:
        mean = image.mean(axis=(0, 1))
        image = (image - mean) * (1 + uniform(keys[1], cfg.contrast)) + mean
    if cfg.saturation or cfg.hue:
        yiq = jnp.matmul(image, jnp.asarray(_TO_YIQ.T, jnp.float32), precision=FLOAT32)
        chroma = yiq[..., 1:] * (1 + uniform(keys[2], cfg.saturation))
        angle = uniform(keys[3], cfg.hue) * (2 * math.pi)  # hue: a fraction of the colour wheel
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        chroma = jnp.matmul(chroma, jnp.array([[cos, sin], [-sin, cos]]), precision=FLOAT32)
        yiq = jnp.concatenate([yiq[..., :1], chroma], axis=-1)
        to_rgb = jnp.asarray(np.linalg.inv(_TO_YIQ).T, jnp.float32)
        image = jnp.matmul(yiq, to_rgb, precision=FLOAT32)
    return jnp.clip(image, 0.0, 1.0)


def augment_example(
    key: jax.Array,
    image: jax.Array,
    mask: jax.Array,
    size_hw: jax.Array,
    size: int,
    cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
    """One padded example -> uint8 (size, size, 3) image and uint8 (size, size) mask."""
    affine_key, colour_key = jax.random.split(key)
    affine = sample_affine(affine_key, size_hw[0], size_hw[1], size, cfg)
    mask = warp(mask[..., None], size_hw, affine, size, nearest=True)[..., 0].astype(jnp.uint8)
    if not cfg.enabled:
        return resize_whole_image(image, size_hw, size), mask
    image, size_hw, affine = prefilter(image, size_hw, affine)
    warped = colour_jitter(colour_key, warp(image, size_hw, affine, size) / 255.0, cfg)
    return jnp.round(warped * 255.0).astype(jnp.uint8), mask


def prefilter(
    image: jax.Array, size_hw: jax.Array, affine: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``augment.prefilter`` on the device: the (h, w) = ``size_hw`` corner of a padded uint8
    (S, S, 3) array shrunk, antialiased, into the corner of a float32 (S, S, 3) array, with its
    new (h, w) and the map onto it."""
    height, width = size_hw.astype(jnp.float32)
    new_height, new_width, rescale = prefilter_size(height, width, affine, jnp)
    shrunk = _resize_corner(image, (height, width), (new_height, new_width), image.shape[:2])
    new_size = jnp.stack([new_height, new_width]).astype(jnp.int32)
    return shrunk, new_size, jnp.matmul(jnp.array(rescale), affine, precision=FLOAT32)


def resize_whole_image(image: jax.Array, size_hw: jax.Array, size: int) -> jax.Array:
    """The (h, w) = ``size_hw`` corner of a padded uint8 (S, S, 3) array resized to a uint8
    (size, size, 3) square, antialiased: ``whole_images.resize_image`` (as evaluation and the
    host pipeline resize) on the device."""
    square = _resize_corner(image, size_hw, (size, size), (size, size))
    return jnp.round(jnp.clip(square, 0.0, 255.0)).astype(jnp.uint8)


def _resize_corner(
    image: jax.Array, in_hw: Any, out_hw: tuple[Any, Any], out_shape: tuple[int, int]
) -> jax.Array:
    """The ``in_hw`` (a pair or a (2,) array) corner of a padded (S, S, C) array resized
    (antialiased bilinear) to ``out_hw``, in the corner of a float32 ``out_shape`` + (C,)
    array (zeros elsewhere)."""
    rows, columns = (
        whole_images.resize_weights(in_hw[axis], out_hw[axis], image.shape[axis], jnp, padded)
        for axis, padded in enumerate(out_shape)
    )
    image = image.astype(jnp.float32)
    return jnp.einsum("ys,xt,stc->yxc", rows, columns, image, precision=FLOAT32)


def stream_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The keys of the stream's order and of its augmentation draws, from ``seed``'s key
    folded with 2. The train state's init and dropout keys are ``split(key(seed))``, which in
    JAX's partitionable threefry are its keys folded with 0 and 1, and each step's dropout key
    is the latter folded with the step."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), 2)))


def batch_fn(
    batch_size: int, image_size: int, augment_config: ml_collections.ConfigDict, seed: int
) -> Callable[[Packed, jax.Array], dict[str, jax.Array]]:
    """``(packed, step) -> {"image": uint8 (B, S, S, 3), "mask": uint8 (B, S, S)}``, the
    augmented global batch number ``step`` (from 0) of an endless stream; jit it.

    Positions ``step * B ... step * B + B - 1`` of the stream are read, position p being
    example ``permutation(epoch p // N)[p % N]``, augmented with a key folded from p.
    """
    order_key, draw_key = stream_keys(seed)

    def batch(packed: Packed, step: jax.Array) -> dict[str, jax.Array]:
        count = packed.images.shape[0]
        positions = step * batch_size + jnp.arange(batch_size)

        def one(position: jax.Array) -> tuple[jax.Array, jax.Array]:
            epoch_order = jax.random.permutation(
                jax.random.fold_in(order_key, position // count), count
            )
            index = epoch_order[position % count]
            return augment_example(
                jax.random.fold_in(draw_key, position),
                packed.images[index],
                packed.masks[index],
                packed.sizes[index],
                image_size,
                augment_config,
            )

        images, masks = jax.vmap(one)(positions)
        return {"image": images, "mask": masks}

    return batch


def train_batches(
    packed: Packed,
    batch_size: int,
    image_size: int,
    augment_config: ml_collections.ConfigDict,
    seed: int,
    mesh: jax.sharding.Mesh,
    start_step: int = 0,
) -> Iterator[dict[str, jax.Array]]:
    """The endless stream of ``batch_fn``'s global batches from ``start_step`` on, each split
    over ``mesh``'s ``data`` axis as it is drawn (``packed`` replicated over ``mesh``)."""
    draw = jax.jit(
        batch_fn(batch_size, image_size, augment_config, seed),
        out_shardings=sharding.batch_sharded(mesh),
    )
    for step in itertools.count(start_step):
        yield draw(packed, step)
