"""Convolution, max-pool and BatchNorm layers shared by the backbones and the DeepLab head.

``Conv2d`` keeps ``flax.linen.Conv``'s parameters (``kernel`` (k, k, in / groups, out), optional
``bias``) and torch's symmetric padding, but computes these cases the cheaper way, with the same
result (up to float32 rounding):
- a 1x1 conv (no groups) is a 2-D matrix product of the flattened pixels by the kernel
  (``pixel_matmul``). On XLA:CPU this avoids the layout transposes that the gradient of a 1x1
  convolution, or of a dot over the 4-D map, costs (ResNet-101's train step runs about 1.4x,
  then 1.1x faster);
- taps of a dilated conv that can only ever read padding (offset ``dilation * i`` not smaller
  than the feature map, e.g. ASPP's rate 18 on a 15x15 map) are dropped with that padding;
- on CPU, a dilated conv whose taps read much padding (at most ``TAP_PRODUCTS_MAX_FRACTION``
  of the dense work is real, e.g. ASPP's branches and most of layer4's convs) is a sum of one
  matrix product per tap over only the pixels that tap reaches (``tap_products``). XLA's
  convolution does the dense work: ResNet-101's rate-18 branch at 512 px ran 2.5x faster
  this way (forward and backward). Above about 0.85 (layer4's rate-2 conv on a 32x32 map,
  0.92) the products' gradient is slower than the convolution's, so in float32 those stay
  convolutions;
- on other backends (GPUs), a dilated conv is an undilated one over the ``dilation ** 2``
  interleaved sub-images of its input (``space_to_batch_conv``): cuDNN's dilated kernels are
  slow (ResNet-101's ASPP and layer4 convs at 512 px, batch 32, bf16, forward and backward on
  an H200: 1.0-2.2 vs 0.7-1.7 ms), and the whole train step ran 4% faster; tap products
  ran it 9% slower there;
- on CPU, an undilated stride-1 conv with at most 64 input channels on a map at most 64
  pixels wide (ResNets' layer1 up to 256 px input) is one 1-D convolution along the width over
  the kernel's row-shifted copies of the input (``row_stacked_conv``): XLA:CPU's YNNPACK
  convolution runs such narrow maps at about half its usual rate (ResNet-101's layer1 3x3 conv
  at 227 px, batch 4, forward and both gradients: 29-30 vs 20-21 ms);
- on CPU in bfloat16, matrix products have float32 results (cast back to bfloat16): XLA:CPU
  hands only those, with both operands in the plain layout, to YNNPACK's bf16 kernels (AMX
  where the CPU has it: 0.5-1.1 TFLOP/s on a 2-core Xeon, against 0.1-0.2 otherwise), and its
  bf16 convolutions run no faster than float32 ones. So there every stride-1 conv with more
  than 64 input channels is ``tap_products`` (dilated) or ``column_conv`` (undilated: tap
  products too, but differentiated one product of the input's columns, im2col, forward and
  for each gradient; ResNet-101's decoder convs at 227 px, batch 4, ran their forward and
  backward passes 2x faster), and 1x1 ones are ``bf16_pixel_matmul``, forward and backward
  (their weight gradients by ``pixel_products``, which copies one operand channels-major
  first);
- on CPU, an undilated stride-1 conv with at least 128 output channels on a map of at least
  32x32 pixels (the decoder's convs from 227 px up, the CPU recipe's 128-channel ones at 160
  px, ResNets' layer2 from 256 px) takes its weight gradient row by row
  (``conv_with_row_weight_grad``): XLA's own slows down sharply there (ResNet-101's 227 px
  train step, batch 4, ran 8% faster; the CPU recipe's at 160 px, 22-30%); if it is 3x3 and
  float32, its forward pass and input gradient are Winograd's F(2x2, 3x3)
  (``winograd_conv3x3``, 2.25x fewer multiplies; that step ran another 5-7% faster);
- on CPU, a depthwise conv is the sum of its taps, each a strided slice of the input times one
  weight per channel, in float32 (``depthwise_taps``): XLA:CPU runs grouped convolutions and
  their gradients at well under 1 GFLOP/s, and MobileNetV2's train step at 160 px, batch 16,
  ran 4x faster this way.

``reference_formulations()`` turns these backend-specific formulations off while tracing (to
count a model's FLOPs the same way on every backend).
"""

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# Largest share of a dilated conv's dense work that is real (not padding) for which the CPU
# computes it as per-tap matrix products (benchmarked on a 2-core AVX-512 CPU, see BENCHMARKS.md).
TAP_PRODUCTS_MAX_FRACTION = 0.85

# Undilated stride-1 convs with at least this many output channels, on maps of at least this
# many pixels, take their weight gradient row by row on CPU (``conv_with_row_weight_grad``).
ROW_WEIGHT_GRAD_MIN_FEATURES = 128
ROW_WEIGHT_GRAD_MIN_PIXELS = 32 * 32

# Undilated stride-1 convs with at most this many input channels, on maps at most this wide,
# are computed by ``row_stacked_conv`` on CPU.
ROW_STACK_MAX_CHANNELS = 64
ROW_STACK_MAX_WIDTH = 64


_own_formulations = True


@contextlib.contextmanager
def reference_formulations() -> Iterator[None]:
    """Within it, ``Conv2d`` traces the plain formulation (XLA's convolution, a matrix product
    for 1x1) on every backend, e.g. to count a model's FLOPs independently of the faster
    formulations each backend computes (Winograd's products do 2.25x fewer multiplies,
    space-to-batch convolves the padding that rounds a map up to a multiple of the dilation)."""
    global _own_formulations
    previous, _own_formulations = _own_formulations, False
    try:
        yield
    finally:
        _own_formulations = previous


def _kept_half_width(half: int, dilation: int, size: int) -> int:
    """How many taps either side of the centre can reach a ``size``-long map (stride 1)."""
    return min(half, (size - 1) // dilation)


def _reach(offset: int, size: int) -> tuple[int, int]:
    """The input rows ``[start, stop)`` that a tap at ``offset`` reads for in-map outputs."""
    return max(0, offset), size + min(0, offset)


def real_fraction(height: int, width: int, kernel_shape: tuple[int, ...], dilation: int) -> float:
    """The share of a stride-1 conv's dense work whose taps read the map, not padding."""
    kh, kw = kernel_shape[:2]
    rows = [_reach((i - kh // 2) * dilation, height) for i in range(kh)]
    cols = [_reach((j - kw // 2) * dilation, width) for j in range(kw)]
    real = sum((r1 - r0) * (c1 - c0) for r0, r1 in rows for c0, c1 in cols)
    return real / (kh * kw * height * width)


def pixel_matmul(x: jax.Array, matrix: jax.Array, **kwargs: Any) -> jax.Array:
    """``x @ matrix`` over the channels of an NHWC map, as one 2-D matrix product.

    Flattening the pixels first matters on XLA:CPU: the weight gradient of a dot over a 4-D
    map contracts three dimensions, and XLA then copies the output gradient into a
    channels-major layout first (ResNet-101's 227 px train step spent ~10% of its op time
    in those copies); the 2-D product's gradient needs none.
    """
    flat = jnp.dot(x.reshape(-1, x.shape[-1]), matrix, **kwargs)
    return flat.reshape(*x.shape[:-1], matrix.shape[-1])


def _unfolded_transpose(matrix: jax.Array) -> jax.Array:
    """``matrix.T`` as a copy in the transposed layout, through a 3-D view: XLA folds a plain
    transpose into the matrix product that reads it, and on XLA:CPU a bf16 product with a
    transposed operand runs on the float32 path (or, for some, fails to run at all). The view
    keeps runs of 8 columns where it can, which copies faster (a 1024 -> 256 1x1 conv's bf16
    gradients: 3.5 against 5.3 ms with single columns)."""
    rows, columns = matrix.shape
    group = 8 if columns % 8 == 0 else 1
    grouped = matrix.reshape(rows, columns // group, group)
    return grouped.transpose(1, 2, 0).reshape(columns, rows)


def _product_transpose(matrix: jax.Array) -> jax.Array:
    """``matrix.T`` as a matrix product's operand: in bfloat16 an unfolded copy (folded, it
    is converted to float32 and the product runs at the float32 rate: ResNet-101's 1x1 input
    gradients at 227 px 2.5-3.4x slower), in float32 the transpose that XLA folds into the
    product (faster there than a copy)."""
    return _unfolded_transpose(matrix) if matrix.dtype == jnp.bfloat16 else matrix.T


def _copied_as_bits(x: jax.Array, copy: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``copy(x)`` for a ``copy`` that only moves elements, done on 16-bit integers where ``x``
    is bfloat16: XLA:CPU copies bf16 arrays through float32 (1.5x slower for a 4x57x57x304
    map; an im2col copy of it 2x slower)."""
    if x.dtype != jnp.bfloat16:
        return copy(x)
    bits = copy(jax.lax.bitcast_convert_type(x, jnp.uint16))
    return jax.lax.bitcast_convert_type(bits, x.dtype)


def _channels_major(x: jax.Array) -> jax.Array:
    """An NHWC map as a (channels, pixels) matrix."""
    return _copied_as_bits(x, lambda m: m.transpose(3, 0, 1, 2).reshape(x.shape[-1], -1))


def _wide(dtype: Any) -> Any:
    """The dtype products of ``dtype`` operands accumulate in: float32, or float64 for float64
    (the model's mode for numerical checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def pixel_products(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``x^T @ dy`` over every pixel of two NHWC maps of one batch and size, in ``_wide``: the
    (in, out) kernel gradient of ``pixel_matmul(x, kernel)`` whose output gradient is ``dy``.

    In bfloat16 (on CPU), the map with fewer channels is first copied channels-major, so the
    product reads both operands in the plain layout that XLA:CPU hands to YNNPACK's bf16
    kernels (AMX where the CPU has it): ResNet-101's 1x1 weight gradients at 227 px ran at
    180-620 GFLOP/s, against 65-190 contracting the pixels in place (BENCHMARKS.md).
    """
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x.dtype != jnp.bfloat16:
        return jax.lax.dot_general(
            x2, dy2, (((0,), (0,)), ((), ())), preferred_element_type=_wide(x.dtype)
        )
    if x2.shape[1] <= dy2.shape[1]:
        return jnp.dot(_channels_major(x), dy2, preferred_element_type=jnp.float32)
    product = jnp.dot(_channels_major(dy), x2, preferred_element_type=jnp.float32)
    return _unfolded_transpose(product)


@jax.custom_vjp
def bf16_pixel_matmul(x: jax.Array, matrix: jax.Array) -> jax.Array:
    """``pixel_matmul`` of bfloat16 operands for XLA:CPU: float32 results cast back to
    bfloat16 (only those run on YNNPACK's bf16 kernels), and gradients whose products do the
    same (``pixel_products`` for the matrix's)."""
    return pixel_matmul(x, matrix, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_pixel_matmul_forward(x: jax.Array, matrix: jax.Array):
    return bf16_pixel_matmul(x, matrix), (x, matrix)


def _bf16_pixel_matmul_backward(residuals: tuple[jax.Array, jax.Array], dy: jax.Array):
    x, matrix = residuals
    dx = pixel_matmul(dy, _product_transpose(matrix), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), pixel_products(x, dy).astype(matrix.dtype)


bf16_pixel_matmul.defvjp(_bf16_pixel_matmul_forward, _bf16_pixel_matmul_backward)


def _tap_offsets(kernel_shape: tuple[int, ...], dilation: int) -> list[tuple[int, int]]:
    """``(row, col)`` offsets of a stride-1 ``same`` conv's taps, row-major."""
    kh, kw = kernel_shape[:2]
    return [
        ((i - kh // 2) * dilation, (j - kw // 2) * dilation) for i in range(kh) for j in range(kw)
    ]


def _taps(kernel_shape: tuple[int, ...], dilation: int, height: int, width: int):
    """``(i, j, row_offset, col_offset, rows, cols)`` for each tap of a stride-1 ``same`` conv:
    where it reads relative to the output pixel, and the input ``[start, stop)`` rows and
    columns it reads for in-map outputs."""
    kw = kernel_shape[1]
    for t, (oy, ox) in enumerate(_tap_offsets(kernel_shape, dilation)):
        yield t // kw, t % kw, oy, ox, _reach(oy, height), _reach(ox, width)


def _sum_shifted(parts: Iterable[tuple[jax.Array, int, int]], height: int, width: int):
    """The sum of maps each placed with its top-left pixel at ``(row, col)`` of a
    ``height`` x ``width`` map of zeros."""
    total = None
    for part, row, col in parts:
        pads = (
            (0, 0),
            (row, height - row - part.shape[1]),
            (col, width - col - part.shape[2]),
            (0, 0),
        )
        part = jnp.pad(part, pads)
        total = part if total is None else total + part
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tap_products(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """A stride-1 ``same`` conv (odd kernel, no groups) as a sum of one matrix product per tap,
    each over only the input pixels the tap reaches, accumulated in ``_wide`` (float32 or
    float64).

    Its gradients are tap products too, accumulated likewise (autodiff's would sum the
    input gradient in the input's dtype and scatter each tap's kernel gradient into a
    zero kernel): the input gradient one product per tap by the tap's transposed kernel,
    the kernel's one ``pixel_products`` per tap.
    """
    _, height, width, _ = x.shape
    parts = (
        (
            pixel_matmul(x[:, r0:r1, c0:c1], kernel[i, j], preferred_element_type=_wide(x.dtype)),
            r0 - oy,
            c0 - ox,
        )
        for i, j, oy, ox, (r0, r1), (c0, c1) in _taps(kernel.shape, dilation, height, width)
    )
    return _sum_shifted(parts, height, width).astype(x.dtype)


def _tap_products_forward(x: jax.Array, kernel: jax.Array, dilation: int):
    return tap_products(x, kernel, dilation), (x, kernel)


def _tap_products_backward(dilation: int, residuals: tuple[jax.Array, jax.Array], g):
    x, kernel = residuals
    _, height, width, _ = x.shape
    dx_parts, kernel_grads = [], []
    for i, j, oy, ox, (r0, r1), (c0, c1) in _taps(kernel.shape, dilation, height, width):
        g_tap = g[:, r0 - oy : r1 - oy, c0 - ox : c1 - ox]
        dx_tap = pixel_matmul(
            g_tap, _product_transpose(kernel[i, j]), preferred_element_type=_wide(x.dtype)
        )
        dx_parts.append((dx_tap, r0, c0))
        kernel_grads.append(pixel_products(x[:, r0:r1, c0:c1], g_tap))
    dx = _sum_shifted(dx_parts, height, width).astype(x.dtype)
    return dx, jnp.stack(kernel_grads).reshape(kernel.shape).astype(kernel.dtype)


tap_products.defvjp(_tap_products_forward, _tap_products_backward)


def _columns(x: jax.Array, offsets: list[tuple[int, int]]) -> jax.Array:
    """im2col: an NHWC map's ``len(offsets) * C`` channels per pixel, the ``C`` of tap ``t``
    read at ``offsets[t]`` from it (zeros beyond its borders)."""
    _, height, width, _ = x.shape
    py, px = max(abs(oy) for oy, _ in offsets), max(abs(ox) for _, ox in offsets)

    def copy(m: jax.Array) -> jax.Array:
        padded = jnp.pad(m, ((0, 0), (py, py), (px, px), (0, 0)))
        windows = [
            padded[:, py + oy : py + oy + height, px + ox : px + ox + width] for oy, ox in offsets
        ]
        return jnp.concatenate(windows, axis=-1)

    return _copied_as_bits(x, copy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def column_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """``tap_products``, whose gradients are computed from the input's columns (im2col).

    Differentiated, the forward pass is one matrix product of the input's columns
    (``_columns``) by the kernel's taps stacked, and its gradients are one such product
    each: the input's of the output gradient's columns (at the opposite offsets) by the
    transposed taps, the kernel's ``pixel_products`` of the columns and the output gradient;
    all in ``_wide``. Not differentiated, it is ``tap_products``, which copies no columns.
    """
    return tap_products(x, kernel, dilation)


def _column_conv_forward(x: jax.Array, kernel: jax.Array, dilation: int):
    columns = _columns(x, _tap_offsets(kernel.shape, dilation))
    matrix = kernel.reshape(-1, kernel.shape[-1])
    y = pixel_matmul(columns, matrix, preferred_element_type=_wide(x.dtype)).astype(x.dtype)
    return y, (columns, kernel)


def _column_conv_backward(dilation: int, residuals: tuple[jax.Array, jax.Array], g):
    columns, kernel = residuals
    offsets = _tap_offsets(kernel.shape, dilation)
    opposite = [(-oy, -ox) for oy, ox in offsets]
    transposed = kernel.transpose(0, 1, 3, 2).reshape(-1, kernel.shape[2])
    g_columns = _columns(g, opposite)
    dx = pixel_matmul(g_columns, transposed, preferred_element_type=_wide(columns.dtype))
    dk = pixel_products(columns, g).reshape(kernel.shape)
    return dx.astype(columns.dtype), dk.astype(kernel.dtype)


column_conv.defvjp(_column_conv_forward, _column_conv_backward)


def space_to_batch_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """A stride-1 ``same`` conv of ``dilation`` (NHWC, HWIO, odd kernel, no groups) as one
    undilated conv over the ``dilation ** 2`` interleaved sub-images of the input (padded at
    the end to a multiple of ``dilation``), its outputs interleaved back. Exact: each output
    pixel reads the same input pixels, and the padding added is zeros the dilated conv's own
    padding would read."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    hp, wp = -(-h // dilation) * dilation, -(-w // dilation) * dilation
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(n, hp // dilation, dilation, wp // dilation, dilation, c)
    x = x.transpose(2, 4, 0, 1, 3, 5).reshape(dilation**2 * n, hp // dilation, wp // dilation, c)
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y.reshape(dilation, dilation, n, hp // dilation, wp // dilation, -1)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, hp, wp, -1)[:, :h, :w]


def row_stacked_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1, undilated ``same`` conv (NHWC, HWIO, odd square kernel, no groups) as one
    1-D conv along the width: the kernel's row-shifted copies of the input side by side on
    the channels, every (image, output row) pair one element of the 1-D conv's batch.

    XLA:CPU hands 1-D convolutions to Eigen, not YNNPACK, whose 2-D convolution with 64
    input channels runs at about 100 GFLOP/s on maps up to 64 pixels wide (190 from about 114
    pixels); this form runs 1.1-1.5x faster there, forward and both gradients (BENCHMARKS.md).
    """
    size = kernel.shape[0]
    half = size // 2
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (half, half), (0, 0), (0, 0)))
    rows = jnp.concatenate([padded[:, i : i + height] for i in range(size)], axis=-1)
    rows = rows.reshape(batch * height, width, size * channels)
    # (kh, kw, in, out) -> (kw, kh * in, out), matching the rows' channel order.
    taps = kernel.transpose(1, 0, 2, 3).reshape(size, size * channels, kernel.shape[-1])
    y = jax.lax.conv_general_dilated(
        rows, taps, (1,), ((half, half),), dimension_numbers=("NWC", "WIO", "NWC")
    )
    return y.reshape(batch, height, width, -1)


def _winograd_input_rows(d: list[jax.Array]) -> list[jax.Array]:
    """Winograd F(2x2, 3x3)'s ``B^T`` over four input rows (or columns)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_kernel_rows(k: list[jax.Array]) -> list[jax.Array]:
    """Winograd F(2x2, 3x3)'s ``G`` over three kernel rows (or columns)."""
    return [k[0], (k[0] + k[1] + k[2]) * 0.5, (k[0] - k[1] + k[2]) * 0.5, k[2]]


def _winograd_output_rows(m: list[jax.Array]) -> list[jax.Array]:
    """Winograd F(2x2, 3x3)'s ``A^T`` over four products' rows (or columns)."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _winograd_windows(pairs: jax.Array, axis: int) -> list[jax.Array]:
    """The four rows (``axis`` 1) or columns (``axis`` 2) of every 4-wide, stride-2 window of
    a map viewed as pixel pairs (pair index at ``axis``, position in the pair at ``axis + 1``)."""
    count = pairs.shape[axis] - 1
    firsts = jax.lax.slice_in_dim(pairs, 0, count, axis=axis)
    seconds = jax.lax.slice_in_dim(pairs, 1, count + 1, axis=axis)
    return [
        jax.lax.index_in_dim(part, i, axis=axis + 1, keepdims=False)
        for part in (firsts, seconds)
        for i in (0, 1)
    ]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 ``same`` 3x3 conv (NHWC, HWIO, no groups) by Winograd's F(2x2, 3x3).

    The map is cut into 2x2 output tiles, each read through a 4x4 input window; the windows'
    and the kernel's transforms (``B^T d B``, ``G g G^T``) turn the conv into 16 matrix
    products over the channels, 2.25x fewer multiplies than the direct conv. XLA:CPU runs
    them as 16 plain YNNPACK products (one batched product ran at ~110 GFLOP/s against ~190),
    with the transforms as a few elementwise passes: the decoder's 304 -> 256 conv at 57x57,
    batch 4, 71 vs 92 ms, its input gradient 75 vs 108 ms. Exact up to float32 rounding of
    the transforms (relative error ~1e-6 of the output's scale).
    """
    batch, height, width, channels = x.shape
    tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
    pads = ((0, 0), (1, 2 * tiles_h + 1 - height), (1, 2 * tiles_w + 1 - width), (0, 0))
    pairs = jnp.pad(x, pads).reshape(batch, tiles_h + 1, 2, 2 * tiles_w + 2, channels)
    rows = jnp.stack(_winograd_input_rows(_winograd_windows(pairs, axis=1)))
    kernel_rows = _winograd_kernel_rows([kernel[i] for i in range(3)])
    products = []  # products[a][b]: (batch, tiles_h, tiles_w, out) for each transformed tap
    for a in range(4):
        row_pairs = rows[a].reshape(batch, tiles_h, tiles_w + 1, 2, channels)
        columns = _winograd_input_rows(_winograd_windows(row_pairs, axis=2))
        taps = _winograd_kernel_rows([kernel_rows[a][j] for j in range(3)])
        products.append([pixel_matmul(v, taps[b]) for b, v in enumerate(columns)])
    # A^T over the rows (a), then over the columns (b): the 2x2 outputs of every tile.
    half_done = [_winograd_output_rows([products[a][b] for a in range(4)]) for b in range(4)]
    out = [_winograd_output_rows([half_done[b][p] for b in range(4)]) for p in range(2)]
    tiles = jnp.stack([jnp.stack(out[p], axis=3) for p in range(2)], axis=2)
    y = tiles.reshape(batch, 2 * tiles_h, 2 * tiles_w, kernel.shape[-1])
    return y[:, :height, :width]


def _same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1, undilated conv (NHWC, HWIO, odd square kernel) with ``same`` padding;
    3x3 float32 ones by ``winograd_conv3x3``."""
    if kernel.shape[:2] == (3, 3) and x.dtype == kernel.dtype == jnp.float32:
        return winograd_conv3x3(x, kernel)
    half = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((half, half), (half, half)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _weight_grad_by_rows(x: jax.Array, dy: jax.Array, kernel_size: int) -> jax.Array:
    """``_same_conv``'s kernel gradient, one kernel row at a time: each row's taps are a 1-D
    conv along the width whose batch is every (image, output row) pair."""
    half = kernel_size // 2
    batch, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    dy_rows = dy.reshape(batch * height, width, dy.shape[-1])
    rows = []
    for i in range(kernel_size):
        x_rows = padded[:, i : i + height].reshape(batch * height, width + 2 * half, x.shape[-1])

        def conv_1d(kernel_row: jax.Array, x_rows: jax.Array = x_rows) -> jax.Array:
            return jax.lax.conv_general_dilated(
                x_rows, kernel_row, (1,), ((0, 0),), dimension_numbers=("NWC", "WIO", "NWC")
            )

        shape = jax.ShapeDtypeStruct((kernel_size, x.shape[-1], dy.shape[-1]), x.dtype)
        rows.append(jax.linear_transpose(conv_1d, shape)(dy_rows)[0])
    return jnp.stack(rows)


@jax.custom_vjp
def conv_with_row_weight_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``_same_conv`` (Winograd for 3x3 float32 kernels) whose input gradient is again a
    ``_same_conv`` and whose kernel gradient is computed row by row (``_weight_grad_by_rows``).

    XLA:CPU computes a 3x3 conv's weight gradient as a convolution that contracts over the
    batch innermost, and it slows down sharply with 128 or more output channels on large
    maps: the decoder's 304 -> 256 conv at 57x57 took 154-205 ms for batch 4 and 1.0-2.2 s for
    batch 16, against 129 and 640-660 ms row by row (where the 1-D convs' batch is every image
    row); the CPU recipe's 176 -> 128 and 128 -> 128 convs at 40x40, batch 16, forward and both
    gradients, 225 and 189 ms against 160 and 129 ms (on a 2-core Xeon; the first measurements,
    on an AMD EPYC, had found XLA's as fast below 256 channels; 64 were not measured here).
    """
    return _same_conv(x, kernel)


def _conv_rows_forward(x: jax.Array, kernel: jax.Array):
    return _same_conv(x, kernel), (x, kernel)


def _conv_rows_backward(residuals: tuple[jax.Array, jax.Array], dy: jax.Array):
    x, kernel = residuals
    # The input gradient of a stride-1 ``same`` conv: the same conv of ``dy`` with the
    # kernel turned by 180 degrees and its input and output channels swapped.
    dx = _same_conv(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    return dx.astype(x.dtype), _weight_grad_by_rows(x, dy, kernel.shape[0]).astype(kernel.dtype)


conv_with_row_weight_grad.defvjp(_conv_rows_forward, _conv_rows_backward)


def _window_taps(
    x: jax.Array,
    window: tuple[int, int],
    stride: int,
    out_shape: tuple[int, ...],
    dilation: int = 1,
) -> Iterator[tuple[int, int, jax.Array]]:
    """``(i, j, x[:, d * i::stride, d * j::stride])`` for each tap of a ``window`` (rows,
    columns) with dilation ``d``, cut to ``out_shape``."""
    height, width = out_shape[1:3]
    for i in range(window[0]):
        for j in range(window[1]):
            rows = slice(dilation * i, dilation * i + stride * (height - 1) + 1, stride)
            cols = slice(dilation * j, dilation * j + stride * (width - 1) + 1, stride)
            yield i, j, x[:, rows, cols]


def depthwise_taps(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """A depthwise conv (``kernel`` (kh, kw, 1, channels), torch's padding ``dilation * (k //
    2)``) as the sum of its taps, each a strided slice of the padded input times one weight per
    channel, computed in ``_wide`` (float32 for bfloat16) and differentiated as such.

    XLA:CPU runs depthwise convolutions (``feature_group_count`` = channels) and their
    gradients at well under 1 GFLOP/s: MobileNetV2's at 160 px, batch 16, took over 70% of its
    train step. As taps, XLA fuses each pass into one elementwise loop: over one depthwise conv
    of each of MobileNetV2's shapes at that size, forward 535 -> 11 ms, with both gradients
    2224 -> 218 ms; in bfloat16 the taps in bfloat16 ran 4x slower than in float32.
    """
    kh, kw = kernel.shape[:2]
    pad_h, pad_w = dilation * (kh // 2), dilation * (kw // 2)
    wide = _wide(x.dtype)
    padded = jnp.pad(x.astype(wide), ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    height = (padded.shape[1] - dilation * (kh - 1) - 1) // stride + 1
    width = (padded.shape[2] - dilation * (kw - 1) - 1) // stride + 1
    out_shape = (x.shape[0], height, width, x.shape[3])
    taps = _window_taps(padded, (kh, kw), stride, out_shape, dilation)
    weights = kernel.astype(wide)
    return functools.reduce(jnp.add, (tap * weights[i, j, 0] for i, j, tap in taps)).astype(x.dtype)


class Conv2d(nn.Module):
    """A square conv with torch-style padding ``dilation * (kernel_size // 2)`` on NHWC input.

    Attributes:
      features: output channels.
      kernel_size: side of the square kernel.
      strides: of both spatial axes.
      dilation: of both spatial axes.
      groups: torch's ``groups`` (``groups == features`` is a depthwise conv).
      use_bias: add a bias.
      kernel_init: initialiser of the kernel.
      dtype: computation dtype; parameters stay float32.
    """

    features: int
    kernel_size: int
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    use_bias: bool = False
    kernel_init: nn.initializers.Initializer = conv_kernel_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, d = self.kernel_size, self.strides, self.dilation
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        cpu = _own_formulations and jax.default_backend() == "cpu"
        bf16_on_cpu = cpu and x.dtype == jnp.bfloat16
        if k == 1 and self.groups == 1:
            matmul = bf16_pixel_matmul if bf16_on_cpu else pixel_matmul
            y = matmul(x[:, ::s, ::s], kernel[0, 0])
        else:
            half = height = width = k // 2
            if s == 1 and d > 1:
                height = _kept_half_width(half, d, x.shape[1])
                width = _kept_half_width(half, d, x.shape[2])
                kernel = kernel[half - height : half + height + 1, half - width : half + width + 1]
            # The backends' own formulations: stride 1, no groups, odd kernel.
            own = s == 1 and self.groups == 1 and k % 2 == 1 and _own_formulations
            on_cpu = own and cpu
            taps = on_cpu and (
                (bf16_on_cpu and x.shape[-1] > ROW_STACK_MAX_CHANNELS)
                or (
                    d > 1
                    and real_fraction(x.shape[1], x.shape[2], kernel.shape, d)
                    <= TAP_PRODUCTS_MAX_FRACTION
                )
            )
            if cpu and self.groups == self.features == x.shape[-1] > 1:
                conv = functools.partial(depthwise_taps, stride=s, dilation=d)
            elif own and not on_cpu and d > 1 and kernel.shape[:2] != (1, 1):
                conv = functools.partial(space_to_batch_conv, dilation=d)
            elif taps:  # undilated only in bf16: there its gradients are column products
                conv = functools.partial(column_conv if d == 1 else tap_products, dilation=d)
            elif (
                on_cpu
                and d == 1
                and x.shape[-1] <= ROW_STACK_MAX_CHANNELS
                and x.shape[2] <= ROW_STACK_MAX_WIDTH
            ):
                conv = row_stacked_conv
            elif (
                on_cpu
                and d == 1
                and self.features >= ROW_WEIGHT_GRAD_MIN_FEATURES
                and x.shape[1] * x.shape[2] >= ROW_WEIGHT_GRAD_MIN_PIXELS
            ):
                conv = conv_with_row_weight_grad
            else:
                conv = functools.partial(
                    jax.lax.conv_general_dilated,
                    window_strides=(s, s),
                    padding=((d * height, d * height), (d * width, d * width)),
                    rhs_dilation=(d, d),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    feature_group_count=self.groups,
                )
            y = conv(x, kernel)
        return y if bias is None else y + bias


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init: nn.initializers.Initializer = conv_kernel_init,
    dtype: Any = jnp.float32,
    name: str,
) -> Conv2d:
    """A named ``Conv2d`` (keyword arguments as in the backbones' torch definitions)."""
    return Conv2d(
        features, kernel_size, strides, dilation, groups, use_bias, kernel_init, dtype, name=name
    )


def residual_relu(x: jax.Array, shortcut: jax.Array) -> jax.Array:
    """``relu(x + shortcut)``, a residual block's output, written as a select.

    Same values, gradients (0 at 0) and NaN propagation as ``nn.relu``. As ``max(y, 0)`` the
    chain of block outputs is all elementwise, and XLA:CPU fuses every earlier block's
    output into each later block's fusion again (ResNet-101's 33 blocks compiled to 308
    residual adds for inference, 609 for a train step); with the select each block's add is
    computed once (35 and 68), and ResNet-101 runs 12% faster at 512 px inference and 8%
    faster in a 227 px train step on a 2-core CPU.
    """
    y = x + shortcut
    return jnp.where(y <= 0, jnp.zeros_like(y), y)


def _pad_with_minus_inf(x: jax.Array, padding: int) -> jax.Array:
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jnp.pad(x, pads, constant_values=-jnp.inf)


def _max_of_taps(padded: jax.Array, window: int, stride: int) -> jax.Array:
    """The max pool of an already padded map (no padding of its own)."""
    height = (padded.shape[1] - window) // stride + 1
    width = (padded.shape[2] - window) // stride + 1
    taps = _window_taps(
        padded, (window, window), stride, (padded.shape[0], height, width, padded.shape[3])
    )
    return functools.reduce(jnp.maximum, (tap for _, _, tap in taps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_taps(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    return _max_of_taps(_pad_with_minus_inf(x, padding), window, stride)


def _max_pool_taps_forward(
    x: jax.Array, window: int, stride: int, padding: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    padded = _pad_with_minus_inf(x, padding)
    y = _max_of_taps(padded, window, stride)
    return y, (padded, y)


def _max_pool_taps_backward(
    window: int,
    stride: int,
    padding: int,
    residuals: tuple[jax.Array, jax.Array],
    grad: jax.Array,
) -> tuple[jax.Array]:
    """Each output's gradient goes to the first input of its window (row-major) that equals
    the output: what XLA's select-and-scatter gives ``nn.max_pool``."""
    padded, y = residuals
    dx = jnp.zeros(padded.shape, grad.dtype)
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), grad.dtype)
    for i, j, tap in _window_taps(padded, (window, window), stride, y.shape):
        hit = (tap == y) & ~taken
        taken = taken | hit
        # Put the hits back where the tap read them: start at (i, j), stride - 1 zeros between.
        spread = [
            (0, 0, 0),
            (i, padded.shape[1] - i - stride * (y.shape[1] - 1) - 1, stride - 1),
            (j, padded.shape[2] - j - stride * (y.shape[2] - 1) - 1, stride - 1),
            (0, 0, 0),
        ]
        dx = dx + jax.lax.pad(jnp.where(hit, grad, zero), zero, spread)
    height, width = dx.shape[1] - 2 * padding, dx.shape[2] - 2 * padding
    return (dx[:, padding : padding + height, padding : padding + width],)


_max_pool_taps.defvjp(_max_pool_taps_forward, _max_pool_taps_backward)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """torch's ``MaxPool2d(window, stride, padding)`` on NHWC input (pads with -inf).

    On CPU it is the maximum of the window's strided slices, with a gradient written out
    the same way: XLA:CPU expands ``nn.max_pool``'s gradient (select-and-scatter) into a scatter
    with index arrays, 6-9x slower (ResNet's stem pool at 160 px, batch 16: 112-117 vs
    13-19 ms forward and backward). Same values and gradients, ties included. A bfloat16
    map is pooled in float32 (the same maxima), its gradient summed there: XLA:CPU's bf16
    version of this backward pass ran 30x slower (445-543 vs 16 ms for ResNet's stem pool at
    227 px, batch 4). GPUs keep ``nn.max_pool`` (not measured there).
    """
    if jax.default_backend() != "cpu":
        pads = ((padding, padding), (padding, padding))
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
    wide = x.astype(_wide(x.dtype))
    return _max_pool_taps(wide, window, stride, padding).astype(x.dtype)


def _batch_moments(x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance of an NHWC map, in at least float32, in one pass
    over ``d = x - shift``: ``E[d^2] - E[d]^2``. With ``shift`` near the batch's mean (the
    running mean, once it has run) few digits cancel; flax's fast variance (no shift) loses
    them wherever the mean is large beside the spread (mean 100, std 1: 1e-2 off). A
    non-finite shift counts as 0, so broken running statistics leave the batch's intact.

    A map of one pixel per image (ASPP's image pooling) takes two passes, about the batch's
    own mean: its few values sit close together, far from a running mean that has not caught
    up with them yet (the first steps; mean 4, std 0.05 over 2-16 images: 1e-3 to 1e-2 off
    the float64 output in one pass, 3e-5 at most in two), and the second pass over B x C
    values costs nothing. (ResNet-18 DeepLabV3+ training on 2 x 97 x 97 against the PyTorch
    reference in float64: logits 2.4e-4 off, relative, in one pass; 1.3e-5 in two.)"""
    x = x.astype(_wide(x.dtype))
    axes = tuple(range(x.ndim - 1))
    if math.prod(x.shape[1:-1]) == 1:
        mean = jnp.mean(x, axes)
        return mean, jnp.mean(jnp.square(x - mean), axes)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0).astype(x.dtype)
    d = x - shift
    mean_d = jnp.mean(d, axes)
    return shift + mean_d, jnp.maximum(0.0, jnp.mean(jnp.square(d), axes) - jnp.square(mean_d))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def normalize_batch(
    x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)``: ``x`` normalised by its own per-channel statistics, scaled and
    shifted (BatchNorm in training), with the statistics it used (``_batch_moments``, about
    ``shift``; no gradient flows to it).

    The values of ``nn.BatchNorm`` to rounding; its gradient is written out as two passes over the
    map (the per-channel sums of ``dy`` and ``dy * x_hat``, then ``dx``), which XLA:CPU runs
    1.4-2x faster than autodiff's through flax's normalisation (forward and backward of a
    4x57x57x256 BatchNorm + ReLU: 6.5-8.1 vs 4.0-4.2 ms).
    """
    return _normalize_batch_forward(x, scale, bias, shift, epsilon)[0]


def _normalize_batch_forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
    mean, var = _batch_moments(x, shift)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x, mean, inv, scale, shift)


def _normalize_batch_backward(
    epsilon: float,
    residuals: tuple[jax.Array, ...],
    grads: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    del epsilon
    x, mean, inv, scale, shift = residuals
    dy, dmean, dvar = grads
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centred = x - mean
    x_hat = centred * inv
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * x_hat, axes)
    dx = (scale * inv) * (dy - (dbias + x_hat * dscale) / count)
    dx = dx + (dmean + 2.0 * dvar * centred) / count  # through the returned statistics
    dscale, dbias = dscale.astype(scale.dtype), dbias.astype(scale.dtype)
    return dx.astype(x.dtype), dscale, dbias, jnp.zeros_like(shift)


normalize_batch.defvjp(_normalize_batch_forward, _normalize_batch_backward)


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over the last axis (same variables: params ``scale`` and ``bias``,
    batch_stats ``mean`` and ``var``; the same outputs to rounding), training through
    ``normalize_batch``, whose statistics lose fewer digits (taken about the running mean).

    As in torch, the running variance averages the batch's unbiased variance (``n / (n - 1)``
    times the biased one that normalises it, n = values per channel), where flax averages the
    biased one: it matters where n is small, e.g. ASPP's image pooling (n = batch size).

    Attributes:
      train: normalise by the batch's statistics and update the running ones.
      momentum: of the running averages (torch's momentum 0.1 is 0.9 here).
      epsilon: added to the variance.
      dtype: of the output; statistics are computed in at least float32.
    """

    train: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if not self.train:
            y = (x - running_mean.value) * (jax.lax.rsqrt(running_var.value + self.epsilon) * scale)
            return (y + bias).astype(self.dtype)
        count = x.size // x.shape[-1]
        if count == 1:  # as torch refuses: a zero variance, the running one decaying to 0
            raise ValueError(
                f"BatchNorm in training needs more than 1 value per channel; got {x.shape} "
                "(ASPP's image pooling: train on batches of at least 2 images)."
            )
        y, mean, var = normalize_batch(x, scale, bias, running_mean.value, self.epsilon)
        if not self.is_initializing():
            m = self.momentum
            running_mean.value = m * running_mean.value + (1 - m) * mean
            unbiased = var * (count / max(count - 1, 1))
            running_var.value = m * running_var.value + (1 - m) * unbiased
        return y.astype(self.dtype)


def batch_norm(train: bool, *, dtype: Any = jnp.float32, name: str) -> BatchNorm:
    """BatchNorm with torch's defaults (torch momentum 0.1 is momentum 0.9 here)."""
    return BatchNorm(train, dtype=dtype, name=name)
