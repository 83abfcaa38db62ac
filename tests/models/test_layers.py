"""Conv2d computes what flax.linen.Conv computes, with the same parameters and gradients;
residual_relu what relu(x + shortcut) computes; max_pool what flax.linen.max_pool computes;
BatchNorm what flax.linen.BatchNorm computes."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hairseg_jax.models import layers
from hairseg_jax.models.layers import BatchNorm, Conv2d, max_pool, residual_relu
from tests.models import key


def jaxpr_equations(layer: nn.Module, x: jax.Array) -> list:
    """The operations ``layer`` applies to ``x`` (traced, nothing compiled)."""
    params = jax.eval_shape(layer.init, key(0), x)
    return jax.make_jaxpr(layer.apply)(params, x).eqns


def jaxpr_primitives(layer: nn.Module, x: jax.Array) -> set[str]:
    """The primitives ``layer`` applies to ``x``."""
    return {e.primitive.name for e in jaxpr_equations(layer, x)}


@pytest.mark.parametrize(
    "kernel_size, strides, dilation, groups, size",
    [
        (1, 1, 1, 1, 9),  # matrix product
        (1, 2, 1, 1, 9),  # strided 1x1: subsample, then matrix product
        (3, 1, 6, 1, 9),  # dilation 6 on 9 pixels: every tap still reaches the map
        (3, 1, 12, 1, 9),  # dilation 12 on 9 pixels: only the centre tap is left
        (3, 1, 4, 1, 5),  # dilation 4 on 5 pixels: all taps, just
        (3, 1, 1, 1, 9),  # undilated, few channels on a narrow map: row-stacked 1-D conv
        (5, 1, 1, 1, 9),
        (3, 2, 1, 1, 9),
        (3, 1, 2, 4, 9),  # depthwise: on CPU a sum of taps
        (3, 2, 1, 4, 9),  # depthwise, strided
        (3, 1, 12, 4, 9),  # depthwise, only the centre tap left
        (3, 2, 1, 2, 9),  # grouped, not depthwise: XLA's convolution
        (7, 2, 1, 1, 9),
    ],
)
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_conv2d_matches_flax_conv(
    monkeypatch, backend, kernel_size, strides, dilation, groups, size
):
    """On CPU, and traced as for a GPU (the backend's name patched) but evaluated here."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x = jax.random.normal(key(0), (2, size, size + 3, 4))
    pad = dilation * (kernel_size // 2)
    reference = nn.Conv(
        4,
        (kernel_size, kernel_size),
        strides=strides,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=True,
        kernel_init=nn.initializers.normal(1.0),
        bias_init=nn.initializers.normal(1.0),
    )
    layer = Conv2d(4, kernel_size, strides, dilation, groups, use_bias=True)
    params = reference.init(key(1), x)
    assert jax.tree.map(jnp.shape, layer.init(key(1), x)) == jax.tree.map(jnp.shape, params)

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    np.testing.assert_allclose(layer.apply(params, x), reference.apply(params, x), atol=1e-4)
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)  # one compile, not one per op
    grads, expected = grad(layer, params, x), grad(reference, params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_conv2d_computes_in_bfloat16_with_float32_params():
    x = jnp.ones((1, 5, 5, 3))
    layer = Conv2d(2, 3, dtype=jnp.bfloat16, use_bias=True)
    params = layer.init(key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert layer.apply(params, x).dtype == jnp.bfloat16


def test_residual_relu_matches_relu_in_values_gradients_and_nans():
    x = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0, jnp.nan, 1.0, -1.0])
    shortcut = jnp.array([1.0, 0.5, 0.0, -1.0, 0.5, 0.0, jnp.inf, -jnp.inf])

    def reference(x, shortcut):
        return nn.relu(x + shortcut)

    np.testing.assert_array_equal(residual_relu(x, shortcut), reference(x, shortcut))
    finite = slice(0, 5)  # relu's gradient at 0 is 0, also where x + shortcut == 0
    grads = jax.grad(lambda x, s: jnp.sum(residual_relu(x, s)[finite]), (0, 1))(x, shortcut)
    expected = jax.grad(lambda x, s: jnp.sum(reference(x, s)[finite]), (0, 1))(x, shortcut)
    np.testing.assert_array_equal(grads, expected)
    assert residual_relu(x, shortcut).dtype == x.dtype


@pytest.mark.parametrize(
    "size, dilation, expected",
    [
        (32, 18, (14 + 32 + 14) ** 2 / (9 * 32 * 32)),  # ASPP rate 18 at 512 px: 0.39
        (32, 6, (26 + 32 + 26) ** 2 / (9 * 32 * 32)),  # rate 6: 0.77
        (9, 6, (3 + 9 + 3) ** 2 / (9 * 9 * 9)),
    ],
)
def test_real_fraction_counts_the_pixels_each_tap_reaches(size, dilation, expected):
    assert layers.real_fraction(size, size, (3, 3), dilation) == pytest.approx(expected)


@pytest.mark.parametrize(
    "size, dilation, products",
    [(9, 6, True), (32, 6, True), (15, 2, True), (32, 2, False)],  # fractions 0.31 0.77 0.83 0.92
)
def test_cpu_computes_dilated_convs_that_read_much_padding_as_tap_products(
    size, dilation, products
):
    primitives = jaxpr_primitives(Conv2d(4, 3, dilation=dilation), jnp.zeros((1, size, size, 2)))
    assert jax.default_backend() == "cpu"
    assert ("conv_general_dilated" not in primitives) == products


@pytest.mark.parametrize(
    "features, channels, size, dilation",
    [(4, 2, 9, 6), (4, 2, 9, 1), (256, 65, 32, 1)],  # tap products, row-stacked, Winograd
)
def test_reference_formulations_trace_xla_convolutions_on_cpu(features, channels, size, dilation):
    layer = Conv2d(features, 3, dilation=dilation)
    x = jnp.zeros((1, size, size, channels))
    assert jax.default_backend() == "cpu"
    assert jaxpr_primitives(layer, x) != {"conv_general_dilated"}
    with layers.reference_formulations():
        assert jaxpr_primitives(layer, x) == {"conv_general_dilated"}
    assert jaxpr_primitives(layer, x) != {"conv_general_dilated"}


@pytest.mark.parametrize(
    "shape, kernel_shape, dilation",
    [
        ((2, 12, 12, 3), (3, 3), 2),  # sides a multiple of the dilation
        ((1, 9, 13, 2), (3, 3), 6),  # padded up to 12x18
        ((1, 32, 32, 4), (3, 3), 18),  # ASPP's rate 18 at 512 px
        ((1, 5, 11, 2), (1, 3), 6),  # kernel rows cut off (they read only padding)
        ((1, 10, 10, 2), (5, 5), 3),
    ],
)
def test_space_to_batch_conv_matches_the_dilated_conv(shape, kernel_shape, dilation):
    x = jax.random.normal(key(0), shape)
    kernel = jax.random.normal(key(1), (*kernel_shape, shape[-1], 5))
    pads = [(dilation * (k // 2), dilation * (k // 2)) for k in kernel_shape]
    expected = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        pads,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    got = layers.space_to_batch_conv(x, kernel, dilation)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("size, dilation", [(9, 2), (9, 6), (15, 4)])
def test_gpus_compute_dilated_convs_by_space_to_batch(monkeypatch, size, dilation):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    equations = jaxpr_equations(Conv2d(4, 3, dilation=dilation), jnp.zeros((2, size, size + 3, 4)))
    convs = [e for e in equations if e.primitive.name == "conv_general_dilated"]
    assert [e.params["rhs_dilation"] for e in convs] == [(1, 1)]


def test_gpus_keep_the_convolution_when_only_the_centre_tap_is_left(monkeypatch):
    """Dilation 18 on 15 pixels: the other taps only read padding, nothing to interleave."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    equations = jaxpr_equations(Conv2d(4, 3, dilation=18), jnp.zeros((1, 15, 15, 2)))
    convs = [e for e in equations if e.primitive.name == "conv_general_dilated"]
    assert [e.invars[1].aval.shape[:2] for e in convs] == [(1, 1)]
    assert "transpose" not in {e.primitive.name for e in equations}


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_row_by_row_weight_gradient_matches_flax_conv(kernel_size):
    """A conv wide and large enough for the row-by-row weight gradient (256 outputs, 32x32)."""
    x = jax.random.normal(key(0), (2, 32, 33, 65))
    pad = kernel_size // 2
    reference = nn.Conv(256, (kernel_size, kernel_size), padding=pad, use_bias=False)
    layer = Conv2d(256, kernel_size)
    params = reference.init(key(1), x)
    weights = jax.random.normal(key(2), (2, 32, 33, 256))

    def loss(module, params, x):
        return jnp.sum(module.apply(params, x) * weights)

    assert jax.default_backend() == "cpu"
    assert "custom_vjp_call" in jaxpr_primitives(layer, x)
    np.testing.assert_allclose(layer.apply(params, x), reference.apply(params, x), atol=1e-5)
    grads = jax.grad(loss, argnums=(1, 2))(layer, params, x)
    expected = jax.grad(loss, argnums=(1, 2))(reference, params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 7, 10, 3), (3, 1, 2, 4)])
def test_winograd_conv3x3_matches_the_direct_conv(shape):
    """Even and odd sizes (the last tile row or column cut off), down to a 1x2 map."""
    x = jax.random.normal(key(0), shape)
    kernel = jax.random.normal(key(1), (3, 3, shape[-1], 6))
    expected = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = layers.winograd_conv3x3(x, kernel)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_same_conv_uses_winograd_only_for_3x3_float32_kernels():
    def dots(x, kernel):
        jaxpr = jax.make_jaxpr(layers._same_conv)(x, kernel)
        return sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)

    x = jnp.zeros((1, 6, 6, 4))
    assert dots(x, jnp.zeros((3, 3, 4, 4))) == 16
    assert dots(x, jnp.zeros((5, 5, 4, 4))) == 0
    assert dots(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 4, 4), jnp.bfloat16)) == 0


@pytest.mark.parametrize(
    "features, size, strides, rows",
    [
        (256, 32, 1, True),
        (128, 57, 1, True),
        (64, 57, 1, False),
        (256, 31, 1, False),
        (256, 64, 2, False),
    ],
)
def test_cpu_takes_the_weight_gradient_row_by_row_only_for_wide_convs_on_large_maps(
    features, size, strides, rows
):
    primitives = jaxpr_primitives(
        Conv2d(features, 3, strides=strides), jnp.zeros((1, size, size, 65))
    )
    assert jax.default_backend() == "cpu"
    assert ("custom_vjp_call" in primitives) == rows


@pytest.mark.parametrize(
    "channels, width, strides, dilation, stacked",
    [
        (64, 57, 1, 1, True),  # ResNet-101's layer1 at 227 px
        (64, 64, 1, 1, True),
        (65, 57, 1, 1, False),
        (64, 65, 1, 1, False),  # YNNPACK's convolution is fast again on wider maps
        (64, 57, 2, 1, False),
        (64, 57, 1, 2, False),
    ],
)
def test_cpu_stacks_rows_only_for_undilated_convs_with_few_channels_on_narrow_maps(
    channels, width, strides, dilation, stacked
):
    layer = Conv2d(64, 3, strides=strides, dilation=dilation)
    equations = jaxpr_equations(layer, jnp.zeros((1, 5, width, channels)))
    conv_ranks = {
        e.invars[0].aval.ndim for e in equations if e.primitive.name == "conv_general_dilated"
    }
    assert jax.default_backend() == "cpu"
    assert (conv_ranks == {3}) == stacked


@pytest.mark.parametrize("formulation", [layers.tap_products, layers.column_conv])
@pytest.mark.parametrize(
    "kernel_shape, dilation", [((3, 3), 2), ((3, 3), 1), ((1, 3), 6), ((5, 5), 3), ((1, 1), 1)]
)
def test_tap_products_column_convs_and_their_gradients_match_the_conv(
    formulation, kernel_shape, dilation
):
    """The custom gradients (tap products: the input's by the taps' transposed kernels, the
    kernel's tap by tap; column convs: one product of columns each) are the convolution's, in
    float32 and, to its precision, in bfloat16."""
    x = jax.random.normal(key(0), (2, 9, 8, 3))
    kernel = jax.random.normal(key(1), (*kernel_shape, 3, 4))
    pads = [(dilation * (k // 2), dilation * (k // 2)) for k in kernel_shape]
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        padding=pads,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    taps = jax.jit(functools.partial(formulation, dilation=dilation))
    dy = jax.random.normal(key(2), (2, 9, 8, 4))
    want = jax.vjp(conv, x, kernel)[1](dy)
    np.testing.assert_allclose(taps(x, kernel), conv(x, kernel), rtol=1e-5, atol=1e-5)
    for got, expected in zip(jax.vjp(taps, x, kernel)[1](dy), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, kernel, dy)]
    got = jax.vjp(taps, *bf16[:2])[1](bf16[2])
    for g, expected in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            g.astype(jnp.float32), expected, atol=0.02 * np.abs(expected).max()
        )


@pytest.mark.parametrize("channels, features", [(16, 8), (8, 16)])
def test_pixel_products_are_the_1x1_weight_gradient(channels, features):
    """Either map copied channels-major in bfloat16 (the one with fewer channels), none in
    float32; the (in, out) product summed over every pixel, in float32."""
    x = jax.random.normal(key(0), (2, 5, 7, channels))
    dy = jax.random.normal(key(1), (2, 5, 7, features))
    want = jnp.einsum("nhwc,nhwk->ck", x, dy)
    np.testing.assert_allclose(layers.pixel_products(x, dy), want, rtol=1e-5, atol=1e-4)
    got = layers.pixel_products(x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


# Replacing XLA's conv; the row-by-row weight gradient; a dilated conv left to XLA in float32
# (real fraction 0.92); a dilated conv of which only the centre tap is left.
@pytest.mark.parametrize(
    "features, size, dilation", [(8, 9, 1), (256, 32, 1), (8, 32, 2), (8, 9, 12)]
)
def test_bfloat16_convs_on_cpu_are_matrix_products_forward_and_backward(features, size, dilation):
    """Matrix products with float32 results, no convolution, forward and in the gradients;
    values and gradients those of the float32 conv to bfloat16's precision."""
    x = jax.random.normal(key(0), (2, size, size, 65))
    layer = Conv2d(features, 3, dilation=dilation, dtype=jnp.bfloat16)
    plain = Conv2d(features, 3, dilation=dilation)
    params = plain.init(key(1), x)

    def loss(module: nn.Module, params: dict) -> jax.Array:
        return jnp.sum(module.apply(params, x).astype(jnp.float32) ** 2)

    assert jax.default_backend() == "cpu"
    assert "custom_vjp_call" in jaxpr_primitives(layer, x)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(layer.apply)(params, x))
    backward = jax.make_jaxpr(jax.grad(loss, 1), static_argnums=0)(layer, params)
    assert "conv_general_dilated" not in str(backward)
    scale = np.abs(plain.apply(params, x)).max()
    np.testing.assert_allclose(layer.apply(params, x), plain.apply(params, x), atol=0.02 * scale)
    got, want = jax.grad(loss, 1)(layer, params), jax.grad(loss, 1)(plain, params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=0.03 * np.abs(w).max())


def test_undilated_bfloat16_convs_on_cpu_are_column_products_when_differentiated():
    """Inference: nine tap products, no columns copied. Training: one product of the input's
    columns (9 x 72 channels) forward, one of the output gradient's columns (9 x 16) for the
    input gradient, one of the output gradient and the columns for the kernel gradient."""
    layer = Conv2d(16, 3, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 6, 7, 72), jnp.bfloat16)
    params = layer.init(key(0), x)
    assert jax.default_backend() == "cpu"
    forward = jax.make_jaxpr(layer.apply)(params, x)
    assert "concatenate" not in str(forward)
    assert str(forward).count("dot_general") == 9
    grad = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32)), (0, 1))
    products = [
        e for e in jax.make_jaxpr(grad)(params, x).eqns if e.primitive.name == "dot_general"
    ]
    pixels = 2 * 6 * 7
    shapes = sorted(tuple(v.aval.shape for v in e.invars) for e in products)
    assert shapes == [
        ((16, pixels), (pixels, 9 * 72)),  # kernel gradient (channels-major output gradient)
        ((pixels, 9 * 16), (9 * 16, 72)),  # input gradient
        ((pixels, 9 * 72), (9 * 72, 16)),  # forward
    ]
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in products)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_depthwise_convs_on_cpu_are_tap_sums_in_float32(dtype):
    """No convolution forward or backward; a bfloat16 map's taps are multiplied and summed
    in float32, its result within bfloat16's rounding of the float32 conv's."""
    x = jax.random.normal(key(0), (2, 9, 7, 8))
    layer = Conv2d(8, 3, strides=2, groups=8, dtype=dtype)
    params = Conv2d(8, 3, strides=2, groups=8).init(key(1), x)
    grad = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32)), (0, 1))
    jaxpr = jax.make_jaxpr(grad)(params, x.astype(dtype))
    assert "conv_general_dilated" not in str(jaxpr)
    products = [e for e in jaxpr.eqns if e.primitive.name == "mul"]
    assert len(products) >= 9 and {e.outvars[0].aval.dtype for e in products} == {
        jnp.dtype(jnp.float32)
    }
    with layers.reference_formulations():
        want = layer.apply(params, x.astype(dtype))
    got = layer.apply(params, x.astype(dtype))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, atol=0.01 * np.abs(want).max())


@pytest.mark.parametrize("kernel_size, strides, groups", [(3, 2, 1), (3, 1, 8), (4, 1, 1)])
def test_bfloat16_convs_the_products_do_not_cover_are_the_plain_conv(kernel_size, strides, groups):
    """Strided, grouped and even-sized convs of a wide bf16 map keep XLA's convolution."""
    x = jax.random.normal(key(0), (2, 9, 9, 72))
    layer = Conv2d(16, kernel_size, strides=strides, groups=groups, dtype=jnp.bfloat16)
    plain = Conv2d(16, kernel_size, strides=strides, groups=groups)
    params = plain.init(key(1), x)
    assert "conv_general_dilated" in str(jax.make_jaxpr(layer.apply)(params, x))
    want = plain.apply(params, x)
    got = layer.apply(params, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


def test_bfloat16_1x1_convs_on_cpu_are_products_with_float32_results():
    """Forward and in both gradients (``bf16_pixel_matmul``'s own)."""
    layer = Conv2d(4, 1, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 4, 4, 8), jnp.bfloat16)
    params = layer.init(key(0), x)
    (call,) = jaxpr_equations(layer, x)[-1:]
    assert call.primitive.name == "custom_vjp_call"
    grad = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32)), (0, 1))
    backward = jax.make_jaxpr(grad)(params, x).eqns
    products = [
        e for e in call.params["call_jaxpr"].eqns + backward if e.primitive.name == "dot_general"
    ]
    assert len(products) == 3
    for product in products:
        assert product.params["preferred_element_type"] == jnp.float32
        assert product.outvars[0].aval.dtype == jnp.float32


def unfused_products(hlo: str) -> list[str]:
    """The matrix products of compiled HLO that are not inside a YNNPACK fusion."""
    ynn = set(re.findall(r'calls=%?([\w.\-]+).*"kind":"__ynn_fusion"', hlo))
    computation, unfused = None, []
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and " = " not in line:
            computation = header.group(1)
        elif " dot(" in line and computation not in ynn:
            unfused.append(line.strip())
    return unfused


def product_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of every matrix product's operands in compiled HLO."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    operands = re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return [tuple(types[name] for name in pair) for pair in operands]


class ConvCases(nn.Module):
    """bf16 convs side by side, the sum of their outputs: on a 72-channel map, 1x1 and 3x3 with
    fewer and with more output channels, a dilated 3x3 and a strided 1x1; on a 65-channel one
    (not a multiple of 8), 1x1 and 3x3 with fewer output channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cases = [
            (x, 32, 1, 1, 1),
            (x, 96, 1, 1, 1),
            (x, 32, 3, 1, 1),
            (x, 96, 3, 1, 1),
            (x, 32, 3, 2, 1),
            (x, 96, 1, 1, 2),
            (x[..., :65], 32, 1, 1, 1),
            (x[..., :65], 32, 3, 1, 1),
        ]
        total = sum(
            jnp.sum(jnp.sin(Conv2d(f, k, dilation=d, strides=s, dtype=jnp.bfloat16)(m)))
            for m, f, k, d, s in cases
        )
        return total.astype(jnp.float32)


def test_bfloat16_conv_gradients_on_cpu_are_all_ynnpack_products():
    """XLA:CPU runs bf16 products with float32 results on YNNPACK's bf16 kernels only when
    both operands are in the plain layout; any other such product runs on the float32 path
    (its operands converted to float32) or fails at run time ("Unsupported element type for
    DotThunk"). So the compiled train gradient must have none outside YNNPACK fusions, every
    product must read bf16 operands, and it must run."""
    probe = jax.jit(jnp.dot).lower(jnp.ones((16, 16)), jnp.ones((16, 16))).compile().as_text()
    if "__ynn_fusion" not in probe:
        pytest.skip("this XLA:CPU does not run matrix products on YNNPACK")
    model = ConvCases()
    x = jax.random.normal(key(0), (2, 12, 12, 72))
    params = model.init(key(1), x)
    step = jax.jit(jax.grad(model.apply, (0, 1))).lower(params, x).compile()
    assert unfused_products(step.as_text()) == []
    operand_types = product_operand_types(step.as_text())
    assert len(operand_types) >= 24  # forward and both gradients of eight convs
    assert set(operand_types) == {("bf16", "bf16")}
    grads = jax.tree.leaves(step(params, x))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("strides", [1, 2])
def test_1x1_conv_weight_gradient_uses_the_output_gradient_as_laid_out(strides):
    """No transpose of the output gradient into a channels-major layout (XLA:CPU made one
    for a dot over a 4-D map, ~10% of ResNet-101's train step)."""
    layer = Conv2d(64, 1, strides=strides)
    x = jax.random.normal(key(0), (2, 14, 14, 32))
    params = layer.init(key(1), x)

    def loss(params):
        y = layer.apply(params, x)  # normalised over the batch, as BatchNorm does in training
        y = (y - y.mean((0, 1, 2))) * jax.lax.rsqrt(y.var((0, 1, 2)) + 1e-5)
        return jnp.sum(y * jnp.cos(y))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert jax.default_backend() == "cpu"
    assert " transpose(" not in hlo


@pytest.mark.parametrize(
    "window, stride, padding, shape",
    [
        (3, 2, 1, (2, 9, 12, 3)),  # ResNet's stem pool, odd and even sides
        (3, 2, 1, (2, 8, 7, 3)),
        (3, 2, 1, (1, 1, 1, 2)),
        (2, 2, 0, (2, 6, 5, 3)),
        (3, 1, 1, (2, 5, 6, 3)),
    ],
)
def test_max_pool_matches_flax_with_ties(window, stride, padding, shape):
    # Small integers: most windows hold their maximum more than once.
    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, shape), jnp.float32)
    pads = ((padding, padding), (padding, padding))

    def reference(x):
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)

    weights = jax.random.normal(key(1), reference(x).shape)
    np.testing.assert_array_equal(max_pool(x, window, stride, padding), reference(x))
    grads = jax.grad(lambda x: jnp.sum(max_pool(x, window, stride, padding) * weights))(x)
    expected = jax.grad(lambda x: jnp.sum(reference(x) * weights))(x)
    np.testing.assert_allclose(grads, expected, atol=1e-6)  # sums of overlaps, other order


def test_max_pool_gradient_is_not_a_scatter_on_cpu():
    """XLA:CPU expands nn.max_pool's gradient into a scatter over index arrays (6-9x slower)."""
    x = jax.random.normal(key(0), (2, 16, 16, 8))
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, 3, 2, 1)))).lower(x).compile().as_text()
    assert jax.default_backend() == "cpu"
    assert " scatter(" not in hlo and " iota(" not in hlo


def test_bfloat16_max_pool_on_cpu_pools_and_sums_its_gradient_in_float32():
    """The same maxima; the gradient of overlapping windows summed in float32, then rounded
    once (XLA:CPU ran the bf16 backward pass 30x slower)."""
    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, (2, 9, 9, 4)), jnp.bfloat16)
    weights = jax.random.normal(key(1), (2, 5, 5, 4)).astype(jnp.bfloat16)

    def loss(x):
        return jnp.sum((max_pool(x, 3, 2, 1) * weights).astype(jnp.float32))

    wide = x.astype(jnp.float32)
    y = max_pool(x, 3, 2, 1)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, max_pool(wide, 3, 2, 1))
    expected = jax.grad(lambda x: jnp.sum(max_pool(x, 3, 2, 1) * weights))(wide)
    np.testing.assert_array_equal(jax.grad(loss)(x), expected.astype(jnp.bfloat16))
    (call,) = [e for e in jax.make_jaxpr(loss)(x).eqns if e.primitive.name == "custom_vjp_call"]
    assert call.invars[0].aval.dtype == jnp.float32


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax_in_values_updates_and_gradients(train, dtype):
    """Same variables, outputs, running-average updates (but torch's unbiased variance), and
    gradients for the input, scale and bias, including those through the updated statistics."""
    x = jax.random.normal(key(0), (3, 5, 4, 6)) * 2 + 1
    weights = jax.random.normal(key(1), x.shape)
    ours = BatchNorm(train, dtype=dtype)
    ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), ours.init(key(2), x))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), ref.init(key(2), x))
    params = {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1.0, 1.0, 6)}
    stats = {"mean": jnp.linspace(-0.2, 0.3, 6), "var": jnp.linspace(0.5, 2.0, 6)}

    count = x.size // x.shape[-1]

    def loss(module, params, x):
        variables = {"params": params, "batch_stats": stats}
        y, updates = module.apply(variables, x.astype(dtype), mutable=["batch_stats"])
        new = updates["batch_stats"]
        if module is ref and train:  # flax averages the biased variance, torch the unbiased
            biased_part = new["var"] - 0.9 * stats["var"]
            new = new | {"var": 0.9 * stats["var"] + biased_part * count / (count - 1)}
        value = jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights)
        return value + jnp.sum(jnp.cos(new["mean"])) + jnp.sum(new["var"] ** 2), (y, new)

    grad = jax.grad(loss, argnums=(1, 2), has_aux=True)
    (ours_grads, (ours_y, ours_stats)) = grad(ours, params, x)
    (ref_grads, (ref_y, ref_stats)) = grad(ref, params, x)
    assert ours_y.dtype == ref_y.dtype == dtype
    # Statistics taken about the running mean: the same to rounding (bf16: an ulp at most).
    np.testing.assert_allclose(
        np.asarray(ours_y, np.float32),
        np.asarray(ref_y, np.float32),
        rtol=1e-5 if dtype == jnp.float32 else 2**-7,
        atol=1e-5,
    )
    for a, b in zip(jax.tree.leaves(ours_stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # bfloat16: the input gradient is rounded to bfloat16 by both, in a different order.
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(ref_grads), strict=True):
        assert a.dtype == b.dtype
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tolerance * scale
        )


def test_batch_norm_statistics_keep_their_digits_where_the_mean_dwarfs_the_spread():
    """Mean 100, std 1: E[x^2] - E[x]^2 in float32 (flax's fast variance) is 1e-2 off the
    float64 output; taken about a running mean near the batch's, 1e-5 at most."""
    x = np.asarray(jax.random.normal(key(0), (4, 8, 8, 6)) + 100.0).astype(np.float64)
    centred = x - x.mean((0, 1, 2))
    expected = centred / np.sqrt((centred**2).mean((0, 1, 2)) + 1e-5)
    stats = {"mean": jnp.full(6, 99.9), "var": jnp.ones(6)}  # after some steps
    params = {"scale": jnp.ones(6), "bias": jnp.zeros(6)}

    def error(module):
        y, _ = module.apply(
            {"params": params, "batch_stats": stats},
            jnp.asarray(x, jnp.float32),
            mutable=["batch_stats"],
        )
        return np.abs(np.asarray(y, np.float64) - expected).max()

    assert error(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)) > 1e-3
    assert error(BatchNorm(True)) < 1e-5


def test_batch_norm_of_pooled_features_keeps_its_digits_before_the_running_mean_catches_up():
    """ASPP's image pooling: one value per image and channel, close together, far from the
    running mean of the first steps (0). One pass about it was 1.2e-3 off the float64 output."""
    x = 4.0 + 0.05 * np.asarray(jax.random.normal(key(0), (2, 1, 1, 6)), np.float64)
    centred = x - x.mean((0, 1, 2))
    expected = centred / np.sqrt((centred**2).mean((0, 1, 2)) + 1e-5)
    layer = BatchNorm(True)
    variables = layer.init(key(1), jnp.zeros(x.shape))  # running mean 0
    y, _ = layer.apply(variables, jnp.asarray(x, jnp.float32), mutable=["batch_stats"])
    assert np.abs(np.asarray(y, np.float64) - expected).max() < 1e-4


def test_batch_norm_refuses_to_train_on_one_value_per_channel():
    """ASPP's image pooling on a batch of 1: torch raises; a zero variance would make the
    branch a constant and decay its running variance to 0."""
    layer = BatchNorm(True)
    variables = layer.init(key(0), jnp.zeros((2, 1, 1, 4)))
    with pytest.raises(ValueError, match="more than 1 value per channel; got \\(1, 1, 1, 4\\)"):
        layer.apply(variables, jnp.ones((1, 1, 1, 4)), mutable=["batch_stats"])
    BatchNorm(False).apply(variables, jnp.ones((1, 1, 1, 4)))  # inference takes one image


def test_batch_norm_running_statistics_update_as_torch_does(torch):
    """The running mean and (unbiased) variance after two training batches, as torch's
    BatchNorm2d with its defaults keeps them; a 1x1 map (ASPP's image pooling) included."""
    for shape in [(4, 5, 3, 6), (3, 1, 1, 6)]:
        layer = BatchNorm(True)
        variables = layer.init(key(0), jnp.zeros(shape))
        reference = torch.nn.BatchNorm2d(shape[-1])
        for seed in (1, 2):
            x = np.array(jax.random.normal(key(seed), shape) * 3 + 1)
            _, updates = layer.apply(variables, x, mutable=["batch_stats"])
            variables = variables | updates
            reference(torch.from_numpy(x).permute(0, 3, 1, 2))
        stats = variables["batch_stats"]
        np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), rtol=1e-5)
        np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("formulation", ["tap_products", "column_conv"])
def test_float64_convolutions_are_float64_through_and_through(formulation):
    """The model's float64 mode (for numerical checks): the CPU formulations accumulate in
    float64 too, forward and both gradients, as XLA's float64 convolution does."""
    conv = getattr(layers, formulation)
    with jax.enable_x64(True):
        x = jax.random.normal(key(0), (2, 9, 7, 16), jnp.float64)
        kernel = jax.random.normal(key(1), (3, 3, 16, 8), jnp.float64)
        weights = jax.random.normal(key(2), (2, 9, 7, 8), jnp.float64)

        def reference(x, kernel):
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                (1, 1),
                ((4, 4), (4, 4)),
                rhs_dilation=(4, 4),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )

        for ours, ref in [
            (conv(x, kernel, 4), reference(x, kernel)),
            *zip(
                jax.grad(lambda x, k: jnp.sum(conv(x, k, 4) * weights), (0, 1))(x, kernel),
                jax.grad(lambda x, k: jnp.sum(reference(x, k) * weights), (0, 1))(x, kernel),
                strict=True,
            ),
        ]:
            assert ours.dtype == jnp.float64
            np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
