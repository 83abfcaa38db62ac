"""Helpers shared by the model tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from hairseg_jax import threefry
from hairseg_jax.models.layers import Conv2d


def key(seed: int) -> jax.Array:
    """``jax.random.key(seed)`` drawing the same numbers in one fused pass
    (``threefry.unrolled_key``): on CPU, the eager draw of each new shape compiles in about
    0.2 s instead of 1.5 s."""
    return threefry.unrolled_key(jax.random.key(seed))


def abstract_init(model: nn.Module, height: int, width: int, dtype=jnp.float32):
    """The (output, variables) shapes of ``model.init`` on one RGB image (no compile)."""
    x = jax.ShapeDtypeStruct((1, height, width, 3), dtype)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


def conv_dilations(model: nn.Module, size: int, under: str = "") -> list[int]:
    """The ``dilation`` of every ``Conv2d`` (of the submodule ``under``, if named) that
    ``model.init`` calls on a ``size``-pixel image, in call order (abstractly traced; read
    from the modules, whichever way each computes)."""
    dilations = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        called = isinstance(module, Conv2d) and context.method_name == "__call__"
        if called and (not under or module.scope.path[0] == under):
            dilations.append(module.dilation)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return dilations
