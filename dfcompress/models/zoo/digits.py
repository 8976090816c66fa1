"""``digits_cnn``: the embedded default teacher, a small BN CNN for 1x8x8 scikit-learn digits.

Three resolution stages (8x8, 4x4, 2x2) with BatchNorm everywhere, so the whole data-free pipeline
(BN-statistics inversion, the feature pyramid over stages, pruning) has something real to work on
while training in seconds on a CPU.
"""
from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class DigitsCNN(nn.Module):
    """stage1 (2 convs, 64) -> pool1 -> stage2 (2 convs, 128) -> pool2 -> stage3 (1 conv, 256) -> GAP -> fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stage1 = nn.Sequential(*_cbr(in_channels, 64), *_cbr(64, 64))
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(*_cbr(64, 128), *_cbr(128, 128))
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = nn.Sequential(*_cbr(128, 256))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool2(self.stage2(self.pool1(self.stage1(x))))
        return self.fc(self.pool(self.stage3(x)).flatten(1))


@register_model(
    "digits_cnn", family="digits_cnn", default_input_size=8, default_num_classes=10, default_in_channels=1,
    aliases=("digits", "digitscnn"),
)
def digits_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    return DigitsCNN(num_classes, in_channels)
