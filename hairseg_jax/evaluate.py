"""Evaluation at each image's original resolution: Dice, IoU, pixel accuracy, BCE; test-time
augmentation, threshold tuning, and the report (per hair type, worst images, contact sheet)."""

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from hairseg_jax import (
    checkpoints,
    config_checks,
    files,
    metrics,
    models,
    pictures,
    sharding,
    steps,
)
from hairseg_jax.data import figaro1k, sources, whole_images
from hairseg_jax.data.examples import Examples
from hairseg_jax.weights import convert
from hairseg_jax.weights.tensors import ConversionError

DEFAULT_THRESHOLD = 0.5
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95
THRESHOLD_FILE = "threshold.json"
NUM_WORST = 10
SHEET_BOX = 160  # side of each picture of the contact sheet
PREVIEW_BOX = 128  # side of each picture of the TensorBoard previews


def logit(probability: float) -> np.float64:
    """The logit above which the sigmoid exceeds ``probability``: a float64 scalar, so that
    float32 logits are compared with it in float64, as ``dice_per_threshold`` compares them
    (with a Python float NumPy would round the cut to float32)."""
    return np.log(np.float64(probability) / (1 - np.float64(probability)))


def resize_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly resizes float logits (h, w) or (h, w, c) to (height, width[, c])."""
    if logits.ndim == 3:
        channels = [resize_logits(logits[..., c], height, width) for c in range(logits.shape[-1])]
        return np.stack(channels, axis=-1)
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
    tta_sizes: Sequence[int] = (),
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (index, logits (H, W, C) at the image's own size) for every example, in order.

    Whole images are resized to ``image_size`` squares and batched (one compiled shape);
    the logits are resized back to each image's original height and width on the host. C is
    the number of channels ``predict_fn`` gives: 1, or 2 with the plain logits of a
    test-time augmented step (``steps.tta_logits``). Multi-scale test-time augmentation:
    with ``tta_sizes`` the images are also predicted at each of those sizes, and channel 0
    is the mean of every size's channel 0 at the original resolution (channel 1 stays that
    of ``image_size``). Every process reads every batch and gets every logit; the devices
    of ``mesh`` (default: all) share each batch, whose size is rounded up to a multiple of
    their number.
    """
    mesh = sharding.data_mesh() if mesh is None else mesh
    batch_size = sharding.padded_batch_size(batch_size, mesh)
    streams = [
        whole_images.eval_batches(examples, batch_size, size) for size in (image_size, *tta_sizes)
    ]
    for batches in zip(*streams, strict=True):
        logits = [
            np.asarray(
                jax.device_get(
                    predict_fn(state, sharding.shard_batch(batch["image"], mesh, whole=True))
                )
            )
            for batch in batches
        ]
        for row, index in enumerate(batches[0]["index"]):
            if index < 0:
                continue
            shape = examples.masks[index].shape
            first = resize_logits(logits[0][row], *shape)
            if len(logits) > 1:  # only channel 0 of the other sizes is used: resize only it
                others = [
                    resize_logits(size_logits[row, ..., :1], *shape) for size_logits in logits[1:]
                ]
                mean = np.mean([first[..., :1], *others], axis=0)
                first = np.concatenate([mean, first[..., 1:]], axis=-1)
            yield int(index), first


def dice_per_threshold(
    logits: np.ndarray, mask: np.ndarray, thresholds: Sequence[float] = SWEEP_THRESHOLDS
) -> np.ndarray:
    """The Dice of ``sigmoid(logits) > t`` against ``mask`` for every ascending ``t``.

    One pass: each pixel's number of thresholds below its probability is counted, over all
    pixels and over hair pixels, so every threshold's confusion counts are cumulative sums.
    """
    cuts = np.log(np.asarray(thresholds, np.float64) / (1 - np.asarray(thresholds, np.float64)))
    logits = logits.ravel().astype(np.float64)
    # NaN sorts above every cut; as ``logits > cut`` is False for it, it is below them all.
    levels = np.where(np.isnan(logits), 0, np.searchsorted(cuts, logits, side="left"))
    hair = mask.ravel().astype(bool)
    above = lambda counts: np.cumsum(counts[::-1])[::-1][1:]  # noqa: E731  (count >= i + 1)
    positives = above(np.bincount(levels, minlength=len(cuts) + 1))
    tp = above(np.bincount(levels[hair], minlength=len(cuts) + 1))
    fp, fn = positives - tp, np.count_nonzero(hair) - tp
    denominator = 2 * tp + fp + fn
    return np.where(denominator == 0, 1.0, 2 * tp / np.maximum(denominator, 1))


@dataclasses.dataclass
class Scores:
    """The outcome of ``score_examples``.

    Attributes:
      summary: mean and pooled Dice/IoU/accuracy, mean BCE, ``num_images``; ``no_tta`` (the
        plain logits' scores) under test-time augmentation; ``dice_at_0.5`` and
        ``pooled_dice_at_0.5`` when the threshold is not 0.5.
      rows: one dict per image: name, height, width, dice, iou, accuracy, loss.
      sweep: the mean Dice at each of ``SWEEP_THRESHOLDS`` (None unless asked for).
      worst: (index, predicted 0/1 mask) of the lowest-Dice images, worst first.
    """

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    sweep: np.ndarray | None = None
    worst: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)


def effective_threshold(threshold: float) -> float:
    """``threshold``, or 0.5 where it is <= 0 (config's "tuned if available" before tuning)."""
    return threshold if threshold > 0 else DEFAULT_THRESHOLD


def score_examples(
    predict_fn: Callable,
    state: steps.TrainState,
    examples: Examples,
    image_size: int,
    batch_size: int,
    threshold: float = DEFAULT_THRESHOLD,
    mesh: Mesh | None = None,
    *,
    tta_sizes: Sequence[int] = (),
    sweep: bool = False,
    num_worst: int = 0,
) -> Scores:
    """Scores predictions against the original-resolution masks, predicted on ``mesh``.

    Args:
      predict_fn: a jitted predict step; its channel 0 is scored, and a second channel (the
        plain logits of a test-time augmented step) gives ``summary["no_tta"]``.
      threshold: the probability above which a pixel is hair; <= 0 means 0.5.
      tta_sizes: more sizes whose logits are averaged in (see ``full_resolution_logits``).
      sweep: also compute the mean Dice at each of ``SWEEP_THRESHOLDS``.
      num_worst: keep the predicted masks of this many lowest-Dice images.
    """
    threshold = effective_threshold(threshold)
    cut = logit(threshold)
    rows, counts, plain_counts, half_counts, sweeps, worst = [], [], [], [], [], []
    for index, logits in full_resolution_logits(
        predict_fn, state, examples, image_size, batch_size, mesh, tta_sizes
    ):
        mask = examples.masks[index]
        main = logits[..., 0]
        prediction = main > cut
        count = metrics.confusion(prediction, mask)
        counts.append(count)
        if logits.shape[-1] > 1:
            plain_counts.append(metrics.confusion(logits[..., 1] > cut, mask))
        if threshold != DEFAULT_THRESHOLD:
            half_counts.append(metrics.confusion(main > 0, mask))
        if sweep:
            sweeps.append(dice_per_threshold(main, mask))
        height, width = mask.shape
        row = {
            "name": examples.names[index],
            "height": height,
            "width": width,
            **metrics.image_scores(count),
            "loss": float(np.mean(np.logaddexp(0.0, main) - mask * main)),
        }
        rows.append(row)
        if num_worst:
            worst.append((row["dice"], index, prediction.astype(np.uint8)))
            worst = sorted(worst, key=lambda w: (w[0], w[1]))[:num_worst]
    summary = metrics.summarize(counts)
    summary["loss"] = float(np.mean([row["loss"] for row in rows]))
    if plain_counts:
        plain = metrics.summarize(plain_counts)
        summary["no_tta"] = {k: plain[k] for k in ("dice", "pooled_dice", "iou", "pooled_iou")}
    if half_counts:
        half = metrics.summarize(half_counts)
        summary["dice_at_0.5"], summary["pooled_dice_at_0.5"] = half["dice"], half["pooled_dice"]
    return Scores(
        summary,
        rows,
        np.mean(sweeps, axis=0) if sweep else None,
        [(index, prediction) for _, index, prediction in worst],
    )


def preview_panels(
    predict_fn: Callable,
    state: steps.TrainState,
    examples: Examples,
    count: int,
    image_size: int,
    batch_size: int,
    threshold: float = DEFAULT_THRESHOLD,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """image | true mask | predicted mask of the first ``count`` examples, for TensorBoard:
    uint8 (count, PREVIEW_BOX, 3 * PREVIEW_BOX, 3). Batched like the evaluation, so the
    compiled predict step is reused."""
    subset = examples.take(count)
    cut = logit(effective_threshold(threshold))
    return np.stack(
        [
            pictures.panel(
                subset.images[index], subset.masks[index], logits[..., 0] > cut, PREVIEW_BOX
            )
            for index, logits in full_resolution_logits(
                predict_fn, state, subset, image_size, batch_size, mesh
            )
        ]
    )


def hair_type(name: str) -> str:
    """The Figaro1k hair type of a frame name, "" for other names (e.g. synthetic images)."""
    try:
        return figaro1k.hair_type(name)
    except ValueError:
        return ""


def per_hair_type(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean Dice and IoU and the image count of each hair type present in ``rows``."""
    report = {}
    for kind in figaro1k.HAIR_TYPES:
        typed = [row for row in rows if row["hair_type"] == kind]
        if typed:
            report[kind] = {
                "dice": float(np.mean([row["dice"] for row in typed])),
                "iou": float(np.mean([row["iou"] for row in typed])),
                "num_images": len(typed),
            }
    return report


def predictor_settings(config: ml_collections.ConfigDict, mode: str) -> dict[str, Any]:
    """How ``mode`` ("eval" or "predict") predicts: TTA, extra TTA sizes and input size."""
    if mode == "eval":
        tta, tta_sizes, image_size = config.eval.tta, config.eval.tta_sizes, config.eval.image_size
    else:
        tta, tta_sizes = config.predict.tta, ()
        image_size = config.predict.image_size or config.eval.image_size
    # The sizes' order does not change their average.
    return {"tta": tta, "tta_sizes": sorted(tta_sizes), "image_size": image_size}


def weights_digest(state: steps.TrainState) -> str:
    """A fingerprint of the weights ``state`` predicts with (16 hex digits of a SHA-256):
    tells apart the weights of one step number (two pretrained files, both step 0; a workdir
    trained again)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(steps.inference_variables(state))):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def read_tuned_threshold(
    workdir: Path,
    step: int,
    settings: dict[str, Any],
    digest: Callable[[], str] | None = None,
) -> dict | None:
    """``workdir``'s ``threshold.json`` if it was tuned for the checkpoint of ``step`` (and
    the weights whose ``weights_digest`` ``digest()`` gives, where the file records one;
    called only then) with the predictor ``settings`` (``predictor_settings``; those the file
    records)."""
    path = Path(workdir) / THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        tuned = json.loads(path.read_text())
        threshold, tuned_step = float(tuned["threshold"]), int(tuned["step"])
        if not 0 < threshold < 1:
            raise ValueError(f"threshold {threshold} is not in (0, 1)")
    except (ValueError, KeyError, TypeError) as e:
        logging.warning("Ignoring %s: unreadable (%s).", path, e)
        return None
    if tuned_step != step:
        logging.warning(
            "Ignoring %s: threshold %s tuned for step %d, but the checkpoint is step %d; "
            "rerun eval with --config.eval.tune_threshold=True.",
            path,
            threshold,
            tuned_step,
            step,
        )
        return None
    if digest and "weights_digest" in tuned and tuned["weights_digest"] != digest():
        logging.warning(
            "Ignoring %s: threshold %s tuned for other weights of step %d (%s; another "
            "pretrained file, or a workdir trained again); rerun eval with "
            "--config.eval.tune_threshold=True.",
            path,
            threshold,
            step,
            tuned.get("weights"),
        )
        return None
    tuned_with = {key: tuned[key] for key in settings if key in tuned}
    used_with = {key: settings[key] for key in tuned_with}
    if tuned_with != used_with:
        logging.warning(
            "Ignoring %s: threshold %s tuned with %s, but predicting with %s; rerun eval with "
            "--config.eval.tune_threshold=True and eval.image_size, eval.tta and "
            "eval.tta_sizes set to these.",
            path,
            threshold,
            tuned_with,
            used_with,
        )
        return None
    # A threshold tuned with eval.max_images set fits those images only: say so.
    logging.info(
        "Using threshold %s of %s, tuned on %s %s images.",
        threshold,
        path,
        tuned.get("num_images", "the"),
        tuned.get("split", "val"),
    )
    return tuned


def resolve_threshold(
    configured: float,
    workdir: Path,
    step: int,
    settings: dict[str, Any],
    tuned: dict[str, Any] | None = None,
    digest: Callable[[], str] | None = None,
) -> tuple[float, str]:
    """The threshold to use and where it comes from: ``configured`` if positive ("config"),
    else the one tuned for ``step`` (and ``digest()``'s weights) and the predictor
    ``settings`` (``tuned``, or read from ``workdir``) ("tuned"), else 0.5 ("default")."""
    if configured > 0:
        return float(configured), "config"
    tuned = tuned or read_tuned_threshold(workdir, step, settings, digest)
    if tuned is not None:
        return float(tuned["threshold"]), "tuned"
    return DEFAULT_THRESHOLD, "default"


def scorer(
    config: ml_collections.ConfigDict, state: steps.TrainState, mesh: Mesh
) -> Callable[..., Scores]:
    """``score_examples`` with ``config.eval``'s predict step (its TTA, and the plain logits
    beside them if it has any), sizes and batch bound: call it with the examples (and
    ``threshold``, ``sweep``, ``num_worst``)."""
    tta, tta_sizes = config.eval.tta, tuple(config.eval.tta_sizes)
    predict_fn = steps.jit_predict(
        config, mesh, tta=tta, with_plain=tta != "none" or bool(tta_sizes)
    )
    return functools.partial(
        score_examples,
        predict_fn,
        state,
        image_size=config.eval.image_size,
        batch_size=config.eval.batch_size,
        mesh=mesh,
        tta_sizes=tta_sizes,
    )


def tune_threshold(run: Callable[..., Scores], examples: Examples, split: str) -> dict[str, Any]:
    """The threshold of ``SWEEP_THRESHOLDS`` with the highest mean Dice on ``examples``.

    Args:
      run: ``score_examples`` with its predict step, state and sizes bound (``scorer``).
      examples: the examples to tune on, normally the validation split.
      split: their name, for the record.

    Returns:
      ``{"threshold", "dice", "dice_at_0.5", "split", "num_images", "sweep"}``; ties go to
      the threshold nearest 0.5, then to the lower one.
    """
    scores = run(examples, sweep=True)
    dice = scores.sweep
    half = SWEEP_THRESHOLDS.index(DEFAULT_THRESHOLD)
    # Steps from 0.5 counted on the sweep's indices: as floats, 0.5 - 0.3 > 0.7 - 0.5.
    best = max(range(len(dice)), key=lambda i: (dice[i], -abs(i - half), -i))
    return {
        "threshold": SWEEP_THRESHOLDS[best],
        "dice": float(dice[best]),
        "dice_at_0.5": float(dice[half]),
        "split": split,
        "num_images": len(examples),
        "sweep": {f"{t:.2f}": float(d) for t, d in zip(SWEEP_THRESHOLDS, dice, strict=True)},
    }


def write_report(workdir: Path, split: str, summary: dict, rows: list[dict]) -> None:
    """Writes ``eval_<split>.json`` (summary) and ``eval_<split>.csv`` (per image)."""
    files.write_json(workdir / f"eval_{split}.json", summary)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomically(workdir / f"eval_{split}.csv", table.getvalue())


def worst_contact_sheet(examples: Examples, rows: list[dict], worst: list) -> np.ndarray:
    """image | truth | prediction of each of ``worst`` ((index, predicted mask), worst first),
    captioned with its name, hair type and Dice: uint8 RGB."""
    panels, captions = [], []
    for index, prediction in worst:
        row = rows[index]
        panels.append(
            pictures.panel(examples.images[index], examples.masks[index], prediction, SHEET_BOX)
        )
        captions.append(f"{row['name']} {row['hair_type']} Dice {row['dice']:.3f}")
    return pictures.contact_sheet(panels, captions)


def load_state(
    config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh
) -> tuple[steps.TrainState, str, int]:
    """The state to evaluate, replicated over ``mesh``: ``workdir``'s best checkpoint, else the
    weights of ``config.model.pretrained``.

    Returns:
      The state, a description of the weights and the checkpoint's step (0 for pretrained).

    Raises:
      FileNotFoundError: no best checkpoint and no ``config.model.pretrained``.
      config_checks.ConfigError: the checkpoint does not fit ``config.model``.
      checkpoints.UnreadableError: the checkpoint cannot be read.
      ConversionError: the pretrained file is unreadable or holds only a backbone.
    """
    best = workdir.absolute() / "best"
    step = checkpoints.best_step(workdir)
    if step is None and not config.model.pretrained:
        started = checkpoints.holds_checkpoints(workdir)  # a run stopped before validating
        raise FileNotFoundError(
            f"No best checkpoint in {best} and no config.model.pretrained; "
            + (
                "resume training there until its next validation (a run that trained all its "
                "steps, its best/ since deleted, validates again with more steps: "
                "--config.train.num_steps and --config.train.allow_config_change=True)."
                if started
                else "train there first."
            )
        )
    model = models.build_model(config.model)
    replicated = sharding.replicated(mesh)
    template = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        steps.variable_shapes(model, config.eval.image_size),
    )
    if step is None:
        weights = config.model.pretrained
        variables = _pretrained_variables(config, template)
    else:
        weights = f"step {step} of {best}"
        try:
            variables = checkpoints.restore_best(workdir, step, template)
        except checkpoints.MismatchError as e:
            advice = f". Pass the model settings it was trained with ({workdir / 'config.json'})."
            raise misfit(config, workdir, weights, e, advice) from e
        changed = [  # what only started training, or does not change predictions
            change
            for change in trained_with(config, workdir, ("model", "input"))
            if not change.startswith(("model.pretrained:", "model.dropout:", "model.dtype:"))
        ]
        if changed:  # e.g. another normalisation: it fits, but predicts poorly
            logging.warning(
                "The checkpoint at %s was trained with other settings (%s): %s.",
                weights,
                workdir / "config.json",
                "; ".join(changed),
            )
    state = steps.inference_state(model, variables)
    return sharding.replicate(state, mesh), weights, int(step or 0)


def misfit(
    config: ml_collections.ConfigDict,
    workdir: Path,
    weights: str,
    error: checkpoints.MismatchError,
    advice: str,
    sections: tuple[str, ...] = ("model",),
) -> config_checks.ConfigError:
    """The error for the checkpoint ``weights`` of ``workdir`` that does not fit ``config``'s
    ``sections`` (sections or fields whose change changes the arrays: a train state's are the
    model, ``optim.name`` and ``train.ema_decay``): it names the settings of those that it was
    trained with (else the first array that differs), then ``advice``."""
    changed = trained_with(config, workdir, sections)
    why = f"trained with {'; '.join(changed)}" if changed else str(error)
    fields = " / ".join(f"config.{section}" for section in sections)
    return config_checks.ConfigError(
        f"The checkpoint at {weights} does not fit {fields} ({why}){advice}"
    )


def trained_with(
    config: ml_collections.ConfigDict, workdir: Path, sections: tuple[str, ...]
) -> list[str]:
    """Where ``config``'s ``sections`` (e.g. ``("model", "optim.name")``: sections or fields)
    differ from ``workdir``'s config.json, as "field: trained -> now"; empty if that file is
    missing, unreadable (a warning) or the same there."""
    try:
        saved = config_checks.saved_config(workdir) or {}
    except config_checks.ConfigError as e:
        logging.warning("Not comparing the settings with those trained with: %s", e)
        saved = {}
    changes = config_checks.config_changes(saved, config)  # none against {}
    return [
        change for change in changes if any(change.startswith((f"{s}.", f"{s}:")) for s in sections)
    ]


def _pretrained_variables(config: ml_collections.ConfigDict, template: dict[str, Any]) -> dict:
    """The variables of ``config.model.pretrained``, loaded against the shapes ``template``.

    Raises:
      ConversionError: the file holds only a backbone: its ASPP and decoder would be random.
    """
    variables = convert.load_pretrained(
        config.model.pretrained, template, config.model, config.input
    )
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(variables)):
        raise ConversionError(
            f"config.model.pretrained={config.model.pretrained!r} holds only a backbone, so the "
            "ASPP and decoder would be random: train first and use the workdir's best "
            "checkpoint, or give a whole model (an original project checkpoint)."
        )
    return variables


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Evaluates ``workdir``'s best checkpoint on ``config.eval.split``; writes the reports.

    With ``config.eval.tune_threshold`` the validation split first picks the threshold with
    the highest mean Dice, saved as ``workdir/threshold.json`` for this checkpoint;
    ``config.eval.threshold`` -1 uses it (else 0.5). ``config.eval.tta="flip"`` scores the
    flip-averaged logits, ``config.eval.tta_sizes`` also averages those of other sizes, and
    the plain logits' scores are reported beside them. A workdir without a
    checkpoint evaluates the weights of ``config.model.pretrained`` instead (e.g. a
    checkpoint of the original PyTorch project, imported as it is).
    """
    workdir = Path(workdir)
    split = config.eval.split
    tuned_on = {"val": config.eval.max_images} if config.eval.tune_threshold else {}
    sources.locate_examples(config, tuned_on | {split: config.eval.max_images})
    mesh = sharding.data_mesh()
    state, weights, step = load_state(config, workdir, mesh)
    # Read once, and only where a threshold is tuned or a tuned one is checked.
    digest = functools.cache(functools.partial(weights_digest, state))
    settings = predictor_settings(config, "eval")
    run = scorer(config, state, mesh)
    leader = jax.process_index() == 0
    # By every process, as training does: one stopping alone would leave the others waiting.
    config_checks.make_folder(workdir, "--workdir")

    tuned = None
    if config.eval.tune_threshold:
        val = sources.load_examples(config, "val", config.eval.max_images)
        checkpoint = {"step": step, "weights": weights, "weights_digest": digest()}
        tuned = tune_threshold(run, val, "val") | checkpoint | settings
        if leader:
            files.write_json(workdir / THRESHOLD_FILE, tuned)
        logging.info(
            "Tuned threshold on val (%d images): %.2f, Dice %.4f (%.4f at 0.5); saved in %s.",
            tuned["num_images"],
            tuned["threshold"],
            tuned["dice"],
            tuned["dice_at_0.5"],
            workdir / THRESHOLD_FILE,
        )
        if config.eval.threshold > 0:
            logging.warning(
                "eval.threshold=%s is used as given, not the threshold just tuned (%.2f).",
                config.eval.threshold,
                tuned["threshold"],
            )
    # The tuned record as tuned, not read back: only process 0 writes it.
    threshold, source = resolve_threshold(
        config.eval.threshold, workdir, step, settings, tuned, digest
    )

    examples = sources.load_examples(config, split, config.eval.max_images)
    scores = run(examples, threshold=threshold, num_worst=NUM_WORST)
    rows = scores.rows
    for row in rows:
        row["hair_type"] = hair_type(row["name"])
    summary = scores.summary
    sheet = f"eval_{split}_worst.png"
    summary.update(
        split=split,
        weights=weights,
        step=step,
        threshold=threshold,
        threshold_source=source,
        **settings,
        skipped=list(examples.skipped),  # unreadable: not in these scores
        per_hair_type=per_hair_type(rows),
        worst=[
            {k: rows[index][k] for k in ("name", "hair_type", "dice", "iou")}
            for index, _ in scores.worst
        ],
        contact_sheet=sheet,
    )
    if leader:  # the sheet first: the report never names a sheet that was not written
        pictures.save(workdir / sheet, worst_contact_sheet(examples, rows, scores.worst))
        write_report(workdir, split, summary, rows)
    logging.info(
        "Eval of %s on %s (%d images) at threshold %.2f (%s), TTA %s, sizes %s: Dice %.4f "
        "(pooled %.4f), IoU %.4f, accuracy %.4f.",
        weights,
        split,
        summary["num_images"],
        threshold,
        source,
        settings["tta"],
        (settings["image_size"], *settings["tta_sizes"]),
        summary["dice"],
        summary["pooled_dice"],
        summary["iou"],
        summary["accuracy"],
    )
    if examples.skipped:
        logging.warning(
            "These scores leave out %d unreadable image%s of %s (data.skip_unreadable): %s.",
            len(examples.skipped),
            "" if len(examples.skipped) == 1 else "s",
            split,
            ", ".join(examples.skipped),
        )
    if "dice_at_0.5" in summary:
        logging.info("At threshold 0.5: Dice %.4f.", summary["dice_at_0.5"])
    if "no_tta" in summary:
        logging.info("Without TTA: Dice %.4f.", summary["no_tta"]["dice"])
    if summary["per_hair_type"]:
        logging.info(
            "Dice per hair type: %s.",
            ", ".join(
                f"{kind} {v['dice']:.3f} ({v['num_images']})"
                for kind, v in summary["per_hair_type"].items()
            ),
        )
    logging.info(
        "Worst: %s; contact sheet %s.",
        ", ".join(f"{w['name']} {w['dice']:.3f}" for w in summary["worst"]),
        workdir / sheet,
    )
    return summary
