"""Every convolution of the model, timed alone: JAX as ``Conv2d`` computes it here, XLA's
plain convolution, and (with ``--torch``) PyTorch's ``conv2d`` (on the GPU where torch has
CUDA, else on the CPU).

    python benchmarks/conv_rates.py --backbone=resnet101 --size=227 --batch=4 --torch
    python benchmarks/conv_rates.py --backbone=resnet101 --size=512 --batch=16 --dtype=bfloat16

The model's ``Conv2d`` calls are recorded while tracing its forward pass and grouped by
shape; each is then run alone, forward and forward with the gradients of its input and
weights, in ``--dtype`` (parameters float32, as in the model). ``jax`` is the backend's own
formulation (on CPU tap products, row-stacked 1-D convolutions, Winograd, 2-D matrix products
for 1x1; on GPUs space-to-batch), ``plain`` XLA's convolution
(``layers.reference_formulations``). Prints one line per shape and a ``total`` line with each
library's milliseconds and FLOP rate over all of them (and, on a device of known peak, the
share of its dense bf16 peak): a train step computes these and everything between them
(BatchNorm, activations, optimizer), so the totals say how much of the step the convolutions
take in each library (bare JAX install; torch only with ``--torch``).
"""

import argparse
import collections
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import train_step  # benchmarks/train_step.py: the config helpers; puts the repo on sys.path

from hairseg_jax import cli, models
from hairseg_jax.models import layers


class ConvCall(NamedTuple):
    """One ``Conv2d`` application: the module's settings and its input's shape."""

    features: int
    kernel_size: int
    strides: int
    dilation: int
    groups: int
    use_bias: bool
    input_shape: tuple[int, ...]


def model_convs(config) -> collections.Counter:
    """``ConvCall`` -> how often the model's forward pass makes it (recorded while ``init``
    traces that pass over a batch)."""
    model = models.build_model(config.model)
    size = config.data.image_size
    images = jax.ShapeDtypeStruct((config.train.batch_size, size, size, 3), jnp.float32)
    calls: collections.Counter = collections.Counter()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.Conv2d) and context.method_name == "__call__":
            settings = (getattr(module, field) for field in ConvCall._fields[:-1])
            calls[ConvCall(*settings, args[0].shape)] += 1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return calls


def conv_flops(call: ConvCall) -> float:
    """Forward FLOPs of ``call``, as ``train_step.py`` counts the model's."""
    conv = layers.Conv2d(*call[:-1])
    x = jax.ShapeDtypeStruct(call.input_shape, jnp.float32)
    params = jax.eval_shape(conv.init, jax.random.key(0), x)
    with layers.reference_formulations():
        jaxpr = jax.make_jaxpr(conv.apply)(params, x)
    return train_step.forward_flops(jaxpr.jaxpr)


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one untimed call, in milliseconds."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def jax_ms(call: ConvCall, repeats: int, dtype: str) -> tuple[float, float]:
    """Forward and forward-with-gradients milliseconds of ``call`` in ``dtype`` as ``Conv2d``
    traces it in the current formulation setting."""
    conv = layers.Conv2d(*call[:-1], dtype=dtype)
    x = np.random.default_rng(0).standard_normal(call.input_shape, np.float32)
    x = jnp.asarray(x, dtype)
    params = conv.init(jax.random.key(0), x)
    forward = jax.jit(conv.apply)

    @jax.jit
    def both(params, x):
        y, vjp = jax.vjp(conv.apply, params, x)
        return y, vjp(jnp.ones_like(y))

    return best_ms(lambda: forward(params, x), repeats), best_ms(lambda: both(params, x), repeats)


def torch_ms(call: ConvCall, repeats: int, dtype: str) -> tuple[float, float]:
    """PyTorch's forward and forward-with-gradients milliseconds of ``call`` in ``dtype``
    (channels-last; on the GPU where torch has CUDA, as train_step.py's reference)."""
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, height, width, channels = call.input_shape
    generator = torch.Generator().manual_seed(0)
    shape = (call.features, channels // call.groups, call.kernel_size, call.kernel_size)
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(batch, channels, height, width, generator=generator).to(device, torch_dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(*shape, generator=generator).to(device, torch_dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.zeros(call.features, dtype=torch_dtype, device=device) if call.use_bias else None
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    kwargs = dict(
        stride=call.strides,
        padding=call.dilation * (call.kernel_size // 2),
        dilation=call.dilation,
        groups=call.groups,
    )

    def forward():
        with torch.no_grad():
            y = F.conv2d(x, w, b, **kwargs)
        synchronize()
        return y

    def both():
        inputs = (x.detach().requires_grad_(), w.detach().requires_grad_())
        y = F.conv2d(*inputs, b, **kwargs)
        grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
        synchronize()
        return y, grads

    return best_ms(forward, repeats), best_ms(both, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train_step.add_case_flags(parser, size=227, batch=4)
    parser.add_argument(
        "--repeats", type=train_step.positive_int, default=5, help="timed calls per shape (best)"
    )
    parser.add_argument("--torch", action="store_true", help="also time PyTorch's conv2d")
    args = parser.parse_args()
    config = train_step.case_from_flags(args)
    calls = model_convs(config)
    device = jax.devices()[0].device_kind
    print(
        f"# conv_rates backbone={args.backbone} size={args.size} batch={args.batch} "
        f"dtype={args.dtype} device={device} shapes={len(calls)} convs={sum(calls.values())}"
    )
    totals: collections.Counter = collections.Counter()
    for call, count in calls.most_common():
        gflops = conv_flops(call) / 1e9
        times = {"jax": jax_ms(call, args.repeats, args.dtype)}
        with layers.reference_formulations():
            times["plain"] = jax_ms(call, args.repeats, args.dtype)
        if args.torch:
            times["torch"] = torch_ms(call, args.repeats, args.dtype)
        line = (
            f"conv input={'x'.join(map(str, call.input_shape))} features={call.features} "
            f"kernel={call.kernel_size} stride={call.strides} dilation={call.dilation} "
            f"groups={call.groups} count={count} gflops={gflops:.3f}"
        )
        totals["gflops"] += count * gflops
        for impl, (fwd, both) in times.items():
            line += f" {impl}_fwd_ms={fwd:.2f} {impl}_fwd_bwd_ms={both:.2f}"
            totals[f"{impl}_fwd_ms"] += count * fwd
            totals[f"{impl}_fwd_bwd_ms"] += count * both
        print(line, flush=True)
    line = f"total forward_gflops={totals['gflops']:.3f}"
    for impl in times:
        fwd, both = totals[f"{impl}_fwd_ms"], totals[f"{impl}_fwd_bwd_ms"]
        line += (
            f" {impl}_fwd_ms={fwd:.0f} {impl}_fwd_gflops_per_s={totals['gflops'] / fwd * 1e3:.0f}"
            f" {impl}_fwd_bwd_ms={both:.0f}"
            f" {impl}_fwd_bwd_gflops_per_s={3 * totals['gflops'] / both * 1e3:.0f}"
        )
        if spec := train_step.accelerator(device):
            of_peak = 3 * totals["gflops"] * 1e12 / both / spec.bf16_peak
            line += f" {impl}_fwd_bwd_of_bf16_peak={of_peak:.3f}"
    print(line)


if __name__ == "__main__":
    cli.run_interruptibly(main, "while benchmarking")
