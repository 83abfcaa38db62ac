"""``evaluate.load_state``: the state to evaluate, built without compiling ``model.init``."""

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from hairseg_jax import checkpoints, config_checks, evaluate, models, sharding, steps
from hairseg_jax.data.examples import Examples
from hairseg_jax.data.figaro1k import DataError
from hairseg_jax.weights import convert
from hairseg_jax.weights.tensors import ConversionError
from tests.conftest import TinyNet
from tests.data.conftest import entry, random_image, random_mask, write_frame


def tiny_config():
    config = synthetic.get_config()
    config.model.aspp_channels = 8
    config.model.decoder_channels = 8
    config.eval.image_size = 32
    return config


@pytest.fixture(scope="module")
def trained_variables() -> dict:
    """Random variables of the tiny model, standing in for trained ones."""
    model = models.build_model(tiny_config().model)
    state = steps.create_train_state(jax.random.PRNGKey(7), model, 32, optax.identity())
    return jax.tree.map(np.asarray, steps.inference_variables(state))


def no_init(*args, **kwargs):
    raise AssertionError("model.init should not run to restore a whole model")


def assert_same(tree, expected):
    assert jax.tree.structure(tree) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, tree, expected)


def test_best_checkpoint_is_restored_into_shapes(tmp_path, trained_variables, monkeypatch):
    best = checkpoints.best_manager(tmp_path)
    checkpoints.save(best, 3, trained_variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    monkeypatch.setattr(steps, "create_train_state", no_init)
    mesh = sharding.data_mesh()

    state, weights, step = evaluate.load_state(tiny_config(), tmp_path, mesh)

    assert step == 3 and weights == f"step 3 of {tmp_path.absolute() / 'best'}"
    assert_same(steps.inference_variables(state), trained_variables)
    assert state.params["aspp"]["conv1"]["kernel"].sharding == sharding.replicated(mesh)


@pytest.mark.parametrize("process", [0, 1])
def test_a_workdir_that_cannot_be_written_stops_every_process(
    tmp_path, trained_variables, monkeypatch, process
):
    """Before any work, by every process: process 0 stopping alone left the others waiting."""
    with checkpoints.closed_after(checkpoints.best_manager(tmp_path)) as best:
        checkpoints.save(best, 3, trained_variables, metrics={checkpoints.BEST_METRIC: 0.5})
    monkeypatch.setattr(evaluate.jax, "process_index", lambda: process)
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: False)

    def load_examples(*args):
        raise AssertionError("the data are read after the check")

    monkeypatch.setattr(evaluate.sources, "load_examples", load_examples)
    with pytest.raises(config_checks.ConfigError, match="is a folder this user cannot write to"):
        evaluate.evaluate(tiny_config(), tmp_path)


def test_checkpoint_of_another_model_names_the_settings_it_was_trained_with(
    tmp_path, trained_variables
):
    best = checkpoints.best_manager(tmp_path)
    checkpoints.save(best, 3, trained_variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    config = tiny_config()
    config.model.backbone = "resnet34"

    with pytest.raises(config_checks.ConfigError) as error:
        evaluate.load_state(config, tmp_path, sharding.data_mesh())

    assert str(error.value) == (
        f"The checkpoint at step 3 of {tmp_path.absolute() / 'best'} does not fit config.model "
        "(trained with model.backbone: 'resnet18' -> 'resnet34'). Pass the model settings it "
        f"was trained with ({tmp_path / 'config.json'})."
    )


def test_no_best_checkpoint_says_whether_training_began(tmp_path, trained_variables):
    mesh = sharding.data_mesh()
    with pytest.raises(FileNotFoundError, match="config.model.pretrained; train there first."):
        evaluate.load_state(tiny_config(), tmp_path, mesh)
    with checkpoints.latest_manager(tmp_path) as latest:  # stopped before its first validation
        checkpoints.save(latest, 2, trained_variables)
    with pytest.raises(FileNotFoundError) as error:
        evaluate.load_state(tiny_config(), tmp_path, mesh)
    assert str(error.value).endswith(  # a finished run resumed validated nothing more
        "resume training there until its next validation (a run that trained all its steps, "
        "its best/ since deleted, validates again with more steps: --config.train.num_steps "
        "and --config.train.allow_config_change=True)."
    )


def test_whole_pretrained_file_is_loaded_into_shapes(tmp_path, trained_variables, monkeypatch):
    convert.save_variables(trained_variables, tmp_path / "whole.msgpack")
    config = tiny_config()
    config.model.pretrained = str(tmp_path / "whole.msgpack")
    monkeypatch.setattr(steps, "create_train_state", no_init)

    state, weights, step = evaluate.load_state(config, tmp_path, sharding.data_mesh())

    assert step == 0 and weights == config.model.pretrained
    assert_same(steps.inference_variables(state), trained_variables)


def test_a_backbone_file_alone_is_refused(tmp_path, trained_variables):
    """Its ASPP and decoder would be random: no Dice worth reporting."""
    backbone = {kind: trained_variables[kind]["backbone"] for kind in trained_variables}
    convert.save_variables(backbone, tmp_path / "backbone.msgpack")
    config = tiny_config()
    config.model.pretrained = str(tmp_path / "backbone.msgpack")

    with pytest.raises(ConversionError, match="holds only a backbone, so the ASPP and decoder"):
        evaluate.load_state(config, tmp_path, sharding.data_mesh())


def test_settings_other_than_the_trained_ones_are_warned_about(tmp_path, trained_variables, caplog):
    """Another normalisation fits the checkpoint but predicts poorly: say so."""
    best = checkpoints.best_manager(tmp_path)
    checkpoints.save(best, 3, trained_variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    config = tiny_config()
    config.input.mean = (98,)

    with caplog.at_level(logging.WARNING):
        evaluate.load_state(config, tmp_path, sharding.data_mesh())

    assert "was trained with other settings" in caplog.text
    assert "input.mean: [123.675, 116.28, 103.53] -> [98]" in caplog.text
    caplog.clear()
    config = tiny_config()
    config.model.pretrained = "torchvision:resnet18"  # where training started: no matter
    config.model.dropout, config.model.dtype = 0.3, "bfloat16"  # no change to predictions
    with caplog.at_level(logging.WARNING):
        evaluate.load_state(config, tmp_path, sharding.data_mesh())
    assert "other settings" not in caplog.text
    (tmp_path / "config.json").write_text('{"model": ')  # cut short: nothing to compare with
    with caplog.at_level(logging.WARNING):
        evaluate.load_state(tiny_config(), tmp_path, sharding.data_mesh())
    assert "Not comparing the settings with those trained with: " in caplog.text
    assert "config.json is not readable JSON" in caplog.text


def flat_examples() -> Examples:
    """Flat images that ``grey_logits`` reads as logits 1, 0.25 and -1, with hair in the first
    quarter, half and three quarters of each mask's columns."""
    greys, hair_columns = (160, 136, 96), (5, 10, 15)
    return Examples(
        ["Frame00001", "Frame00151", "Frame00152"],
        [np.full((10, 20, 3), grey, np.uint8) for grey in greys],
        [np.repeat((np.arange(20) < k).astype(np.uint8)[None], 10, axis=0) for k in hair_columns],
    )


def grey_logits(state, images):
    """A stand-in predict step: an image's logit is (its mean grey level - 128) / 32."""
    level = (jnp.mean(images.astype(jnp.float32), axis=(1, 2, 3)) - 128) / 32
    return jnp.broadcast_to(level[:, None, None, None], (*images.shape[:3], 1))


def test_weights_digest_tells_weights_apart():
    state = steps.create_train_state(jax.random.PRNGKey(0), TinyNet(), 16, optax.identity())
    again = steps.create_train_state(jax.random.PRNGKey(0), TinyNet(), 16, optax.identity())
    other = steps.create_train_state(jax.random.PRNGKey(1), TinyNet(), 16, optax.identity())
    assert evaluate.weights_digest(state) == evaluate.weights_digest(again)
    assert evaluate.weights_digest(state) != evaluate.weights_digest(other)


def test_logits_are_upsampled_bilinearly_in_place():
    """Half-pixel centres, as JAX's resize (an independent implementation): a flipped or
    shifted map would be far off."""
    logits = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32)
    expected = np.asarray(jax.image.resize(logits, (13, 29, 2), "linear"))
    np.testing.assert_allclose(evaluate.resize_logits(logits, 13, 29), expected, atol=1e-5)


def test_scores_of_known_logits_are_their_dice_iou_and_bce():
    logits, hair = np.array([1.0, 0.25, -1.0]), np.array([0.25, 0.5, 0.75])
    scores = evaluate.score_examples(
        grey_logits, None, flat_examples(), 8, 2, threshold=0.6, mesh=sharding.data_mesh()
    )
    # At 0.6 only the first image is all hair (sigmoid(0.25) = 0.56); at 0.5 the second too.
    dice_at = {0.6: [2 * 0.25 / 1.25, 0.0, 0.0], 0.5: [2 * 0.25 / 1.25, 2 * 0.5 / 1.5, 0.0]}
    np.testing.assert_allclose([row["dice"] for row in scores.rows], dice_at[0.6], atol=1e-12)
    np.testing.assert_allclose([row["iou"] for row in scores.rows], [0.25, 0.0, 0.0])
    bce = np.logaddexp(0.0, logits) - hair * logits  # the mean over each image's pixels
    np.testing.assert_allclose([row["loss"] for row in scores.rows], bce, rtol=1e-6)
    np.testing.assert_allclose(scores.summary["loss"], bce.mean(), rtol=1e-6)
    np.testing.assert_allclose(scores.summary["dice"], np.mean(dice_at[0.6]), rtol=1e-12)
    np.testing.assert_allclose(scores.summary["dice_at_0.5"], np.mean(dice_at[0.5]), rtol=1e-12)
    # The cut is on the probability: at 0.55 (logit 0.20) the second image is hair too, where
    # comparing logits with 0.55 itself would leave it out.
    at_055 = evaluate.score_examples(
        grey_logits, None, flat_examples(), 8, 2, threshold=0.55, mesh=sharding.data_mesh()
    )
    np.testing.assert_allclose([row["dice"] for row in at_055.rows], dice_at[0.5], atol=1e-12)
    # Pooled over the pixels (50, 100 and 150 of 200 hair): at 0.6 image 1 is 50 true and 150
    # false positives, images 2 and 3 are 250 false negatives; at 0.5 image 2 adds 100 of each.
    assert scores.summary["pooled_dice"] == pytest.approx(100 / (100 + 150 + 250))
    assert scores.summary["pooled_dice_at_0.5"] == pytest.approx(300 / (300 + 250 + 150))
    at_half = evaluate.score_examples(
        grey_logits, None, flat_examples(), 8, 2, threshold=0.5, mesh=sharding.data_mesh()
    )
    assert "dice_at_0.5" not in at_half.summary and "pooled_dice_at_0.5" not in at_half.summary


def test_the_plain_channel_is_scored_as_no_tta_and_the_worst_images_kept_worst_first():
    """Channel 1 (negated logits here: image 3 all hair at 0.6, 150 true and 50 false
    positives) gives ``no_tta``; at 0.5 the images' Dice are 0.4, 0.67 and 0."""

    def with_plain(state, images):
        logits = grey_logits(state, images)
        return jnp.concatenate([logits, -logits], axis=-1)

    scores = evaluate.score_examples(
        with_plain, None, flat_examples(), 8, 2, threshold=0.6, mesh=sharding.data_mesh()
    )
    assert scores.summary["no_tta"] == pytest.approx(
        {"dice": 300 / 350 / 3, "pooled_dice": 300 / 500, "iou": 0.75 / 3, "pooled_iou": 150 / 350}
    )
    worst = evaluate.score_examples(
        grey_logits, None, flat_examples(), 8, 2, mesh=sharding.data_mesh(), num_worst=2
    ).worst
    assert [index for index, _ in worst] == [2, 0]
    assert not worst[0][1].any() and worst[1][1].all()  # image 3 none, image 1 all hair


def test_previews_show_image_truth_then_prediction():
    panels = evaluate.preview_panels(
        grey_logits, None, flat_examples(), 3, 8, 2, threshold=0.6, mesh=sharding.data_mesh()
    )
    box = evaluate.PREVIEW_BOX
    assert panels.shape == (3, box, 3 * box, 3)
    row, x = panels[:, box // 2, :, 0], int(0.4 * box)  # 40% across: hair in masks 2 and 3
    assert list(row[:, box + x]) == [0, 255, 255]  # the truth
    assert list(row[:, 2 * box + x]) == [255, 0, 0]  # the prediction: image 1 all hair


@pytest.mark.parametrize(
    "tied, best",
    [((0.3, 0.6), 0.6), ((0.3, 0.7), 0.3), ((0.7, 0.3), 0.3), ((0.05, 0.95), 0.05)],
)
def test_the_tuned_threshold_is_the_best_and_ties_go_nearest_half_then_lower(tied, best):
    """Whatever the floats' rounding: 0.5 - 0.3 is above 0.7 - 0.5, 0.95 - 0.5 below 0.5 - 0.05."""
    dice = np.linspace(0.1, 0.2, len(evaluate.SWEEP_THRESHOLDS))
    dice[[evaluate.SWEEP_THRESHOLDS.index(t) for t in tied]] = 0.9
    run = lambda examples, sweep: evaluate.Scores({}, [], dice)  # noqa: E731
    tuned = evaluate.tune_threshold(run, flat_examples(), "val")
    assert (tuned["threshold"], tuned["dice"]) == (best, 0.9)
    assert tuned["dice_at_0.5"] == dice[evaluate.SWEEP_THRESHOLDS.index(0.5)]


def test_per_hair_type_means_each_types_scores():
    rows = [
        {"hair_type": "wavy", "dice": 0.5, "iou": 0.2},
        {"hair_type": "straight", "dice": 0.9, "iou": 0.8},
        {"hair_type": "wavy", "dice": 0.7, "iou": 0.4},
    ]
    assert evaluate.per_hair_type(rows) == {
        "straight": {"dice": 0.9, "iou": 0.8, "num_images": 1},
        "wavy": {"dice": pytest.approx(0.6), "iou": pytest.approx(0.3), "num_images": 2},
    }


def test_the_tuned_threshold_line_names_its_split_and_image_count(tmp_path, caplog):
    record = {"threshold": 0.3, "step": 7, "num_images": 20, "split": "test"}
    (tmp_path / evaluate.THRESHOLD_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.INFO):
        assert evaluate.read_tuned_threshold(tmp_path, 7, {}) == record
    assert "tuned on 20 test images." in caplog.text


def test_the_report_names_the_images_skipped_as_unreadable(
    tmp_path, trained_variables, monkeypatch, caplog
):
    """With data.skip_unreadable, a score of fewer images is not taken for the whole split's."""
    best = checkpoints.best_manager(tmp_path)
    checkpoints.save(best, 3, trained_variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    config = tiny_config()
    config.eval.max_images = 2
    load = evaluate.sources.load_examples

    def with_a_skip(config, split, limit=0):
        return dataclasses.replace(load(config, split, limit), skipped=("Frame00009",))

    monkeypatch.setattr(evaluate.sources, "load_examples", with_a_skip)
    with caplog.at_level(logging.WARNING):
        summary = evaluate.evaluate(config, tmp_path)
    assert summary["skipped"] == ["Frame00009"] and summary["num_images"] == 2
    assert json.loads((tmp_path / "eval_test.json").read_text())["skipped"] == ["Frame00009"]
    assert (
        "These scores leave out 1 unreadable image of test (data.skip_unreadable): Frame00009."
    ) in caplog.text


def test_a_missing_test_file_is_found_before_the_threshold_is_tuned(tmp_path, monkeypatch):
    """It was found after the checkpoint's restore and the whole tuning pass over val."""
    root = tmp_path / "Figaro1k"
    for i, name in enumerate(["Frame00001", "Frame00002"]):
        write_frame(root, name, random_image(seed=i), pbm=random_mask(seed=i))
    lists = {"train": [], "val": [entry("Frame00001")], "test": [entry("Frame00004")]}
    (root / "train_val_test.json").write_text(json.dumps(lists))
    config = tiny_config()
    config.data.dataset, config.data.data_dir = "figaro1k", str(root)
    config.eval.tune_threshold = True

    def load_state(*args):
        raise AssertionError("the checkpoint was restored before the test split's files")

    monkeypatch.setattr(evaluate, "load_state", load_state)
    with pytest.raises(DataError, match="split 'test'.*Frame00004-org.jpg does not exist"):
        evaluate.evaluate(config, tmp_path / "w")
