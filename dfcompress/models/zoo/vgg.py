"""VGG-11/16 with BatchNorm: torchvision keys (``features.N``, ``classifier.0/3/6``) at ImageNet sizes.

For small inputs (<= 64 px) ``features`` is unchanged (same indices, same keys) but the head is the
usual CIFAR one, global average pool + ``classifier = Linear(512, K)``; a 7x7x512 -> 4096 head on a
1x1 map would be 100M useless parameters. Max-pools that would act on a 1-pixel map become
``nn.Identity`` so odd/small sizes (16, 28) still work without shifting any key.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .init import init_weights
from .registry import register_model

CIFAR_MAX_INPUT = 64

_CFGS: dict[str, list[int | str]] = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_features(cfg: list[int | str], in_channels: int, input_size: int) -> nn.Sequential:
    """Conv-BN-ReLU stack; ``input_size`` only decides which pools would see a 1-pixel map."""
    layers: list[nn.Module] = []
    channels, size = in_channels, input_size
    for v in cfg:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                layers.append(nn.Identity())
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=False)]
            channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int = 1000, in_channels: int = 3, input_size: int = 224):
        super().__init__()
        self.features = make_features(cfg, in_channels, input_size)
        self.small_input = input_size <= CIFAR_MAX_INPUT
        if self.small_input:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier: nn.Module = nn.Linear(512, num_classes)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=False), nn.Dropout(0.5),
                nn.Linear(4096, 4096), nn.ReLU(inplace=False), nn.Dropout(0.5),
                nn.Linear(4096, num_classes),
            )
        init_weights(self, linear="normal")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _define(name: str) -> None:
    cfg = _CFGS[name]

    @register_model(name, family="vgg", aliases=(name.replace("_bn", "-bn"), name.replace("_", "")))
    def build(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224) -> nn.Module:
        return VGG(cfg, num_classes, in_channels, input_size)


for _name in _CFGS:
    _define(_name)
