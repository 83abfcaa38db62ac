"""Training killed with SIGKILL anywhere, then rerun: the result of a run never killed.

Every run goes through ``tests/faulty_main.py`` (``main.py`` plus a self-SIGKILL at a chosen
point) on a few real Figaro1k images. The runs share the session's JAX compilation cache, so
only the first one compiles.
"""

import glob
import os
import shutil
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import figaro
from hairseg_jax import models, steps
from hairseg_jax.weights import convert
from tests.conftest import SHARED_TRAIN_STEP, config_flags, run_python

# 8 steps of batch 4 over 8 images (4 epochs), evaluation (2 batches) at 4 and 8, train
# states also at 2 and 6, an EMA and dropout: everything a resumed run must restore. The
# train step is conftest's SHARED_TRAIN_STEP (one compile, then hits in the session's
# persistent compilation cache).
TINY = [
    "--config=configs/figaro.py:smoke",
    *config_flags(SHARED_TRAIN_STEP),
    "--config.data.max_train_images=8",
    "--config.data.max_val_images=4",
    "--config.train.eval_every_steps=4",
    "--config.train.checkpoint_every_steps=2",
    "--config.train.log_every_steps=4",  # the loss of steps 1-2 and 5-6 is saved with them
    "--config.eval.batch_size=2",
    "--config.eval.preview_images=0",
]

# The kills, in order, on one workdir; each rerun resumes from what the last one left.
KILLS = [
    "step=3",  # in step 3, maybe while the async save of step 2 is still writing
    "save=best/4",  # best model of step 4 written, not yet renamed into place
    "save=checkpoints/4",  # the same for the train state of step 4 (best is committed)
    "eval=4",  # resumed from 2: in the evaluation of step 8 (batches 3, 4), after batch 3
]


def run(workdir: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {  # every compile of a run goes into the session's cache: the next run loads it
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "HAIRSEG_FAULT": fault,
    }
    return run_python("tests/faulty_main.py", *TINY, f"--workdir={workdir}", *args, env=env)


@pytest.fixture(scope="module")
def reference(figaro_dir, tmp_path_factory) -> Path:
    """The workdir of the same training, never killed."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, f"--config.data.data_dir={figaro_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def restore(workdir: Path, folder: str, step: int):
    return ocp.StandardCheckpointer().restore(workdir / folder / str(step) / "default")


def scalars(workdir: Path) -> dict:
    """(step, tag) -> value of the train_* and val_* scalars; later runs' values win."""
    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(str(workdir / "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith(("train_", "val_")):
                    found[event.step, value.tag] = float(tf.make_ndarray(value.tensor))
    return found


def test_sigkill_anywhere_then_rerun_equals_an_unkilled_run(reference, figaro_dir, tmp_path):
    workdir = tmp_path / "killed"
    data = f"--config.data.data_dir={figaro_dir}"
    for fault in KILLS:
        result = run(workdir, data, fault=fault)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-3000:])
        assert f"faulty_main: SIGKILL at {fault}" in result.stderr
        if fault.startswith("save="):  # killed inside the save: only the temporary folder
            target = workdir / fault.partition("=")[2]
            assert not target.exists()
            assert target.with_name(target.name + ".orbax-checkpoint-tmp").is_dir()
        if fault == "save=checkpoints/4":
            assert (workdir / "best" / "4").is_dir()  # the best model is committed first
    result = run(workdir, data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from step" in result.stderr

    assert not list(workdir.rglob("*.orbax-checkpoint-tmp"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "8"]
    assert os.listdir(workdir / "best") == os.listdir(reference / "best")
    for folder, step in (("checkpoints", 8), ("best", int(os.listdir(reference / "best")[0]))):
        expected, got = restore(reference, folder, step), restore(workdir, folder, step)
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        jax.tree.map(np.testing.assert_array_equal, got, expected)  # bitwise
    expected, got = scalars(reference), scalars(workdir)
    assert {(8, f"val_{k}") for k in ("loss", "dice", "pooled_dice", "iou")} <= expected.keys()
    assert got == expected


def test_nonfinite_weights_stop_with_one_line_naming_the_step(figaro_dir, tmp_path):
    """A NaN in the starting weights: the first step's loss is NaN; nothing is saved."""
    model_config = figaro.get_config("smoke").model
    model_config.update({"aspp_channels": 16, "decoder_channels": 16})
    shapes = steps.variable_shapes(models.build_model(model_config), 64)
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    variables["params"]["decoder"]["last_conv_8"]["bias"][0] = np.nan
    weights = tmp_path / "nan.msgpack"
    convert.save_variables(variables, weights)
    workdir = tmp_path / "w"

    result = run(
        workdir,
        f"--config.data.data_dir={figaro_dir}",
        f"--config.model.pretrained={weights}",
    )

    assert result.returncode == 1, result.stderr[-3000:]
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert fatal == [
        "FATAL Non-finite loss, gradient or update at step 1: stopped without saving it or any "
        "later step (newest checkpoint: none). Lower the learning rate, or pass "
        "--config.train.skip_nonfinite=True to skip such steps."
    ]
    assert "Traceback" not in result.stderr
    assert not os.listdir(workdir / "checkpoints") and not os.listdir(workdir / "best")


def test_changed_config_stops_with_one_line_and_the_flag_allows_it(reference, figaro_dir, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    changed = [
        f"--config.data.data_dir={figaro_dir}",
        "--config.seed=1",
        "--config.data.max_train_images=6",
        "--config.eval.batch_size=4",  # may change on resume: not listed
        "--config.train.log_every_steps=2",
    ]

    result = run(workdir, *changed)

    assert result.returncode == 1
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and "Traceback" not in result.stderr
    assert fatal[0].endswith(
        "data.max_train_images: 8 -> 6; seed: 0 -> 1. Use another workdir, or pass "
        "--config.train.allow_config_change=True to go on with the new values."
    )
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before

    result = run(workdir, *changed, "--config.train.allow_config_change=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Config changed from" in result.stderr and "Resumed from step 8" in result.stderr
