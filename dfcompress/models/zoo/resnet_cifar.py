"""CIFAR ResNet-20/32/44/56 (He et al. 2016 §4.2) as in akamaster/pytorch_resnet_cifar10.

The option-A shortcut (stride-2 subsample + zero channel padding) is a real module instead of the
upstream lambda so the model pickles, traces, exports and prunes; it has no parameters, so upstream
checkpoints load strictly once their ``module.`` prefix is stripped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model


class PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: ``x[:, :, ::2, ::2]`` then zero channels on both sides.

    After channel pruning (see ``zoo.pruning``) the output is no longer "zeros | x | zeros", so the
    module then carries ``index``: for each output channel, the input channel it copies, or
    ``in_channels`` for a zero channel. Unpruned, it is the plain pad (cheapest, cleanest export).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(f"option-A shortcut cannot map {in_channels} to {out_channels} channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.pad = (out_channels - in_channels) // 2
        self.stride = stride
        # None until pruned; a None buffer stays out of state_dict, so upstream checkpoints load strictly
        self.register_buffer("index", None)

    def default_index(self) -> Tensor:
        """The unpruned layout as an index: zeros, then the input channels in order, then zeros."""
        zero = [self.in_channels] * self.pad
        return torch.tensor(zero + list(range(self.in_channels)) + zero, dtype=torch.long)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.index is None:
            return F.pad(x, (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)
        index = self.index if self.index.device == x.device else self.index.to(x.device)
        with_zero = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return with_zero.index_select(1, index)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}" + (", pruned" if self.index is not None else "")


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Depth 6n+2: 16/32/64-channel stages of n basic blocks, global average pool, ``linear`` head."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.avgpool(out).flatten(1))


def _define(depth: int) -> None:
    name = f"resnet{depth}"

    @register_model(
        name, family="resnet_cifar", default_input_size=32, default_num_classes=10,
        aliases=(f"{name}_cifar", f"cifar_{name}", f"resnet-{depth}", f"{name}-cifar10", f"cifar10_{name}"),
    )
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
        return CifarResNet((depth - 2) // 6, num_classes, in_channels)


for _depth in (20, 32, 44, 56):
    _define(_depth)
