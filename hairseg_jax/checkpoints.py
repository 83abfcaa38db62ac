"""Orbax checkpoints of a workdir: the latest train states, and the best model by val Dice.

Orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
when complete, so a process killed while saving leaves only that temporary folder: it is never
restored from, and the next manager on the folder deletes it (in the background, at the latest
before its first save).
"""

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

BEST_METRIC = "dice"


def latest_manager(workdir: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
    """Full train states (optimizer included) under ``workdir/checkpoints``, newest ``keep``."""
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        ),
    )


def best_manager(workdir: str | os.PathLike, read_only: bool = False) -> ocp.CheckpointManager:
    """Model variables of the step with the highest validation Dice under ``workdir/best``.

    With ``read_only`` (evaluation, prediction, export) the folder is neither created nor
    cleaned: a training run still writing there keeps its checkpoint in progress.
    """
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode="max",
            # Not orbax's read_only, which warns three times on every use; this one saves nothing.
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        ),
    )


def best_score(manager: ocp.CheckpointManager) -> float:
    """The validation Dice of the best checkpoint, -inf if there is none."""
    step = manager.best_step()
    return -float("inf") if step is None else float(manager.metrics(step)[BEST_METRIC])


def save(manager: ocp.CheckpointManager, step: int, item: Any, metrics: Any = None) -> None:
    """Saves ``item`` (any pytree) at ``step``."""
    manager.save(step, args=ocp.args.StandardSave(item), metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """Restores the checkpoint at ``step`` into the structure of ``target``."""
    return manager.restore(step, args=ocp.args.StandardRestore(target))
