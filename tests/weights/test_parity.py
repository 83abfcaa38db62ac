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
from hairseg_jax.models.resnet import resnet
from hairseg_jax.weights import convert
from tests.weights import nhwc

TOLERANCE = 1e-4
FEATURE_SIZE = (300, 200)  # height, width: backbone features
LOGIT_SIZE = (227, 227)  # the whole model
# Each residual block (basic, bottleneck) at both output strides, and ResNet-101's 23-block
# layer3 (ResNet-50 and -101 differ only in the number of blocks of layer3).
CASES = [("resnet18", 16), ("resnet18", 8), ("resnet50", 8), ("resnet101", 16)]


def apply(model, variables, images: np.ndarray):
    return jax.jit(functools.partial(model.apply, train=False))(variables, jnp.asarray(images))


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-os{s}" for b, s in CASES])
def errors(request, torch, reference, tmp_path_factory, parity_errors) -> dict[str, float]:
    """Max abs errors of one backbone and output stride: ``{"layer3": ..., "logits": ...}``."""
    backbone, output_stride = request.param
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = reference.torch_deeplab(backbone, output_stride, num_classes=2)
    reference.randomize_batch_norm_stats(model, generator)
    model.eval()
    feature_images = torch.randn(1, 3, *FEATURE_SIZE, generator=generator)
    logit_images = torch.randn(1, 3, *LOGIT_SIZE, generator=generator)
    with torch.no_grad():
        torch_features = model.backbone(feature_images)
        two_class = model(logit_images)
    torch_logits = nhwc(two_class[:, 1:] - two_class[:, :1])

    directory = tmp_path_factory.mktemp(f"{backbone}_os{output_stride}")
    backbone_file, model_file = directory / f"{backbone}.pth", directory / "model.pth"
    channels = 512 * model.backbone.layer1[0].expansion
    classifier = {"fc.weight": torch.randn(10, channels), "fc.bias": torch.randn(10)}
    torch.save({**model.backbone.state_dict(), **classifier}, backbone_file)  # torchvision's
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, model_file)  # the original's

    variables, whole = convert.convert_file(backbone_file, backbone)
    assert not whole
    features = apply(resnet(backbone, output_stride=output_stride), variables, nhwc(feature_images))
    flax_model = DeepLabV3Plus(backbone=backbone, output_stride=output_stride)
    template = jax.eval_shape(
        functools.partial(flax_model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    model_config = ml_collections.ConfigDict({"backbone": backbone, "align_corners": False})
    variables = convert.load_pretrained(str(model_file), dict(template), model_config)
    logits = np.asarray(apply(flax_model, variables, nhwc(logit_images)))

    pairs = {name: (features[name], nhwc(value)) for name, value in torch_features.items()}
    pairs["logits"] = (logits, torch_logits)
    result = {}
    for name, (got, want) in pairs.items():
        result[name] = float(np.abs(np.asarray(got) - want).max())
        size = "x".join(map(str, LOGIT_SIZE if name == "logits" else FEATURE_SIZE))
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
