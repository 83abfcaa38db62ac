"""Tests of the ResNet backbone: torchvision parameter counts, names, strides and dilations.

Everything is traced abstractly (``jax.eval_shape``), except one small ResNet-50 inference
compiled to count its residual adds.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hairseg_jax.models.resnet import BACKBONES, ResNet, resnet
from tests.models import abstract_init, conv_dilations

# Strides of layer1..layer4 per output stride, as in DeepLabV3.
LAYER_STRIDES = {8: (1, 2, 1, 1), 16: (1, 2, 2, 1), 32: (1, 2, 2, 2)}


def torch_conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output size of a torch conv / max pool (floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 11_176_512), ("resnet50", 23_508_032), ("resnet101", 42_500_160)],
)
def test_param_count_matches_torchvision_without_fc(name, expected):
    _, variables = abstract_init(resnet(name), 64, 64)
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == expected


def test_bottleneck_param_names_mirror_torchvision():
    _, variables = abstract_init(resnet("resnet50"), 64, 64)
    params = variables["params"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params["bn1"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]["bn1"]) == {"mean", "var"}
    assert set(params["layer1_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "conv3",
        "bn3",
        "downsample_conv",
        "downsample_bn",
    }
    assert "downsample_conv" not in params["layer1_1"]
    assert params["layer3_0"]["conv2"]["kernel"].shape == (3, 3, 256, 256)
    assert params["layer3_0"]["downsample_conv"]["kernel"].shape == (1, 1, 512, 1024)
    assert params["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert "layer4_3" not in params


def test_basic_param_names_mirror_torchvision():
    _, variables = abstract_init(resnet("resnet18"), 64, 64)
    params = variables["params"]
    assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert params["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    assert "layer4_2" not in params


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize(("name", "expansion"), [("resnet18", 1), ("resnet50", 4)])
@pytest.mark.parametrize(("height", "width"), [(97, 65), (300, 200)])
def test_feature_shapes_follow_torch_arithmetic(output_stride, name, expansion, height, width):
    model = resnet(name, output_stride=output_stride, multi_grid=(1, 1, 1))
    features, _ = abstract_init(model, height, width)

    sizes = [torch_conv_size(s, 7, 2, 3) for s in (height, width)]
    assert features["stem"].shape == (1, *sizes, 64)
    sizes = [torch_conv_size(s, 3, 2, 1) for s in sizes]
    for i, stride in enumerate(LAYER_STRIDES[output_stride]):
        sizes = [torch_conv_size(s, 3, stride, 1) for s in sizes]
        assert features[f"layer{i + 1}"].shape == (1, *sizes, 64 * 2**i * expansion)
    assert features["layer4"].shape[1] == -(-height // output_stride)


def test_feature_shapes_at_227_os16():
    features, _ = abstract_init(resnet("resnet18"), 227, 227)
    sizes = {name: feature.shape[1] for name, feature in features.items()}
    assert sizes == {"stem": 114, "layer1": 57, "layer2": 29, "layer3": 15, "layer4": 15}


@pytest.mark.parametrize(
    ("name", "output_stride", "multi_grid", "expected"),
    [
        ("resnet18", 16, (1, 2, 4), [2, 2, 4, 4]),
        ("resnet18", 8, (1, 2, 4), [2, 2, 2, 2, 4, 4, 8, 8]),
        ("resnet18", 32, (1, 1), []),
        ("resnet50", 16, (1, 2, 4), [2, 4, 8]),
        ("resnet50", 16, (1, 1, 1), [2, 2, 2]),
    ],
)
def test_dilations_use_output_stride_and_multi_grid(name, output_stride, multi_grid, expected):
    model = resnet(name, output_stride=output_stride, multi_grid=multi_grid)
    assert [d for d in conv_dilations(model, 33) if d != 1] == expected


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="resnet7") as info:
        resnet("resnet7")
    for name in BACKBONES:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"output_stride": 4}, {"multi_grid": (1,)}, {"block": "wide"}])
def test_invalid_configuration_raises(kwargs):
    model = ResNet(**{"stage_sizes": (2, 2, 2, 2), "block": "basic", **kwargs})
    with pytest.raises(ValueError):
        abstract_init(model, 32, 32)


def test_each_residual_add_is_compiled_once():
    """Guards against XLA fusing the chain of block outputs into every later block (the
    quadratic recomputation that ``layers.residual_relu`` avoids)."""
    model = resnet("resnet50")
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    hlo = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    adds = re.findall(r"= f32\S* add\(.*op_name=\"[^\"]*(layer\d_\d+)/add\"", hlo.as_text())
    blocks = sum(BACKBONES["resnet50"][0])
    assert len(set(adds)) == blocks
    assert len(adds) < 1.5 * blocks  # with max(y, 0): several times the block count
