"""Orbax checkpoints of a workdir: the latest train states, and the best model by val Dice.

Orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
when complete, so a process killed while saving leaves only that temporary folder: it is never
restored from, and the next manager on the folder deletes it (in the background, at the latest
before its first save).
"""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

BEST_METRIC = "dice"


class MismatchError(ValueError):
    """A checkpoint whose arrays are not those of the structure it is restored into."""


class UnreadableError(OSError):
    """A checkpoint whose files cannot be read (truncated or damaged)."""


class UnwritableError(OSError):
    """A checkpoint that cannot be written (a full disk, a read-only folder, ...)."""


# After a write that failed: what a user does next.
RESUME_ADVICE = (
    "The complete checkpoints are kept: free space (or fix the folder) and rerun the same "
    "command to resume from the newest."
)

# What orbax raises for a failed write: OSError, and TensorStore's errors wrapped in ValueError
# or RuntimeError.
_WRITE_ERRORS = (OSError, RuntimeError, ValueError)

# Step folders made by the saving thread itself: where one cannot be made (a full disk), the
# save fails at once, rather than orbax's background threads each waiting 300 s for it.
_ASYNC_OPTIONS = ocp.options.AsyncOptions(create_directories_asynchronously=False)


def latest_manager(
    workdir: str | os.PathLike, keep: int = 2, read_only: bool = False
) -> ocp.CheckpointManager:
    """Full train states (optimizer included) under ``workdir/checkpoints``, newest ``keep``.

    With ``read_only`` the folder is neither created nor cleaned (see ``best_manager``).
    """
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        item_handlers=ocp.StandardCheckpointHandler(),  # so its metadata can be read
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            async_options=_ASYNC_OPTIONS,
        ),
    )


def best_manager(workdir: str | os.PathLike, read_only: bool = False) -> ocp.CheckpointManager:
    """Model variables of the step with the highest validation Dice under ``workdir/best``.

    With ``read_only`` (evaluation, prediction, export) the folder is neither created nor
    cleaned: a training run still writing there keeps its checkpoint in progress.
    """
    directory = Path(workdir).absolute() / "best"
    try:
        return ocp.CheckpointManager(
            directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda metrics: metrics[BEST_METRIC],
                best_mode="max",
                # Not orbax's read_only, which warns three times on every use; this one saves
                # nothing.
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                async_options=_ASYNC_OPTIONS,
            ),
        )
    except ValueError as e:  # orbax reads each step's metrics here: one that is not JSON
        for metrics_file in sorted(directory.glob("*/metrics/metrics")):
            try:
                json.loads(metrics_file.read_text())
            except ValueError:
                raise _unreadable(directory, int(metrics_file.parents[1].name), e) from e
        raise


def best_step(workdir: str | os.PathLike) -> int | None:
    """The step of ``workdir``'s best checkpoint, None if there is none (nothing is created)."""
    if not (Path(workdir) / "best").is_dir():
        return None
    with best_manager(workdir, read_only=True) as manager:
        return manager.best_step()


def holds_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` holds a complete train state or best model (nothing is created)."""
    if best_step(workdir) is not None:
        return True
    if not (Path(workdir) / "checkpoints").is_dir():
        return False
    with latest_manager(workdir, read_only=True) as manager:
        return manager.latest_step() is not None


def restore_best(workdir: str | os.PathLike, step: int, target: Any) -> Any:
    """``workdir``'s best checkpoint at ``step``, restored into the structure of ``target``."""
    with best_manager(workdir, read_only=True) as manager:
        return restore(manager, step, target)


def best_score(manager: ocp.CheckpointManager) -> float:
    """The validation Dice of the best checkpoint, -inf if there is none."""
    step = manager.best_step()
    return -float("inf") if step is None else float(manager.metrics(step)[BEST_METRIC])


def save(
    manager: ocp.CheckpointManager,
    step: int,
    item: Any,
    metrics: Any = None,
    custom_metadata: dict[str, Any] | None = None,
) -> None:
    """Saves ``item`` (any pytree) at ``step``, in the background (see ``check``), with
    ``custom_metadata`` (see ``step_metadata``).

    A step below the manager's newest is saved too (orbax would skip it), and a step the
    manager holds already is replaced, deleted first (orbax cannot replace one whole):
    ``best/`` may hold the same or a later step of an earlier run whose ``checkpoints/`` were
    deleted, or of a repeated evaluation.

    Raises:
      UnwritableError: this save, or an earlier one of ``manager``, failed.
    """
    if step in manager.all_steps():
        logging.info("Replacing step %d of %s.", step, manager.directory)
        manager.delete(step)
    try:
        manager.save(
            step,
            args=ocp.args.StandardSave(item),
            metrics=metrics,
            force=True,
            custom_metadata=custom_metadata,
        )
    except _WRITE_ERRORS as e:
        raise _unwritable(manager, e) from e


def step_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The ``custom_metadata`` saved with ``step`` (empty if none).

    Raises:
      UnreadableError: the step's metadata file cannot be read (orbax only logs it).
    """
    metadata = manager.metadata(step)
    if metadata.commit_timestamp_nsecs is None:  # written with every complete checkpoint
        error = ValueError("its _CHECKPOINT_METADATA file cannot be read")
        raise _unreadable(manager.directory, step, error)
    return dict(metadata.custom_metadata or {})


def check(manager: ocp.CheckpointManager, wait: bool = False) -> None:
    """Raises UnwritableError if a save of ``manager`` failed in the background; with ``wait``,
    after waiting for the saves in progress (without, it does not wait)."""
    try:
        if wait or not manager.is_saving_in_progress():
            manager.wait_until_finished()  # raises a finished save's failure
        manager.check_for_errors()
    except _WRITE_ERRORS as e:
        raise _unwritable(manager, e) from e


@contextlib.contextmanager
def closed_after(manager: ocp.CheckpointManager) -> Iterator[ocp.CheckpointManager]:
    """``manager``, closed (its saves finished) when the block ends. A save that fails while
    closing raises UnwritableError, unless the block is already raising, whose error then
    stands alone (often the same failure, found first)."""
    try:
        yield manager
    except BaseException:
        with contextlib.suppress(*_WRITE_ERRORS):
            manager.close()
        raise
    try:
        manager.close()
    except _WRITE_ERRORS as e:
        raise _unwritable(manager, e) from e


def _innermost(error: BaseException) -> str:
    """The first line of ``error``'s innermost cause (orbax wraps TensorStore's errors in plain
    ones)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _unwritable(manager: ocp.CheckpointManager, error: Exception) -> UnwritableError:
    """The UnwritableError for ``error``, naming its innermost cause."""
    return UnwritableError(
        f"Cannot write a checkpoint under {manager.directory} ({_innermost(error)}). "
        + RESUME_ADVICE
    )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Each array's shape in ``tree``, by its path ("params/aspp/...")."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): x.shape for path, x in leaves}


def _unreadable(directory: os.PathLike, step: int, error: Exception) -> UnreadableError:
    """The UnreadableError for ``error``, in the checkpoint at ``step`` of ``directory``."""
    return UnreadableError(
        f"The checkpoint at step {step} of {directory} cannot be read ({_innermost(error)}): "
        f"delete {Path(directory) / str(step)} to use an earlier one, if any."
    )


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """Restores the checkpoint at ``step`` into the structure of ``target``.

    Raises:
      MismatchError: the checkpoint holds other arrays, or other shapes, than ``target``
        (checked on its metadata, before anything is read).
      UnreadableError: its metadata or arrays cannot be read.
    """
    try:
        metadata = manager.item_metadata(step)
    except Exception as e:
        cause = (  # orbax's words for no default/ folder name its handler registry
            ValueError("its default/ folder is missing")
            if "Unable to retrieve default item" in str(e)
            else e
        )
        raise _unreadable(manager.directory, step, cause) from e
    if metadata is None:  # orbax's answer where the item's _METADATA file is missing
        raise _unreadable(manager.directory, step, ValueError("its _METADATA file is missing"))
    stored = _shapes(metadata.tree)
    wanted = _shapes(target)
    differences = [
        f"{name} is {stored.get(name, 'missing')} there, {wanted.get(name, 'missing')} here"
        for name in sorted(stored.keys() | wanted.keys())
        if stored.get(name) != wanted.get(name)
    ]
    if differences:
        more = f" and {len(differences) - 1} more" if len(differences) > 1 else ""
        raise MismatchError(f"{differences[0]}{more}")
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise _unreadable(manager.directory, step, e) from e
