"""Train state, optimizer and the jitted train/predict steps (pure JAX, flax and optax)."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from hairseg_jax import losses


class TrainState(train_state.TrainState):
    """Flax train state plus BatchNorm statistics and the dropout key."""

    batch_stats: Any
    rng: jax.Array


def normalize(
    images: jax.Array, mean: Sequence[float], std: Sequence[float], bgr: bool = False
) -> jax.Array:
    """uint8 RGB (B, H, W, 3) -> float32 ``(x - mean) / std`` (optionally in BGR order)."""
    images = images.astype(jnp.float32)
    if bgr:
        images = images[..., ::-1]
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup, then poly or cosine decay to zero at ``total_steps``.

    Args:
      config: ``config.optim`` with learning_rate, schedule ("poly", "cosine" or "constant"),
        poly_power and warmup_steps.
      total_steps: length of the whole training run.
    """
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.schedule == "poly":
        decay = optax.polynomial_schedule(config.learning_rate, 0.0, config.poly_power, decay_steps)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
    elif config.schedule == "constant":
        decay = optax.constant_schedule(config.learning_rate)
    else:
        raise ValueError(f"Unknown schedule {config.schedule!r}; use poly, cosine or constant.")
    if not config.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def param_groups(params: Any) -> Any:
    """Labels every parameter "backbone" or "head" (ASPP and decoder)."""
    return {
        name: jax.tree.map(lambda _, n=name: "backbone" if n == "backbone" else "head", tree)
        for name, tree in params.items()
    }


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """SGD with momentum (or AdamW), weight decay, and ``head_lr_multiplier`` for the head."""

    def optimizer(multiplier: float) -> optax.GradientTransformation:
        learning_rate = lambda step: multiplier * schedule(step)  # noqa: E731
        if config.name == "sgd":
            return optax.chain(
                optax.add_decayed_weights(config.weight_decay),
                optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
            )
        if config.name == "adamw":
            return optax.adamw(learning_rate, weight_decay=config.weight_decay)
        raise ValueError(f"Unknown optimizer {config.name!r}; use sgd or adamw.")

    return optax.multi_transform(
        {"backbone": optimizer(1.0), "head": optimizer(config.head_lr_multiplier)}, param_groups
    )


def create_train_state(
    rng: jax.Array, model: nn.Module, image_size: int, tx: optax.GradientTransformation
) -> TrainState:
    """Initialises the model on a dummy batch and wraps it with the optimizer."""
    init_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        rng=dropout_rng,
    )


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, preprocess: Callable[[jax.Array], jax.Array]
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch of uint8 images and 0/1 masks; returns the new state and loss."""
    images = preprocess(batch["image"])
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        return losses.sigmoid_bce(logits, batch["mask"]), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss}


def predict_step(
    state: TrainState, images: jax.Array, *, preprocess: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """Logits (B, H, W, 1) of uint8 images, BatchNorm in inference mode."""
    return state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, preprocess(images), train=False
    )


def jit_steps(input_config: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and predict step for ``config.input``."""
    preprocess = functools.partial(
        normalize,
        mean=tuple(input_config.mean),
        std=tuple(input_config.std),
        bgr=input_config.channel_order == "BGR",
    )
    return (
        jax.jit(functools.partial(train_step, preprocess=preprocess), donate_argnums=0),
        jax.jit(functools.partial(predict_step, preprocess=preprocess)),
    )
