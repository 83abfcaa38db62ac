"""``train_and_evaluate`` on synthetic images, in-process: summary and checkpoints."""

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import asynclib
from jax import monitoring

from configs import synthetic
from hairseg_jax import checkpoints, config_checks, evaluate, models, steps, train
from hairseg_jax.data import device_augment, figaro1k, pipeline, sources
from hairseg_jax.weights import convert
from tests.conftest import TinyNet
from tests.data.conftest import entry, random_image, random_mask, write_frame


def tiny_config():
    config = synthetic.get_config()
    config.data.synthetic_size = 48
    config.data.synthetic_counts = {"train": 8, "val": 4, "test": 4}
    config.data.image_size = 32
    config.model.aspp_channels = 8
    config.model.decoder_channels = 8
    config.train.batch_size = 4
    config.train.num_steps = 4
    config.train.log_every_steps = 2
    config.train.eval_every_steps = 2
    config.eval.image_size = 32
    config.eval.batch_size = 4
    return config


def test_train_and_evaluate_on_synthetic_data(tmp_path, caplog):
    config = tiny_config()
    config.train.checkpoint_every_steps, config.train.keep_checkpoints = 1, 3
    with caplog.at_level(logging.INFO):
        summary = train.train_and_evaluate(config, tmp_path)
    # The last step's progress line splits the time: waiting for batches, validating.
    assert re.search(r"100\.0% \(4/4\).*\(.*: [0-9.]+% eval, [0-9.]+% input\)", caplog.text)
    assert summary["num_images"] == 4  # the last validation's summary, of step 4
    assert 0.0 <= summary["dice"] <= 1.0
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2, 3, 4]  # the newest 3 of 4
    best = checkpoints.best_manager(tmp_path)  # which step: test_best_holds_the_step_of_...
    assert best.best_step() in (2, 4)
    if best.best_step() == 4:
        assert summary["dice"] == checkpoints.best_score(best)
    else:
        assert summary["dice"] <= checkpoints.best_score(best)
    assert (tmp_path / "config.json").is_file()

    # Resumed, a run does not read config.model.pretrained again (its weights are in the
    # checkpoint): a file gone since does not stop it. Nor does it initialise the model: the
    # state is restored into its shapes, so nothing is lowered to XLA (let alone compiled).
    saved = (tmp_path / "config.json").read_bytes()
    events = sorted(tmp_path.glob("events.out.tfevents.*"))
    config = tiny_config()
    config.model.pretrained = str(tmp_path / "gone.msgpack")
    config.train.allow_config_change = True
    lowered = []
    listener = lambda event, secs, **kwargs: lowered.append(event)  # noqa: E731
    monitoring.register_event_duration_secs_listener(listener)
    try:
        assert train.train_and_evaluate(config, tmp_path) == {}  # at step 4 of 4: nothing to do
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/jaxpr_to_mlir_module_duration" not in lowered
    assert (tmp_path / "config.json").read_bytes() == saved  # it still describes the checkpoints
    assert sorted(tmp_path.glob("events.out.tfevents.*")) == events  # no empty event file
    assert len(events) == 1

    # A model change that the flag allows cannot resume: it stops with one line, and leaves
    # config.json as it was. The line names that change, not others that change no array.
    config = tiny_config()
    config.model.aspp_channels, config.train.allow_config_change = 16, True
    config.optim.learning_rate, config.train.num_steps = 0.5, 6
    with pytest.raises(config_checks.ConfigError) as error:
        train.train_and_evaluate(config, tmp_path)
    assert str(error.value) == (
        f"The checkpoint at step 4 of {tmp_path.absolute() / 'checkpoints'} does not fit "
        "config.model / config.optim.name / config.train.ema_decay (trained with "
        "model.aspp_channels: 8 -> 16), so training cannot resume from it: train with the new "
        "settings in another workdir."
    )
    assert (tmp_path / "config.json").read_bytes() == saved

    # So does another optimizer, or EMA where there was none: the line names that change.
    for field, value in (("optim.name", "adamw"), ("train.ema_decay", 0.5)):
        config = tiny_config()
        section, name = field.split(".")
        config[section][name], config.train.allow_config_change = value, True
        with pytest.raises(config_checks.ConfigError, match=rf"\(trained with {field}: \S+ -> "):
            train.train_and_evaluate(config, tmp_path)
    assert (tmp_path / "config.json").read_bytes() == saved
    assert sorted(tmp_path.glob("events.out.tfevents.*")) == events


def test_batch_larger_than_the_training_set_stops_before_any_work(tmp_path):
    config = tiny_config()
    config.train.batch_size = 16
    with pytest.raises(config_checks.ConfigError, match="batch_size=16 is larger than the 8"):
        train.train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_progressive_resizing_trains_each_stage_on_its_crop_size(tmp_path, monkeypatch):
    config = tiny_config()
    config.data.progressive_sizes, config.data.progressive_until = (24,), (0.5,)
    streams = []

    def recording_train_batches(*args, **kwargs):
        streams.append((kwargs["image_size"], kwargs["start_step"]))
        return plain_train_batches(*args, **kwargs)

    plain_train_batches = pipeline.train_batches
    monkeypatch.setattr(pipeline, "train_batches", recording_train_batches)
    summary = train.train_and_evaluate(config, tmp_path)
    assert streams == [(24, 0), (32, 2)]  # steps 1-2 at 24 px, steps 3-4 at 32 px
    assert 0.0 <= summary["dice"] <= 1.0
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2, 4]


def test_augmentation_on_the_device_trains_each_stage_from_its_step(tmp_path, monkeypatch):
    config = tiny_config()
    config.augment.on_device, config.augment.device_max_side = True, 40
    config.data.progressive_sizes, config.data.progressive_until = (24,), (0.5,)
    streams, shapes = [], []

    def recording_train_batches(packed, *args, **kwargs):
        streams.append((kwargs["image_size"], kwargs["start_step"]))
        for batch in plain_train_batches(packed, *args, **kwargs):
            shapes.append((packed.images.shape, batch["image"].shape))
            yield batch

    plain_train_batches = device_augment.train_batches
    monkeypatch.setattr(device_augment, "train_batches", recording_train_batches)
    monkeypatch.setattr(pipeline, "train_batches", None)  # the tf.data path must stay unused
    summary = train.train_and_evaluate(config, tmp_path)
    assert streams == [(24, 0), (32, 2)]
    assert [image for _, image in shapes] == [(4, 24, 24, 3)] * 2 + [(4, 32, 32, 3)] * 2
    assert all(packed == (8, 40, 40, 3) for packed, _ in shapes)  # 48 px images shrunk to 40
    assert 0.0 <= summary["dice"] <= 1.0
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2, 4]


def test_eval_without_training_uses_config_model_pretrained(tmp_path):
    """An imported model (here: a random one saved as .msgpack) is evaluated as it is."""
    config = tiny_config()
    model = models.build_model(config.model)
    state = steps.create_train_state(jax.random.PRNGKey(7), model, 32, optax.identity())
    variables = steps.inference_variables(state)
    convert.save_variables(variables, tmp_path / "imported.msgpack")
    config.model.pretrained = str(tmp_path / "imported.msgpack")
    config.eval.split = "val"

    summary = evaluate.evaluate(config, tmp_path / "workdir")

    assert summary["weights"] == config.model.pretrained and summary["step"] == 0
    saved = json.loads((tmp_path / "workdir" / "eval_val.json").read_text())
    assert saved["dice"] == summary["dice"]
    _, predict = steps.jit_steps(config)
    expected = evaluate.score_examples(
        predict, state, sources.load_examples(config, "val"), 32, 4
    ).summary
    np.testing.assert_allclose(summary["dice"], expected["dice"])


# Non-finite steps and config changes: the loop's logic, on a model that compiles in a second.


@pytest.fixture
def pixel_net(monkeypatch):
    monkeypatch.setattr(train.models, "build_model", lambda model_config: TinyNet(dropout=0.5))


def nan_image_at(monkeypatch, bad_step: int) -> None:
    """Makes train step ``bad_step`` see a NaN pixel (so a non-finite loss)."""
    jit_steps = steps.jit_steps

    def faulty_jit_steps(*args, **kwargs):
        train_step, *others = jit_steps(*args, **kwargs)

        def faulty_train_step(state, batch):
            if int(state.step) + 1 == bad_step:
                image = jnp.asarray(batch["image"], jnp.float32).at[0, 0, 0, 0].set(jnp.nan)
                batch = dict(batch, image=image)
            return train_step(state, batch)

        return (faulty_train_step, *others)

    monkeypatch.setattr(steps, "jit_steps", faulty_jit_steps)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_changed_config_stops_before_any_work(tmp_path):
    config = tiny_config()
    train.write_config(config, tmp_path)
    with checkpoints.latest_manager(tmp_path) as manager:
        checkpoints.save(manager, 2, {"step": np.int32(2)})
    before = snapshot(tmp_path)
    config.train.num_steps = 6
    config.optim.learning_rate = 0.02
    config.eval.batch_size = 2  # may change: not listed
    config.train.log_every_steps = 1

    with pytest.raises(config_checks.ConfigError) as error:
        train.train_and_evaluate(config, tmp_path)

    assert str(error.value) == (
        f"The workdir {tmp_path} was trained with another config ({tmp_path}/config.json): "
        "optim.learning_rate: 0.01 -> 0.02; train.num_steps: 4 -> 6. Use another workdir, "
        "or pass --config.train.allow_config_change=True to go on with the new values."
    )
    assert snapshot(tmp_path) == before and not list(tmp_path.glob("events.*"))


def test_the_last_step_off_the_schedules_is_validated_logged_and_saved(
    tmp_path, pixel_net, monkeypatch, caplog
):
    """3 steps, validated and logged every 2, saved every step: step 3 is validated and logged
    too; a checkpoint between logs keeps the loss since the last one, one at a log step none;
    and each best model is committed before the train state of its step."""
    events = []
    save, check = checkpoints.save, checkpoints.check

    def recording_save(manager, step, *args, **kwargs):
        events.append(("save", manager.directory.name, step))
        return save(manager, step, *args, **kwargs)

    def recording_check(manager, wait=False):
        events.append(("check", manager.directory.name, wait))
        return check(manager, wait)

    monkeypatch.setattr(checkpoints, "save", recording_save)
    monkeypatch.setattr(checkpoints, "check", recording_check)
    config = tiny_config()
    config.train.num_steps, config.train.checkpoint_every_steps = 3, 1
    config.train.keep_checkpoints = 3
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, tmp_path)
    assert "[3] val_dice" in caplog.text and "[3] learning_rate" in caplog.text
    with checkpoints.latest_manager(tmp_path, read_only=True) as manager:
        assert manager.all_steps() == [1, 2, 3]
        assert checkpoints.step_metadata(manager, 1)["train_loss_count"] == 1
        assert checkpoints.step_metadata(manager, 2) == checkpoints.step_metadata(manager, 3) == {}
    best_saves = [i for i, event in enumerate(events) if event[:2] == ("save", "best")]
    assert best_saves
    for i in best_saves:
        state_save = events.index(("save", "checkpoints", events[i][2]))
        assert ("check", "best", True) in events[i:state_save]


def test_the_logged_loss_is_the_mean_since_the_last_log(tmp_path, pixel_net, monkeypatch):
    """Logged every 2 steps, step 4's loss is the mean of steps 3 and 4 as logged every step."""
    logged = {}
    create = train.metric_writers.create_default_writer

    def recording(workdir, *args, **kwargs):
        writer = create(workdir, *args, **kwargs)
        write = writer.write_scalars

        def write_scalars(step, scalars):
            if "train_loss" in scalars:
                logged.setdefault(Path(workdir).name, {})[step] = float(scalars["train_loss"])
            write(step, scalars)

        writer.write_scalars = write_scalars
        return writer

    monkeypatch.setattr(train.metric_writers, "create_default_writer", recording)
    for name, every in (("each", 1), ("pairs", 2)):
        config = tiny_config()
        config.train.log_every_steps = every
        train.train_and_evaluate(config, tmp_path / name)
    each, pairs = logged["each"], logged["pairs"]
    assert sorted(pairs) == [2, 4]
    np.testing.assert_allclose(pairs[4], (each[3] + each[4]) / 2, rtol=1e-5)


def test_a_save_that_failed_in_the_background_stops_training_at_the_next_step(
    tmp_path, pixel_net, monkeypatch
):
    make = checkpoints.latest_manager

    def failing_latest(*args, **kwargs):
        manager = make(*args, **kwargs)
        check_for_errors = manager.check_for_errors

        def fail_once_a_step_is_saved():
            if manager.all_steps():
                raise OSError(28, "No space left on device")
            check_for_errors()

        manager.check_for_errors = fail_once_a_step_is_saved
        return manager

    monkeypatch.setattr(checkpoints, "latest_manager", failing_latest)
    config = tiny_config()
    config.train.checkpoint_every_steps = 1
    with pytest.raises(checkpoints.UnwritableError, match="No space left on device"):
        train.train_and_evaluate(config, tmp_path)
    with make(tmp_path, read_only=True) as manager:
        assert manager.all_steps() == [1]


def test_a_config_saved_with_no_checkpoint_is_replaced(tmp_path):
    """A run that saved nothing (say, its first step was not finite) binds no later run."""
    config = tiny_config()
    train.write_config(config, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    config.optim.learning_rate = 0.001
    train.check_saved_config(config, tmp_path)  # no ConfigError


def test_best_holds_the_step_of_the_highest_validation_dice(tmp_path, pixel_net, monkeypatch):
    """Validation scores 0.3, 0.6, then 0.6 again (at steps 2, 4, 6): best/ is replaced by
    step 4's model, and step 6's, only as good, does not replace it."""
    scripted, real = [0.3, 0.6, 0.6], evaluate.score_examples

    def score_examples(*args, **kwargs):
        scores = real(*args, **kwargs)
        return dataclasses.replace(scores, summary=scores.summary | {"dice": scripted.pop(0)})

    monkeypatch.setattr(evaluate, "score_examples", score_examples)
    config = tiny_config()
    config.train.num_steps = 6
    train.train_and_evaluate(config, tmp_path)
    assert not scripted
    best = checkpoints.best_manager(tmp_path)
    assert (best.best_step(), checkpoints.best_score(best)) == (4, 0.6)


def test_nonfinite_step_stops_naming_it_and_leaves_best_untouched(tmp_path, pixel_net, monkeypatch):
    config = tiny_config()
    config.train.num_steps = 2
    train.train_and_evaluate(config, tmp_path)
    best_before = snapshot(tmp_path / "best")
    assert list(checkpoints.best_manager(tmp_path).all_steps()) == [2]
    nan_image_at(monkeypatch, 4)  # a step to log, validate and save: none of it happens
    config.train.num_steps = 6
    config.train.allow_config_change = True

    with pytest.raises(steps.NonFiniteError) as error:
        train.train_and_evaluate(config, tmp_path)

    assert str(error.value) == (
        "Non-finite loss, gradient or update at step 4: stopped without saving it or any "
        "later step (newest checkpoint: step 2). Lower the learning rate (and resume with "
        "--config.train.allow_config_change=True), or pass "
        "--config.train.skip_nonfinite=True to skip such steps."
    )
    assert snapshot(tmp_path / "best") == best_before
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2]
    # allow_config_change let it run with the new config.
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 6


def test_skip_nonfinite_skips_the_bad_step_and_goes_on(tmp_path, pixel_net, monkeypatch, caplog):
    nan_image_at(monkeypatch, 3)
    config = tiny_config()
    config.train.skip_nonfinite = True
    config.train.log_every_steps = 1  # step 3's window holds the bad step alone

    with caplog.at_level(logging.INFO):
        summary = train.train_and_evaluate(config, tmp_path)

    assert "Step 3: non-finite loss, gradient or update; skipped (1 so far)." in caplog.text
    assert "train_skipped_steps=1" in caplog.text  # the count logged at step 4
    rate = steps.learning_rate_schedule(config.optim, 4)(2)  # step 4 is the 3rd update
    assert f"[4] learning_rate={float(rate)}," in caplog.text
    assert "train_loss=nan" not in caplog.text  # the mean loss leaves the bad step out
    rate = steps.learning_rate_schedule(config.optim, 4)(2)  # step 3's, though skipped
    assert f"[3] learning_rate={float(rate)}," in caplog.text
    assert "[3] train_loss" not in caplog.text
    assert np.isfinite(summary["loss"])
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2, 4]

    # Resumed, it still counts the skipped step, and so logs the rate the optimizer uses.
    caplog.clear()
    config.train.num_steps, config.train.allow_config_change = 6, True
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, tmp_path)
    assert "train_skipped_steps=1" in caplog.text
    rate = steps.learning_rate_schedule(config.optim, 6)(4)  # step 6 is the 5th update
    assert f"[6] learning_rate={float(rate)}," in caplog.text


def test_a_second_ctrl_c_stops_at_once_a_repeated_sigterm_does_not():
    """The first SIGINT or SIGTERM asks for a checkpoint and a clean stop. Ctrl-C again does
    not wait for it; a SIGTERM sent again (forwarded, resent) still lets it checkpoint."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with train.stop_requests() as should_stop:
        assert not should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs in the main thread, between bytecodes
        assert should_stop(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    assert {s: signal.getsignal(s) for s in before} == before  # restored


def test_a_stop_asked_for_during_an_evaluation_stops_at_its_step(tmp_path, monkeypatch, caplog):
    """SIGTERM while step 2 is validated: step 2 is saved and training stops there, not after
    another step. The rerun has one step left, and still logs its progress line; a SIGTERM
    while that last step is validated does not call the complete run stopped (it did, and
    said that the same command resumes it)."""
    score_examples = evaluate.score_examples

    def score_then_terminate(*args, **kwargs):
        scores = score_examples(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return scores

    monkeypatch.setattr(evaluate, "score_examples", score_then_terminate)
    config = tiny_config()
    config.train.num_steps = 3
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, tmp_path)
    assert "Stopped at step 2; the same command resumes from it." in caplog.text
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, tmp_path)
    assert re.search(r"100\.0% \(3/3\)", caplog.text)  # clu's first call alone logs nothing
    assert "Stopped at step" not in caplog.text
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2, 3]


def test_the_events_writer_of_several_processes_is_closed_after_its_error():
    """Process 0's writer of a multi-process run drops writes after its first error, but its
    ``close`` still closes the writer under it (its thread pool and event files)."""
    calls = []

    class FailingWriter:
        def write_scalars(self, step, scalars):
            calls.append("write")
            raise asynclib.AsyncError("Error occurred ASYNCHRONOUSLY.")

        def close(self):
            calls.append("close")
            raise asynclib.AsyncError("the same error again")

    writer = train.StopOnWriteError(FailingWriter())
    with train.stop_requests() as should_stop:  # its SIGTERM asks this process to stop
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 1.0})  # dropped
        writer.close()
        time.sleep(0.1)  # the handler runs in the main thread, between bytecodes
        assert should_stop(2)
    assert calls == ["write", "close"] and isinstance(writer.error, asynclib.AsyncError)


def interrupt_after_loading(monkeypatch) -> None:
    """Makes the training set's load end with a Ctrl-C (SIGINT): training stops before step 1."""
    load_examples = sources.load_examples

    def load_then_interrupt(config, split, *args, **kwargs):
        examples = load_examples(config, split, *args, **kwargs)
        if split == "train":  # once: a second request would stop at once
            os.kill(os.getpid(), signal.SIGINT)
        return examples

    monkeypatch.setattr(sources, "load_examples", load_then_interrupt)


def test_a_stop_requested_before_the_first_step_trains_nothing(tmp_path, monkeypatch, caplog):
    """Ctrl-C while the data load or the model is made: stopped before step 1, no traceback."""
    interrupt_after_loading(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert train.train_and_evaluate(tiny_config(), tmp_path) == {}
    assert "SIGINT received" in caplog.text and "Stopped before step 1" in caplog.text
    assert checkpoints.latest_manager(tmp_path).all_steps() == []


def test_a_stage_without_steps_a_larger_crop_and_a_warmup_past_the_end_are_warned_about(
    tmp_path, monkeypatch, caplog
):
    interrupt_after_loading(monkeypatch)  # the warnings come before step 1
    config = tiny_config()
    config.data.progressive_sizes, config.data.progressive_until = (24, 40), (0.1, 0.5)
    config.optim.warmup_steps = 4
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, tmp_path)
    assert "The 24 px stage has no step: 4 steps are too few for it." in caplog.text
    assert "data.progressive_sizes [40] are not below data.image_size=32" in caplog.text
    assert "optim.warmup_steps=4 is not below the run's 4 steps" in caplog.text


@pytest.mark.parametrize(
    "failing, kept",
    [
        ("train_loss", [2, 3]),  # step 3 (no evaluation) is saved before stopping
        ("learning_rate@4", [2]),  # step 4's evaluation did not run: a resume repeats it
        ("val_dice", [2, 4]),  # step 4's evaluation ended (its best model kept): saved
        ("train_loss+full", [2]),  # step 3's save fails too: logged, the events' error stands
    ],
)
def test_events_that_cannot_be_written_stop_with_one_error_and_keep_the_steps(
    tmp_path, monkeypatch, caplog, failing, kept
):
    """clu's writer raises a failed write (a full disk) at its next use, wrapped in AsyncError:
    training saves the step it is at where it can, then stops with an OSError naming the
    events. Steps 1-4, evaluated at 2 and 4; the writer fails from step 3 (``failing``: the
    scalar whose write fails, from its step on)."""
    create = train.metric_writers.create_default_writer
    key, _, at = failing.partition("+")[0].partition("@")

    def full_disk(*args, **kwargs):
        writer = create(*args, **kwargs)
        write_scalars = writer.write_scalars

        def write(step, scalars):
            if step >= int(at or 3) and key in scalars:
                error = asynclib.AsyncError("Error occurred ASYNCHRONOUSLY.")
                error.__cause__ = OSError(28, "No space left on device")
                raise error
            write_scalars(step, scalars)

        writer.write_scalars = write
        return writer

    monkeypatch.setattr(train.metric_writers, "create_default_writer", full_disk)
    if failing.endswith("+full"):
        save = checkpoints.save

        def save_until_step_3(manager, step, *args, **kwargs):
            if step >= 3:
                raise checkpoints.UnwritableError("Cannot write a checkpoint under ... (full)")
            save(manager, step, *args, **kwargs)

        monkeypatch.setattr(train.checkpoints, "save", save_until_step_3)
    config = tiny_config()
    config.train.log_every_steps = 1
    with pytest.raises(OSError) as error, caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, tmp_path)
    assert str(error.value).startswith(
        f"Cannot write the TensorBoard events in {tmp_path} ([Errno 28] No space left on device)."
    )
    with checkpoints.latest_manager(tmp_path, read_only=True) as manager:
        assert manager.all_steps() == kept
        if kept[-1] == 3:  # a log step: its loss was logged (or lost with the events)
            assert checkpoints.step_metadata(manager, 3) == {}
    if failing.endswith("+full"):
        assert "Step 3 could not be saved either: Cannot write a checkpoint" in caplog.text
    elif kept[-1] > 2:
        assert f"Saved step {kept[-1]} before stopping." in caplog.text


def test_a_missing_val_file_is_found_before_the_training_images_are_decoded(tmp_path, monkeypatch):
    """It was found after every training image had been decoded (22 s for Figaro1k's)."""
    root = tmp_path / "Figaro1k"
    for i, name in enumerate(["Frame00001", "Frame00002"]):
        write_frame(root, name, random_image(seed=i), pbm=random_mask(seed=i))
    lists = {"train": [entry("Frame00001"), entry("Frame00002")], "val": [entry("Frame00003")]}
    (root / "train_val_test.json").write_text(json.dumps(lists | {"test": []}))
    config = tiny_config()
    config.data.dataset, config.data.data_dir, config.train.batch_size = "figaro1k", str(root), 2

    def decode(*args):
        raise AssertionError("a training image was decoded before val's files were found")

    monkeypatch.setattr(figaro1k, "read_example", decode)
    with pytest.raises(figaro1k.DataError, match="split 'val'.*Frame00003-org.jpg does not"):
        train.train_and_evaluate(config, tmp_path / "w")


def test_a_checkpoint_that_cannot_resume_leaves_the_workdir_as_it_was(tmp_path, pixel_net):
    """Its metadata was read after config.json had been rewritten and an event file made, so
    the next run was refused for a config that never trained."""
    config = tiny_config()
    train.train_and_evaluate(config, tmp_path)
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").unlink()
    before = snapshot(tmp_path)
    config.train.num_steps, config.optim.learning_rate = 6, 0.5
    config.train.allow_config_change = True
    with pytest.raises(checkpoints.UnreadableError, match="_CHECKPOINT_METADATA"):
        train.train_and_evaluate(config, tmp_path)
    assert snapshot(tmp_path) == before


def test_a_workdir_missing_its_train_states_best_model_or_config_is_warned_about(
    tmp_path, pixel_net, caplog
):
    """Each was silent: training started over beside the best model, chose the best among
    later evaluations only, or took any config."""
    config = tiny_config()
    train.train_and_evaluate(config, tmp_path)
    config.train.num_steps, config.train.allow_config_change = 6, True
    with caplog.at_level(logging.WARNING):
        (tmp_path / "config.json").unlink()
        shutil.rmtree(tmp_path / "best")
        train.train_and_evaluate(config, tmp_path)
        shutil.rmtree(tmp_path / "checkpoints")
        config.train.num_steps = 8
        train.train_and_evaluate(config, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if not w.startswith("Config changed")][:3] == [
        f"{tmp_path} holds checkpoints but no config.json: this run's config cannot be checked "
        "against the one they were trained with.",
        f"{tmp_path / 'best'} holds no model although training resumes from step 4, past "
        "evaluations: the best model is chosen among the evaluations from here on.",
        f"{tmp_path / 'best'} holds a best model (step 6) but checkpoints/ no train state to "
        "resume from: training starts over from step 1, and its evaluations may replace that "
        "model.",
    ]
