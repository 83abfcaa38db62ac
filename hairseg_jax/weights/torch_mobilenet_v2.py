"""A pure-PyTorch MobileNetV2 with torchvision's exact state-dict keys, as a parity reference.

Same layers and keys as ``torchvision.models.mobilenet_v2`` (``features.0`` .. ``features.18``
and ``classifier.1``, so a torchvision-format file can be saved from it), dilated to an output
stride by the Flax backbone's ``block_plan``. ``forward`` returns the DeepLab features and
skips ``features.18`` and the classifier. Imports torch: load it only where torch is wanted.
"""

import torch
from torch import nn

from hairseg_jax.models.mobilenet_v2 import LOW_LEVEL_BLOCKS, STEM_CHANNELS, block_plan

LAST_CHANNELS = 1280


class ConvBNReLU6(nn.Sequential):
    """Conv (``.0``, no bias, padding ``dilation * (k // 2)``) -> BatchNorm (``.1``) -> ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                dilation * (kernel_size // 2),
                dilation,
                groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's block: ``conv`` = [expand,] depthwise, project conv, project BN."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dilation: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, dilation, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 at ``output_stride`` 8, 16 or 32."""

    def __init__(self, output_stride: int = 32, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, STEM_CHANNELS, 3, stride=2)]
        in_channels = STEM_CHANNELS
        for expand_ratio, channels, stride, dilation in block_plan(output_stride):
            layers.append(InvertedResidual(in_channels, channels, stride, dilation, expand_ratio))
            in_channels = channels
        layers.append(ConvBNReLU6(in_channels, LAST_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CHANNELS, num_classes))
        for m in self.modules():  # torchvision's initialisation (BatchNorm keeps torch's)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """NCHW images to ``low_level`` (features.3) and ``high_level`` (features.17)."""
        low_level = self.features[: LOW_LEVEL_BLOCKS + 1](x)
        high_level = self.features[LOW_LEVEL_BLOCKS + 1 : -1](low_level)
        return {"low_level": low_level, "high_level": high_level}
