"""MobileNetV2 (width 1.0) with torchvision's state_dict keys and ReLU6.

Small inputs (<= 64 px) use the common CIFAR variant: stride 1 in the stem conv and in the second
stage, so a 32x32 image reaches the last stage at 4x4 instead of 1x1. Keys are unchanged.
"""
from __future__ import annotations

from torch import Tensor, nn

from .init import init_weights
from .registry import register_model

CIFAR_MAX_INPUT = 64
# t (expansion), c (channels), n (repeats), s (first stride)
_SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class ConvBNReLU6(nn.Sequential):
    """torchvision ``Conv2dNormActivation``: keys ``.0`` conv, ``.1`` BN."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, dropout: float = 0.2):
        super().__init__()
        small = input_size <= CIFAR_MAX_INPUT
        input_channel, last_channel = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(in_channels, input_channel, stride=1 if small else 2)]
        for i, (t, c, n, s) in enumerate(_SETTINGS):
            if small and i == 1:
                s = 1
            for j in range(n):
                features.append(InvertedResidual(input_channel, c, s if j == 0 else 1, t))
                input_channel = c
        features.append(ConvBNReLU6(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))
        init_weights(self, linear="normal")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model("mobilenetv2", family="mobilenetv2", aliases=("mobilenet_v2", "mobilenetv2_100", "mbv2", "mobilenet-v2"))
def mobilenetv2(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224) -> nn.Module:
    return MobileNetV2(num_classes, in_channels, input_size)
