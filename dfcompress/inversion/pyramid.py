"""NaturalInversion's Feature Transfer Pyramid (FTP, eq. 5 and appendix table 7), built from any teacher.

The paper hard-codes four ResNet-34 stages; here the blocks come from ``probe_stages``: with stages
f_1..f_N (high -> low resolution),

    m_1 = W1(up(f_N))                          -> f_{N-1}'s channels and size
    m_l = W1(up(W3(m_{l-1} + f_{N-l+1})))      -> f_{N-l}'s channels and size   (1 < l < N)
    m_N = W1(up?(W3(m_{N-1} + f_1)))           -> C channels at the input size
    out = tanh(W1(G(z|y) + m_N))               (table 7's "output" row)

"up" resizes to the *next stage's actual size* (nearest, like ``nn.Upsample``), so stages that do not
halve exactly and stems with stride-2 first stages (ImageNet ResNets: f_1 at H/2) work too. The
features are read by forward hooks on the stage modules during a no-grad teacher pass on G(z|y), as in
the reference implementation: they are inputs of the pyramid, not a path for gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.stages import Stage
from ..models.taps import FeatureTaps


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="nearest")


class PyramidBlock(nn.Module):
    """One FTP block: (optional W3 on m_{l-1} + f) -> resize -> W1 to the next stage's channels."""

    def __init__(self, in_channels: int, out_channels: int, out_size: tuple[int, int], fuse: bool):
        super().__init__()
        self.out_size = out_size
        self.conv3 = nn.Conv2d(in_channels, in_channels, 3, 1, 1) if fuse else None
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, f: Tensor, m: Tensor | None) -> Tensor:
        x = f if m is None else f + m
        if self.conv3 is not None:
            x = self.conv3(x)
        # W1(up(x)) == up(W1(x)) exactly for nearest resizing; the 1x1 conv is cheaper at low resolution
        return _resize(self.conv1(x), self.out_size)


class FeatureTransferPyramid(nn.Module):
    """Sub-generator that adds the teacher's multi-scale features of G(z|y) back onto G(z|y)."""

    def __init__(self, stages: Sequence[Stage], input_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = input_shape
        self.stages = list(stages)
        blocks = []
        # walk from the deepest stage up; block l targets stage N-l (or the image for the last block)
        deep_first = list(reversed(self.stages))
        for i, stage in enumerate(deep_first):
            nxt = deep_first[i + 1] if i + 1 < len(deep_first) else None
            out_ch, out_size = (nxt.channels, (nxt.height, nxt.width)) if nxt else (c, (h, w))
            blocks.append(PyramidBlock(stage.channels, out_ch, out_size, fuse=i > 0))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, g: Tensor, features: Sequence[Tensor]) -> Tensor:
        """``g`` = G(z|y); ``features`` = [f_1..f_N] of the teacher on g (high -> low resolution)."""
        m: Tensor | None = None
        for block, f in zip(self.blocks, reversed(list(features))):
            m = block(f, m)
        x = g if m is None else g + m
        return torch.tanh(self.out(x))


class _AllStagesSeen(Exception):
    """Raised by the last stage hook to end the pyramid's feature pass early."""


class StageTaps(FeatureTaps):
    """FeatureTaps on the pyramid's stage modules that record (a detached copy) only while ``active``.

    The copy protects against in-place ops later in the teacher's forward (e.g. ``out += identity``);
    switching off keeps the loss pass from recording features nobody reads. The feature pass stops as
    soon as every stage has been seen: the layers after the last stage (a CNN's head, a ViT's whole
    transformer after its patch embedding) would cost teacher compute for nothing.
    """

    def __init__(self, module: nn.Module, stages: Sequence[Stage]):
        self.active = False
        super().__init__(module, [(s.name, "output") for s in stages], detach=True)
        self.names = [s.name for s in stages]

    def _hook(self, name: str, side: str):
        def hook(_mod: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self.active:
                value = inputs[0] if side == "input" else output
                self.features[name] = value.detach().clone()
                if len(self.features) == len(self.names):
                    raise _AllStagesSeen
        return hook

    @torch.no_grad()
    def capture(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """One no-grad teacher pass on ``x``, up to the last stage; returns the stage features, high -> low resolution."""
        self.active = True
        try:
            self.features.clear()
            model(x)
        except _AllStagesSeen:
            pass
        finally:
            self.active = False
        return [self.features[n] for n in self.names]
