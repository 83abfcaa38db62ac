"""Training loop: data -> jitted steps -> clu metric writers and orbax checkpoints."""

import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from clu import asynclib, metric_writers, metrics, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hairseg_jax import checkpoints, config_checks, evaluate, files, models, sharding, steps
from hairseg_jax.data import device_augment, pipeline, sources
from hairseg_jax.weights import convert


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")  # over the steps whose "mask" is True


def loss_window(train_metrics: TrainMetrics | None) -> dict[str, Any]:
    """The train loss's sum and count since the last log, for a checkpoint's metadata: a run
    resumed from it logs the mean a run never stopped logs (``resumed_loss_window``)."""
    if train_metrics is None:
        return {}
    loss = train_metrics.loss
    return {"train_loss_total": float(loss.total), "train_loss_count": int(loss.count)}


def resumed_loss_window(metadata: dict[str, Any]) -> TrainMetrics | None:
    """The train loss since the last log, from a checkpoint's metadata (``loss_window``)."""
    if "train_loss_count" not in metadata:  # a log step, or a checkpoint saved before them
        return None
    return TrainMetrics.empty().replace(
        loss=metrics.Average(
            total=jnp.float32(metadata["train_loss_total"]),
            count=jnp.int32(metadata["train_loss_count"]),
        )
    )


def check_saved_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Raises ConfigError if ``workdir/config.json`` differs from ``config`` in fields that
    matter (see ``config_checks.config_changes``), unless ``config.train.allow_config_change``
    or no checkpoint was saved in ``workdir``.
    """
    saved = config_checks.saved_config(workdir)
    if saved is None:
        if checkpoints.holds_checkpoints(workdir):
            logging.warning(
                "%s holds checkpoints but no config.json: this run's config cannot be checked "
                "against the one they were trained with.",
                workdir,
            )
        return
    saved_path = workdir / "config.json"
    changes = config_checks.config_changes(saved, config)
    if not changes:
        return
    if not checkpoints.holds_checkpoints(workdir):  # e.g. a first step that was not finite
        logging.info("Replacing %s: no checkpoint was saved with it.", saved_path)
        return
    if config.train.allow_config_change:
        logging.warning("Config changed from %s (allowed): %s.", saved_path, "; ".join(changes))
        return
    raise config_checks.ConfigError(
        f"The workdir {workdir} was trained with another config ({saved_path}): "
        + "; ".join(changes)
        + ". Use another workdir, or pass --config.train.allow_config_change=True to go on "
        "with the new values."
    )


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes ``workdir/config.json`` atomically."""
    files.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")


def resumed_state(
    config: ml_collections.ConfigDict,
    workdir: Path,
    manager: ocp.CheckpointManager,
    step: int,
    state: steps.TrainState,
) -> steps.TrainState:
    """``state`` restored from ``manager``'s checkpoint at ``step``.

    Raises:
      config_checks.ConfigError: the checkpoint does not fit the model, optimizer or EMA of
        ``config`` (a change passed with ``config.train.allow_config_change``).
    """
    try:
        state = checkpoints.restore(manager, step, state)
    except checkpoints.MismatchError as e:
        weights = f"step {step} of {manager.directory}"
        advice = (
            ", so training cannot resume from it: train with the new settings in another workdir."
        )
        changes_arrays = ("model", "optim.name", "train.ema_decay")
        raise evaluate.misfit(config, workdir, weights, e, advice, changes_arrays) from e
    logging.info("Resumed from step %d of %s.", int(state.step), manager.directory)
    return state


def load_pretrained(
    state: steps.TrainState, config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> steps.TrainState:
    """``state`` restarted (``steps.restarted_state``) from the weights named by
    ``config.model.pretrained`` (see ``hairseg_jax.weights.convert.load_pretrained``),
    replicated over ``mesh`` (default: every device)."""
    variables = convert.load_pretrained(
        config.model.pretrained,
        {"params": state.params, "batch_stats": state.batch_stats},
        config.model,
        config.input,
    )
    logging.info("Loaded pretrained weights from %s.", config.model.pretrained)
    return steps.restarted_state(state, variables, mesh)


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[int], bool]]:
    """While the block runs, a function of the step: whether to checkpoint it and stop.

    One process: after SIGTERM or SIGINT (preemption, Ctrl-C); a second SIGINT raises
    KeyboardInterrupt, a repeated SIGTERM changes nothing. Several processes: at the step that
    JAX's preemption service names after a SIGTERM to any of them, the same on all (one process
    stopping alone would leave the others waiting in the step's all-reduce); a SIGINT is sent
    on as such a SIGTERM, and a second one raises KeyboardInterrupt in that process only.
    """
    if jax.process_count() > 1:
        interrupted = threading.Event()

        def notify_all(signum: int, frame: Any) -> None:
            if interrupted.is_set():  # Ctrl-C twice: this process stops at once
                raise KeyboardInterrupt
            interrupted.set()
            logging.warning(
                "SIGINT received: every process checkpoints one step, then stops (Ctrl-C "
                "again: stop this process at once)."
            )
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells the others

        previous = signal.signal(signal.SIGINT, notify_all)
        try:
            yield multihost_utils.reached_preemption_sync_point
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            if signum == signal.SIGINT:  # Ctrl-C twice: stop at once, saving nothing more
                raise KeyboardInterrupt
            return  # a repeated SIGTERM (forwarded, resent): still checkpoint first
        logging.warning(
            "%s received: checkpointing after this step, then stopping%s.",
            signal.Signals(signum).name,
            " (Ctrl-C again: stop at once)" if signum == signal.SIGINT else "",
        )
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda step: stop.is_set()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopOnWriteError:
    """Process 0's metric writer in a run of several processes. Its first error (TensorBoard's
    events that cannot be written, raised at the writer's next use) is kept in ``error`` and
    sent as a preemption notice (SIGTERM, which JAX's preemption service passes to every
    process), so that all of them save the same step and stop; process 0 alone stopping at
    once would leave the others waiting in the step's all-reduce. Later writes are dropped;
    ``close`` still closes it."""

    def __init__(self, writer: metric_writers.MetricWriter):
        self._writer = writer
        self.error: asynclib.AsyncError | None = None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._writer, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.error is not None:
                if name == "close":  # still closed (its pool and files), its error kept
                    with contextlib.suppress(asynclib.AsyncError):
                        method(*args, **kwargs)
                return None
            try:
                return method(*args, **kwargs)
            except asynclib.AsyncError as e:
                self.error = e
                logging.error(
                    "Cannot write the TensorBoard events (%s): stopping.", e.__cause__ or e
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return None

        return call


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains with periodic validation and checkpoints; resumes from ``workdir`` if possible.

    The global batch of ``config.train.batch_size`` is split over every device of every
    process; only process 0 writes the config and metrics (orbax coordinates the
    checkpoint writes of all processes).

    Returns:
      The validation summary of the last evaluation.

    Raises:
      config_checks.ConfigError: ``workdir`` holds a config.json that differs in fields that
        matter, or the batch is larger than the training set (before anything is written),
        or its newest checkpoint does not fit ``config.model``.
      checkpoints.UnreadableError: its newest checkpoint cannot be read.
      sharding.ShardingError: the batch size does not divide by the number of devices.
      steps.NonFiniteError: a step had a non-finite loss, gradient, update or BatchNorm
        statistic, and ``config.train.skip_nonfinite`` is False; nothing after the step
        before it was saved.
      OSError: a file that cannot be written (a full disk, ...); checkpoints.UnwritableError
        for a checkpoint. The complete checkpoints are kept.
    """
    # From the start: a SIGTERM or Ctrl-C while the data load or the model is made stops
    # before the first step, as cleanly as one during training.
    # The writer and checkpoint managers are closed however the run ends.
    try:
        with stop_requests() as should_stop, contextlib.ExitStack() as closing:
            return _train_and_evaluate(config, Path(workdir), should_stop, closing)
    except asynclib.AsyncError as e:  # the metric writer's, raised at its next use
        cause = e.__cause__ or e
        raise OSError(
            f"Cannot write the TensorBoard events in {workdir} ({cause}). "
            + checkpoints.RESUME_ADVICE
        ) from e


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: Path,
    should_stop: Callable[[int], bool],
    closing: contextlib.ExitStack,
) -> dict:
    """``train_and_evaluate`` under its stop requests; ``closing`` closes what it opens."""
    check_saved_config(config, workdir)
    config_checks.check_folder(workdir, "--workdir")  # made once the data are found usable
    if config.model.get("pretrained") and not checkpoints.holds_checkpoints(workdir):
        # A mistyped name, another backbone's weights or a failed download: before any work.
        convert.check_pretrained(config.model.pretrained, config.model.backbone)
    mesh = sharding.data_mesh()
    batch_size = config.train.batch_size
    sharding.check_batch_size(batch_size, mesh, "config.train.batch_size")
    limits = {"train": config.data.max_train_images, "val": config.data.max_val_images}
    sources.locate_examples(config, limits)  # a missing val file before train's long read
    train_data = sources.load_examples(config, "train", limits["train"])
    val_data = sources.load_examples(config, "val", limits["val"])
    steps_per_epoch = steps.steps_per_epoch(config.train, len(train_data))
    if not steps_per_epoch:
        raise config_checks.ConfigError(
            f"config.train.batch_size={batch_size} is larger than the {len(train_data)} "
            "training images: lower it, or train on more images."
        )
    config_checks.make_folder(workdir, "--workdir")

    total_steps = steps.total_train_steps(config.train, len(train_data))
    eval_every = config.train.eval_every_steps or steps_per_epoch
    checkpoint_every = config.train.checkpoint_every_steps or eval_every
    processes = jax.process_count()
    logging.info(
        "%d train / %d val images, %d steps of batch %d (%.1f epochs) on %d device%s of %d "
        "process%s.",
        len(train_data),
        len(val_data),
        total_steps,
        batch_size,
        total_steps / steps_per_epoch,
        mesh.size,
        "" if mesh.size == 1 else "s",
        processes,
        "" if processes == 1 else "es",
    )

    latest = closing.enter_context(
        checkpoints.closed_after(checkpoints.latest_manager(workdir, config.train.keep_checkpoints))
    )
    best = closing.enter_context(checkpoints.closed_after(checkpoints.best_manager(workdir)))
    resume_step, best_step = latest.latest_step(), best.best_step()
    if resume_step is None and best_step is not None:
        logging.warning(
            "%s holds a best model (step %d) but checkpoints/ no train state to resume from: "
            "training starts over from step 1, and its evaluations may replace that model.",
            best.directory,
            best_step,
        )
    elif resume_step is not None and best_step is None and resume_step >= eval_every:
        logging.warning(
            "%s holds no model although training resumes from step %d, past evaluations: the "
            "best model is chosen among the evaluations from here on.",
            best.directory,
            resume_step,
        )
    # Resuming, only the state's shapes are made (nothing is initialised) to restore into.
    state, schedule = steps.initial_train_state(
        config,
        models.build_model(config.model),
        total_steps,
        mesh,
        abstract=resume_step is not None,
    )
    if resume_step is not None:
        # Read first: a checkpoint that cannot resume stops the run before anything is written.
        resume_metadata = checkpoints.step_metadata(latest, resume_step)
        state = resumed_state(config, workdir, latest, resume_step, state)
    elif config.model.get("pretrained"):  # a resumed run has its weights in the checkpoint
        state = load_pretrained(state, config, mesh)
    start_step = int(state.step)
    if start_step >= total_steps:
        logging.warning(
            "Nothing to train: the checkpoint is at step %d of %d.", start_step, total_steps
        )
        return {}
    # Written after the resume and only when a step will run: a run that cannot resume, or
    # has nothing left to train, leaves config.json as it was, and makes no event file.
    if jax.process_index() == 0:
        write_config(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if jax.process_count() > 1 and jax.process_index() == 0:
        writer = StopOnWriteError(writer)
    closing.callback(writer.close)
    parameter_overview.log_parameter_overview(state.params)

    train_step, predict_step = steps.jit_steps(config, mesh)
    stages = pipeline.size_stages(config.data, total_steps)
    if len(stages) > 1:
        logging.info("Crop side by stage, as (last step, side): %s.", stages)
    for (end, side), (start, _) in zip(stages, [(0, 0), *stages], strict=False):
        if end <= start:
            logging.warning(
                "The %d px stage has no step: %d steps are too few for it.", side, total_steps
            )
    larger = [side for side in config.data.progressive_sizes if side >= config.data.image_size]
    if larger:
        logging.warning(
            "data.progressive_sizes %s are not below data.image_size=%d: progressive resizing "
            "trains smaller crops first.",
            larger,
            config.data.image_size,
        )
    if config.optim.warmup_steps >= total_steps:
        logging.warning(
            "optim.warmup_steps=%d is not below the run's %d steps: the learning rate never "
            "reaches its peak.",
            config.optim.warmup_steps,
            total_steps,
        )
    if config.augment.on_device:  # global batches, drawn on (and split over) the devices
        packed = device_augment.pack(train_data, config.augment.device_max_side)
        batches_from = functools.partial(
            device_augment.train_batches,
            sharding.replicate(packed, mesh),
            batch_size,
            augment_config=config.augment,
            seed=config.seed,
            mesh=mesh,
        )
    else:  # this process's slices of the global batches, on the host
        batches_from = functools.partial(
            pipeline.train_batches,
            train_data,
            batch_size,
            augment_config=config.augment,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    batches = pipeline.staged_batches(stages, start_step, batches_from)
    if not config.augment.on_device:
        batches = (sharding.shard_batch(batch, mesh) for batch in batches)
    report_progress = periodic_actions.ReportProgress(  # a line a minute, and at the end
        num_train_steps=total_steps, writer=writer
    )
    if total_steps - start_step == 1:  # clu's first call only starts its clock (no line)
        report_progress(start_step)
    train_metrics = None  # the loss since the last log: a checkpoint keeps it
    if resume_step is not None:
        train_metrics = resumed_loss_window(resume_metadata)
    val_summary = {}
    unchecked = []  # (step, its "nonfinite" flag on the device) not read yet
    skipped = start_step - steps.optimizer_count(state.opt_state)  # by earlier runs too
    last_skipped = 0  # the newest skipped step

    def check_steps() -> None:
        """Stops at the first bad step among the unchecked ones, or counts them as skipped."""
        nonlocal skipped, last_skipped
        for bad_step, nonfinite in unchecked:
            if not bool(nonfinite):
                continue
            if not config.train.skip_nonfinite:
                latest.wait_until_finished()
                newest = latest.latest_step()
                saved, resume = "none", ""
                if newest is not None:  # resuming with a lower rate changes the config
                    saved = f"step {newest}"
                    resume = " (and resume with --config.train.allow_config_change=True)"
                raise steps.NonFiniteError(
                    f"Non-finite loss, gradient or update at step {bad_step}: stopped without "
                    f"saving it or any later step (newest checkpoint: {saved}). Lower the "
                    f"learning rate{resume}, or pass --config.train.skip_nonfinite=True to skip "
                    "such steps."
                )
            skipped, last_skipped = skipped + 1, bad_step
            logging.warning(
                "Step %d: non-finite loss, gradient or update; skipped (%d so far).",
                bad_step,
                skipped,
            )
        unchecked.clear()

    def is_eval_step(step: int) -> bool:
        return step % eval_every == 0 or step == total_steps

    def is_log_step(step: int) -> bool:
        return step % config.train.log_every_steps == 0 or step == total_steps

    def keep_step_before_stopping(step: int, state: steps.TrainState, evaluated: int) -> None:
        """Saves ``step`` when TensorBoard's events cannot be written, so that stopping loses no
        trained step: not a step whose evaluation did not end (a resume repeats it, and keeps
        a better model it finds), nor with several processes (a save needs them all). A save
        that fails too is logged; the events' error is the one reported."""
        if (is_eval_step(step) and evaluated != step) or jax.process_count() > 1:
            return
        check_steps()  # a bad step is not saved (and its error is reported instead)
        window = {} if is_log_step(step) else loss_window(train_metrics)
        try:
            checkpoints.save(latest, step, state, custom_metadata=window)
            checkpoints.check(latest, wait=True)
        except checkpoints.UnwritableError as e:
            logging.error("Step %d could not be saved either: %s", step, e)
            return
        logging.warning("Saved step %d before stopping.", step)

    if should_stop(start_step):
        logging.warning("Stopped before step %d; the same command starts it.", start_step + 1)
        return val_summary
    step, evaluated = start_step, start_step  # evaluated: the last step whose evaluation ended
    try:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                # The progress line's "input" share: time the loop waited for batches (large when
                # tf.data cannot feed the accelerator; augment.on_device=True then helps).
                with report_progress.timed("input", wait_jax_async_dispatch=False):
                    batch = next(batches)
                state, step_metrics = train_step(state, batch)
            check_steps()  # the previous step's flag, read while this step runs
            checkpoints.check(latest)  # a save that failed in the background stops the run now
            unchecked.append((step, step_metrics["nonfinite"]))
            update = TrainMetrics.single_from_model_output(
                loss=step_metrics["loss"][None], mask=~step_metrics["nonfinite"][None]
            )
            train_metrics = update if train_metrics is None else train_metrics.merge(update)
            report_progress(step)

            stopping = should_stop(step)
            log_now = is_log_step(step)
            eval_now = is_eval_step(step)
            save_now = eval_now or step % checkpoint_every == 0 or stopping
            if log_now or save_now:
                check_steps()  # nothing is logged or saved past a bad step

            if log_now:
                skip_count = {"train_skipped_steps": skipped} if config.train.skip_nonfinite else {}
                # No mean loss when every step since the last log was skipped (not NaN).
                losses = train_metrics.compute() if train_metrics.loss.count else {}
                writer.write_scalars(
                    step,
                    {f"train_{k}": v for k, v in losses.items()}
                    # The rate the step computed its update with: the optimizer's count
                    # before it, which leaves out the skipped steps before it.
                    | {"learning_rate": schedule(step - 1 - skipped + (last_skipped == step))}
                    | skip_count,
                )
                train_metrics = None

            if eval_now:
                with report_progress.timed("eval"):
                    val_summary = evaluate.score_examples(
                        predict_step,
                        state,
                        val_data,
                        config.eval.image_size,
                        config.eval.batch_size,
                        config.eval.threshold,
                        mesh,
                    ).summary
                if val_summary["dice"] > checkpoints.best_score(best):
                    checkpoints.save(
                        best,
                        step,
                        steps.inference_variables(state),
                        metrics={checkpoints.BEST_METRIC: val_summary["dice"]},
                    )
                    # Committed before the step's train state: a run killed in between (or
                    # while a repeat replaces it) resumes before this step and repeats its
                    # evaluation, so no best is lost.
                    checkpoints.check(best, wait=True)
                evaluated = step
                # A stop asked for during the evaluation stops here, not a step later (one
                # process; several ask JAX's preemption service once a step, all alike).
                stopping = stopping or (jax.process_count() == 1 and should_stop(step))
                writer.write_scalars(
                    step,
                    {f"val_{k}": val_summary[k] for k in ("loss", "dice", "pooled_dice", "iou")},
                )
                if config.eval.preview_images:  # every process predicts, process 0 writes
                    previews = evaluate.preview_panels(
                        predict_step,
                        state,
                        val_data,
                        config.eval.preview_images,
                        config.eval.image_size,
                        config.eval.batch_size,
                        config.eval.threshold,
                        mesh,
                    )
                    if jax.process_index() == 0:
                        writer.write_images(step, {"val_image_truth_prediction": previews})
            if save_now:  # with the loss since the last log, which a resume logs with its own
                checkpoints.save(latest, step, state, custom_metadata=loss_window(train_metrics))
            if stopping and step < total_steps:  # at the last, training is complete
                logging.warning("Stopped at step %d; the same command resumes from it.", step)
                break
    except asynclib.AsyncError:  # TensorBoard's events of an earlier write cannot be written
        keep_step_before_stopping(step, state, evaluated)
        raise
    checkpoints.check(latest, wait=True)  # the last save's failure, if any, before returning
    if isinstance(writer, StopOnWriteError) and writer.error is not None:
        raise writer.error  # once every process saved the step it stopped at
    return val_summary
