"""ResNet backbone in torchvision's v1.5 layout, with DeepLab-style dilation.

Module and parameter names mirror torchvision (``conv1``, ``bn1``, ``layer3_0/conv2``,
``layer3_0/downsample_conv`` ...) so that torchvision weights can be ported name for name.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hairseg_jax.models.layers import batch_norm, conv, max_pool, residual_relu

BACKBONES: dict[str, tuple[tuple[int, ...], str]] = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}

# Per output stride: (strides, dilations) of layer1..layer4.
_LAYER_STRIDES_DILATIONS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 conv + BN) shortcut; expansion 1."""

    planes: int
    strides: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = conv(
            self.planes,
            3,
            strides=self.strides,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv1",
        )(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv(self.planes, 3, dilation=self.dilation, dtype=self.dtype, name="conv2")(out)
        out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
        return residual_relu(out, _shortcut(x, self.planes, self.strides, train, self.dtype))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carrying stride and dilation, v1.5) -> 1x1 convs; expansion 4."""

    planes: int
    strides: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv(
            self.planes,
            3,
            strides=self.strides,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv2",
        )(out)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        out = conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
        out = batch_norm(train, dtype=self.dtype, name="bn3")(out)
        return residual_relu(out, _shortcut(x, self.planes * 4, self.strides, train, self.dtype))


def _shortcut(x: jax.Array, features: int, strides: int, train: bool, dtype: Any) -> jax.Array:
    """Identity, or ``downsample_conv`` + ``downsample_bn`` when the shape changes.

    Must be called inside a block's compact ``__call__`` so the submodules attach to it.
    """
    if strides == 1 and x.shape[-1] == features:
        return x
    x = conv(features, 1, strides=strides, dtype=dtype, name="downsample_conv")(x)
    return batch_norm(train, dtype=dtype, name="downsample_bn")(x)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


class ResNet(nn.Module):
    """ResNet feature extractor (no fc); see ``__call__`` for the returned features.

    Attributes:
        stage_sizes: number of blocks in layer1..layer4.
        block: ``"basic"`` or ``"bottleneck"``.
        output_stride: 8, 16 or 32; stride of layer4 w.r.t. the input, the rest is dilation.
        multi_grid: layer4's block ``i`` uses dilation ``layer4 dilation * multi_grid[i]``.
        dtype: computation dtype; parameters stay float32.
    """

    stage_sizes: Sequence[int]
    block: str
    output_stride: int = 16
    multi_grid: Sequence[int] = (1, 2, 4)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Maps NHWC images to NHWC features ``stem`` (stride 2, before the max pool),
        ``layer1`` (stride 4, the low-level feature) and ``layer2``..``layer4``."""
        if self.block not in _BLOCKS:
            raise ValueError(f"Unknown block {self.block!r}; expected one of {list(_BLOCKS)}.")
        if self.output_stride not in _LAYER_STRIDES_DILATIONS:
            raise ValueError(
                f"output_stride must be one of {list(_LAYER_STRIDES_DILATIONS)}, "
                f"got {self.output_stride}."
            )
        if len(self.stage_sizes) != 4:
            raise ValueError(f"stage_sizes needs 4 entries, got {self.stage_sizes}.")
        if len(self.multi_grid) < self.stage_sizes[3]:
            raise ValueError(
                f"multi_grid {tuple(self.multi_grid)} is shorter than layer4's "
                f"{self.stage_sizes[3]} blocks."
            )
        block_cls = _BLOCKS[self.block]
        strides, dilations = _LAYER_STRIDES_DILATIONS[self.output_stride]

        x = conv(64, 7, strides=2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        features = {"stem": x}
        x = max_pool(x, 3, 2, 1)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                dilation = dilations[i] * (self.multi_grid[j] if i == 3 else 1)
                x = block_cls(
                    64 * 2**i,
                    strides=strides[i] if j == 0 else 1,
                    dilation=dilation,
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
            features[f"layer{i + 1}"] = x
        return features


def resnet(name: str, /, **kwargs: Any) -> ResNet:
    """Builds the ResNet ``name`` (a key of ``BACKBONES``); ``kwargs`` (including a module
    ``name``) go to ``ResNet``."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; known: {', '.join(BACKBONES)}.")
    stage_sizes, block = BACKBONES[name]
    return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)
