"""Training augmentation in TensorFlow: joint spatial transforms, image-only colour jitter.

Every spatial transform (random resized crop, rotation, flips) is folded into one affine map
from output pixels to input pixels. The image is resampled through it bilinearly and the mask
through the very same map with nearest neighbours, so labels stay on the pixels they describe.
All randomness is stateless and derived from a per-example seed, so a pipeline position always
yields the same augmented example.
"""

import math

import ml_collections
import tensorflow as tf

from hairseg_jax.data.affine import crop_map_rows, prefilter_size

# TensorFlow runs the host-side input only: keep it off the GPUs JAX uses (set where the
# package's input modules first import it: pipeline.py imports this one).
tf.config.set_visible_devices([], "GPU")


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, low, high)


def _bernoulli(seed: tf.Tensor, probability: float) -> tf.Tensor:
    return _uniform(seed, 0.0, 1.0) < probability


def sample_affine(
    seeds: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    size: int,
    cfg: ml_collections.ConfigDict,
) -> tf.Tensor:
    """Draws a crop, rotation and flips; returns the 3x3 map output -> input pixel centres.

    Coordinates are continuous (pixel ``i`` covers ``[i, i + 1)``), x along width, y along height.
    """
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = height * width
    scale = _uniform(seeds[0], *cfg.scale)
    log_ratio = _uniform(seeds[1], math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    crop_w = tf.minimum(tf.sqrt(scale * area * tf.exp(log_ratio)), width)
    crop_h = tf.minimum(tf.sqrt(scale * area / tf.exp(log_ratio)), height)
    x0 = _uniform(seeds[2], 0.0, 1.0) * (width - crop_w)
    y0 = _uniform(seeds[3], 0.0, 1.0) * (height - crop_h)
    angle = _uniform(seeds[4], -cfg.rotation, cfg.rotation) * (math.pi / 180.0)
    flip_x = tf.where(_bernoulli(seeds[5], 0.5 if cfg.hflip else 0.0), -1.0, 1.0)
    flip_y = tf.where(_bernoulli(seeds[6], 0.5 if cfg.vflip else 0.0), -1.0, 1.0)
    return tf.stack(
        crop_map_rows(x0, y0, crop_w, crop_h, tf.cos(angle), tf.sin(angle), flip_x, flip_y, size)
    )


def warp(image: tf.Tensor, affine: tf.Tensor, size: int, interpolation: str) -> tf.Tensor:
    """Resamples an (H, W, C) image through ``affine`` (continuous coordinates) to size^2."""
    # ImageProjectiveTransformV3 maps integer output indices to input indices: shift by the
    # half-pixel on both sides of the continuous map.
    to_centres = tf.constant([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    from_centres = tf.constant([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    matrix = from_centres @ affine @ to_centres
    matrix = matrix / matrix[2, 2]
    transform = tf.reshape(matrix, [9])[:8]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.constant([size, size]),
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode="REFLECT",
    )[0]


def prefilter(image: tf.Tensor, affine: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A float (H, W, C) image shrunk, antialiased, to about one input pixel per output pixel
    of ``affine``, and the map onto the shrunk image (``affine.prefilter_size``).

    Bilinear sampling alone reads 4 pixels per output pixel however much a crop shrinks, so
    training crops would alias where evaluation's whole-image resize does not; after this
    resize (evaluation's kernel) the warp resamples at about 1:1.
    """
    shape = tf.shape(image)[:2]
    height, width = tf.unstack(tf.cast(shape, tf.float32))
    new_height, new_width, rescale = prefilter_size(height, width, affine, tf)
    new_shape = tf.cast(tf.stack([new_height, new_width]), tf.int32)
    shrunk = lambda: tf.image.resize(image, new_shape, method="bilinear", antialias=True)  # noqa: E731
    kept = tf.reduce_all(new_shape == shape)
    return tf.cond(kept, lambda: image, shrunk), tf.stack(rescale) @ affine


def colour_jitter(image: tf.Tensor, seeds: tf.Tensor, cfg: ml_collections.ConfigDict) -> tf.Tensor:
    """Brightness, contrast, saturation and hue jitter of a float image in [0, 1]."""
    if cfg.brightness:
        image = tf.image.stateless_random_brightness(image, cfg.brightness, seeds[0])
    if cfg.contrast:
        image = tf.image.stateless_random_contrast(
            image, 1 - cfg.contrast, 1 + cfg.contrast, seeds[1]
        )
    if cfg.saturation:
        image = tf.image.stateless_random_saturation(
            image, 1 - cfg.saturation, 1 + cfg.saturation, seeds[2]
        )
    if cfg.hue:
        image = tf.image.stateless_random_hue(image, cfg.hue, seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0)


def train_transform(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    cfg: ml_collections.ConfigDict,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Augments one uint8 (H, W, 3) image and its (H, W) mask to ``size`` x ``size``.

    Args:
      image: uint8 RGB image.
      mask: uint8 mask of the same height and width.
      seed: int32 or int64 tensor of shape (2,), the example's stateless seed.
      size: side of the square output.
      cfg: ``config.augment`` (enabled, scale, ratio, rotation, hflip, vflip, brightness,
        contrast, saturation, hue). With ``enabled`` False the whole image and mask are
        resized to the square as in evaluation, with nothing random.

    Returns:
      The uint8 (size, size, 3) image and uint8 (size, size) mask.
    """
    if not cfg.enabled:
        mask = tf.image.resize(mask[..., None], [size, size], method="nearest")[..., 0]
        return resize_whole_image(image, size), mask
    seeds = tf.random.experimental.stateless_split(seed, num=11)
    shape = tf.shape(image)
    affine = sample_affine(seeds[:7], shape[0], shape[1], size, cfg)
    mask = warp(mask[..., None], affine, size, "NEAREST")[..., 0]
    image, affine = prefilter(tf.cast(image, tf.float32), affine)
    image = warp(image, affine, size, "BILINEAR") / 255.0
    image = colour_jitter(image, seeds[7:], cfg)
    return tf.cast(tf.round(image * 255.0), tf.uint8), mask


def resize_whole_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes a whole uint8 image to ``size`` x ``size`` (no crop), antialiased, as
    evaluation resizes it in NumPy (``whole_images.resize_image``)."""
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
