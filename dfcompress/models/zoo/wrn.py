"""Wide ResNets WRN-depth-k (Zagoruyko & Komodakis 2016), CIFAR style, pre-activation, no dropout.

Key names follow the wrn.py used by the common KD code bases (CRD/RepDistiller, DFAD, CMI):
``conv1``, ``block{1,2,3}.layer.i.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``, so their
checkpoints load directly.
"""
from __future__ import annotations

from torch import Tensor, nn

from .init import init_weights
from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block; when the width changes the shortcut conv sees the *activated* input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n+4")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        init_weights(self, linear="zero_bias")

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.avgpool(out).flatten(1))


def _define(depth: int, k: int) -> None:
    @register_model(
        f"wrn_{depth}_{k}", family="wrn", default_input_size=32, default_num_classes=10,
        aliases=(f"wrn{depth}_{k}", f"wideresnet_{depth}_{k}", f"wide_resnet_{depth}_{k}"),
    )
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
        return WideResNet(depth, k, num_classes, in_channels)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _define(_depth, _k)
