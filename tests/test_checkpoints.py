"""The workdir's orbax checkpoint managers: latest train states and the best model."""

import math
import time

import numpy as np
import pytest

from hairseg_jax import checkpoints

TREE = {
    "params": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
    "step": np.array(7, np.int32),
}


def test_latest_keeps_the_newest_and_restores_into_the_target(tmp_path):
    manager = checkpoints.latest_manager(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(manager, step, {**TREE, "step": np.array(step, np.int32)})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]

    reopened = checkpoints.latest_manager(tmp_path)
    restored = checkpoints.restore(reopened, reopened.latest_step(), TREE)
    np.testing.assert_array_equal(restored["params"]["kernel"], TREE["params"]["kernel"])
    assert int(restored["step"]) == 3


def test_best_holds_one_model_and_its_dice(tmp_path):
    manager = checkpoints.best_manager(tmp_path)
    assert checkpoints.best_score(manager) == -math.inf
    for step, dice in ((2, 0.61), (4, 0.75)):  # training saves only a better model
        checkpoints.save(manager, step, TREE, metrics={checkpoints.BEST_METRIC: dice})
    manager.wait_until_finished()
    reopened = checkpoints.best_manager(tmp_path)
    assert reopened.all_steps() == [4] and reopened.best_step() == 4
    assert checkpoints.best_score(reopened) == 0.75


def test_a_half_written_checkpoint_is_never_restored_and_is_deleted(tmp_path):
    manager = checkpoints.latest_manager(tmp_path)
    checkpoints.save(manager, 2, TREE)
    manager.wait_until_finished()
    half = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"  # a save killed midway
    half.mkdir()
    (half / "partial").write_bytes(b"\0")

    reopened = checkpoints.latest_manager(tmp_path)
    assert reopened.latest_step() == 2
    # Deleted in the background, at the latest before the manager's first save.
    checkpoints.save(reopened, 6, TREE)
    reopened.wait_until_finished()
    assert not half.exists()
    assert reopened.all_steps() == [2, 6]


def test_a_reader_of_best_leaves_a_save_in_progress_alone(tmp_path):
    """Evaluating while training writes a better model: the reader deletes nothing."""
    writer = checkpoints.best_manager(tmp_path)
    checkpoints.save(writer, 2, TREE, metrics={checkpoints.BEST_METRIC: 0.5})
    writer.wait_until_finished()
    in_progress = tmp_path / "best" / "4.orbax-checkpoint-tmp"
    in_progress.mkdir()

    reader = checkpoints.best_manager(tmp_path, read_only=True)
    assert reader.best_step() == 2
    restored = checkpoints.restore(reader, 2, TREE)
    np.testing.assert_array_equal(restored["params"]["kernel"], TREE["params"]["kernel"])
    time.sleep(1.0)  # a cleaning manager deletes such a folder in the background by now
    assert in_progress.is_dir()
    assert checkpoints.best_manager(tmp_path / "new", read_only=True).best_step() is None
    assert not (tmp_path / "new").exists()  # nor does a reader create folders


def test_restoring_into_other_shapes_names_the_first_difference_and_reads_nothing(
    tmp_path, monkeypatch
):
    manager = checkpoints.latest_manager(tmp_path)
    checkpoints.save(manager, 1, TREE)
    manager.wait_until_finished()
    monkeypatch.setattr(manager, "restore", lambda *args, **kwargs: pytest.fail("read"))
    wider = {**TREE, "params": {"kernel": np.zeros((2, 4), np.float32)}}
    with pytest.raises(checkpoints.MismatchError, match=r"^params/kernel is \(2, 3\) there, "):
        checkpoints.restore(manager, 1, wider)
    other = {**TREE, "params": {"bias": np.zeros(3, np.float32), "weight": np.zeros(2)}}
    with pytest.raises(checkpoints.MismatchError) as error:
        checkpoints.restore(manager, 1, other)
    assert str(error.value) == "params/bias is missing there, (3,) here and 2 more"


def test_a_damaged_checkpoint_is_named_as_unreadable(tmp_path):
    manager = checkpoints.latest_manager(tmp_path)
    checkpoints.save(manager, 3, {**TREE, "params": {"kernel": np.ones((64, 64), np.float32)}})
    manager.wait_until_finished()
    for data in (tmp_path / "checkpoints" / "3").rglob("d/*"):  # the arrays' bytes, cut short
        data.write_bytes(data.read_bytes()[:10])
    target = {**TREE, "params": {"kernel": np.zeros((64, 64), np.float32)}}
    with pytest.raises(checkpoints.UnreadableError) as error:
        checkpoints.restore(manager, 3, target)
    assert str(error.value).startswith(
        f"The checkpoint at step 3 of {tmp_path / 'checkpoints'} cannot be read ("
    )
    assert str(error.value).endswith(
        f"): delete {tmp_path / 'checkpoints' / '3'} to use an earlier one, if any."
    )
