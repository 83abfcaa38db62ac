"""Converted torchvision ResNets and original DeepLabV3+ files against the PyTorch reference.

Random weights with random BatchNorm statistics, saved with torch.save and converted from the
file as a user would; eval mode, float32, odd input sizes, output strides 16 and 8.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hairseg_jax.models.deeplab import DeepLabV3Plus
from hairseg_jax.weights import convert
from tests.weights import nhwc

TOLERANCE = 1e-4
IMAGE_SIZE = (227, 171)  # height, width: odd, not square
# Each residual block (basic, bottleneck) at both output strides, and ResNet-101's 23-block
# layer3 (ResNet-50 and -101 differ only in the number of blocks of layer3).
CASES = [("resnet18", 16), ("resnet18", 8), ("resnet50", 8), ("resnet101", 16)]


def logits_and_features(model, variables, images: np.ndarray) -> tuple[jax.Array, dict]:
    """The model's logits and its backbone's features, from one compiled forward pass."""

    def forward(variables, images):
        logits, captured = model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=lambda module, method: module.name == "backbone",
            mutable=["intermediates"],
        )
        return logits, captured["intermediates"]["backbone"]["__call__"][0]

    return jax.jit(forward)(variables, jnp.asarray(images))


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-os{s}" for b, s in CASES])
def errors(request, torch, reference, tmp_path_factory, parity_errors) -> dict[str, float]:
    """Max abs errors of one backbone and output stride: ``{"layer3": ..., "logits": ...}``."""
    backbone, output_stride = request.param
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = reference.torch_deeplab(backbone, output_stride, num_classes=2)
    reference.randomize_batch_norm_stats(model, generator)
    model.eval()
    images = torch.randn(1, 3, *IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        torch_features = model.backbone(images)
        two_class = model(images)
    torch_logits = nhwc(two_class[:, 1:] - two_class[:, :1])

    directory = tmp_path_factory.mktemp(f"{backbone}_os{output_stride}")
    backbone_file, model_file = directory / f"{backbone}.pth", directory / "model.pth"
    channels = 512 * model.backbone.layer1[0].expansion
    classifier = {"fc.weight": torch.randn(10, channels), "fc.bias": torch.randn(10)}
    torch.save({**model.backbone.state_dict(), **classifier}, backbone_file)  # torchvision's
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, model_file)  # the original's

    flax_model = DeepLabV3Plus(backbone=backbone, output_stride=output_stride)
    template = jax.eval_shape(
        functools.partial(flax_model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    model_config = ml_collections.ConfigDict({"backbone": backbone, "align_corners": False})
    variables = convert.load_pretrained(str(model_file), dict(template), model_config)
    # The torchvision file gives the same backbone as the whole model's file, so the
    # features below are those of both conversions.
    backbone_variables, whole = convert.convert_file(backbone_file, backbone)
    assert not whole
    for collection in ("params", "batch_stats"):
        jax.tree.map(
            np.testing.assert_array_equal,
            backbone_variables[collection],
            jax.device_get(variables[collection]["backbone"]),
        )
    logits, features = logits_and_features(flax_model, variables, nhwc(images))
    logits = np.asarray(logits)

    pairs = {name: (features[name], nhwc(value)) for name, value in torch_features.items()}
    pairs["logits"] = (logits, torch_logits)
    size = "x".join(map(str, IMAGE_SIZE))
    result = {}
    for name, (got, want) in pairs.items():
        result[name] = float(np.abs(np.asarray(got) - want).max())
        parity_errors[f"{backbone} OS{output_stride} {name} {size}"] = (
            result[name],
            float(np.abs(want).max()),
        )
    result["argmax agreement"] = float(np.mean((logits > 0) == (torch_logits > 0)))
    return result


@pytest.mark.parametrize("feature", ["stem", "layer1", "layer2", "layer3", "layer4"])
def test_backbone_features_match(errors, feature):
    print(f"{feature}: max abs error {errors[feature]:.2e}")
    assert errors[feature] <= TOLERANCE


def test_deeplab_logits_match(errors):
    print(f"logits: max abs error {errors['logits']:.2e}")
    assert errors["logits"] <= TOLERANCE
    assert errors["argmax agreement"] == 1.0
