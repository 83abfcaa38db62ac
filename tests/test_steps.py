"""Tests of normalisation, learning-rate schedules, optimizers and the jitted train step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import figaro
from hairseg_jax import losses, steps
from hairseg_jax.models import DeepLabV3Plus
from tests.conftest import TinyNet


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """A copy of the Figaro config's ``optim`` with ``overrides``."""
    config = ml_collections.ConfigDict(figaro.get_config().optim.to_dict())
    config.update(overrides)
    return config


def tiny_batch() -> dict[str, np.ndarray]:
    """Two random 4 x 4 images and masks."""
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (2, 4, 4, 3), np.uint8),
        "mask": rng.integers(0, 2, (2, 4, 4), np.uint8),
    }


# normalize.


def test_normalize_by_hand():
    images = jnp.array([[[[10, 20, 30], [255, 0, 128]]]], jnp.uint8)
    out = steps.normalize(images, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    assert out.dtype == jnp.float32 and out.shape == (1, 1, 2, 3)
    expected = [[[[4.5, 4.5, 3.375], [127.0, -0.5, 15.625]]]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_normalize_bgr_flips_channels_before_mean_and_std():
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), np.uint8)
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    bgr = steps.normalize(jnp.asarray(images), mean, std, bgr=True)
    expected = (images[..., ::-1].astype(np.float32) - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(bgr, expected, rtol=1e-6, atol=1e-6)
    rgb = steps.normalize(jnp.asarray(images), mean, std)
    assert not np.allclose(rgb, bgr)


def test_jit_steps_preprocess_follows_channel_order():
    """The jitted predict step normalises with config.input (identity model)."""
    state = steps.TrainState.create(
        apply_fn=lambda variables, x, train: x,
        params={},
        tx=optax.sgd(0.1),
        batch_stats={},
        rng=jax.random.key(0),
    )
    images = np.random.default_rng(1).integers(0, 256, (1, 2, 2, 3), np.uint8)
    config = figaro.get_config()
    mean, std = np.array(config.input.mean), np.array(config.input.std)
    _, predict = steps.jit_steps(config)
    np.testing.assert_allclose(predict(state, images), (images - mean) / std, rtol=1e-5)
    config.input.channel_order = "BGR"
    _, predict = steps.jit_steps(config)
    np.testing.assert_allclose(predict(state, images), (images[..., ::-1] - mean) / std, rtol=1e-5)


# total_train_steps.


def test_total_train_steps_counts_whole_batches_unless_num_steps_is_set():
    train = ml_collections.ConfigDict({"num_steps": 0, "num_epochs": 3, "batch_size": 16})
    assert steps.total_train_steps(train, 840) == 3 * 52  # 840 // 16 whole batches per epoch
    assert steps.total_train_steps(train, 15) == 0  # no whole batch
    train.num_steps = 7
    assert steps.total_train_steps(train, 840) == 7


# learning_rate_schedule.


def test_poly_schedule():
    schedule = steps.learning_rate_schedule(optim_config(learning_rate=0.01), total_steps=100)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(50)) == pytest.approx(0.01 * 0.5**0.9)
    assert float(schedule(75)) == pytest.approx(0.01 * 0.25**0.9)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(150)) == pytest.approx(0.0, abs=1e-12)


def test_poly_power():
    config = optim_config(learning_rate=0.1, poly_power=2.0)
    schedule = steps.learning_rate_schedule(config, total_steps=10)
    assert float(schedule(5)) == pytest.approx(0.1 * 0.25)


def test_warmup_ramps_linearly_then_decays():
    config = optim_config(learning_rate=0.01, warmup_steps=10)
    schedule = steps.learning_rate_schedule(config, total_steps=110)
    for step in range(11):
        assert float(schedule(step)) == pytest.approx(0.01 * step / 10, abs=1e-9), step
    # After warmup the poly decay runs over the remaining 100 steps.
    assert float(schedule(60)) == pytest.approx(0.01 * 0.5**0.9)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)
    values = [float(schedule(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_cosine_schedule():
    config = optim_config(learning_rate=0.02, schedule="cosine")
    schedule = steps.learning_rate_schedule(config, total_steps=100)
    assert float(schedule(0)) == pytest.approx(0.02)
    assert float(schedule(25)) == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)))
    assert float(schedule(50)) == pytest.approx(0.01)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_cosine_schedule_with_warmup():
    config = optim_config(learning_rate=0.02, schedule="cosine", warmup_steps=20)
    schedule = steps.learning_rate_schedule(config, total_steps=120)
    assert float(schedule(10)) == pytest.approx(0.01)
    assert float(schedule(20)) == pytest.approx(0.02)
    assert float(schedule(70)) == pytest.approx(0.01)


def test_constant_schedule():
    schedule = steps.learning_rate_schedule(optim_config(schedule="constant"), total_steps=10)
    assert [float(schedule(s)) for s in (0, 5, 10, 1000)] == pytest.approx([0.01] * 4)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="Unknown schedule 'step'"):
        steps.learning_rate_schedule(optim_config(schedule="step"), total_steps=10)


# Optimizer.


def tiny_params() -> dict:
    return {
        "backbone": {"w": jnp.full((3,), 2.0), "bn": {"scale": jnp.ones((2,))}},
        "aspp": {"w": jnp.full((3,), 2.0)},
        "decoder": {"w": jnp.full((3,), 2.0)},
    }


def test_param_groups_label_backbone_and_head():
    labels = steps.param_groups(tiny_params())
    assert labels == {
        "backbone": {"w": "backbone", "bn": {"scale": "backbone"}},
        "aspp": {"w": "head"},
        "decoder": {"w": "head"},
    }


def first_updates(config: ml_collections.ConfigDict, grads: dict, params: dict) -> dict:
    """The updates of one optimizer step at a constant learning rate of 0.1."""
    tx = steps.create_optimizer(config, optax.constant_schedule(0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_head_learning_rate_multiplier():
    config = optim_config(momentum=0.0, weight_decay=0.0, head_lr_multiplier=10.0)
    params = tiny_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates = first_updates(config, grads, params)
    np.testing.assert_allclose(updates["backbone"]["w"], -0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["aspp"]["w"], -1.0 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["decoder"]["w"], -1.0 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["aspp"]["w"], 10 * updates["backbone"]["w"], rtol=1e-6)


def test_sgd_weight_decay_adds_decay_times_param():
    config = optim_config(momentum=0.0, weight_decay=0.01, head_lr_multiplier=10.0)
    params = tiny_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates = first_updates(config, grads, params)
    np.testing.assert_allclose(updates["backbone"]["w"], -0.1 * (0.5 + 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates["aspp"]["w"], -1.0 * (0.5 + 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates["decoder"]["w"], -1.0 * (0.5 + 0.01 * 2.0), rtol=1e-6)
    # As torch's SGD: BatchNorm scales decay too.
    np.testing.assert_allclose(updates["backbone"]["bn"]["scale"], -0.1 * (0.5 + 0.01), rtol=1e-6)


@pytest.mark.parametrize(
    "nesterov, expected",
    [
        # trace_t = g + 0.9 trace_(t-1), update = -lr * trace_t: 1, then 1 + 0.9.
        (False, (1.0, 1.9)),
        # Nesterov (optax.trace): update = -lr * (g + 0.9 trace_t): 1 + 0.9, then 1 + 0.9 * 1.9.
        (True, (1.9, 2.71)),
    ],
)
@pytest.mark.parametrize("rates", [(0.1, 0.1), (0.1, 0.05)])
def test_sgd_momentum_accumulates(nesterov, expected, rates):
    """As torch's SGD: the trace sums gradients, and each step's own rate scales it (a rate
    applied before the trace would give 0.1 * 0.9 + 0.05 at the second step)."""
    config = optim_config(momentum=0.9, nesterov=nesterov, weight_decay=0.0, head_lr_multiplier=1.0)
    params = tiny_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = steps.create_optimizer(config, lambda count: jnp.asarray(rates)[count])
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    for group in ("backbone", "aspp"):
        np.testing.assert_allclose(first[group]["w"], -rates[0] * expected[0], rtol=1e-6)
        np.testing.assert_allclose(second[group]["w"], -rates[1] * expected[1], rtol=1e-6)


def test_adamw_step():
    config = optim_config(name="adamw", weight_decay=0.01, head_lr_multiplier=10.0)
    params = tiny_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates = first_updates(config, grads, params)
    # Adam's first step moves each weight by about lr, plus the decoupled decay lr * wd * p.
    np.testing.assert_allclose(updates["backbone"]["w"], -0.1 * (1 + 0.01 * 2.0), rtol=1e-4)
    np.testing.assert_allclose(updates["aspp"]["w"], -1.0 * (1 + 0.01 * 2.0), rtol=1e-4)
    np.testing.assert_allclose(updates["decoder"]["w"], -1.0 * (1 + 0.01 * 2.0), rtol=1e-4)
    np.testing.assert_allclose(updates["backbone"]["bn"]["scale"], -0.1 * (1 + 0.01), rtol=1e-4)


def test_unknown_optimizer_raises():
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        steps.create_optimizer(optim_config(name="lamb"), optax.constant_schedule(0.1))


# One tiny model trained for a few steps (compiled once for the module).

IMAGE_SIZE = 48
NUM_STEPS = 5


@pytest.fixture(scope="module")
def trained() -> dict:
    """Runs NUM_STEPS + 1 train steps on one fixed batch; records what the tests check."""
    config = figaro.get_config()
    model = DeepLabV3Plus(
        backbone="resnet18", aspp_channels=16, decoder_channels=16, low_level_channels=8
    )
    optim = optim_config(learning_rate=0.01, schedule="constant")
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 100))
    # rbg keys compile faster than threefry's on CPU.
    state = steps.create_train_state(jax.random.key(0, impl="rbg"), model, IMAGE_SIZE, tx)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    images[:, 10:30, 5:40] = rng.integers(180, 256, (2, 20, 35, 3), np.uint8)
    batch = {"image": images, "mask": (images.mean(axis=-1) > 150).astype(np.uint8)}
    train, predict = steps.jit_steps(config)

    # The train step donates the state: copy what is compared later before stepping.
    copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731
    initial = {"batch_stats": copy(state.batch_stats), "params": copy(state.params)}
    losses_seen = []
    for _ in range(NUM_STEPS + 1):
        state, metrics = train(state, batch)
        losses_seen.append(float(metrics["loss"]))
    logits = predict(state, batch["image"])
    return {
        "state": state,
        "initial": initial,
        "losses": losses_seen,
        "logits": np.asarray(logits),
        "batch": batch,
        "train_compiles": train._cache_size(),
    }


def test_train_steps_lower_the_loss(trained):
    losses_seen = trained["losses"]
    assert all(np.isfinite(losses_seen)), losses_seen
    assert losses_seen[-1] < losses_seen[0], losses_seen


def test_train_step_compiles_once_from_a_created_state(trained):
    """create_train_state places the state as the step returns it: no second trace."""
    assert trained["train_compiles"] == 1


def test_train_step_counts_steps(trained):
    assert int(trained["state"].step) == NUM_STEPS + 1


def test_train_step_updates_params_and_batch_stats(trained):
    state, initial = trained["state"], trained["initial"]
    assert jax.tree.structure(state.batch_stats) == jax.tree.structure(initial["batch_stats"])
    old, new = initial["batch_stats"], state.batch_stats
    assert not np.allclose(new["backbone"]["bn1"]["mean"], old["backbone"]["bn1"]["mean"])
    assert not np.allclose(new["aspp"]["bn1"]["var"], old["aspp"]["bn1"]["var"])
    old_kernel = initial["params"]["decoder"]["last_conv_8"]["kernel"]
    assert not np.allclose(state.params["decoder"]["last_conv_8"]["kernel"], old_kernel)


def test_predict_step_returns_float32_logits(trained):
    logits = trained["logits"]
    assert logits.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_predict_step_is_the_model_in_inference_mode(trained):
    """The running BatchNorm statistics, no dropout: the trained model applied directly."""
    state = trained["state"]
    images = steps.preprocess_fn(figaro.get_config())(trained["batch"]["image"])
    apply = jax.jit(lambda variables: state.apply_fn(variables, images, train=False))
    expected = apply(steps.inference_variables(state))
    np.testing.assert_allclose(trained["logits"], expected, rtol=1e-5, atol=1e-5)


def test_ema_follows_ramped_decay_and_is_used_for_prediction():
    config = figaro.get_config()
    config.train.ema_decay = 0.2  # the cap from step 2 on (the ramp: 2/11, 3/12, 4/13)
    config.loss.dice_weight = 0.5
    optim = optim_config(learning_rate=0.1, schedule="constant")
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 10))
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, tx, ema=True)
    batch = tiny_batch()
    train, predict = steps.jit_steps(config)
    expected = jax.tree.map(np.array, state.params)
    for step in (1, 2, 3):
        state, _ = train(state, batch)
        decay = min(0.2, (1 + step) / (10 + step))
        expected = jax.tree.map(
            lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p), expected, state.params
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state.ema_params, expected
    )
    assert not np.allclose(state.ema_params["Conv_0"]["kernel"], state.params["Conv_0"]["kernel"])
    variables = {"params": state.ema_params, "batch_stats": state.batch_stats}
    _, plain_predict = steps.jit_steps(figaro.get_config())
    np.testing.assert_allclose(
        predict(state, batch["image"]),
        plain_predict(state.replace(params=variables["params"], ema_params=None), batch["image"]),
        rtol=1e-6,
    )


def test_dice_weight_adds_that_many_soft_dice_losses_to_the_train_loss():
    """config.loss.dice_weight reaches the jitted train step: the loss grows by exactly
    dice_weight times the soft Dice of the train-mode logits (no dropout in the tiny net)."""
    optim = optim_config(learning_rate=0.1, schedule="constant")
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 10))
    batch = tiny_batch()
    config = figaro.get_config()
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, tx)
    seen = {}
    for weight in (0.0, 0.5):
        config.loss.dice_weight = weight
        train, _ = steps.jit_steps(config)
        _, metrics = train(jax.tree.map(jnp.copy, state), batch)  # the step donates its state
        seen[weight] = float(metrics["loss"])

    @jax.jit  # faster than the eager ops
    def bce_and_dice(variables, batch):
        images = steps.preprocess_fn(config)(batch["image"])
        logits, _ = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        return losses.sigmoid_bce(logits, batch["mask"]), losses.soft_dice(logits, batch["mask"])

    bce, dice = map(float, bce_and_dice(steps.inference_variables(state), batch))
    assert dice > 0.1  # a Dice term large enough to see
    np.testing.assert_allclose(seen[0.0], bce, rtol=1e-5)
    np.testing.assert_allclose(seen[0.5] - seen[0.0], 0.5 * dice, rtol=1e-4)


def test_without_ema_the_state_keeps_none():
    optim = optim_config(learning_rate=0.1, schedule="constant")
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 10))
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, tx)
    assert state.ema_params is None
    assert steps.inference_variables(state)["params"] is state.params


def test_variable_shapes_are_the_initialised_variables_without_values():
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, optax.identity())
    variables = steps.inference_variables(state)
    shapes = steps.variable_shapes(TinyNet(), 4)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert describe(shapes) == describe(variables)


def test_abstract_train_state_has_the_created_states_shapes_and_placement():
    """What a resumed run restores into: the created state's tree, shapes, dtypes and
    shardings, with nothing initialised."""
    model, tx = TinyNet(), optax.sgd(0.1, momentum=0.9)
    state = steps.create_train_state(jax.random.key(0), model, 4, tx, ema=True)
    abstract = steps.create_train_state(jax.random.key(0), model, 4, tx, ema=True, abstract=True)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for shape, array in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert isinstance(shape, jax.ShapeDtypeStruct)
        assert (shape.shape, shape.dtype) == (array.shape, array.dtype)
        assert shape.sharding == array.sharding


def test_inference_state_predicts_like_the_train_state():
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, optax.sgd(0.1))
    state = state.replace(batch_stats={"BatchNorm_0": {"mean": jnp.ones(4), "var": jnp.ones(4)}})
    inference = steps.inference_state(TinyNet(), steps.inference_variables(state))
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
    _, predict = steps.jit_steps(figaro.get_config())
    np.testing.assert_array_equal(predict(inference, images), predict(state, images))


# Non-finite steps.


@pytest.mark.parametrize(
    "bad, expected",
    [(None, True), (np.nan, False), (np.inf, False), (-np.inf, False), ("both", False)],
)
def test_all_finite_finds_one_bad_element(bad, expected):
    tree = {"a": np.full((3, 4), 1e30, np.float32), "b": [np.zeros(5, np.float32), 2.0]}
    if bad == "both":  # +inf and -inf in two leaves: their sum is NaN
        tree["a"][1, 2], tree["b"][0][4] = np.inf, -np.inf
    elif bad is not None:
        tree["b"][0][4] = bad
    assert bool(steps.all_finite(tree)) is expected


def test_a_nonfinite_step_changes_nothing_but_the_step_count():
    optim = optim_config(learning_rate=0.1, schedule="constant")  # SGD with momentum
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 10))
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, tx, ema=True)
    train = jax.jit(
        lambda s, b: steps.train_step(s, b, preprocess=lambda x: x / 255.0, ema_decay=0.5)
    )
    rng = np.random.default_rng(0)
    good = {
        "image": rng.integers(0, 256, (2, 4, 4, 3)).astype(np.float32),
        "mask": rng.integers(0, 2, (2, 4, 4), np.uint8),
    }
    state, metrics = train(state, good)  # momentum, EMA and BN statistics now non-trivial
    assert not metrics["nonfinite"]
    kept = ("params", "opt_state", "batch_stats", "ema_params")
    before = {name: jax.tree.map(np.array, getattr(state, name)) for name in kept}

    bad = dict(good, image=good["image"].copy())
    bad["image"][0, 1, 2, 0] = np.nan
    state, metrics = train(state, bad)

    assert metrics["nonfinite"] and np.isnan(metrics["loss"])
    assert int(state.step) == 2
    for name in kept:
        jax.tree.map(np.testing.assert_array_equal, getattr(state, name), before[name])
    state, metrics = train(state, good)  # the next good step trains again
    assert not metrics["nonfinite"] and np.isfinite(metrics["loss"])
    kernel = state.params["Conv_0"]["kernel"]
    assert not np.array_equal(kernel, before["params"]["Conv_0"]["kernel"])


def step_on_grey_images(state: steps.TrainState) -> tuple[steps.TrainState, dict]:
    """One jitted train step on two grey 4x4 images, all hair."""
    batch = {"image": np.full((2, 4, 4, 3), 100, np.uint8), "mask": np.ones((2, 4, 4), np.uint8)}
    train = jax.jit(lambda s, b: steps.train_step(s, b, preprocess=lambda x: x / 255.0))
    return train(state, batch)


def test_an_overflowing_update_is_refused_like_a_nonfinite_loss():
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, optax.sgd(float("inf")))
    before = jax.tree.map(np.array, state.params)
    state, metrics = step_on_grey_images(state)
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite"]
    jax.tree.map(np.testing.assert_array_equal, state.params, before)


def test_an_overflowing_adam_moment_is_refused_though_the_update_is_finite():
    """A gradient of 1e20 squares to inf in AdamW's second moment: the update m / sqrt(inf) is
    0 and the params finite, but committing that state would freeze the weight for good."""
    optim = optim_config(name="adamw", learning_rate=0.1, schedule="constant")
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 10))
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, tx)
    params = state.params
    params["Conv_1"]["kernel"] = params["Conv_1"]["kernel"] * 1e26
    state = state.replace(params=params)
    before = jax.tree.map(np.array, (state.params, state.opt_state))
    state, metrics = step_on_grey_images(state)
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite"]
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state), before)


def test_nonfinite_batch_norm_statistics_are_refused_though_the_loss_is_finite():
    """Training normalises by the batch's own statistics, so an infinite running variance
    leaves the loss finite; the step must still be refused rather than committed."""
    state = steps.create_train_state(jax.random.key(0), TinyNet(), 4, optax.sgd(0.1))
    state = state.replace(
        batch_stats=jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.inf), state.batch_stats)
    )
    before = jax.tree.map(np.array, state.params)
    state, metrics = step_on_grey_images(state)
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite"]
    jax.tree.map(np.testing.assert_array_equal, state.params, before)


def test_initial_weights_are_those_of_the_plain_threefry_key():
    """create_train_state draws under the unrolled key: the weights model.init gives."""
    key = jax.random.PRNGKey(3)
    state = steps.create_train_state(key, TinyNet(), 8, optax.identity())
    expected = TinyNet().init(jax.random.split(key)[0], jnp.zeros((1, 8, 8, 3)))
    jax.tree.map(np.testing.assert_array_equal, state.params, expected["params"])
    assert float(jnp.abs(state.params["Conv_0"]["kernel"]).sum()) > 0


def test_dropout_masks_change_from_step_to_step_and_repeat_from_the_same_state():
    """Frozen weights (SGD at rate 0): two steps on one batch draw other dropout masks, so
    other losses; the same state draws the same masks again."""
    state = steps.create_train_state(jax.random.key(0), TinyNet(dropout=0.5), 4, optax.sgd(0.0))
    train = jax.jit(lambda s, b: steps.train_step(s, b, preprocess=lambda x: x / 255.0))
    batch = tiny_batch()
    first, metrics = train(state, batch)
    _, second = train(first, batch)
    _, again = train(state, batch)
    assert float(metrics["loss"]) == float(again["loss"])
    assert float(metrics["loss"]) != float(second["loss"])


@pytest.mark.parametrize("ema", [True, False])
def test_restarted_state_starts_afresh_around_the_imported_weights(ema):
    """As from pretrained weights: step, optimizer count and momentum at zero, the params and
    BatchNorm statistics those given, an EMA (where the state kept one) starting from them."""
    optim = optim_config(learning_rate=0.1, schedule="constant")
    tx = steps.create_optimizer(optim, steps.learning_rate_schedule(optim, 10))
    train = jax.jit(
        lambda s, b: steps.train_step(s, b, preprocess=lambda x: x / 255.0, ema_decay=0.5)
    )
    state, _ = train(
        steps.create_train_state(jax.random.key(0), TinyNet(), 4, tx, ema=ema), tiny_batch()
    )
    variables = {
        "params": jax.tree.map(lambda p: jnp.full_like(p, 0.25), state.params),
        "batch_stats": jax.tree.map(lambda s: jnp.full_like(s, 0.5), state.batch_stats),
    }
    new = steps.restarted_state(state, variables)
    assert int(new.step) == 0 and steps.optimizer_count(new.opt_state) == 0
    jax.tree.map(np.testing.assert_array_equal, new.params, variables["params"])
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, variables["batch_stats"])
    moments = [
        leaf for leaf in jax.tree.leaves(new.opt_state) if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert moments and not any(np.any(leaf) for leaf in moments)
    if ema:
        jax.tree.map(np.testing.assert_array_equal, new.ema_params, variables["params"])
    else:
        assert new.ema_params is None
