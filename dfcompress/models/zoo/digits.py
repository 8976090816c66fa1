"""``digits_cnn``: the embedded default teacher, a small BN CNN for 1x8x8 scikit-learn digits.

Three resolution stages (8x8, 4x4, 2x2) with BatchNorm everywhere, so the whole data-free pipeline
(BN-statistics inversion, the feature pyramid over stages, pruning) has something real to work on
while training in seconds on a CPU.
"""
from __future__ import annotations

from torch import Tensor, nn

from .init import init_weights
from .registry import register_model


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class DigitsCNN(nn.Module):
    """stage1 (2 convs, w) -> pool1 -> stage2 (2 convs, 2w) -> pool2 -> stage3 (1 conv, 4w) -> GAP -> fc.

    The teacher uses w=32 (~140k params, 1.8M MACs): small enough that inverting it on a 2-core CPU
    takes a minute or two, which is what lets `dfcompress demo` run the whole pipeline in minutes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.stage1 = nn.Sequential(*_cbr(in_channels, w), *_cbr(w, w))
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(*_cbr(w, 2 * w), *_cbr(2 * w, 2 * w))
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = nn.Sequential(*_cbr(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool2(self.stage2(self.pool1(self.stage1(x))))
        return self.fc(self.pool(self.stage3(x)).flatten(1))


@register_model(
    "digits_cnn", family="digits_cnn", default_input_size=8, default_num_classes=10, default_in_channels=1,
    aliases=("digits", "digitscnn"),
)
def digits_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    return DigitsCNN(num_classes, in_channels, width=32)


@register_model(
    "digits_cnn_small", family="digits_cnn", default_input_size=8, default_num_classes=10, default_in_channels=1,
    aliases=("digits_small",),
)
def digits_cnn_small(num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    """Half-width digits CNN (~35k params): the demo's distillation student."""
    return DigitsCNN(num_classes, in_channels, width=16)
