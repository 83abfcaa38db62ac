"""DeepLabV3+ with a ResNet or MobileNetV2 backbone.

Submodule names mirror the PyTorch project jfzhang95/pytorch-deeplab-xception (``aspp/aspp2/
atrous_conv``, ``decoder/last_conv_4`` ...), so its checkpoints convert name for name
(``weights.convert.convert_original_deeplab``).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hairseg_jax.models.layers import Conv2d, batch_norm, conv
from hairseg_jax.models.mobilenet_v2 import mobilenet_v2
from hairseg_jax.models.resnet import BACKBONES, resnet

# Every name ``DeepLabV3Plus.backbone`` accepts.
BACKBONE_NAMES: tuple[str, ...] = (*BACKBONES, "mobilenet_v2")

# (low-level, high-level) feature keys read by the decoder and ASPP, per backbone family.
_FEATURE_TAPS: dict[str, tuple[str, str]] = {
    "resnet": ("layer1", "layer4"),
    "mobilenet_v2": ("low_level", "high_level"),
}

# Default ASPP rates of the three dilated branches per output stride.
_ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}

_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}

# The PyTorch project's kaiming_normal_ (fan_in, gain sqrt(2), untruncated) for head convs.
_head_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _head_conv(features: int, kernel_size: int, **kwargs: Any) -> Conv2d:
    """A head conv: the backbone's padded conv with the PyTorch project's initialiser."""
    return conv(features, kernel_size, kernel_init=_head_kernel_init, **kwargs)


def resize(x: jax.Array, height: int, width: int, align_corners: bool = False) -> jax.Array:
    """Bilinearly resizes NHWC ``x`` to ``height`` x ``width`` without antialiasing.

    ``align_corners=False`` is torch's default (half-pixel centres); ``True`` maps the corner
    pixels onto each other, as the original PyTorch project did.
    """
    shape = (x.shape[0], height, width, x.shape[3])
    if not align_corners:
        return jax.image.resize(x, shape, "bilinear", antialias=False)
    scale, translation = [], []
    for old, new in ((x.shape[1], height), (x.shape[2], width)):
        # Corner onto corner; a single output pixel samples the first, as torch's does.
        scale.append((new - 1) / (old - 1) if old > 1 and new > 1 else new / old)
        translation.append(0.5 - 0.5 * scale[-1] if old > 1 else 0.0)
    return jax.image.scale_and_translate(
        x, shape, (1, 2), jnp.array(scale), jnp.array(translation), "linear", antialias=False
    )


class ASPPBranch(nn.Module):
    """``atrous_conv`` (1x1, or 3x3 dilated by ``rate``) -> ``bn`` -> ReLU."""

    features: int
    kernel_size: int
    rate: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _head_conv(
            self.features,
            self.kernel_size,
            dilation=self.rate,
            dtype=self.dtype,
            name="atrous_conv",
        )(x)
        return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and image
    pooling, concatenated and projected back to ``features`` channels."""

    features: int
    rates: Sequence[int]
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        branches = [ASPPBranch(self.features, 1, dtype=self.dtype, name="aspp1")(x, train)]
        for i, rate in enumerate(self.rates):
            branch = ASPPBranch(self.features, 3, rate, dtype=self.dtype, name=f"aspp{i + 2}")
            branches.append(branch(x, train))
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = _head_conv(self.features, 1, dtype=self.dtype, name="global_avg_pool_conv")(pooled)
        pooled = nn.relu(batch_norm(train, dtype=self.dtype, name="global_avg_pool_bn")(pooled))
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        x = jnp.concatenate(branches, axis=-1)
        x = _head_conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Decoder(nn.Module):
    """Fuses the upsampled ASPP output with projected low-level features into logits."""

    features: int
    low_level_features: int
    dropout: tuple[float, float]
    num_classes: int
    align_corners: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, low_level: jax.Array, train: bool) -> jax.Array:
        low_level = _head_conv(self.low_level_features, 1, dtype=self.dtype, name="conv1")(
            low_level
        )
        low_level = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(low_level))
        x = resize(x, low_level.shape[1], low_level.shape[2], self.align_corners)
        x = jnp.concatenate([x, low_level], axis=-1)
        for i, rate in enumerate(self.dropout):
            x = _head_conv(self.features, 3, dtype=self.dtype, name=f"last_conv_{4 * i}")(x)
            x = nn.relu(batch_norm(train, dtype=self.dtype, name=f"last_conv_{4 * i + 1}")(x))
            x = nn.Dropout(rate, deterministic=not train)(x)
        # The classifier in float32 at least: logits of about 10 rounded to bf16 move by 0.06.
        wide = jnp.promote_types(self.dtype, jnp.float32)
        return _head_conv(self.num_classes, 1, use_bias=True, dtype=wide, name="last_conv_8")(x)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation model: ResNet or MobileNetV2 backbone, ASPP and decoder.

    Attributes:
        backbone: one of ``BACKBONE_NAMES`` (``"resnet18"`` .. ``"resnet152"``,
            ``"mobilenet_v2"``).
        output_stride: 8, 16 or 32, stride of the backbone's last feature map.
        multi_grid: dilation multipliers of a ResNet's layer4 blocks (MobileNetV2 ignores it).
        aspp_channels: channels of each ASPP branch and of its output.
        aspp_rates: dilations of the three 3x3 ASPP branches; ``None`` picks (12, 24, 36) at
            output stride 8, (6, 12, 18) at 16 and (3, 6, 9) at 32.
        decoder_channels: channels of the decoder's two 3x3 convs.
        low_level_channels: channels the low-level features (ResNet layer1, MobileNetV2
            features.3) are projected to.
        aspp_dropout: dropout rate after the ASPP projection.
        decoder_dropout: dropout rates after the decoder's two 3x3 convs.
        num_classes: logit channels.
        align_corners: bilinear upsampling that maps corner pixels onto each other (the
            original PyTorch project's choice, for its imported checkpoints).
        dtype: computation dtype; parameters stay float32 and logits are float32.
    """

    backbone: str = "resnet101"
    output_stride: int = 16
    multi_grid: Sequence[int] = (1, 2, 4)
    aspp_channels: int = 256
    aspp_rates: Sequence[int] | None = None
    decoder_channels: int = 256
    low_level_channels: int = 48
    aspp_dropout: float = 0.5
    decoder_dropout: tuple[float, float] = (0.5, 0.1)
    num_classes: int = 1
    align_corners: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """Maps normalised NHWC images to float32 logits (N, H, W, num_classes)."""
        rates = self.aspp_rates
        if rates is None:
            if self.output_stride not in _ASPP_RATES:
                raise ValueError(
                    f"output_stride must be one of {list(_ASPP_RATES)}, got {self.output_stride}."
                )
            rates = _ASPP_RATES[self.output_stride]
        if self.backbone == "mobilenet_v2":
            backbone = mobilenet_v2(
                output_stride=self.output_stride, dtype=self.dtype, name="backbone"
            )
            low_key, high_key = _FEATURE_TAPS["mobilenet_v2"]
        elif self.backbone in BACKBONES:
            backbone = resnet(
                self.backbone,
                output_stride=self.output_stride,
                multi_grid=self.multi_grid,
                dtype=self.dtype,
                name="backbone",
            )
            low_key, high_key = _FEATURE_TAPS["resnet"]
        else:
            raise ValueError(
                f"Unknown backbone {self.backbone!r}; known: {', '.join(BACKBONE_NAMES)}."
            )
        features = backbone(images, train)
        x = ASPP(self.aspp_channels, rates, self.aspp_dropout, dtype=self.dtype, name="aspp")(
            features[high_key], train
        )
        x = Decoder(
            self.decoder_channels,
            self.low_level_channels,
            tuple(self.decoder_dropout),
            self.num_classes,
            self.align_corners,
            dtype=self.dtype,
            name="decoder",
        )(x, features[low_key], train)
        return resize(x.astype(jnp.float32), images.shape[1], images.shape[2], self.align_corners)


def build_model(config: Any) -> DeepLabV3Plus:
    """Builds the model from a config with ``get`` (e.g. an ``ml_collections.ConfigDict``).

    Reads ``backbone``, ``output_stride``, ``multi_grid``, ``aspp_channels``,
    ``decoder_channels``, ``dropout`` (ASPP rate; the decoder uses ``(dropout, dropout / 5)``),
    ``align_corners`` and ``dtype`` (``"float32"``, ``"bfloat16"``, or ``"float64"`` for
    numerical checks, which needs ``jax_enable_x64``); missing fields take the defaults.
    """
    defaults = DeepLabV3Plus()
    dtype_name = config.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype_name!r}; known: {', '.join(_DTYPES)}.")
    if dtype_name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype 'float64' needs jax_enable_x64 (e.g. JAX_ENABLE_X64=1).")
    dropout = config.get("dropout", defaults.aspp_dropout)
    return DeepLabV3Plus(
        backbone=config.get("backbone", defaults.backbone),
        output_stride=config.get("output_stride", defaults.output_stride),
        multi_grid=tuple(config.get("multi_grid", defaults.multi_grid)),
        aspp_channels=config.get("aspp_channels", defaults.aspp_channels),
        decoder_channels=config.get("decoder_channels", defaults.decoder_channels),
        aspp_dropout=dropout,
        decoder_dropout=(dropout, dropout / 5),
        align_corners=config.get("align_corners", defaults.align_corners),
        dtype=_DTYPES[dtype_name],
    )
