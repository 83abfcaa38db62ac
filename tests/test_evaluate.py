"""``evaluate.load_state``: the state to evaluate, built without compiling ``model.init``."""

import logging

import jax
import numpy as np
import optax
import pytest

from configs import synthetic
from hairseg_jax import checkpoints, config_checks, evaluate, models, sharding, steps
from hairseg_jax.weights import convert
from hairseg_jax.weights.tensors import ConversionError


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
    with pytest.raises(FileNotFoundError, match="resume training there until its first"):
        evaluate.load_state(tiny_config(), tmp_path, mesh)


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
