"""PyTorch reference models of the Flax ResNet and DeepLabV3+, for parity tests and benchmarks.

``TorchResNet`` has torchvision's state dict keys (``conv1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ...) and the Flax model's strides and dilations;
``TorchDeepLabV3Plus`` has the original PyTorch project's module names (``aspp.aspp1.atrous_conv``,
``aspp.global_avg_pool.1``, ``decoder.last_conv.8`` ...). Neither needs torchvision.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hairseg_jax.models.deeplab import _ASPP_RATES
from hairseg_jax.models.resnet import _LAYER_STRIDES_DILATIONS, BACKBONES


def _conv3x3(inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with a dilation for both 3x3 convs."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 Bottleneck: the 3x3 conv carries stride and dilation."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """ResNet with torchvision's keys; ``forward`` returns the Flax model's feature dict.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in layer1..layer4.
        output_stride: 8, 16 or 32; as in ``hairseg_jax.models.resnet.ResNet``, every block of
            a dilated layer (the first included) uses the layer's dilation, and layer4's block
            ``i`` multiplies it by ``multi_grid[i]``.
        multi_grid: layer4's dilation multipliers.
        num_classes: adds torchvision's ``fc`` (its output is the feature ``"fc"``) if set.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        output_stride: int = 16,
        multi_grid: Sequence[int] = (1, 2, 4),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        strides, dilations = _LAYER_STRIDES_DILATIONS[output_stride]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, num_blocks in enumerate(layers):
            planes = 64 * 2**i
            downsample = None
            if strides[i] != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride=strides[i], bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            blocks = []
            for j in range(num_blocks):
                dilation = dilations[i] * (multi_grid[j] if i == 3 else 1)
                stride = strides[i] if j == 0 else 1
                blocks.append(
                    block(inplanes, planes, stride, dilation, downsample if j == 0 else None)
                )
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = None if num_classes is None else nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """NCHW images -> NCHW features ``stem`` (before the max pool), ``layer1``..``layer4``."""
        x = self.relu(self.bn1(self.conv1(x)))
        features = {"stem": x}
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            features[f"layer{i}"] = x
        if self.fc is not None:
            features["fc"] = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return features


def torch_resnet(name: str, /, **kwargs: Any) -> TorchResNet:
    """The reference ResNet ``name`` (a key of ``hairseg_jax.models.resnet.BACKBONES``)."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; known: {', '.join(BACKBONES)}.")
    layers, block = BACKBONES[name]
    return TorchResNet(BasicBlock if block == "basic" else Bottleneck, layers, **kwargs)


class _ASPPModule(nn.Module):
    def __init__(self, inplanes: int, planes: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(
            inplanes, planes, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """The original project's ASPP: four branches, image pooling, 1x1 projection, dropout."""

    def __init__(
        self, inplanes: int, planes: int, rates: Sequence[int], align_corners: bool
    ) -> None:
        super().__init__()
        self.aspp1 = _ASPPModule(inplanes, planes, 1, 1)
        for i, rate in enumerate(rates):
            self.add_module(f"aspp{i + 2}", _ASPPModule(inplanes, planes, 3, rate))
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(inplanes, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(),
        )
        self.conv1 = nn.Conv2d(planes * (len(rates) + 2), planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.num_branches = len(rates) + 1
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [getattr(self, f"aspp{i + 1}")(x) for i in range(self.num_branches)]
        pooled = self.global_avg_pool(x)
        branches.append(
            F.interpolate(
                pooled, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners
            )
        )
        x = self.relu(self.bn1(self.conv1(torch.cat(branches, dim=1))))
        return self.dropout(x)


class Decoder(nn.Module):
    """The original project's decoder: 48-channel low-level projection and ``last_conv``."""

    def __init__(
        self,
        low_level_inplanes: int,
        aspp_channels: int,
        channels: int,
        num_classes: int,
        align_corners: bool,
        low_level_channels: int = 48,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, low_level_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(low_level_channels)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(
            x, size=low_level.shape[2:], mode="bilinear", align_corners=self.align_corners
        )
        return self.last_conv(torch.cat([x, low_level], dim=1))


class TorchDeepLabV3Plus(nn.Module):
    """DeepLabV3+ with the original project's module names around any feature backbone.

    Args:
        backbone: maps NCHW images to a dict holding ``low_level_key`` (stride 4) and
            ``high_level_key`` (the output stride) feature maps.
        low_level_channels_in: channels of the low-level feature.
        high_channels_in: channels of the high-level feature.
        output_stride: picks the ASPP rates, (6, 12, 18) at 16 and (12, 24, 36) at 8.
        num_classes: output channels (the original used 2, the Flax model 1).
        align_corners: of every bilinear upsampling (the original's ``True``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        low_level_channels_in: int,
        high_channels_in: int,
        output_stride: int,
        num_classes: int,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        align_corners: bool = False,
        low_level_key: str = "layer1",
        high_level_key: str = "layer4",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(high_channels_in, aspp_channels, _ASPP_RATES[output_stride], align_corners)
        self.decoder = Decoder(
            low_level_channels_in, aspp_channels, decoder_channels, num_classes, align_corners
        )
        self.align_corners = align_corners
        self.low_level_key = low_level_key
        self.high_level_key = high_level_key
        for m in [*self.aspp.modules(), *self.decoder.modules()]:  # the original's head init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW images -> NCHW logits at the input's size."""
        features = self.backbone(x)
        out = self.aspp(features[self.high_level_key])
        out = self.decoder(out, features[self.low_level_key])
        return F.interpolate(
            out, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners
        )


def torch_deeplab(
    backbone: str, output_stride: int = 16, num_classes: int = 1, **kwargs: Any
) -> TorchDeepLabV3Plus:
    """The reference DeepLabV3+ on ``torch_resnet(backbone)``; ``kwargs`` go to the model."""
    resnet = torch_resnet(backbone, output_stride=output_stride)
    expansion = resnet.layer1[0].expansion
    return TorchDeepLabV3Plus(
        resnet, 64 * expansion, 512 * expansion, output_stride, num_classes, **kwargs
    )


@torch.no_grad()
def randomize_batch_norm_stats(module: nn.Module, generator: torch.Generator) -> None:
    """Draws every BatchNorm's weight, bias, running mean and running variance at random, so
    that a port that mixes them up (or drops one) cannot pass a parity test.

    The ranges keep the activations of a ResNet-101 at OS8 within about 20 (its layer3 sums
    23 residual branches); wider ones make them grow by orders of magnitude, and a parity
    check at a fixed absolute tolerance would then measure float32 rounding, not the port.
    """
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) * 0.75 + 0.75)
