"""The best MFU a train step can reach while BatchNorm runs outside the convolutions' kernels.

    python benchmarks/roofline.py --backbones=resnet101 --sizes=512 --batches=32 \
        --dtypes=bfloat16 --devices=H100,H200

Nothing is run: the model is traced on the CPU (``jax.eval_shape``), so the figures are the
same on every machine. Lower bounds on a train step's time:
- ``compute_ms``: the model FLOPs (``train_step.py``'s count: 3x the forward convolutions and
  matrix products) at the device's dense bf16 peak, the MFU's measure;
- ``kernels_ms``: the same work kernel by kernel (each ``Conv2d`` call's forward pass, input
  gradient, but not for the images, and weight gradient), each taking at least its FLOPs at
  ``--conv_efficiency`` of that peak and at least its own HBM traffic at the memory
  bandwidth: its operands read and its result written once, in the map's dtype (weight
  gradients in float32). A 1x1 convolution over 64 channels does about 51 FLOP per byte,
  below the H100's 295 at which its memory keeps up with its peak, so such kernels are bound
  by memory (``conv_memory_ms``: all the kernels' traffic alone);
- ``memory_ms``: the HBM traffic of the model's BatchNorms in training at the device's memory
  bandwidth. XLA calls cuDNN and cuBLAS for the convolutions and fuses nothing into them, so
  each BatchNorm over a map of E values moves at least ``--bn_passes`` x E values in the
  dtype of the map: forward, one read for the statistics, one read and one write to
  normalise (ReLU and residual adds fused in); backward, two reads (the output gradient and
  the input) for the sums of ``dy`` and ``dy * x_hat``, then two reads and one write for the
  input gradient: 8 passes;
- ``optimizer_ms``: SGD with momentum reads the float32 params, gradients and momentum and
  writes the params and momentum (5 passes over the parameters).
These kernels run one after the other on the GPU's stream, so
``mfu_ceiling = compute_ms / (kernels_ms + memory_ms + optimizer_ms)`` bounds the MFU of any
step of this model whose BatchNorm is not fused into its convolutions, and
``mfu_ceiling_bn_fused`` (``memory_ms`` left out) that of one whose BatchNorm is. Runs on a
bare JAX install (JAX, flax, numpy and the package's model code).
"""

import argparse
import itertools

import conv_rates  # benchmarks/conv_rates.py: the model's Conv2d calls and their FLOPs
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import train_step  # benchmarks/train_step.py: the config helpers; puts the repo on sys.path

from hairseg_jax import cli, models, steps
from hairseg_jax.models import layers


def batch_norm_values(config) -> tuple[int, int]:
    """How many BatchNorms one train-mode forward pass of ``config``'s model applies and the
    number of values of all their inputs together, over one ``config.train`` batch."""
    model = models.build_model(config.model)
    size = config.data.image_size
    images = jax.ShapeDtypeStruct((config.train.batch_size, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    sizes = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
            sizes.append(args[0].size)
        return next_fun(*args, **kwargs)

    def train_forward(variables, x):
        rngs = {"dropout": jax.random.key(0)}
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)

    with nn.intercept_methods(record):
        jax.eval_shape(train_forward, variables, images)
    return len(sizes), int(np.sum(sizes, dtype=np.int64))


def conv_kernels(config) -> list[tuple[float, float]]:
    """(FLOPs, HBM bytes) of each convolution kernel of one train step of ``config``'s model:
    every ``Conv2d`` call's forward pass, input gradient (none for the images) and weight
    gradient, each reading its operands and writing its result once."""
    itemsize = jnp.dtype(config.model.dtype).itemsize
    kernels = []
    for call, count in conv_rates.model_convs(config).items():
        flops = conv_rates.conv_flops(call)
        batch, height, width, channels = call.input_shape
        out_height, out_width = -(-height // call.strides), -(-width // call.strides)
        inputs = batch * height * width * channels
        outputs = batch * out_height * out_width * call.features
        weights = call.kernel_size**2 * channels // call.groups * call.features
        maps = itemsize * (inputs + outputs)
        passes = [(flops, maps + itemsize * weights), (flops, maps + 4 * weights)]
        if channels != 3:  # the images need no gradient
            passes.append((flops, maps + itemsize * weights))
        kernels += passes * count
    return kernels


def parse_args() -> argparse.Namespace:
    """Command-line flags: the grid, the devices and the assumptions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_grid_flags(parser, size=512, batch=32, dtype="bfloat16")
    parser.add_argument(
        "--devices",
        type=train_step.csv_list(str),
        default=["H100"],
        help=f"names among {sorted(train_step.ACCELERATORS)}",
    )
    parser.add_argument(
        "--bn_passes", type=float, default=8.0, help="map-sized transfers per BatchNorm"
    )
    parser.add_argument(
        "--conv_efficiency",
        type=float,
        default=1.0,
        help="fraction of the bf16 peak that the convolutions and matrix products run at",
    )
    args = parser.parse_args()
    if not 0 < args.conv_efficiency <= 1:
        parser.error(f"--conv_efficiency={args.conv_efficiency:g} must be in (0, 1]")
    if not args.bn_passes >= 0:
        parser.error(f"--bn_passes={args.bn_passes:g} must not be negative")
    for name in args.devices:
        if not train_step.accelerator(name):
            parser.error(f"unknown device {name!r}; known: {', '.join(train_step.ACCELERATORS)}")
    return args


def main() -> None:
    args = parse_args()
    base = train_step.base_config(args.config, args.set)
    print(
        f"# roofline bn_passes={args.bn_passes:g} conv_efficiency={args.conv_efficiency:g} "
        f"jax={jax.__version__}",
        flush=True,
    )
    for backbone, size, batch, dtype in itertools.product(
        args.backbones, args.sizes, args.batches, args.dtypes
    ):
        config = train_step.case_config(base, backbone, size, batch, dtype, args.output_stride)
        model = models.build_model(config.model)
        step_flops = 3.0 * train_step.image_forward_flops(model, size) * batch
        norms, values = batch_norm_values(config)
        step_bytes = args.bn_passes * values * jnp.dtype(config.model.dtype).itemsize
        kernels = conv_kernels(config)
        params = sum(p.size for p in jax.tree.leaves(steps.variable_shapes(model, size)["params"]))
        for name in args.devices:
            spec = train_step.accelerator(name)
            rate = spec.bf16_peak * args.conv_efficiency
            compute_ms = 1e3 * step_flops / spec.bf16_peak
            kernels_ms = 1e3 * sum(max(f / rate, b / spec.bandwidth) for f, b in kernels)
            conv_memory_ms = 1e3 * sum(b for _, b in kernels) / spec.bandwidth
            memory_ms = 1e3 * step_bytes / spec.bandwidth
            optimizer_ms = 1e3 * 5 * 4 * params / spec.bandwidth
            ceiling = compute_ms / (kernels_ms + memory_ms + optimizer_ms)
            fused = compute_ms / (kernels_ms + optimizer_ms)
            print(
                f"roofline backbone={backbone} size={size} batch={batch} dtype={dtype} "
                f"device={name} model_tflop_per_step={step_flops / 1e12:.4g} "
                f"compute_ms={compute_ms:.3g} kernels_ms={kernels_ms:.3g} "
                f"conv_memory_ms={conv_memory_ms:.3g} batch_norms={norms} "
                f"bn_gvalues_per_step={values / 1e9:.4g} "
                f"bn_gbytes_per_step={step_bytes / 1e9:.3g} memory_ms={memory_ms:.3g} "
                f"optimizer_ms={optimizer_ms:.3g} mfu_ceiling={ceiling:.3f} "
                f"mfu_ceiling_bn_fused={fused:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    cli.run_interruptibly(main, "while benchmarking")
