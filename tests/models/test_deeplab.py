"""Tests of the DeepLabV3+ head on a ResNet-18 backbone with small inputs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hairseg_jax.models import DeepLabV3Plus, build_model
from hairseg_jax.models.deeplab import ASPP, resize
from tests.models import abstract_init, conv_dilations, key

# Narrow head so the one compiled model stays quick on CPU.
SMALL = {"aspp_channels": 16, "decoder_channels": 16, "low_level_channels": 8}


@pytest.fixture(scope="module")
def model() -> DeepLabV3Plus:
    return DeepLabV3Plus(backbone="resnet18", **SMALL)


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jax.random.normal(key(1), (2, 64, 96, 3))


@pytest.fixture(scope="module")
def variables(model, images):
    return jax.jit(functools.partial(model.init, train=False))(key(0), images)


@pytest.fixture(scope="module")
def train_apply(model):
    @jax.jit
    def apply(variables, images, rng):
        return model.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
        )

    return apply


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize(("height", "width"), [(64, 96), (65, 97)])
def test_logits_have_input_size(output_stride, height, width):
    logits, _ = abstract_init(
        DeepLabV3Plus(backbone="resnet18", output_stride=output_stride), height, width
    )
    assert logits.shape == (1, height, width, 1)
    assert logits.dtype == jnp.float32


def test_bfloat16_keeps_float32_params_and_logits():
    """The classifier too computes in float32: logits rounded to bf16, then cast, would not be
    float32 logits."""
    model = DeepLabV3Plus(backbone="resnet18", dtype=jnp.bfloat16)
    logits, variables = abstract_init(model, 64, 96)
    assert logits.dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        ),
        variables,
        images,
    )
    decoder = state["intermediates"]["decoder"]
    assert decoder["last_conv_4"]["__call__"][0].dtype == jnp.bfloat16
    assert decoder["last_conv_8"]["__call__"][0].dtype == jnp.float32


def test_head_param_names_mirror_pytorch_project():
    _, variables = abstract_init(DeepLabV3Plus(backbone="resnet18", num_classes=3), 64, 96)
    params = variables["params"]
    assert set(params) == {"backbone", "aspp", "decoder"}
    aspp, decoder = params["aspp"], params["decoder"]
    assert aspp["aspp1"]["atrous_conv"]["kernel"].shape == (1, 1, 512, 256)
    for name in ("aspp2", "aspp3", "aspp4"):
        assert aspp[name]["atrous_conv"]["kernel"].shape == (3, 3, 512, 256)
        assert set(aspp[name]["bn"]) == {"scale", "bias"}
    assert aspp["global_avg_pool_conv"]["kernel"].shape == (1, 1, 512, 256)
    assert "global_avg_pool_bn" in aspp
    assert aspp["conv1"]["kernel"].shape == (1, 1, 5 * 256, 256)
    assert decoder["conv1"]["kernel"].shape == (1, 1, 64, 48)
    assert decoder["last_conv_0"]["kernel"].shape == (3, 3, 256 + 48, 256)
    assert decoder["last_conv_4"]["kernel"].shape == (3, 3, 256, 256)
    assert {"last_conv_1", "last_conv_5", "bn1"} <= set(decoder)
    assert decoder["last_conv_8"]["kernel"].shape == (1, 1, 256, 3)
    assert decoder["last_conv_8"]["bias"].shape == (3,)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    convs = {jax.tree_util.keystr(path[:-1]) for path, _ in leaves if path[-1].key == "kernel"}
    biased = {jax.tree_util.keystr(path[:-1]) for path, _ in leaves if path[-1].key == "bias"}
    assert convs & biased == {"['decoder']['last_conv_8']"}


@pytest.mark.parametrize(
    ("output_stride", "aspp_rates", "expected"),
    [
        (16, None, (6, 12, 18)),
        (8, None, (12, 24, 36)),
        (32, None, (3, 6, 9)),
        (16, (3, 5, 7), (3, 5, 7)),
    ],
)
def test_aspp_rates(output_stride, aspp_rates, expected):
    """aspp2, aspp3 and aspp4 in that order (the original's checkpoints name them so), between
    the 1x1 aspp1 and the image pooling and projection."""
    model = DeepLabV3Plus(
        backbone="resnet18", output_stride=output_stride, aspp_rates=aspp_rates, **SMALL
    )
    assert conv_dilations(model, 64, under="aspp") == [1, *expected, 1, 1]


def test_train_mode_updates_batch_stats(variables, images, train_apply):
    logits, updates = train_apply(variables, images, key(2))
    assert logits.shape == (2, 64, 96, 1)
    assert np.isfinite(logits).all()
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(new) == jax.tree.structure(old)
    # Every BatchNorm (backbone, ASPP and its image pooling, decoder) normalises by the batch
    # and moves its running mean and variance in training.
    for (path, before), after in zip(
        jax.tree_util.tree_leaves_with_path(old), jax.tree.leaves(new), strict=True
    ):
        assert not np.allclose(before, after), jax.tree_util.keystr(path)


def test_aspp_drops_out_its_projection_in_training_only():
    """Its dropout (0.5, the original's) zeroes about half the projection's units and
    doubles the rest, differently for each dropout key."""
    x = jax.random.normal(key(0), (2, 5, 5, 8))
    aspp = ASPP(features=16, rates=(1, 2, 3), dropout=0.5)
    variables = aspp.init(key(1), x, train=False)

    def train(module, seed):
        y, _ = module.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key(seed)}
        )
        return np.asarray(y)

    kept = train(ASPP(features=16, rates=(1, 2, 3), dropout=0.0), 2)
    first, other = train(aspp, 2), train(aspp, 3)
    assert not np.allclose(first, other)
    dropped = (first == 0) & (kept != 0)
    assert 0.3 < dropped.sum() / (kept != 0).sum() < 0.7
    np.testing.assert_allclose(first[~dropped], 2 * kept[~dropped], rtol=1e-5, atol=1e-6)


def test_head_convs_draw_kaiming_normal_weights():
    """As the original's ``kaiming_normal_`` (fan in, gain sqrt 2): std sqrt(2 / fan_in)."""
    x = np.zeros((2, 5, 5, 64), np.float32)
    params = ASPP(features=256, rates=(1, 2, 3), dropout=0.0).init(key(0), x, train=False)
    params = params["params"]
    for kernel, fan_in in (
        (params["conv1"]["kernel"], 5 * 256),
        (params["aspp2"]["atrous_conv"]["kernel"], 9 * 64),
    ):
        np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / fan_in), rtol=0.05)
        assert abs(np.mean(kernel)) < 0.1 * np.sqrt(2.0 / fan_in)


def test_dropout_is_random_in_train_and_off_in_eval(model, variables, images, train_apply):
    first, _ = train_apply(variables, images, key(3))
    again, _ = train_apply(variables, images, key(3))
    other, _ = train_apply(variables, images, key(4))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)

    evaluate = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_array_equal(evaluate(variables, images), evaluate(variables, images))


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="resnet18.*resnet152.*mobilenet_v2"):
        abstract_init(DeepLabV3Plus(backbone="vgg16"), 64, 96)


def test_build_model_reads_config():
    config = ml_collections.ConfigDict(
        {
            "backbone": "resnet50",
            "output_stride": 8,
            "multi_grid": [1, 1, 1],
            "aspp_channels": 128,
            "decoder_channels": 64,
            "dropout": 0.25,
            "dtype": "bfloat16",
        }
    )
    model = build_model(config)
    assert model.backbone == "resnet50"
    assert model.output_stride == 8
    assert model.multi_grid == (1, 1, 1)
    assert (model.aspp_channels, model.decoder_channels) == (128, 64)
    assert model.aspp_dropout == 0.25
    assert model.decoder_dropout == (0.25, 0.05)
    assert model.dtype == jnp.bfloat16


def test_build_model_defaults():
    assert build_model(ml_collections.ConfigDict()) == DeepLabV3Plus()


def test_build_model_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="'float16'"):
        build_model(ml_collections.ConfigDict({"dtype": "float16"}))


def test_build_model_wants_x64_for_float64():
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="jax_enable_x64"):
        build_model(ml_collections.ConfigDict({"dtype": "float64"}))


@pytest.mark.parametrize(
    "align_corners, expected",
    [(True, [0.0, 0.25, 0.5, 0.75, 1.0]), (False, [0.0, 0.1, 0.5, 0.9, 1.0])],
)
def test_resize_corner_conventions(align_corners, expected):
    """A 2-pixel ramp upsampled to 5 pixels, worked out by hand for both conventions."""
    ramp = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    out = resize(ramp, 1, 5, align_corners)
    np.testing.assert_allclose(np.asarray(out).ravel(), expected, atol=1e-6)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(1, 1), (1, 3), (4, 1), (7, 2), (3, 9)])
def test_resize_matches_torch_interpolate(torch, align_corners, size):
    """Down to a single pixel too, where torch samples the first (align_corners) or the
    centre's neighbourhood, and up from one."""
    x = np.random.default_rng(0).normal(size=(1, 5, 1, 2)).astype(np.float32)
    x = np.concatenate([x, x[:, :, :, ::-1] * 2], axis=2)  # (1, 5, 2, 2)
    for source in (x, x[:, :1, :1]):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(source.transpose(0, 3, 1, 2)),
            size,
            mode="bilinear",
            align_corners=align_corners,
        ).numpy()
        out = np.asarray(resize(jnp.asarray(source), *size, align_corners))
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, atol=1e-6)
