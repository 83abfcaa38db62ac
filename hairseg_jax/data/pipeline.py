"""tf.data pipelines over in-memory examples, delivering NumPy batches to JAX.

TensorFlow lives only on the host side: it is hidden from any GPU when this module is imported.
"""

import atexit
import weakref
from collections.abc import Callable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hairseg_jax.data import augment
from hairseg_jax.data.examples import Examples

# Training streams not yet garbage-collected. One still open when Python shuts down can hang
# it: tf.data's destructor waits for its map calls, whose ``numpy_function`` needs the GIL,
# which other threads can no longer take once finalisation has begun.
_open_streams: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Closes the streams still open at exit, while their map calls can still finish."""
    for stream in list(_open_streams):
        stream.close()


# The map and filter functions branch only on Python values (the config), never on tensors,
# so AutoGraph's source conversion (0.4-0.9 s before the first batch) has nothing to do.
plain_graph = tf.autograph.experimental.do_not_convert


def _lookup(examples: Examples):
    """A tf.data map function: example index -> (image, mask) uint8 tensors."""

    def fetch(index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        return examples.images[index], examples.masks[index]

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, mask = tf.numpy_function(fetch, [index], (tf.uint8, tf.uint8), stateful=False)
        image.set_shape([None, None, 3])
        mask.set_shape([None, None])
        return image, mask

    return lookup


def train_batches(
    examples: Examples,
    batch_size: int,
    image_size: int,
    augment_config: ml_collections.ConfigDict,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """An endless iterator of augmented training batches, or of one process's slices of them.

    The order (a reshuffle every epoch) and every augmentation draw depend only on ``seed`` and
    the position in the stream, so ``start_step`` resumes exactly where a run stopped, and
    the global batches are the same whatever the number of processes.

    Args:
      examples: the training examples.
      batch_size: the global batch size, a multiple of ``process_count``.
      image_size: side of the square crops.
      augment_config: ``config.augment``.
      seed: seed of the order and the augmentation.
      start_step: number of global batches to skip.
      process_index: the slice to yield: every global batch is cut into ``process_count``
        contiguous slices of ``batch_size // process_count`` examples.
      process_count: number of processes reading the stream.

    Yields:
      ``{"image": uint8 (B, S, S, 3), "mask": uint8 (B, S, S)}``, B = the slice's size.
    """
    count = len(examples)
    if count < batch_size:
        raise ValueError(f"Batch size {batch_size} is larger than the {count} training examples.")
    if batch_size % process_count:
        raise ValueError(f"Batch size {batch_size} does not divide by {process_count} processes.")
    local_size = batch_size // process_count
    lookup = _lookup(examples)

    def load(position: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
        image, mask = lookup(index)
        example_seed = tf.stack([tf.constant(seed, tf.int64), position])
        image, mask = augment.train_transform(image, mask, example_seed, image_size, augment_config)
        return {"image": image, "mask": mask}

    ds = tf.data.Dataset.range(count).shuffle(count, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate().skip(start_step * batch_size)
    ds = ds.filter(
        plain_graph(lambda position, _: position % batch_size // local_size == process_index)
    )
    ds = ds.map(plain_graph(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    stream = iter(tfds.as_numpy(ds))
    _open_streams.add(stream)
    return stream


def size_stages(data_config: ml_collections.ConfigDict, total_steps: int) -> list[tuple[int, int]]:
    """The crop side of each stage of training, as (last step, side) pairs in order.

    ``data_config.progressive_sizes`` are the sides of the stages before the last, each ending
    at its fraction ``data_config.progressive_until`` of ``total_steps``; the last stage crops
    ``data_config.image_size`` up to ``total_steps`` (progressive resizing).
    """
    ends = [round(f * total_steps) for f in data_config.progressive_until] + [total_steps]
    return list(zip(ends, [*data_config.progressive_sizes, data_config.image_size], strict=True))


def staged_batches(
    stages: Sequence[tuple[int, int]],
    start_step: int,
    batches_from: Callable[..., Iterator[dict[str, np.ndarray]]],
) -> Iterator[dict[str, np.ndarray]]:
    """Training batches whose crop side changes by stage (see ``size_stages``).

    ``batches_from(image_size=side, start_step=k)`` is the stream of one side from step k on:
    ``train_batches`` with its other arguments bound. Every stage continues the same stream of
    examples and augmentation draws, so batch k is the first of ``batches_from`` with k's side
    and ``start_step=k``, and ``start_step`` resumes inside any stage. The last stage is endless.
    """
    for number, (last_step, image_size) in enumerate(stages):
        final = number == len(stages) - 1
        if start_step >= last_step and not final:
            continue
        batches = batches_from(image_size=image_size, start_step=start_step)
        if final:
            yield from batches
        for _ in range(last_step - start_step):
            yield next(batches)
        start_step = last_step
