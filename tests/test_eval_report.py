"""Test-time augmentation, threshold tuning, the eval report and TensorBoard previews, on a
tiny model trained for a few steps on real Figaro1k images."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import figaro
from hairseg_jax import checkpoints, evaluate, pictures, sharding, steps, train
from hairseg_jax.data import sources
from hairseg_jax.data.examples import Examples
from hairseg_jax.data.figaro1k import HAIR_TYPES
from tests.conftest import SHARED_TRAIN_STEP

SIZE = SHARED_TRAIN_STEP["data.image_size"]
PREVIEWS = 2


def tiny_config(figaro_dir: Path):
    """8 steps at 64 px with an EMA: conftest's ``SHARED_TRAIN_STEP``, which test_preemption's
    runs compile into the session's compilation cache."""
    config = figaro.get_config("smoke")  # 16 train, 8 val, 8 test images
    config.data.data_dir = str(figaro_dir)
    config.update_from_flattened_dict(SHARED_TRAIN_STEP)
    config.train.log_every_steps = 4
    config.train.eval_every_steps = 4
    config.eval.preview_images = PREVIEWS
    return config


@pytest.fixture(scope="module")
def trained(figaro_dir, tmp_path_factory) -> Path:
    """A workdir after 8 training steps, validated (and previewed) at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("trained")
    train.train_and_evaluate(tiny_config(figaro_dir), workdir)
    return workdir


@pytest.fixture(scope="module")
def report(trained, figaro_dir) -> dict:
    """``evaluate`` with threshold tuning on val and flip TTA, on 8 test images."""
    config = tiny_config(figaro_dir)
    config.eval.tune_threshold = True
    config.eval.tta = "flip"
    return evaluate.evaluate(config, trained)


@pytest.fixture(scope="module")
def model(trained, figaro_dir) -> dict:
    config = tiny_config(figaro_dir)
    mesh = sharding.data_mesh()
    state, _, step = evaluate.load_state(config, trained, mesh)
    predict = {tta: steps.jit_predict(config, mesh, tta=tta) for tta in steps.TTA_MODES}
    return {"config": config, "mesh": mesh, "state": state, "step": step, "predict": predict}


def scores(model, split: str, tta: str, threshold: float) -> dict:
    predict_fn = model["predict"][tta]
    examples = sources.load_examples(model["config"], split, 8)
    summary = evaluate.score_examples(
        predict_fn,
        model["state"],
        examples,
        SIZE,
        model["config"].eval.batch_size,
        threshold,
        model["mesh"],
    ).summary
    return summary


def test_training_writes_image_truth_prediction_previews(trained):
    previews = []
    for events in trained.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == "val_image_truth_prediction":
                    previews.append((event.step, tf.make_ndarray(value.tensor)))
    assert [step for step, _ in previews] == [4, 8]
    width, height, *pngs = previews[-1][1]
    assert (int(width), int(height), len(pngs)) == (3 * 128, 128, PREVIEWS)
    picture = tf.io.decode_png(pngs[0]).numpy()
    assert picture.shape == (128, 3 * 128, 3)
    truth = picture[:, 128:256]
    assert truth.max() == 255 and truth.min() < 255  # a true mask: some hair, some not


def test_threshold_is_tuned_on_val_and_saved_for_the_checkpoint(trained, report, model):
    tuned = json.loads((trained / evaluate.THRESHOLD_FILE).read_text())
    assert tuned["step"] == model["step"] == checkpoints.best_step(trained)
    assert tuned["weights_digest"] == evaluate.weights_digest(model["state"])
    assert tuned["split"] == "val" and tuned["num_images"] == 8 and tuned["tta"] == "flip"
    assert tuned["tta_sizes"] == [] and tuned["image_size"] == report["image_size"]
    assert tuned["threshold"] in evaluate.SWEEP_THRESHOLDS
    assert tuned["dice"] == max(tuned["sweep"].values()) >= tuned["dice_at_0.5"]
    assert tuned["dice_at_0.5"] == tuned["sweep"]["0.50"]
    # The sweep's Dice is the Dice of a plain evaluation at that threshold.
    at_tuned = scores(model, "val", "flip", tuned["threshold"])
    np.testing.assert_allclose(at_tuned["dice"], tuned["dice"], rtol=1e-12)
    assert [p.name for p in trained.glob(".*.tmp")] == []


def test_the_best_checkpoint_holds_the_weights_that_scored_its_dice(trained, model):
    """With an EMA, best/ holds the averaged weights, which validation scored."""
    with checkpoints.best_manager(trained, read_only=True) as best:
        recorded = best.metrics(best.best_step())[checkpoints.BEST_METRIC]
    np.testing.assert_allclose(scores(model, "val", "none", 0.5)["dice"], recorded, rtol=1e-6)


def test_test_dice_is_reported_at_the_tuned_threshold_and_at_half(report, trained, model):
    tuned = json.loads((trained / evaluate.THRESHOLD_FILE).read_text())
    assert report["threshold"] == tuned["threshold"] and report["threshold_source"] == "tuned"
    assert report["tta"] == "flip" and report["tta_sizes"] == []
    flip = scores(model, "test", "flip", tuned["threshold"])
    np.testing.assert_allclose(report["dice"], flip["dice"], rtol=1e-12)
    plain = scores(model, "test", "none", tuned["threshold"])
    np.testing.assert_allclose(report["no_tta"]["dice"], plain["dice"], rtol=1e-12)
    if tuned["threshold"] != 0.5:
        half = scores(model, "test", "flip", 0.5)
        np.testing.assert_allclose(report["dice_at_0.5"], half["dice"], rtol=1e-12)
    else:  # (test_evaluate checks dice_at_0.5 at another threshold)
        assert "dice_at_0.5" not in report
    saved = json.loads((trained / "eval_test.json").read_text())
    assert saved["dice"] == report["dice"] and saved["no_tta"] == report["no_tta"]


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(model):
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), np.uint8)
    both = np.asarray(
        steps.jit_predict(model["config"], tta="flip", with_plain=True)(model["state"], images)
    )
    plain = model["predict"]["none"]
    logits = np.asarray(plain(model["state"], images))
    mirrored = np.asarray(plain(model["state"], images[:, :, ::-1]))[:, :, ::-1]
    np.testing.assert_allclose(both[..., 1:], logits, atol=1e-5)
    np.testing.assert_allclose(both[..., :1], (logits + mirrored) / 2, atol=1e-5)
    assert not np.allclose(logits, mirrored, atol=1e-3)  # the flip changes something


def test_multi_scale_tta_averages_each_sizes_logits_at_the_original_resolution(model):
    # Batches of the config's size, as evaluate's: its predict steps are compiled already.
    batch = model["config"].eval.batch_size
    examples = sources.load_examples(model["config"], "test", 3)
    multi = evaluate.full_resolution_logits(
        steps.jit_predict(model["config"], tta="flip", with_plain=True),
        model["state"],
        examples,
        SIZE,
        batch,
        tta_sizes=(48,),
    )
    single = {
        size: dict(
            evaluate.full_resolution_logits(
                model["predict"]["flip"], model["state"], examples, size, batch
            )
        )
        for size in (SIZE, 48)
    }
    plain = dict(
        evaluate.full_resolution_logits(
            model["predict"]["none"], model["state"], examples, SIZE, batch
        )
    )
    indices = []
    for index, logits in multi:
        indices.append(index)
        assert logits.shape == (*examples.masks[index].shape, 2)
        mean = np.mean([single[size][index][..., 0] for size in single], axis=0)
        np.testing.assert_allclose(logits[..., 0], mean, atol=1e-5)
        np.testing.assert_allclose(logits[..., 1], plain[index][..., 0], atol=1e-5)
        assert not np.allclose(logits[..., 0], single[SIZE][index][..., 0], atol=1e-3)
    assert indices == [0, 1, 2]


def test_multi_scale_eval_reports_the_plain_model_beside_it(trained, model, figaro_dir):
    """Multi-scale TTA alone (no flip) still reports the plain model as ``no_tta``."""
    config = tiny_config(figaro_dir)
    config.eval.split = "val"  # leaves the test report of the other tests alone
    config.eval.tta_sizes = (48,)
    report = evaluate.evaluate(config, trained)
    assert report["tta"] == "none" and report["tta_sizes"] == [48]
    examples = sources.load_examples(config, "val", 8)
    multi = evaluate.score_examples(
        steps.jit_predict(config, tta="none", with_plain=True),
        model["state"],
        examples,
        SIZE,
        config.eval.batch_size,
        report["threshold"],
        tta_sizes=(48,),
    ).summary
    plain = scores(model, "val", "none", report["threshold"])
    np.testing.assert_allclose(report["dice"], multi["dice"], rtol=1e-12)
    np.testing.assert_allclose(report["no_tta"]["dice"], plain["dice"], rtol=1e-12)
    np.testing.assert_allclose(multi["no_tta"]["dice"], plain["dice"], rtol=1e-12)


def test_a_given_threshold_is_used_beside_a_tuned_one_with_a_warning(
    trained, figaro_dir, tmp_path, caplog
):
    workdir = tmp_path / "copy"  # tuning rewrites threshold.json: not the shared workdir's
    shutil.copytree(trained, workdir)
    config = tiny_config(figaro_dir)
    config.eval.tune_threshold, config.eval.threshold = True, 0.3
    with caplog.at_level(logging.WARNING):
        summary = evaluate.evaluate(config, workdir)
    tuned = json.loads((workdir / evaluate.THRESHOLD_FILE).read_text())
    assert (summary["threshold"], summary["threshold_source"]) == (0.3, "config")
    assert (
        f"eval.threshold=0.3 is used as given, not the threshold just tuned "
        f"({tuned['threshold']:.2f})"
    ) in caplog.text


def test_a_report_is_written_only_after_its_contact_sheet(
    trained, figaro_dir, tmp_path, monkeypatch
):
    """A sheet that cannot be written (a full disk) leaves no report naming it."""
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("eval_*"))

    def full_disk(path, pixels, **options):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluate.pictures, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device: .*eval_test_worst.png"):
        evaluate.evaluate(tiny_config(figaro_dir), workdir)
    assert not list(workdir.glob("eval_*"))


def test_report_has_hair_types_worst_images_and_a_contact_sheet(report, trained):
    with open(trained / "eval_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(row["hair_type"] in HAIR_TYPES for row in rows)
    kinds = {row["hair_type"] for row in rows}
    assert set(report["per_hair_type"]) == kinds
    for kind, entry in report["per_hair_type"].items():
        typed = [float(row["dice"]) for row in rows if row["hair_type"] == kind]
        assert entry["num_images"] == len(typed)
        np.testing.assert_allclose(entry["dice"], np.mean(typed))

    worst = report["worst"]
    assert len(worst) == min(evaluate.NUM_WORST, len(rows))
    by_dice = sorted(rows, key=lambda row: float(row["dice"]))
    assert [w["name"] for w in worst] == [row["name"] for row in by_dice[: len(worst)]]
    assert [w["dice"] for w in worst] == sorted(w["dice"] for w in worst)

    with Image.open(trained / report["contact_sheet"]) as sheet:
        box = evaluate.SHEET_BOX
        assert sheet.size == (3 * box, len(worst) * (box + 16))


def test_dice_per_threshold_is_the_dice_of_each_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (37, 23)).astype(np.float32)
    logits[:3, :5] = np.nan  # not hair, as the score counts it (was hair at every threshold)
    mask = rng.integers(0, 2, (37, 23), np.uint8)
    thresholds = evaluate.SWEEP_THRESHOLDS
    expected = []
    for t in thresholds:
        count = evaluate.metrics.confusion(logits > evaluate.logit(t), mask)
        expected.append(evaluate.metrics.dice(count["tp"], count["fp"], count["fn"]))
    np.testing.assert_allclose(evaluate.dice_per_threshold(logits, mask), expected, rtol=1e-12)
    empty = evaluate.dice_per_threshold(np.full((4, 4), -9.0), np.zeros((4, 4)))
    np.testing.assert_array_equal(empty, np.ones(len(thresholds)))
    # float32 logits nearest each cut (9 of the 19 round above it): the same side in both.
    at_cuts = np.array([evaluate.logit(t) for t in thresholds], np.float32)
    hair = np.ones_like(at_cuts, np.uint8)
    counts = [evaluate.metrics.confusion(at_cuts > evaluate.logit(t), hair) for t in thresholds]
    scored = [evaluate.metrics.dice(c["tp"], c["fp"], c["fn"]) for c in counts]
    np.testing.assert_array_equal(evaluate.dice_per_threshold(at_cuts, hair), scored)


def test_worst_contact_sheet_shows_image_truth_then_prediction():
    truth = np.zeros((20, 20), np.uint8)
    truth[:, :10] = 1  # left half
    prediction = np.zeros((20, 20), np.uint8)
    prediction[:10] = 1  # top half
    examples = Examples(["a"], [np.full((20, 20, 3), 90, np.uint8)], [truth])
    rows = [{"name": "a", "hair_type": "", "dice": 0.5}]
    sheet = evaluate.worst_contact_sheet(examples, rows, [(0, prediction)])
    box, h = evaluate.SHEET_BOX, pictures.CAPTION_HEIGHT
    assert sheet.shape == (h + box, 3 * box, 3)
    np.testing.assert_array_equal(
        sheet[h:], pictures.panel(examples.images[0], truth, prediction, box)
    )
