"""``config.model.dtype = "bfloat16"``: bf16 convolutions; float32 params, statistics and loss."""

from collections.abc import Iterator

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from hairseg_jax import evaluate, models, sharding, steps
from hairseg_jax.data.synthetic import make_examples

SIZE = 32
BATCH = 8
TRAIN_STEPS = 48  # Dice 0.55-0.63 over four init seeds (0.19-0.58 after 24 steps)
FLOAT32 = {jnp.dtype(jnp.float32)}


def tiny_config(dtype: str):
    """A ResNet-18 DeepLabV3+ with 16-channel heads, AdamW at a constant 3e-3."""
    config = synthetic.get_config()
    config.model.aspp_channels = 16
    config.model.decoder_channels = 16
    config.model.dropout = 0.1
    config.model.dtype = dtype
    config.optim.update(name="adamw", learning_rate=3e-3, weight_decay=0.0, head_lr_multiplier=1.0)
    config.optim.schedule = "constant"
    return config


@pytest.fixture(scope="module")
def initial() -> dict:
    """Initial params and BatchNorm statistics (the same for both dtypes)."""
    config = tiny_config("float32")
    # rbg keys compile faster than threefry's on CPU.
    state = steps.create_train_state(
        jax.random.key(0, impl="rbg"), models.build_model(config.model), SIZE, optax.identity()
    )
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def new_state(config, variables: dict) -> steps.TrainState:
    """A fresh train state of ``config``'s model and optimizer holding copies of ``variables``
    (the train step donates them), placed on the mesh as the step returns it (else the second
    step would compile again)."""
    tx = steps.create_optimizer(config.optim, steps.learning_rate_schedule(config.optim, 100))
    state = steps.TrainState.create(
        apply_fn=models.build_model(config.model).apply,
        tx=tx,
        rng=jax.random.key(1, impl="rbg"),
        **variables,
    )
    return sharding.replicate(state, sharding.data_mesh())


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """64 synthetic training images and masks."""
    examples = make_examples(8 * BATCH, size=SIZE, seed=0)
    return {"image": np.stack(examples.images), "mask": np.stack(examples.masks)}


def batch_at(data: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    start = step * BATCH % len(data["image"])
    return {key: value[start : start + BATCH] for key, value in data.items()}


def equations(jaxpr: jax.extend.core.Jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
    """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
    yield from jaxpr.eqns
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from equations(sub)


def test_bfloat16_runs_convolutions_in_bf16_and_keeps_float32_state(initial, data):
    """Forward and backward convolutions take bf16 operands (on CPU most are matrix products:
    ``layers.Conv2d``); the loss stays float32."""
    state = new_state(tiny_config("bfloat16"), initial)
    train = lambda s, b: steps.train_step(s, b, preprocess=lambda x: x / 255.0)  # noqa: E731
    closed = jax.make_jaxpr(train)(state, batch_at(data, 0))
    convs = [e for e in equations(closed.jaxpr) if e.primitive.name == "conv_general_dilated"]
    bf16 = jnp.dtype(jnp.bfloat16)
    dots = [e for e in equations(closed.jaxpr) if e.primitive.name == "dot_general"]
    products = [e for e in dots if e.invars[0].aval.dtype == bf16]
    # The only other products resize the one-channel logits (an operand with a 1 in its shape).
    others = [e for e in dots if e.invars[0].aval.dtype != bf16]
    assert all(any(1 in v.aval.shape for v in e.invars) for e in others)
    assert len(convs) + len(products) > 40  # ResNet-18 + heads, forward and backward
    assert {v.aval.dtype for e in convs + products for v in e.invars} == {bf16}
    new, metrics = jax.eval_shape(train, state, batch_at(data, 0))
    assert metrics["loss"].dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(new.params)} == FLOAT32
    assert {s.dtype for s in jax.tree.leaves(new.batch_stats)} == FLOAT32


def test_bfloat16_training_lowers_the_loss(initial, data):
    config = tiny_config("bfloat16")
    state = new_state(config, initial)
    train, _ = steps.jit_steps(config)
    batch = batch_at(data, 0)
    losses = []
    for _ in range(4):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    print(f"bf16 losses on one batch: {np.round(losses, 4).tolist()}")
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses
    assert {p.dtype for p in jax.tree.leaves(state.params)} == FLOAT32
    assert {s.dtype for s in jax.tree.leaves(state.batch_stats)} == FLOAT32


def test_bfloat16_eval_dice_within_0_005_of_float32_on_a_trained_checkpoint(initial, data):
    """A float32-trained model evaluated with bf16 convolutions scores (almost) the same."""
    config = tiny_config("float32")
    state = new_state(config, initial)
    train, predict = steps.jit_steps(config)
    for step in range(TRAIN_STEPS):
        state, _ = train(state, batch_at(data, step))
    val = make_examples(16, size=48, seed=1)
    fp32 = evaluate.score_examples(predict, state, val, SIZE, BATCH).summary
    bf16_model = models.build_model(tiny_config("bfloat16").model)
    bf16 = evaluate.score_examples(
        predict, state.replace(apply_fn=bf16_model.apply), val, SIZE, BATCH
    ).summary
    print(f"val Dice: float32 {fp32['dice']:.5f}, bfloat16 {bf16['dice']:.5f}")
    assert fp32["dice"] > 0.4  # trained: calling every pixel hair scores 0.25
    assert abs(bf16["dice"] - fp32["dice"]) <= 0.005
