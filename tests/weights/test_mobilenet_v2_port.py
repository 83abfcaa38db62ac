"""Parity of the torchvision MobileNetV2 port: torch reference models with random weights are
saved in torchvision's (or the original project's) format, loaded, converted and compared with
the Flax models in eval mode.

The comparisons run in float64 on both sides, where a correct port agrees to ~1e-12: the
features reach ~20 and float32 rounding alone (torch float32 vs float64) is ~2e-4 there, so
one float32 case checks the error relative to the features' scale instead.
"""

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hairseg_jax.models import DeepLabV3Plus
from hairseg_jax.models.mobilenet_v2 import MobileNetV2
from hairseg_jax.weights.convert import convert_original_deeplab
from hairseg_jax.weights.mobilenet_v2_port import UNUSED_PREFIXES, convert_mobilenet_v2
from hairseg_jax.weights.tensors import ConversionError, StateDict, check_matches, load_state_dict
from tests.weights import nhwc

TOLERANCE = 1e-4
SHAPES = [(227, 227), (300, 200)]


def calibrate_batch_norm(
    torch: ModuleType, reference: ModuleType, model, images, generator
) -> None:
    """Randomises every BatchNorm's affine and running statistics, and puts ``model`` in
    eval mode.

    Statistics drawn independently of the weights leave MobileNetV2's features nearly
    constant (the BN biases dominate) and never reach ReLU6's cap, which would hide bugs. So
    the running statistics are measured on ``images / 3`` and then jittered: on ``images``
    the features depend on the input and a few percent of ReLU6 outputs clip at 6.
    """
    reference.randomize_batch_norm_stats(model, generator)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics exactly
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        model(images / 3)
        for m in norms:
            n = m.num_features
            m.running_mean += 0.1 * m.running_var.sqrt() * torch.randn(n, generator=generator)
            m.running_var *= 0.7 + 0.6 * torch.rand(n, generator=generator)
            m.momentum = 0.1
    model.eval()


def images(torch: ModuleType, height: int, width: int, seed: int = 0, batch: int = 1):
    """Random NCHW float64 images."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator, dtype=torch.float64)


def max_error(got: jax.Array, expected: np.ndarray) -> float:
    """Max abs difference, computed in float64."""
    assert got.shape == expected.shape
    return float(np.max(np.abs(np.asarray(got, np.float64) - expected)))


def torch_mobilenet_v2(torch: ModuleType, output_stride: int, checkpoint: str | None = None):
    """The torch reference in eval mode, loaded from ``checkpoint`` if given."""
    from hairseg_jax.weights.torch_mobilenet_v2 import MobileNetV2 as TorchMobileNetV2

    model = TorchMobileNetV2(output_stride=output_stride)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(torch, reference, tmp_path_factory) -> str:
    """A torchvision-format MobileNetV2 file (features.18 and classifier included)."""
    torch.manual_seed(0)
    model = torch_mobilenet_v2(torch, 16)
    calibration = images(torch, 96, 96, seed=1).float()
    calibrate_batch_norm(torch, reference, model, calibration, torch.Generator())
    path = tmp_path_factory.mktemp("mobilenet_v2") / "mobilenet_v2.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def variables(checkpoint):
    """The checkpoint converted as a user would: from the file, every tensor accounted for."""
    state = StateDict(load_state_dict(checkpoint), checkpoint)
    converted = convert_mobilenet_v2(state)
    state.check_all_used(UNUSED_PREFIXES)
    return converted


@functools.cache
def flax_backbone(output_stride: int, dtype: jnp.dtype):
    """The jitted eval-mode Flax backbone."""
    model = MobileNetV2(output_stride=output_stride, dtype=dtype)
    return jax.jit(functools.partial(model.apply, train=False))


def as_float64(tree):
    """Variables cast to float64 (used under ``jax.enable_x64``)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_conversion_fits_the_flax_backbone(checkpoint, variables):
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    template = jax.eval_shape(lambda x: MobileNetV2().init(jax.random.key(0), x, train=False), x)
    check_matches(variables, template)
    state = StateDict(load_state_dict(checkpoint))
    convert_mobilenet_v2(state)
    unused = state.unused()
    assert "features.18.0.weight" in unused and "classifier.1.weight" in unused
    assert all(key.startswith(UNUSED_PREFIXES) for key in unused)


def test_missing_tensor_is_named(checkpoint):
    tensors = load_state_dict(checkpoint)
    del tensors["features.5.conv.1.1.running_var"]
    with pytest.raises(ConversionError, match=r"features\.5\.conv\.1\.1\.running_var"):
        convert_mobilenet_v2(StateDict(tensors))


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_backbone_features_match_torch(
    torch, checkpoint, variables, parity_errors, output_stride, height, width
):
    model = torch_mobilenet_v2(torch, output_stride, checkpoint).double()
    x = images(torch, height, width)
    with torch.no_grad():
        expected = model(x)
    with jax.enable_x64(True):
        got = flax_backbone(output_stride, jnp.float64)(as_float64(variables), nhwc(x))
    for key in ("low_level", "high_level"):
        error = max_error(got[key], nhwc(expected[key]))
        scale = float(expected[key].abs().max())
        parity_errors[f"mobilenet_v2 f64 OS{output_stride} {key} {height}x{width}"] = (error, scale)
        assert error <= TOLERANCE, f"{key}: max abs error {error:.2e}"


def test_float32_features_match_torch_up_to_rounding(torch, checkpoint, variables, parity_errors):
    model = torch_mobilenet_v2(torch, 16, checkpoint)
    x = images(torch, 227, 227).float()
    with torch.no_grad():
        expected = model(x)
    got = flax_backbone(16, jnp.float32)(variables, nhwc(x))
    for key in ("low_level", "high_level"):
        scale = float(expected[key].abs().max())
        error = max_error(got[key], nhwc(expected[key]))
        parity_errors[f"mobilenet_v2 OS16 {key} 227x227"] = (error, scale)
        assert error <= TOLERANCE * max(1.0, scale), f"{key}: max abs error {error:.2e}"


def test_deeplab_logits_match_torch(torch, reference, tmp_path, parity_errors):
    """The whole model, in the original project's key layout, through ``convert.py``."""
    torch.manual_seed(1)
    model = reference.TorchDeepLabV3Plus(
        torch_mobilenet_v2(torch, 16),
        24,
        320,
        16,
        num_classes=2,
        low_level_key="low_level",
        high_level_key="high_level",
    )
    calibration = images(torch, 129, 129, seed=1, batch=2).float()
    calibrate_batch_norm(torch, reference, model, calibration, torch.Generator().manual_seed(1))
    path = tmp_path / "deeplab_mobilenet_v2.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    variables = convert_original_deeplab(StateDict(load_state_dict(path)), "mobilenet_v2")
    x = images(torch, 129, 97)
    with torch.no_grad():
        logits = model.double()(x)
    expected = nhwc(logits[:, 1:] - logits[:, :1])
    flax_model = DeepLabV3Plus(backbone="mobilenet_v2", dtype=jnp.float64)
    with jax.enable_x64(True):
        got = jax.jit(functools.partial(flax_model.apply, train=False))(
            as_float64(variables), nhwc(x)
        )
    error = max_error(got, expected)
    parity_errors["mobilenet_v2 f64 OS16 logits 129x97"] = (error, float(np.abs(expected).max()))
    assert error <= TOLERANCE, f"max abs error {error:.2e}"
