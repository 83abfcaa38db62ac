"""Tests of the tf.data training pipeline on small in-memory examples."""

import functools
import itertools
import subprocess
import sys
import weakref

import ml_collections
import numpy as np
import pytest

from configs import figaro
from hairseg_jax.data import pipeline
from hairseg_jax.data.examples import Examples
from hairseg_jax.data.pipeline import (
    size_stages,
    staged_batches,
    train_batches,
)
from hairseg_jax.data.synthetic import make_examples
from tests.conftest import REPO

SIZE = 32
BATCH = 4


@pytest.fixture(scope="module")
def examples() -> Examples:
    return make_examples(12, (48, 40), seed=3)


@pytest.fixture(scope="module")
def augment_config() -> ml_collections.ConfigDict:
    return figaro.get_config().augment


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


def assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batches_shapes_and_types(examples, augment_config):
    batches = take(train_batches(examples, BATCH, SIZE, augment_config, seed=0), 4)
    for batch in batches:
        assert set(batch) == {"image", "mask"}
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (BATCH, SIZE, SIZE, 3)
        assert batch["mask"].dtype == np.uint8 and batch["mask"].shape == (BATCH, SIZE, SIZE)
        assert set(np.unique(batch["mask"])) <= {0, 1}
    assert any(batch["mask"].any() for batch in batches)


def test_train_batches_are_deterministic(examples, augment_config):
    first = take(train_batches(examples, BATCH, SIZE, augment_config, seed=5), 4)
    again = take(train_batches(examples, BATCH, SIZE, augment_config, seed=5), 4)
    assert_batches_equal(first, again)


def test_the_seed_moves_both_the_order_and_the_augmentation(examples, augment_config):
    """Each apart: copies of one image (the order cannot show), flat images without colour
    jitter (the augmentation cannot)."""
    copies = Examples(["a", "b", "c", "d"], examples.images[:1] * 4, examples.masks[:1] * 4)
    drawn = [next(train_batches(copies, BATCH, SIZE, augment_config, seed=s)) for s in (5, 6)]
    assert not np.array_equal(drawn[0]["image"], drawn[1]["image"])
    cfg = ml_collections.ConfigDict(augment_config.to_dict())
    cfg.update(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    epochs = [next(train_batches(constant_examples(12), 12, 8, cfg, seed=s)) for s in (5, 6)]
    orders = [[int(image.flat[0]) for image in epoch["image"]] for epoch in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1], orders


def test_an_example_is_augmented_anew_each_epoch(examples, augment_config):
    """Copies of one image, one batch an epoch: the second epoch's crops are not the first's
    in another order (each draw follows the stream's position, not the example)."""
    copies = Examples(["a", "b", "c", "d"], examples.images[:1] * 4, examples.masks[:1] * 4)
    epochs = take(train_batches(copies, BATCH, SIZE, augment_config, seed=5), 2)
    drawn = [sorted(image.tobytes() for image in epoch["image"]) for epoch in epochs]
    assert drawn[0] != drawn[1]


@pytest.mark.parametrize("start_step", [1, 4])
def test_start_step_resumes_the_stream(examples, augment_config, start_step):
    """Resuming at step k (here also past the first epoch of 3 steps) yields steps k, k+1..."""
    fresh = take(train_batches(examples, BATCH, SIZE, augment_config, seed=2), start_step + 2)
    resumed = take(
        train_batches(examples, BATCH, SIZE, augment_config, seed=2, start_step=start_step), 2
    )
    assert_batches_equal(resumed, fresh[start_step:])


@pytest.mark.parametrize("start_step", [0, 2])
def test_processes_read_contiguous_slices_of_the_same_global_batches(
    examples, augment_config, start_step
):
    """With 2 processes each yields half of every global batch, resumable the same way."""
    stream = lambda **kw: train_batches(  # noqa: E731
        examples, BATCH, SIZE, augment_config, seed=3, start_step=start_step, **kw
    )
    whole = take(stream(), 4)
    halves = [take(stream(process_index=i, process_count=2), 4) for i in (0, 1)]
    joined = [
        {key: np.concatenate([first[key], second[key]]) for key in first}
        for first, second in zip(*halves, strict=True)
    ]
    assert halves[0][0]["image"].shape[0] == BATCH // 2
    assert_batches_equal(joined, whole)


def constant_examples(count: int) -> Examples:
    """Examples whose images are one flat colour encoding their index (10 * index + 5)."""
    images = [np.full((30, 20, 3), 10 * i + 5, np.uint8) for i in range(count)]
    masks = [np.full((30, 20), i % 2, np.uint8) for i in range(count)]
    return Examples([f"flat_{i}" for i in range(count)], images, masks)


def test_each_epoch_visits_every_example_once(augment_config):
    """Spatial augmentation keeps a flat colour, so each output names the example it came from."""
    cfg = ml_collections.ConfigDict(augment_config.to_dict())
    cfg.update(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    count, epochs = 12, 3
    batches = take(train_batches(constant_examples(count), BATCH, 8, cfg, seed=1), 9)
    indices = []
    for batch in batches:
        for image, mask in zip(batch["image"], batch["mask"], strict=True):
            assert (image == image.flat[0]).all(), "a flat image did not stay flat"
            index, remainder = divmod(int(image.flat[0]) - 5, 10)
            assert remainder == 0
            np.testing.assert_array_equal(mask, index % 2)
            indices.append(index)
    orders = [indices[e * count : (e + 1) * count] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(count))
    assert len({tuple(order) for order in orders}) == epochs, "epochs were not reshuffled"


def test_size_stages_end_at_their_fractions_of_training():
    data = figaro.get_config().data
    assert size_stages(data, 100) == [(100, 227)]
    data.progressive_sizes, data.progressive_until = (64, 96), (0.25, 0.6)
    assert size_stages(data, 100) == [(25, 64), (60, 96), (100, 227)]
    data.progressive_sizes, data.progressive_until = (64,), (0.257,)
    assert size_stages(data, 100) == [(26, 64), (100, 227)]  # the nearest step


@pytest.mark.parametrize("start_step", [0, 1, 3])
def test_staged_batches_continue_one_stream_at_each_stage_size(
    examples, augment_config, start_step
):
    """Step k of a staged stream is step k of the plain stream at k's crop side, also when
    resumed inside either stage."""
    stages = [(2, 24), (5, SIZE)]
    batches_from = functools.partial(
        train_batches, examples, BATCH, augment_config=augment_config, seed=4
    )
    staged = take(staged_batches(stages, start_step, batches_from), 6 - start_step)
    for step, batch in enumerate(staged, start=start_step):
        side = 24 if step < 2 else SIZE
        plain = next(train_batches(examples, BATCH, side, augment_config, 4, start_step=step))
        assert batch["image"].shape == (BATCH, side, side, 3)
        assert_batches_equal([batch], [plain])


def test_batch_larger_than_dataset_raises(examples, augment_config):
    with pytest.raises(ValueError, match="larger than the 12"):
        train_batches(examples, 13, SIZE, augment_config, seed=0)


def test_batch_that_processes_cannot_share_raises(examples, augment_config):
    # 6 rows over 4 processes: slices of 1 would leave 2 rows of every batch unread.
    with pytest.raises(ValueError, match="Batch size 6 does not divide by 4 processes."):
        train_batches(examples, 6, SIZE, augment_config, seed=0, process_count=4)


def test_batch_as_large_as_dataset(examples, augment_config):
    batch = next(train_batches(examples, 12, 16, augment_config, seed=0))
    assert batch["image"].shape == (12, 16, 16, 3)


EXIT_WITH_AN_OPEN_STREAM = """
from configs import synthetic
from hairseg_jax.data.pipeline import train_batches
from hairseg_jax.data.synthetic import make_examples

batches = train_batches(make_examples(64, 400, seed=0), 8, 64, synthetic.get_config().augment, 0)
next(batches)
print("pulled", flush=True)
"""


def test_python_exits_with_a_training_stream_still_open():
    """Exiting while a stream is prefetching returns (without the exit hook 5 of 8 runs hung)."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", EXIT_WITH_AN_OPEN_STREAM],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        try:
            stdout, _ = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for other in runs:
                other.kill()
            pytest.fail("Python hung at exit with a training stream open.")
        assert run.returncode == 0 and "pulled" in stdout


def test_streams_still_open_are_closed_by_the_exit_hook(examples, augment_config, monkeypatch):
    monkeypatch.setattr(pipeline, "_open_streams", weakref.WeakSet())  # only this test's stream
    batches = train_batches(examples, BATCH, SIZE, augment_config, seed=0)
    next(batches)
    assert batches in pipeline._open_streams
    pipeline._close_open_streams()
    with pytest.raises(StopIteration):
        next(batches)
