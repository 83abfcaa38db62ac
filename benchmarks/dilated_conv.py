"""Dilated 3x3 convolutions as XLA runs them vs. as space-to-batch or tap products (bare JAX).

    python benchmarks/dilated_conv.py

Space-to-batch turns a convolution of dilation ``r`` into an undilated one over the ``r * r``
interleaved sub-images of the input (padded to a multiple of ``r``), then interleaves the
outputs back; the result is exact. Tap products (``layers.tap_products``, what ``Conv2d``
computes on CPU when at most ``TAP_PRODUCTS_MAX_FRACTION`` of the dense work is real) sum one
matrix product per tap over the pixels that tap reaches. Prints one line per case and
formulation: forward and forward+backward milliseconds, and ``real_fraction``, at the shapes of
the dilated convolutions of ResNet-101 at 227 px (batch 4) and 512 px (batch 1) and ResNet-18
at 128 px and 160 px (batch 16), output stride 16.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hairseg_jax.models.layers import real_fraction, tap_products  # noqa: E402

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def dilated(x: jax.Array, kernel: jax.Array, rate: int) -> jax.Array:
    """The 'SAME' 3x3 convolution of dilation ``rate`` as one XLA convolution."""
    padding = [(rate, rate), (rate, rate)]
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, rhs_dilation=(rate, rate), dimension_numbers=DIMENSIONS
    )


def space_to_batch(x: jax.Array, kernel: jax.Array, rate: int) -> jax.Array:
    """The same convolution as an undilated one over ``rate**2`` interleaved sub-images."""
    n, h, w, c = x.shape
    hp, wp = -(-h // rate) * rate, -(-w // rate) * rate
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(n, hp // rate, rate, wp // rate, rate, c).transpose(2, 4, 0, 1, 3, 5)
    x = x.reshape(rate * rate * n, hp // rate, wp // rate, c)
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=DIMENSIONS
    )
    y = y.reshape(rate, rate, n, hp // rate, wp // rate, -1).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, hp, wp, -1)[:, :h, :w]


def milliseconds(fn: Callable, *args, repeats: int) -> float:
    """Mean milliseconds of ``fn(*args)`` after two untimed calls (compile, warm-up)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


# (batch, side, in channels, out channels, rate)
CASES = [
    (4, 15, 512, 512, 2),  # ResNet-101 227 px: layer4 (multi-grid 2, 4, 8)
    (4, 15, 512, 512, 4),
    (4, 15, 512, 512, 8),
    (4, 15, 2048, 256, 6),  # its ASPP branches
    (4, 15, 2048, 256, 12),
    (16, 8, 512, 512, 2),  # ResNet-18 128 px: layer4
    (16, 8, 512, 512, 4),
    (1, 32, 512, 512, 2),  # ResNet-101 512 px: layer4
    (1, 32, 512, 512, 4),
    (1, 32, 512, 512, 8),
    (1, 32, 2048, 256, 6),  # its ASPP branches
    (1, 32, 2048, 256, 12),
    (1, 32, 2048, 256, 18),
    (16, 10, 512, 512, 2),  # the CPU recipe (ResNet-18) at 160 px: layer4
    (16, 10, 512, 128, 6),  # its 128-channel ASPP
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for batch, side, cin, cout, rate in CASES:
        x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.01, jnp.float32)
        reference = dilated(x, kernel, rate)
        fraction = real_fraction(side, side, kernel.shape, rate)
        for name, conv in [
            ("dilated", dilated),
            ("space_to_batch", space_to_batch),
            ("tap_products", tap_products),
        ]:
            error = float(jnp.max(jnp.abs(conv(x, kernel, rate) - reference)))
            forward = jax.jit(conv, static_argnums=2)
            grads = jax.jit(
                jax.grad(lambda x, k, r, conv=conv: jnp.sum(conv(x, k, r) ** 2), argnums=(0, 1)),
                static_argnums=2,
            )
            forward_ms = milliseconds(forward, x, kernel, rate, repeats=args.repeats)
            both_ms = milliseconds(grads, x, kernel, rate, repeats=args.repeats)
            print(
                f"dilated_conv batch={batch} side={side} cin={cin} cout={cout} rate={rate} "
                f"real_fraction={fraction:.2f} impl={name} forward_ms={forward_ms:.1f} "
                f"forward_backward_ms={both_ms:.1f} max_abs_diff={error:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
