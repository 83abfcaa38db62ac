"""``train_and_evaluate`` on synthetic images, in-process: summary and checkpoints."""

import json

import jax
import numpy as np
import optax

from configs import synthetic
from hairseg_jax import checkpoints, evaluate, models, steps, train
from hairseg_jax.data import sources
from hairseg_jax.weights import convert


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


def test_train_and_evaluate_on_synthetic_data(tmp_path):
    summary = train.train_and_evaluate(tiny_config(), tmp_path)
    assert summary["num_images"] == 4
    assert 0.0 <= summary["dice"] <= 1.0
    assert checkpoints.latest_manager(tmp_path).all_steps() == [2, 4]
    best = checkpoints.best_manager(tmp_path)
    assert best.best_step() in (2, 4)
    assert checkpoints.best_score(best) == max(
        best.metrics(s)[checkpoints.BEST_METRIC] for s in best.all_steps()
    )
    assert (tmp_path / "config.json").is_file()


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
    expected, _ = evaluate.evaluate_examples(
        predict, state, sources.load_examples(config, "val"), 32, 4
    )
    np.testing.assert_allclose(summary["dice"], expected["dice"])
