"""Config value checks: the shipped configs pass, each impossible value is named."""

import json

import pytest

from configs import figaro, figaro_cpu, synthetic
from hairseg_jax.config_checks import ConfigError, check_config, config_changes, problems


@pytest.mark.parametrize(
    "config",
    [
        figaro.get_config(),
        figaro.get_config("smoke"),
        figaro.get_config("scratch"),
        synthetic.get_config(),
        figaro_cpu.get_config(),
    ],
    ids=["figaro", "smoke", "scratch", "synthetic", "figaro_cpu"],
)
def test_shipped_configs_pass(config):
    assert problems(config) == []
    check_config(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optim.learning_rate", 0.0, "optim.learning_rate=0.0 must be positive"),
        ("optim.learning_rate", -0.1, "optim.learning_rate=-0.1 must be positive"),
        ("train.num_steps", -5, "train.num_steps=-5 must not be negative"),
        ("train.num_epochs", 0, "train.num_epochs=0 must be positive"),
        ("train.batch_size", 0, "train.batch_size=0 must be positive"),
        ("model.backbone", "resnet13", "model.backbone='resnet13' is not one of"),
        ("model.output_stride", 4, "model.output_stride=4 must be 8, 16 or 32"),
        ("eval.threshold", 1.0, "eval.threshold=1.0 must be in (0, 1)"),
        ("eval.split", "validation", "eval.split='validation' is not one of"),
        ("augment.scale", (0.5, 0.2), "augment.scale=(0.5, 0.2) must be 0 < low <= high <= 1"),
        ("train.ema_decay", 1.0, "train.ema_decay=1.0 must be in [0, 1)"),
        ("eval.threshold", -0.5, "eval.threshold=-0.5 must be in (0, 1), or -1 for the tuned"),
        ("eval.tta", "vflip", "eval.tta='vflip' is not one of ('none', 'flip')"),
        ("predict.tta", "rot", "predict.tta='rot' is not one of ('none', 'flip')"),
        ("predict.save_prob", "jpg", "predict.save_prob='jpg' is not one of"),
        ("predict.batch_size", 0, "predict.batch_size=0 must be positive"),
        ("eval.tta_sizes", (96, -1), "eval.tta_sizes=(96, -1) must be positive"),
        ("data.progressive_sizes", (0,), "data.progressive_sizes=(0,) must be positive"),
        ("augment.device_max_side", 0, "augment.device_max_side=0 must be positive"),
        ("data.progressive_until", (0.5,), "data.progressive_until=(0.5,) must hold one fraction"),
        ("data.dataset", "synthetic", "data.dataset='synthetic' needs data.synthetic_size"),
        ("data.max_train_images", -1, "data.max_train_images=-1 must not be negative (0: all)"),
        ("eval.max_images", -8, "eval.max_images=-8 must not be negative (0: all)"),
        ("input.channel_order", "bgr", "input.channel_order='bgr' must be RGB or BGR"),
        ("input.std", (1.0, 0.0, 1.0), "input.std=(1.0, 0.0, 1.0) must hold 3 positive values"),
        ("input.mean", (0.5,), "input.mean=(0.5,) must hold 3 values"),
        ("model.multi_grid", (1, 2), "model.multi_grid=(1, 2) must hold a positive rate for each"),
        ("optim.momentum", 1.0, "optim.momentum=1.0 must be in [0, 1)"),
        ("optim.poly_power", 0.0, "optim.poly_power=0.0 must be positive"),
    ],
)
def test_each_bad_value_is_named(field, value, message):
    config = figaro.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match="Bad config") as error:
        check_config(config)
    assert message in str(error.value)


@pytest.mark.parametrize("until", [(0.7, 0.4), (0.5, 1.0), (0.0, 0.5), (0.5,)])
def test_progressive_stages_need_increasing_fractions_inside_training(until):
    config = figaro.get_config()
    config.data.progressive_sizes = (64, 96)
    config.data.progressive_until = until
    assert any("data.progressive_until" in problem for problem in problems(config))
    config.data.progressive_until = (0.3, 0.6)
    assert problems(config) == []


def test_epochs_may_be_zero_when_steps_are_given():
    config = figaro.get_config()
    config.train.num_epochs = 0
    config.train.num_steps = 10
    assert problems(config) == []


def test_all_problems_are_reported_together():
    config = figaro.get_config()
    config.optim.learning_rate = -1.0
    config.train.batch_size = -2
    assert len(problems(config)) == 2


def test_config_changes_name_the_fields_that_matter_old_to_new():
    saved = json.loads(figaro.get_config("smoke").to_json_best_effort())
    config = figaro.get_config("smoke")
    assert config_changes(saved, config) == []
    config.model.backbone = "resnet34"
    config.train.batch_size = 8
    config.augment.scale = (0.5, 1.0)
    # Fields that may change on resume: mode, eval.*, logging and checkpoint frequency, ...
    config.mode = "eval"
    config.eval.batch_size = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 3
    config.data.data_dir = "/elsewhere/Figaro1k"
    config.train.allow_config_change = True
    assert config_changes(saved, config) == [
        "augment.scale: [0.25, 1.0] -> [0.5, 1.0]",
        "model.backbone: 'resnet18' -> 'resnet34'",
        "train.batch_size: 4 -> 8",
    ]
    # Fields only one side has (another version of the code) are not compared.
    del saved["model"]["dropout"]
    saved["train"]["retired_field"] = 1
    config.model.dropout = 0.1
    assert len(config_changes(saved, config)) == 3


def test_predict_mode_needs_an_input_and_an_output_folder():
    config = figaro.get_config()
    assert problems(config) == []  # not asked for outside predict mode
    config.mode = "predict"
    assert problems(config) == [
        "predict.input='' must name an image, a folder or a glob pattern",
        "predict.output='' must name the output folder",
    ]
    config.predict.input, config.predict.output = "photos/*.jpg", "masks"
    assert problems(config) == []


def test_an_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="known: smoke, scratch"):
        figaro.get_config("fast")
