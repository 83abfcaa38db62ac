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
import train_step  # benchmarks/train_step.py: the flag types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hairseg_jax import cli  # noqa: E402
from hairseg_jax.models.layers import (  # noqa: E402
    real_fraction,
    space_to_batch_conv,
    tap_products,
)

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def dilated(x: jax.Array, kernel: jax.Array, rate: int) -> jax.Array:
    """The 'SAME' 3x3 convolution of dilation ``rate`` as one XLA convolution."""
    padding = [(rate, rate), (rate, rate)]
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, rhs_dilation=(rate, rate), dimension_numbers=DIMENSIONS
    )


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


def parse_case(text: str) -> tuple[int, ...]:
    """``BATCH,SIDE,CIN,COUT,RATE`` as a tuple of five positive ints."""
    try:
        case = tuple(int(v) for v in text.split(","))
    except ValueError:
        case = ()
    if len(case) != 5 or min(case) < 1:
        raise argparse.ArgumentTypeError(
            f"expected BATCH,SIDE,CIN,COUT,RATE (positive integers), got {text!r}"
        )
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=train_step.positive_int, default=5)
    parser.add_argument(
        "--dtype", default="float32", choices=train_step.DTYPES, help="of the input and kernel"
    )
    parser.add_argument(
        "--case",
        type=parse_case,
        action="append",
        metavar="BATCH,SIDE,CIN,COUT,RATE",
        help="time this case instead of the built-in list (repeatable)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"# device={jax.devices()[0].device_kind} jax={jax.__version__}", flush=True)
    for batch, side, cin, cout, rate in args.case or CASES:
        x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), args.dtype)
        kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.01, args.dtype)
        reference = dilated(x, kernel, rate).astype(jnp.float32)
        fraction = real_fraction(side, side, kernel.shape, rate)
        for name, conv in [
            ("dilated", dilated),
            ("space_to_batch", space_to_batch_conv),
            ("tap_products", tap_products),
        ]:
            error = float(jnp.max(jnp.abs(conv(x, kernel, rate).astype(jnp.float32) - reference)))
            forward = jax.jit(conv, static_argnums=2)
            grads = jax.jit(
                jax.grad(
                    lambda x, k, r, conv=conv: jnp.sum(conv(x, k, r).astype(jnp.float32) ** 2),
                    argnums=(0, 1),
                ),
                static_argnums=2,
            )
            forward_ms = milliseconds(forward, x, kernel, rate, repeats=args.repeats)
            both_ms = milliseconds(grads, x, kernel, rate, repeats=args.repeats)
            print(
                f"dilated_conv batch={batch} side={side} cin={cin} cout={cout} rate={rate} "
                f"dtype={args.dtype} real_fraction={fraction:.2f} impl={name} "
                f"forward_ms={forward_ms:.1f} forward_backward_ms={both_ms:.1f} "
                f"max_abs_diff={error:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    cli.run_interruptibly(main, "while benchmarking")
