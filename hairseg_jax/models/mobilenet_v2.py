"""MobileNetV2 backbone in torchvision's layout, with DeepLab-style dilation.

Only ``features.0`` .. ``features.17`` are built: DeepLab drops the 1x1 320 -> 1280 conv
(``features.18``) and the classifier. Flax names map 1:1 onto torchvision's state dict:

    Flax (params / batch_stats)          torchvision mobilenet_v2
    features_0/{conv,bn}                 features.0.{0,1}
    features_1/depthwise/{conv,bn}       features.1.conv.0.{0,1}
    features_1/project_conv, project_bn  features.1.conv.1, features.1.conv.2
    features_i/expand/{conv,bn}          features.i.conv.0.{0,1}          (i = 2 .. 17)
    features_i/depthwise/{conv,bn}       features.i.conv.1.{0,1}
    features_i/project_conv, project_bn  features.i.conv.2, features.i.conv.3

Convs have no bias; a depthwise kernel is (3, 3, 1, C), torch's (C, 1, 3, 3) transposed.
Each conv zero-pads its own input as torchvision does. (jfzhang95/pytorch-deeplab-xception's
MobileNetV2 pads a block's input once, before the 1x1 expand conv, so its borders differ, and
its checkpoints use other keys.)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hairseg_jax.models.layers import batch_norm, conv

# (expand ratio t, output channels c, blocks n, stride s) of features.1 .. features.17.
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

STEM_CHANNELS = 32
# features.0 .. features.3 make the stride-4, 24-channel low-level feature.
LOW_LEVEL_BLOCKS = 3


def block_plan(output_stride: int) -> list[tuple[int, int, int, int]]:
    """``(expand_ratio, channels, stride, dilation)`` of features.1 .. features.17.

    TF-slim's rule (``mobilenet_base``, as DeepLab's MobileNetV2 uses it), block by block:
    once the stride so far equals ``output_stride``, a block keeps stride 1 and uses the
    dilation reached so far, and the dilation of every *later* block is multiplied by the
    stride the block gave up; so each pretrained block sees the spacing it was trained on.
    At output stride 16, features.14 (the first 160-channel block) loses its stride and
    features.15 .. 17 use dilation 2; at 8, features.7 loses its stride, features.8 .. 14
    use 2 and features.15 .. 17 use 4. (jfzhang95's port dilates a whole group alike, which
    leaves features.15 and 16 undilated at 16; its MobileNetV2 checkpoints cannot be loaded
    here anyway.)
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be one of [8, 16, 32], got {output_stride}.")
    plan = []
    current_stride, rate = 2, 1  # after the stride-2 stem
    for expand_ratio, channels, num_blocks, group_stride in INVERTED_RESIDUAL_SETTINGS:
        for i in range(num_blocks):
            stride = group_stride if i == 0 else 1
            if current_stride == output_stride:
                plan.append((expand_ratio, channels, 1, rate))
                rate *= stride
            else:
                plan.append((expand_ratio, channels, stride, 1))
                current_stride *= stride
    return plan


class ConvBNReLU6(nn.Module):
    """``conv`` -> ``bn`` -> ReLU6, torchvision's ``Conv2dNormActivation``."""

    features: int
    kernel_size: int
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            dilation=self.dilation,
            groups=self.groups,
            dtype=self.dtype,
            name="conv",
        )(x)
        return nn.relu6(batch_norm(train, dtype=self.dtype, name="bn")(x))


class InvertedResidual(nn.Module):
    """Optional 1x1 ``expand`` -> 3x3 ``depthwise`` (stride, dilation) -> linear 1x1 project,
    with an identity shortcut when the shape is kept."""

    features: int
    expand_ratio: int
    strides: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        hidden = round(x.shape[-1] * self.expand_ratio)
        out = x
        if self.expand_ratio != 1:
            out = ConvBNReLU6(hidden, 1, dtype=self.dtype, name="expand")(out, train)
        out = ConvBNReLU6(
            hidden,
            3,
            strides=self.strides,
            dilation=self.dilation,
            groups=hidden,
            dtype=self.dtype,
            name="depthwise",
        )(out, train)
        out = conv(self.features, 1, dtype=self.dtype, name="project_conv")(out)
        out = batch_norm(train, dtype=self.dtype, name="project_bn")(out)
        if self.strides == 1 and x.shape[-1] == self.features:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 features.0 .. features.17 (no 1280 conv, no classifier).

    Attributes:
        output_stride: 8, 16 or 32; stride of ``high_level``, the rest is dilation
            (see ``block_plan``).
        dtype: computation dtype; parameters stay float32.
    """

    output_stride: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Maps NHWC images to ``low_level`` (features.3, stride 4, 24 channels) and
        ``high_level`` (features.17, stride ``output_stride``, 320 channels)."""
        plan = block_plan(self.output_stride)
        x = ConvBNReLU6(STEM_CHANNELS, 3, strides=2, dtype=self.dtype, name="features_0")(x, train)
        features = {}
        for i, (expand_ratio, channels, strides, dilation) in enumerate(plan, start=1):
            x = InvertedResidual(
                channels, expand_ratio, strides, dilation, dtype=self.dtype, name=f"features_{i}"
            )(x, train)
            if i == LOW_LEVEL_BLOCKS:
                features["low_level"] = x
        features["high_level"] = x
        return features


def mobilenet_v2(**kwargs: Any) -> MobileNetV2:
    """Builds ``MobileNetV2``; ``kwargs`` (including a module ``name``) go to it."""
    return MobileNetV2(**kwargs)
