"""Config value checks: the shipped configs pass, each impossible value is named."""

import pytest

from configs import figaro, figaro_cpu, synthetic
from hairseg_jax.config_checks import ConfigError, check_config, problems


@pytest.mark.parametrize(
    "config",
    [
        figaro.get_config(),
        figaro.get_config("smoke"),
        synthetic.get_config(),
        figaro_cpu.get_config(),
    ],
    ids=["figaro", "smoke", "synthetic", "figaro_cpu"],
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
    ],
)
def test_each_bad_value_is_named(field, value, message):
    config = figaro.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match="Bad config") as error:
        check_config(config)
    assert message in str(error.value)


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
