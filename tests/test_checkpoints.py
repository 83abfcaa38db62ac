"""The workdir's orbax checkpoint managers: latest train states and the best model."""

import math
import shutil
import sys
import time

import numpy as np
import pytest

from hairseg_jax import checkpoints, cli
from tests.conftest import run_python

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


def test_best_takes_a_better_model_at_an_earlier_or_the_same_step(tmp_path):
    """best/ can hold a later step of an earlier run (its checkpoints/ deleted, then trained
    again) or the step a resumed run evaluates again: orbax skipped such saves silently."""
    with checkpoints.closed_after(checkpoints.best_manager(tmp_path)) as manager:
        checkpoints.save(manager, 8, TREE, metrics={checkpoints.BEST_METRIC: 0.1})
    for step, dice, value in ((4, 0.5, 1.0), (4, 0.7, 2.0)):
        tree = {**TREE, "params": {"kernel": np.full((2, 3), value, np.float32)}}
        with checkpoints.closed_after(checkpoints.best_manager(tmp_path)) as manager:
            checkpoints.save(manager, step, tree, metrics={checkpoints.BEST_METRIC: dice})
        with checkpoints.best_manager(tmp_path, read_only=True) as reopened:
            assert reopened.all_steps() == [4] and checkpoints.best_score(reopened) == dice
        restored = checkpoints.restore_best(tmp_path, 4, TREE)
        np.testing.assert_array_equal(restored["params"]["kernel"], tree["params"]["kernel"])


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
    """Evaluating while training writes a better model: the reader deletes nothing (nor does
    a reader of the train states)."""
    writer = checkpoints.best_manager(tmp_path)
    checkpoints.save(writer, 2, TREE, metrics={checkpoints.BEST_METRIC: 0.5})
    writer.wait_until_finished()
    assert checkpoints.holds_checkpoints(tmp_path)  # best/ alone: a workdir trained in
    in_progress = tmp_path / "best" / "4.orbax-checkpoint-tmp"
    in_progress.mkdir()
    state_in_progress = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
    state_in_progress.mkdir(parents=True)

    reader = checkpoints.best_manager(tmp_path, read_only=True)
    assert reader.best_step() == 2
    restored = checkpoints.restore(reader, 2, TREE)
    np.testing.assert_array_equal(restored["params"]["kernel"], TREE["params"]["kernel"])
    assert checkpoints.latest_manager(tmp_path, read_only=True).latest_step() is None
    time.sleep(1.0)  # a cleaning manager deletes such a folder in the background by now
    assert in_progress.is_dir() and state_in_progress.is_dir()
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


def test_a_damaged_checkpoint_is_named_as_unreadable(tmp_path, monkeypatch):
    # As main.run does (cli.quiet_libraries): TensorStore reads still in flight when orbax gives
    # up the restore end after its event loop closed, each an "Event loop is closed" error.
    monkeypatch.setattr(sys, "unraisablehook", cli.late_restore_errors_dropped(sys.unraisablehook))
    with checkpoints.latest_manager(tmp_path) as manager:
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


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        ("default/_METADATA", "its _METADATA file is missing"),
        ("default", "its default/ folder is missing"),
    ],
)
def test_a_checkpoint_missing_its_metadata_or_item_says_so_in_words(tmp_path, damage, cause):
    """They read "'NoneType' object has no attribute 'tree'" and orbax's advice to register
    a handler."""
    with checkpoints.latest_manager(tmp_path) as manager:
        checkpoints.save(manager, 2, TREE)
        manager.wait_until_finished()
    path = tmp_path / "checkpoints" / "2" / damage
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    unreadable = pytest.raises(checkpoints.UnreadableError)
    with checkpoints.latest_manager(tmp_path, read_only=True) as manager, unreadable as error:
        checkpoints.restore(manager, 2, TREE)
    assert str(error.value) == (
        f"The checkpoint at step 2 of {tmp_path / 'checkpoints'} cannot be read ({cause}): "
        f"delete {tmp_path / 'checkpoints' / '2'} to use an earlier one, if any."
    )


def test_damaged_metadata_and_metrics_files_are_named_as_unreadable(tmp_path):
    """Orbax only logs a step's metadata that it cannot parse (the train loss's window would
    be lost on resume), and raises a bare JSONDecodeError for the best model's metrics."""
    with checkpoints.latest_manager(tmp_path) as manager:
        checkpoints.save(manager, 2, TREE, custom_metadata={"train_loss_count": 1})
        manager.wait_until_finished()
        assert checkpoints.step_metadata(manager, 2) == {"train_loss_count": 1}
    metadata_file = tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA"
    metadata_file.write_text(metadata_file.read_text()[:40])
    unreadable = pytest.raises(checkpoints.UnreadableError, match="^The checkpoint at step 2 of ")
    with checkpoints.latest_manager(tmp_path, read_only=True) as manager, unreadable:
        checkpoints.step_metadata(manager, 2)

    with checkpoints.best_manager(tmp_path) as best:
        checkpoints.save(best, 5, TREE, metrics={checkpoints.BEST_METRIC: 0.25})
        best.wait_until_finished()
    assert checkpoints.best_step(tmp_path) == 5
    (tmp_path / "best" / "5" / "metrics" / "metrics").write_text('{"dice": 0.2')
    with pytest.raises(checkpoints.UnreadableError) as error:
        checkpoints.best_step(tmp_path)
    assert str(error.value).startswith(f"The checkpoint at step 5 of {tmp_path / 'best'} cannot")
    assert str(error.value).endswith(
        f"delete {tmp_path / 'best' / '5'} to use an earlier one, if any."
    )


FULL_DISK = """
import errno, os, sys
import numpy as np
from hairseg_jax import checkpoints

manager = checkpoints.latest_manager(sys.argv[1])
checkpoints.save(manager, 1, {"x": np.zeros(3)})
checkpoints.check(manager, wait=True)
makedirs = os.makedirs

def full_disk(path, *args, **kwargs):
    if "2.orbax-checkpoint-tmp" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return makedirs(path, *args, **kwargs)

os.makedirs = full_disk
try:
    with checkpoints.closed_after(manager):
        checkpoints.save(manager, 2, {"x": np.zeros(3)})
        checkpoints.check(manager, wait=True)
except checkpoints.UnwritableError as e:
    print(e)
"""


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_process_exits_at_once(tmp_path):
    """A full disk when the step's folder is made: one error naming it, the earlier step kept,
    and the process exits at once (orbax's background threads once held it 300 s, waiting for
    a folder that was never made)."""
    start = time.monotonic()
    result = run_python("-c", FULL_DISK, str(tmp_path), timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(
        f"Cannot write a checkpoint under {tmp_path / 'checkpoints'} ([Errno 28] No space left "
    )
    assert result.stdout.strip().endswith("rerun the same command to resume from the newest.")
    with checkpoints.latest_manager(tmp_path, read_only=True) as manager:
        assert manager.all_steps() == [1]


class BackgroundSave:
    """A manager's save state, as ``checkpoints.check`` reads it."""

    def __init__(self, directory, saving: bool, error: Exception | None):
        self.directory, self.saving, self.error, self.waited = directory, saving, error, False

    def is_saving_in_progress(self) -> bool:
        return self.saving

    def wait_until_finished(self) -> None:
        self.waited = True
        if self.error:
            raise self.error

    def check_for_errors(self) -> None:
        pass


def test_check_reports_a_failed_background_save_without_waiting_for_one_in_progress(tmp_path):
    """orbax keeps a finished save's failure for its wait: ``check`` asks for it only once the
    save is over (each training step), or waits first where asked (the last step)."""
    failure = ValueError("RESOURCE_EXHAUSTED: Error writing 'params' in OCDBT database\nmore")
    failed = BackgroundSave(tmp_path, saving=False, error=failure)
    with pytest.raises(checkpoints.UnwritableError, match=r"\(RESOURCE_EXHAUSTED: [^\n]*\)\."):
        checkpoints.check(failed)
    wrapped = RuntimeError("Error occurred in a background thread.")  # orbax's wrapping
    wrapped.__cause__ = OSError(28, "No space left on device")
    with pytest.raises(checkpoints.UnwritableError, match=r"\(\[Errno 28\] No space left"):
        checkpoints.check(BackgroundSave(tmp_path, saving=False, error=wrapped))
    in_progress = BackgroundSave(tmp_path, saving=True, error=None)
    checkpoints.check(in_progress)
    assert not in_progress.waited
    checkpoints.check(in_progress, wait=True)
    assert in_progress.waited


def test_closing_after_a_failure_keeps_that_error(tmp_path):
    """The close, which waits for the same failed save, does not replace the first error."""
    failed = BackgroundSave(tmp_path, saving=False, error=OSError("second"))
    failed.close = failed.wait_until_finished
    with pytest.raises(KeyError, match="first"), checkpoints.closed_after(failed):
        raise KeyError("first")
    closing = checkpoints.closed_after(failed)
    with pytest.raises(checkpoints.UnwritableError, match=r"\(second\)"), closing:
        pass
