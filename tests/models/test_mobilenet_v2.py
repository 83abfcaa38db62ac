"""Tests of the MobileNetV2 backbone: torchvision parameter count and names, strides,
dilations, and DeepLabV3+ on top of it.

Everything is traced abstractly (``jax.eval_shape`` / ``jax.make_jaxpr``), nothing is compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hairseg_jax.models import DeepLabV3Plus, layers
from hairseg_jax.models.mobilenet_v2 import MobileNetV2, block_plan, mobilenet_v2
from tests.models import abstract_init

# torchvision's mobilenet_v2 has 3,504,872 parameters; features.18 (320 * 1280 conv + BN)
# has 412,160 and the classifier (1280 * 1000 + 1000) 1,281,000.
FEATURES_0_TO_17_PARAMS = 3_504_872 - 412_160 - 1_281_000


def torch_conv_size(size: int, stride: int) -> int:
    """Output size of a torch 3x3 conv with padding ``dilation`` (any dilation)."""
    return (size - 1) // stride + 1


def test_param_count_matches_torchvision_features_0_to_17():
    assert FEATURES_0_TO_17_PARAMS == 1_811_712
    _, variables = abstract_init(mobilenet_v2(), 64, 64)
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == 1_811_712


def test_param_names_mirror_torchvision():
    _, variables = abstract_init(mobilenet_v2(), 64, 64)
    params, stats = variables["params"], variables["batch_stats"]
    assert set(params) == {f"features_{i}" for i in range(18)}
    assert params["features_0"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert set(params["features_0"]["bn"]) == {"scale", "bias"}
    assert set(stats["features_0"]["bn"]) == {"mean", "var"}
    assert set(params["features_1"]) == {"depthwise", "project_conv", "project_bn"}
    assert params["features_1"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 32)
    assert params["features_1"]["project_conv"]["kernel"].shape == (1, 1, 32, 16)
    block = params["features_17"]
    assert set(block) == {"expand", "depthwise", "project_conv", "project_bn"}
    assert block["expand"]["conv"]["kernel"].shape == (1, 1, 160, 960)
    assert block["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 960)
    assert block["project_conv"]["kernel"].shape == (1, 1, 960, 320)
    assert set(stats["features_17"]) == {"expand", "depthwise", "project_bn"}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    convs = {path[:-1] for path, _ in leaves if path[-1].key == "kernel"}
    biased = {path[:-1] for path, _ in leaves if path[-1].key == "bias"}
    assert len(convs) == 1 + 17 * 3 - 1 and not convs & biased  # features.1 has no expand


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize(("height", "width"), [(227, 227), (300, 200)])
def test_feature_strides(output_stride, height, width):
    features, _ = abstract_init(mobilenet_v2(output_stride=output_stride), height, width)
    assert set(features) == {"low_level", "high_level"}
    low = [torch_conv_size(torch_conv_size(torch_conv_size(s, 2), 2), 1) for s in (height, width)]
    assert features["low_level"].shape == (1, *low, 24)
    high = low
    for stride in {8: (2,), 16: (2, 2), 32: (2, 2, 2)}[output_stride]:
        high = [torch_conv_size(s, stride) for s in high]
    assert features["high_level"].shape == (1, *high, 320)
    assert features["high_level"].shape[1] == -(-height // output_stride)


@pytest.mark.parametrize(
    ("output_stride", "expected"),
    # TF-slim's: from the block that gives up its stride on, blocks 15 .. 17 at 16; 8 .. 17 at 8.
    [(32, []), (16, [2, 2, 2]), (8, [2, 2, 2, 2, 2, 2, 2, 4, 4, 4])],
)
def test_dilations_follow_deeplab_rule(output_stride, expected):
    model = mobilenet_v2(output_stride=output_stride)
    x = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
    with layers.reference_formulations():  # XLA's convolutions, depthwise ones included
        jaxpr = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    convs = [eqn.params for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]
    assert [p["rhs_dilation"][0] for p in convs if p["rhs_dilation"][0] != 1] == expected
    assert sum(p["feature_group_count"] > 1 for p in convs) == 17
    assert [d for *_, d in block_plan(output_stride) if d != 1] == expected


def test_bfloat16_keeps_float32_params():
    model = MobileNetV2(dtype=jnp.bfloat16)
    features, variables = abstract_init(model, 64, 64, jnp.bfloat16)
    assert features["high_level"].dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}


def test_invalid_output_stride_raises():
    with pytest.raises(ValueError, match="output_stride"):
        abstract_init(mobilenet_v2(output_stride=4), 32, 32)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_with_mobilenet_v2(output_stride):
    model = DeepLabV3Plus(backbone="mobilenet_v2", output_stride=output_stride, multi_grid=(1,))
    logits, variables = abstract_init(model, 97, 65)
    assert logits.shape == (1, 97, 65, 1)
    assert logits.dtype == jnp.float32
    params = variables["params"]
    assert set(params["backbone"]) == {f"features_{i}" for i in range(18)}
    assert params["aspp"]["aspp1"]["atrous_conv"]["kernel"].shape == (1, 1, 320, 256)
    assert params["decoder"]["conv1"]["kernel"].shape == (1, 1, 24, 48)
