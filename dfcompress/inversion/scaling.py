"""NaturalInversion's Adaptive Channel Scaling (ACS, eq. 6-7): a learnable per-image, per-channel gain.

The teacher saw normalised data with a particular per-channel range; letting each synthetic image
learn its own channel scale alpha (B x C x 1 x 1, init N(5, 1)) lets the optimisation find that range
instead of being stuck with the tanh output's [-1, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelScaling(nn.Module):
    """I_hat = alpha ⊗ x with alpha ~ N(mean, std) drawn from ``generator``; ``learnable=False`` gives alpha = 1 (ablation)."""

    def __init__(self, batch: int, channels: int, mean: float, std: float, generator: torch.Generator, learnable: bool = True):
        super().__init__()
        if learnable:
            alpha = torch.randn(batch, channels, 1, 1, generator=generator) * std + mean
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", torch.ones(batch, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # in float32 even under autocast: alpha's small updates would vanish in bf16
        return x.float() * self.alpha
