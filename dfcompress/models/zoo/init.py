"""One weight initialisation for the zoo: torchvision's CNN convention, shared by every family."""
from __future__ import annotations

from typing import Literal

from torch import nn


def init_weights(model: nn.Module, linear: Literal["default", "zero_bias", "normal"] = "default") -> None:
    """Kaiming-normal (fan_out) convs with zero bias, unit/zero BatchNorm; Linear layers per family:
    ``default`` keeps PyTorch's init (ResNets), ``zero_bias`` zeroes the bias (WRN reference code),
    ``normal`` draws N(0, 0.01) with zero bias (torchvision VGG/MobileNetV2)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
