"""Train-step speed of DeepLabV3+ in JAX (and the PyTorch reference) over a grid of cases.

Runs on a bare JAX install: it imports JAX, flax, optax, numpy, ml-collections and the
package's model and step code only (no TensorFlow, no clu); torch only with ``--torch``.
Prints one line per case; compile time is reported apart from the step time.

    python benchmarks/train_step.py --backbones=resnet101 --sizes=227 --batches=4 --torch

FLOPs: ``model_gflops`` counts every convolution and matmul of the forward pass from the
jaxpr (2 * outputs * kernel taps * input channels; the image resizes' matrix products too; the
taps of a dilated convolution that only ever read padding are not in the jaxpr, the model
drops them) and takes a train step as 3x the forward pass (forward, input and weight
gradients); MFU divides by the peaks of all the devices the step runs on together (every
device; one with ``--torch``, as PyTorch's step runs on one). The jaxpr
is traced in its plain form (``layers.reference_formulations``), so the count is the same on
every backend, whatever the CPU computes instead (tap products, Winograd).
``xla_gflops`` is XLA's own cost analysis of the compiled step, which may differ (it counts
the padded taps of dilated convolutions differently, and on GPU leaves out the convolutions
that run as cuDNN calls). ``--predict`` times the inference step instead (BatchNorm in
inference mode, no gradients, FLOPs 1x the forward pass); with ``--fold_bn`` also with every
BatchNorm reduced to its bias add, which is what a model with BatchNorm folded into the
preceding convolutions' kernels computes (row ``impl=jax_bn_folded``: its speed, not its
numbers). MFU is model FLOPs per second over the
device's dense bf16 peak, printed for known accelerators. ``jax_over_torch`` is JAX's
images/s over PyTorch's (above 1: JAX is faster); with ``--rounds=N`` the two alternate N
times (``--steps`` each) and the medians are compared, since this machine's speed drifts by up
to 10% between runs:

    python benchmarks/train_step.py --backbones=resnet101 --sizes=227 --batches=4 --steps=2 \
        --torch --rounds=8
"""

import argparse
import ast
import contextlib
import importlib.util
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to torch too

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hairseg_jax import cli, config_checks, models, sharding, steps  # noqa: E402
from hairseg_jax.models import layers  # noqa: E402
from hairseg_jax.models.deeplab import BACKBONE_NAMES  # noqa: E402
from hairseg_jax.models.resnet import BACKBONES  # noqa: E402


class Accelerator(NamedTuple):
    """A device kind's dense bf16 peak in FLOP/s and HBM bandwidth in bytes/s."""

    bf16_peak: float
    bandwidth: float


# From NVIDIA's data sheets: dense bf16, half their figures "with sparsity" (H100 SXM and H200
# 989 TFLOP/s, H100 PCIe 756, the NVL cards 835, A100 312), by JAX's device kind: substring
# match, first wins, so each variant comes before its family.
ACCELERATORS = {
    "H200 NVL": Accelerator(835e12, 4.8e12),
    "H200": Accelerator(989e12, 4.8e12),
    "H100 NVL": Accelerator(835e12, 3.9e12),
    "H100 PCIe": Accelerator(756e12, 2.0e12),
    "H100": Accelerator(989e12, 3.35e12),
    "A100-SXM4-40GB": Accelerator(312e12, 1.555e12),
    "A100-PCIE-40GB": Accelerator(312e12, 1.555e12),
    "A100": Accelerator(312e12, 2.0e12),  # the 80 GB cards
}


def accelerator(device_kind: str) -> Accelerator | None:
    """The figures of a device kind, or None where unknown (e.g. CPUs)."""
    return next((v for k, v in ACCELERATORS.items() if k in device_kind), None)


def forward_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
    """FLOPs of every convolution and dot product in ``jaxpr`` and its sub-jaxprs."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(out) * np.prod(rhs) / out_features
        elif name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
            )
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += forward_flops(sub)
    return total


def image_forward_flops(model: nn.Module, size: int) -> float:
    """FLOPs of ``model``'s forward pass over one ``size`` x ``size`` image, traced in the plain
    formulation (``layers.reference_formulations``), whichever formulation runs here."""
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    with layers.reference_formulations():
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return forward_flops(jaxpr.jaxpr)


# The fields that the scripts' own flags set in each case (``case_config``), not ``--set``.
CASE_FIELDS = (
    "model.backbone",
    "model.output_stride",
    "model.dtype",
    "data.image_size",
    "train.batch_size",
)
DTYPES = ("float32", "bfloat16")
OUTPUT_STRIDES = (8, 16, 32)  # as config_checks allows


def base_config(spec: str, overrides: list[str]):
    """The config of ``FILE`` or ``FILE:VARIANT`` (as ``main.py --config`` takes it) with
    ``key=value`` overrides of its fields (``model.dropout=0``); values are Python literals,
    else strings. Exits with one line for a missing file, an unknown field, an ill-typed
    value, one of ``CASE_FIELDS`` or a value that ``main.py`` would refuse."""
    path, _, variant = spec.partition(":")
    if not Path(path).is_file():
        sys.exit(f"--config: no config file {path}.")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None:  # not a .py file
        sys.exit(f"--config: {path} is not a Python config file.")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (SyntaxError, ImportError) as e:
        sys.exit(f"--config: cannot load {path}: {type(e).__name__}: {e}")
    try:
        config = module.get_config(variant) if variant else module.get_config()
    except (AttributeError, TypeError, ValueError) as e:  # no get_config, an unknown variant
        sys.exit(f"--config {spec}: {e}")
    config.lock()  # as main.py's --config: an override names a field it has
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals:
            sys.exit(f"--set {item}: expected KEY=VALUE.")
        if key in CASE_FIELDS:
            sys.exit(f"--set {key}: this script's own flags set it in each case.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            config.update_from_flattened_dict({key: value})
        except KeyError:  # locked: a field it does not have is not added
            sys.exit(f"--set {key}: {path} has no such field.")
        except TypeError as e:  # ml-collections' type check
            sys.exit(f"--set {item}: {e}")
    try:
        config_checks.check_config(config)
    except config_checks.ConfigError as e:
        sys.exit(f"--config {spec}: {e}")
    return config


def case_config(base, backbone: str, size: int, batch: int, dtype: str, output_stride: int):
    """A copy of ``base`` (a config file's, e.g. figaro.py's SGD + BCE) with one case's model,
    size and batch (its ``CASE_FIELDS``)."""
    config = base.copy_and_resolve_references()
    config.model.backbone = backbone
    config.model.output_stride = output_stride
    config.model.dtype = dtype
    config.data.image_size = size
    config.train.batch_size = batch
    return config


# What the PyTorch reference step computes (the original project's: SGD, BCE, dropout 0.5, no
# EMA) and what its model is; a config other than these is not compared with it.
TORCH_STEP = {
    "optim.name": "sgd",
    "optim.nesterov": False,
    "loss.dice_weight": 0.0,
    "model.dropout": 0.5,
    "train.ema_decay": 0.0,
}
TORCH_MODEL = {"model.multi_grid": (1, 2, 4), "model.align_corners": False}


def torch_differences(config, predict: bool) -> list[str]:
    """The fields (``key=value``) in which ``config`` asks for another step (or, with
    ``predict``, another model) than the PyTorch reference's."""
    reference = TORCH_MODEL if predict else TORCH_MODEL | TORCH_STEP
    found = []
    for key, expected in reference.items():
        section, name = key.split(".")
        value = config[section][name]
        if (tuple(value) if isinstance(value, list | tuple) else value) != expected:
            found.append(f"{key}={value!r} (the reference's: {expected!r})")
    return found


class JaxCase(NamedTuple):
    """A compiled step with its inputs and FLOP counts per image."""

    run: Callable[[Any], tuple[Any, jax.Array]]  # state -> (state, output)
    state: Any
    compiled: jax.stages.Compiled
    compile_s: float
    model_flops_per_image: float
    xla_flops_per_image: float


def bias_only_batch_norm(next_fun, args, kwargs, context):
    """A flax method interceptor that computes each BatchNorm as its bias add alone."""
    if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
        x = args[0]
        return x + context.module.get_variable("params", "bias").astype(x.dtype)
    return next_fun(*args, **kwargs)


def compile_jax(
    config, predict: bool, fold_bn: bool = False, devices: list[jax.Device] | None = None
) -> JaxCase:
    """Compiles the jitted train (or predict) step of ``config`` on a random batch, over
    ``devices`` (default: all); with ``fold_bn`` every BatchNorm is traced as
    ``bias_only_batch_norm``."""
    size, batch = config.data.image_size, config.train.batch_size
    mesh = sharding.data_mesh(devices)
    sharding.check_batch_size(batch, mesh)
    model = models.build_model(config.model)
    tx = steps.create_optimizer(config.optim, steps.learning_rate_schedule(config.optim, 10_000))
    ema = config.train.ema_decay > 0  # the recipe's step, its EMA update included
    state = steps.create_train_state(jax.random.PRNGKey(0), model, size, tx, ema, mesh=mesh)
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "mask": rng.integers(0, 2, (batch, size, size), dtype=np.uint8),
    }
    device_batch = sharding.shard_batch(host_batch, mesh, whole=True)
    train_fn, predict_fn = steps.jit_steps(config, mesh)
    if predict:
        fn, inputs = predict_fn, device_batch["image"]
    else:
        fn, inputs = train_fn, device_batch

    start = time.perf_counter()
    with nn.intercept_methods(bias_only_batch_norm) if fold_bn else contextlib.nullcontext():
        compiled = fn.lower(state, inputs).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    model_flops = (1.0 if predict else 3.0) * image_forward_flops(model, size)

    def run(state):
        if predict:
            return state, compiled(state, inputs)
        state, out = compiled(state, inputs)
        return state, out["loss"]

    # XLA's cost is the program of one device, which computes its share of the batch.
    return JaxCase(run, state, compiled, compile_s, model_flops, xla_flops * mesh.size / batch)


def time_jax(case: JaxCase, steps_timed: int, warmup: int) -> tuple[float, Any]:
    """Seconds per step of a compiled case, after ``warmup`` untimed steps, and the state
    after them (the case's own state is donated to the first step)."""
    state, out = case.state, None
    for _ in range(warmup):
        state, out = case.run(state)
    jax.block_until_ready((state, out))  # a predict step leaves the state as it was
    start = time.perf_counter()
    for _ in range(steps_timed):
        state, out = case.run(state)
    out = np.asarray(out)
    seconds = (time.perf_counter() - start) / steps_timed
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("Non-finite output in the benchmark step.")
    return seconds, state


def torch_steps(config, compile_model: bool, predict: bool) -> tuple[Callable[[int], None], float]:
    """The same step in the PyTorch reference model (SGD, backbone x1 / head x10, BCE; or
    with ``predict`` a forward pass in eval mode without gradients), after its first run:
    a function that runs a number of steps and waits for them, and the first step's seconds."""
    import torch
    import torch.nn.functional as F

    from hairseg_jax.weights.torch_reference import torch_deeplab

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest kernels, as XLA does
    size, batch, optim = config.data.image_size, config.train.batch_size, config.optim
    torch.manual_seed(0)
    model = torch_deeplab(
        config.model.backbone,
        config.model.output_stride,
        aspp_channels=config.model.aspp_channels,
        decoder_channels=config.model.decoder_channels,
    ).to(device, memory_format=torch.channels_last)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.SGD(
        [
            {"params": model.backbone.parameters(), "lr": optim.learning_rate},
            {"params": head, "lr": optim.learning_rate * optim.head_lr_multiplier},
        ],
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
    )
    images = torch.randn(batch, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 2, (batch, 1, size, size), device=device).float()
    model.train(not predict)
    forward = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device, torch.bfloat16, enabled=config.model.dtype == "bfloat16")

    def step() -> torch.Tensor:
        if predict:
            with torch.no_grad(), autocast:
                return forward(images)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), masks)
        loss.backward()
        optimizer.step()
        return loss

    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None

    def run(steps: int) -> None:
        for _ in range(steps):
            out = step()
        synchronize()
        if not torch.isfinite(out).all():
            raise FloatingPointError("Non-finite output in the torch step.")

    start = time.perf_counter()
    run(1)
    return run, time.perf_counter() - start


def time_torch(run: Callable[[int], None], steps_timed: int, warmup: int) -> float:
    """Seconds per step of ``torch_steps``'s ``run``, after ``warmup`` untimed steps."""
    if warmup:
        run(warmup)
    start = time.perf_counter()
    run(steps_timed)
    return (time.perf_counter() - start) / steps_timed


def csv_list(cast: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse type: comma-separated values, each read by ``cast``."""
    return lambda text: [cast(value) for value in text.split(",")]


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def backbone_name(text: str) -> str:
    """An argparse type: one of the model's ``BACKBONE_NAMES``."""
    if text not in BACKBONE_NAMES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(BACKBONE_NAMES)}, got {text!r}"
        )
    return text


def dtype_name(text: str) -> str:
    """An argparse type: one of ``DTYPES``."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES)}, got {text!r}")
    return text


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``, as ``base_config`` reads them."""
    parser.add_argument(
        "--config", default="configs/figaro.py", help="base config: FILE or FILE:VARIANT"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )


def add_grid_flags(parser: argparse.ArgumentParser, size: int, batch: int, dtype: str) -> None:
    """The config flags and a grid of cases: backbones x sizes x batches x dtypes."""
    add_config_flags(parser)
    parser.add_argument("--backbones", type=csv_list(backbone_name), default=["resnet101"])
    parser.add_argument("--sizes", type=csv_list(positive_int), default=[size])
    parser.add_argument("--batches", type=csv_list(positive_int), default=[batch])
    parser.add_argument("--dtypes", type=csv_list(dtype_name), default=[dtype])
    parser.add_argument("--output_stride", type=int, default=16, choices=OUTPUT_STRIDES)


def add_case_flags(parser: argparse.ArgumentParser, size: int, batch: int) -> None:
    """The config flags and one case: backbone, size, batch, dtype (``case_from_flags``)."""
    add_config_flags(parser)
    parser.add_argument("--backbone", type=backbone_name, default="resnet101")
    parser.add_argument("--size", type=positive_int, default=size)
    parser.add_argument("--batch", type=positive_int, default=batch)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--output_stride", type=int, default=16, choices=OUTPUT_STRIDES)


def case_from_flags(args: argparse.Namespace):
    """The config of ``add_case_flags``'s flags."""
    base = base_config(args.config, args.set)
    return case_config(base, args.backbone, args.size, args.batch, args.dtype, args.output_stride)


def parse_args() -> argparse.Namespace:
    """Command-line flags: the grid and the number of steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_flags(parser, size=227, batch=4, dtype="float32")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
    parser.add_argument("--predict", action="store_true", help="time inference instead")
    parser.add_argument(
        "--fold_bn", action="store_true", help="with --predict: also time BatchNorm folded"
    )
    parser.add_argument(
        "--torch",
        action="store_true",
        help="also time the PyTorch reference (on one device; so is JAX then)",
    )
    parser.add_argument("--torch_compile", action="store_true", help="also with torch.compile")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="with --torch: alternate JAX and PyTorch this many times, --steps each, and "
        "report the median round (this machine's speed drifts by up to 10%% between runs)",
    )
    args = parser.parse_args()
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.fold_bn and not args.predict:
        parser.error("--fold_bn times inference: pass --predict too")
    args.torch = args.torch or args.torch_compile
    if args.rounds > 1 and not args.torch:
        parser.error("--rounds alternates JAX and PyTorch: pass --torch too")
    if not args.predict and min(args.batches) < 2:
        parser.error("--batches: a train step needs at least 2 images (BatchNorm over the batch)")
    if args.torch and (others := [b for b in args.backbones if b not in BACKBONES]):
        parser.error(
            f"--torch: the PyTorch reference has no backbone {', '.join(others)}; "
            f"it has {', '.join(BACKBONES)}"
        )
    return args


def main() -> None:
    args = parse_args()
    # PyTorch runs on one device, so JAX does too when compared with it; else on them all.
    devices = jax.devices()[:1] if args.torch else jax.devices()
    spec = accelerator(devices[0].device_kind)
    peak = spec.bf16_peak * len(devices) if spec else None
    print(
        f"# devices={len(devices)}x{devices[0].device_kind} (of {jax.device_count()}) "
        f"jax={jax.__version__} python={platform.python_version()} cpu_cores={os.cpu_count()}",
        flush=True,
    )
    kind = "predict_step" if args.predict else "train_step"
    base = base_config(args.config, args.set)
    if args.torch and (differences := torch_differences(base, args.predict)):
        sys.exit(
            f"--torch times the original's step, which {args.config} does not compute: "
            f"{', '.join(differences)}. Use configs/figaro.py, or --set those fields."
        )
    for backbone, size, batch, dtype in itertools.product(
        args.backbones, args.sizes, args.batches, args.dtypes
    ):
        config = case_config(base, backbone, size, batch, dtype, args.output_stride)
        case = f"backbone={backbone} size={size} batch={batch} dtype={dtype}"
        seconds = {}
        for impl in ["jax", "jax_bn_folded"] if args.predict and args.fold_bn else ["jax"]:
            jax_case = compile_jax(config, args.predict, impl == "jax_bn_folded", devices)
            impl_s, state = time_jax(jax_case, args.steps, args.warmup)
            if impl == "jax":
                plain = jax_case._replace(state=state)
            seconds[impl] = impl_s
            flops = jax_case.model_flops_per_image
            line = (
                f"{kind} impl={impl} {case} compile_s={jax_case.compile_s:.1f} "
                f"ms_per_step={1e3 * impl_s:.1f} images_per_s={batch / impl_s:.2f} "
                f"model_gflops_per_image={flops / 1e9:.1f} "
                f"xla_gflops_per_image={jax_case.xla_flops_per_image / 1e9:.1f}"
            )
            if peak:
                line += f" mfu={flops * batch / impl_s / peak:.3f}"
            print(line, flush=True)
        variants = [False, True] if args.torch_compile else [False] if args.torch else []
        for compile_model in variants:
            run, first_s = torch_steps(config, compile_model, args.predict)
            torch_s = [time_torch(run, args.steps, args.warmup)]
            jax_s = [seconds["jax"]]  # torch is compared with the plain JAX step
            for _ in range(args.rounds - 1):
                step_s, state = time_jax(plain, args.steps, 0)
                plain = plain._replace(state=state)
                jax_s.append(step_s)
                torch_s.append(time_torch(run, args.steps, 0))
            step_s, result_s = statistics.median(jax_s), statistics.median(torch_s)
            name = "torch_compile" if compile_model else "torch"
            line = (
                f"{kind} impl={name} {case} first_step_s={first_s:.1f} "
                f"ms_per_step={1e3 * result_s:.1f} images_per_s={batch / result_s:.2f} "
                f"jax_over_{name}={result_s / step_s:.2f}"
            )
            if args.rounds > 1:
                line += (
                    f" rounds={args.rounds} jax_median_ms_per_step={1e3 * step_s:.1f}"
                    f" jax_ms={','.join(f'{1e3 * t:.0f}' for t in jax_s)}"
                    f" {name}_ms={','.join(f'{1e3 * t:.0f}' for t in torch_s)}"
                )
            if peak:
                line += f" mfu={flops * batch / result_s / peak:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    cli.run_interruptibly(main, "while benchmarking")
