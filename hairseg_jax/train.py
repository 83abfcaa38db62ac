"""Training loop: data -> jitted steps -> clu metric writers and orbax checkpoints."""

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from clu import metric_writers, metrics, parameter_overview, periodic_actions

from hairseg_jax import checkpoints, evaluate, models, sharding, steps
from hairseg_jax.data import pipeline, sources
from hairseg_jax.weights import convert


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")


def load_pretrained(
    state: steps.TrainState, model_config: ml_collections.ConfigDict
) -> steps.TrainState:
    """``state`` with the weights named by ``model_config.pretrained`` (see
    ``hairseg_jax.weights.convert.load_pretrained``), its EMA (if kept) starting from them and
    a fresh optimizer state."""
    variables = convert.load_pretrained(
        model_config.pretrained,
        {"params": state.params, "batch_stats": state.batch_stats},
        model_config,
    )
    logging.info("Loaded pretrained weights from %s.", model_config.pretrained)
    params = variables["params"]
    return state.replace(
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=state.tx.init(params),
        ema_params=None if state.ema_params is None else jax.tree.map(jnp.copy, params),
    )


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (preemption, Ctrl-C) while the block runs."""
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        logging.warning(
            "%s received: checkpointing after this step, then stopping.",
            signal.Signals(signum).name,
        )
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains with periodic validation and checkpoints; resumes from ``workdir`` if possible.

    The global batch of ``config.train.batch_size`` is split over every device of every
    process; only process 0 writes the config and metrics (orbax coordinates the
    checkpoint writes of all processes).

    Returns:
      The validation summary of the last evaluation.

    Raises:
      sharding.ShardingError: the batch size does not divide by the number of devices.
    """
    mesh = sharding.data_mesh()
    batch_size = config.train.batch_size
    sharding.check_batch_size(batch_size, mesh, "config.train.batch_size")
    train_data = sources.load_examples(config, "train", config.data.max_train_images)
    val_data = sources.load_examples(config, "val", config.data.max_val_images)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

    steps_per_epoch = len(train_data) // batch_size
    total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
    eval_every = config.train.eval_every_steps or steps_per_epoch
    logging.info(
        "%d train / %d val images, %d steps of batch %d (%.1f epochs) on %d devices of %d "
        "processes.",
        len(train_data),
        len(val_data),
        total_steps,
        batch_size,
        total_steps / max(steps_per_epoch, 1),
        mesh.size,
        jax.process_count(),
    )

    model = models.build_model(config.model)
    schedule = steps.learning_rate_schedule(config.optim, total_steps)
    state = steps.create_train_state(
        jax.random.PRNGKey(config.seed),
        model,
        config.data.image_size,
        steps.create_optimizer(config.optim, schedule),
        ema=config.train.ema_decay > 0,
    )
    if config.model.get("pretrained"):
        state = load_pretrained(state, config.model)
    parameter_overview.log_parameter_overview(state.params)
    state = sharding.replicate(state, mesh)

    latest = checkpoints.latest_manager(workdir, config.train.keep_checkpoints)
    best = checkpoints.best_manager(workdir)
    if latest.latest_step() is not None:
        state = checkpoints.restore(latest, latest.latest_step(), state)
        logging.info("Resumed from step %d of %s.", int(state.step), latest.directory)
    start_step = int(state.step)

    train_step, predict_step = steps.jit_steps(config, mesh)
    batches = pipeline.train_batches(
        train_data,
        batch_size,
        config.data.image_size,
        config.augment,
        config.seed,
        start_step,
        jax.process_index(),
        jax.process_count(),
    )
    report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    train_metrics = None
    val_summary = {}
    with metric_writers.ensure_flushes(writer), stop_requests() as stop:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.shard_batch(next(batches), mesh)
                state, step_metrics = train_step(state, batch)
            update = TrainMetrics.single_from_model_output(**step_metrics)
            train_metrics = update if train_metrics is None else train_metrics.merge(update)
            report_progress(step)

            if step % config.train.log_every_steps == 0 or step == total_steps:
                writer.write_scalars(
                    step,
                    {f"train_{k}": v for k, v in train_metrics.compute().items()}
                    | {"learning_rate": schedule(step - 1)},
                )
                train_metrics = None

            if step % eval_every == 0 or step == total_steps:
                with report_progress.timed("eval"):
                    val_summary, _ = evaluate.evaluate_examples(
                        predict_step,
                        state,
                        val_data,
                        config.eval.image_size,
                        config.eval.batch_size,
                        config.eval.threshold,
                        mesh,
                    )
                writer.write_scalars(
                    step,
                    {f"val_{k}": val_summary[k] for k in ("loss", "dice", "pooled_dice", "iou")},
                )
                checkpoints.save(latest, step, state)
                if val_summary["dice"] > checkpoints.best_score(best):
                    checkpoints.save(
                        best,
                        step,
                        steps.inference_variables(state),
                        metrics={checkpoints.BEST_METRIC: val_summary["dice"]},
                    )
            if stop.is_set():
                if latest.latest_step() != step:
                    checkpoints.save(latest, step, state)
                logging.warning("Stopped at step %d; the same command resumes from it.", step)
                break
    latest.wait_until_finished()
    best.wait_until_finished()
    return val_summary
