"""Small nn.Modules for ONNX ops whose semantics no stock torch module matches exactly.

They are modules (not functions) so forward hooks fire on them like on any activation or pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HardSigmoid(nn.Module):
    """ONNX HardSigmoid ``max(0, min(1, alpha*x + beta))``; ONNX defaults alpha=0.2, torch's is 1/6."""

    def __init__(self, alpha: float = 0.2, beta: float = 0.5):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.alpha + self.beta, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class PaddedAvgPool(nn.Module):
    """AveragePool with explicit (possibly asymmetric) pads that are *not* counted in the divisor.

    torch's pools only take symmetric padding; padding by hand would count the zeros, so the mean
    is the pooled sum of the padded input divided by the pooled count of real pixels.
    """

    def __init__(self, kernel: list[int], stride: list[int], torch_pads: list[int], ceil_mode: bool):
        super().__init__()
        self.kernel, self.stride, self.torch_pads, self.ceil_mode = list(kernel), list(stride), list(torch_pads), bool(ceil_mode)
        self._pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, self.torch_pads)
        ones = F.pad(torch.ones_like(x[:1, :1]), self.torch_pads)
        kw = dict(kernel_size=self.kernel, stride=self.stride, ceil_mode=self.ceil_mode)
        return self._pool(padded, **kw) / self._pool(ones, **kw)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, pads={self.torch_pads}, ceil_mode={self.ceil_mode}"
