"""Evaluation at each image's original resolution: Dice, IoU, pixel accuracy, BCE."""

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from PIL import Image

from hairseg_jax import checkpoints, metrics, models, sharding, steps
from hairseg_jax.data import pipeline, sources
from hairseg_jax.data.examples import Examples
from hairseg_jax.weights import convert


def resize_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly resizes a float (h, w) logit map to (height, width)."""
    return np.asarray(
        Image.fromarray(logits.astype(np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )


def full_resolution_logits(
    predict_fn: Callable,
    state: steps.TrainState,
    examples: Examples,
    image_size: int,
    batch_size: int,
    mesh: Mesh | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (index, logits at the image's own size) for every example, in order.

    Whole images are resized to ``image_size`` squares and batched (one compiled shape);
    the logits are resized back to each image's original height and width on the host.
    Every process reads every batch and gets every logit; the devices of ``mesh`` (default:
    all) share each batch, whose size is rounded up to a multiple of their number.
    """
    mesh = sharding.data_mesh() if mesh is None else mesh
    batch_size = sharding.padded_batch_size(batch_size, mesh)
    for batch in pipeline.eval_batches(examples, batch_size, image_size):
        images = sharding.shard_batch(batch["image"], mesh, whole=True)
        logits = np.asarray(jax.device_get(predict_fn(state, images)))[..., 0]
        for index, image_logits in zip(batch["index"], logits, strict=True):
            if index >= 0:
                yield int(index), resize_logits(image_logits, *examples.masks[index].shape)


def evaluate_examples(
    predict_fn: Callable,
    state: steps.TrainState,
    examples: Examples,
    image_size: int,
    batch_size: int,
    threshold: float = 0.5,
    mesh: Mesh | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Scores predictions against the original-resolution masks, predicted on ``mesh``.

    Returns:
      The summary (mean and pooled Dice/IoU, accuracy, mean BCE loss) and one row per image.
    """
    logit_threshold = np.log(threshold / (1 - threshold))
    rows, counts = [], []
    for index, logits in full_resolution_logits(
        predict_fn, state, examples, image_size, batch_size, mesh
    ):
        mask = examples.masks[index]
        count = metrics.confusion(logits > logit_threshold, mask)
        loss = float(np.mean(np.logaddexp(0.0, logits) - mask * logits))
        counts.append(count)
        height, width = mask.shape
        rows.append(
            {
                "name": examples.names[index],
                "height": height,
                "width": width,
                **metrics.image_scores(count),
                "loss": loss,
            }
        )
    summary = metrics.summarize(counts)
    summary["loss"] = float(np.mean([row["loss"] for row in rows]))
    return summary, rows


def write_report(workdir: Path, split: str, summary: dict, rows: list[dict]) -> None:
    """Writes ``eval_<split>.json`` (summary) and ``eval_<split>.csv`` (per image)."""
    (workdir / f"eval_{split}.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(workdir / f"eval_{split}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_state(
    config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh
) -> tuple[steps.TrainState, str, int]:
    """The state to evaluate, replicated over ``mesh``: ``workdir``'s best checkpoint, else the
    weights of ``config.model.pretrained``.

    Returns:
      The state, a description of the weights and the checkpoint's step (0 for pretrained).
    """
    manager = checkpoints.best_manager(workdir) if (workdir / "best").is_dir() else None
    step = manager and manager.best_step()
    if step is None and not config.model.pretrained:
        raise FileNotFoundError(
            f"No best checkpoint in {workdir / 'best'} and no config.model.pretrained; "
            "train there first."
        )
    model = models.build_model(config.model)
    replicated = sharding.replicated(mesh)
    template = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        steps.variable_shapes(model, config.eval.image_size),
    )
    if step is None:
        weights = config.model.pretrained
        variables = _pretrained_variables(config, model, template)
    else:
        weights = f"step {step} of {manager.directory}"
        variables = checkpoints.restore(manager, step, template)
    state = steps.inference_state(model, variables)
    return sharding.replicate(state, mesh), weights, int(step or 0)


def _pretrained_variables(
    config: ml_collections.ConfigDict, model: nn.Module, template: dict[str, Any]
) -> dict[str, Any]:
    """The variables of ``config.model.pretrained``, loaded against the shapes ``template``.

    What the file does not hold (the head, for a backbone file) is randomly initialised as in
    training; only then is ``model.init`` compiled.
    """
    variables = convert.load_pretrained(config.model.pretrained, template, config.model)
    if not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(variables)):
        return variables
    state = steps.create_train_state(
        jax.random.PRNGKey(config.seed), model, config.eval.image_size, tx=optax.identity()
    )
    return jax.tree.map(
        lambda leaf, fresh: fresh if isinstance(leaf, jax.ShapeDtypeStruct) else leaf,
        variables,
        steps.inference_variables(state),
    )


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Evaluates ``workdir``'s best checkpoint on ``config.eval.split``; writes the reports.

    A workdir without one evaluates the weights of ``config.model.pretrained`` instead (e.g. a
    checkpoint of the original PyTorch project, imported as it is).
    """
    workdir = Path(workdir)
    mesh = sharding.data_mesh()
    state, weights, step = load_state(config, workdir, mesh)
    _, predict_fn = steps.jit_steps(config, mesh)

    split = config.eval.split
    examples = sources.load_examples(config, split, config.eval.max_images)
    summary, rows = evaluate_examples(
        predict_fn,
        state,
        examples,
        config.eval.image_size,
        config.eval.batch_size,
        config.eval.threshold,
        mesh,
    )
    summary.update(
        split=split,
        weights=weights,
        step=step,
        threshold=config.eval.threshold,
        image_size=config.eval.image_size,
    )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_report(workdir, split, summary, rows)
    logging.info(
        "Eval of %s on %s (%d images): Dice %.4f (pooled %.4f), IoU %.4f, accuracy %.4f.",
        weights,
        split,
        summary["num_images"],
        summary["dice"],
        summary["pooled_dice"],
        summary["iou"],
        summary["accuracy"],
    )
    return summary
