"""NaturalInversion's conditional generator (appendix table 6), sized from the teacher's input.

Table 6 is written for 32x32 CIFAR: z (1024) concatenated with one-hot y -> Linear -> 128 x 8 x 8 ->
[BN, LeakyReLU, Up x2] -> [Conv 128, BN, LeakyReLU, Up x2] -> [Conv 64, BN, LeakyReLU] -> Conv -> C.
Here the number of x2 upsamplings follows from the input size: at least two (the table), more when
the initial map would exceed 8x8, so a 224-px teacher gets a 7x7 start and five upsamplings instead
of a 400M-parameter Linear layer. Sizes that are no power-of-two multiple of the start are reached
with a final interpolation. Layers past 32 px get narrower to keep the generator cheaper than the
teacher.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def plan_upsampling(height: int, width: int, max_init: int = 8) -> tuple[int, int, int]:
    """(num_upsamplings, init_h, init_w): at least 2 upsamplings, initial map at most ``max_init`` on its long side."""
    longest = max(height, width)
    n_up = max(2, math.ceil(math.log2(max(1.0, longest / max_init))))
    scale = 2 ** n_up
    return n_up, max(1, math.ceil(height / scale)), max(1, math.ceil(width / scale))


def _width(resolution: int) -> int:
    """Channel width of a generator conv at a given output resolution (128 up to 32 px as in table 6)."""
    if resolution <= 32:
        return 128
    if resolution <= 64:
        return 64
    return 32


# Nearest x2 then a 3-tap filter w = (w0, w1, w2) along one axis: even outputs see (x[i-1], x[i]) with
# (w0, w1 + w2), odd outputs (x[i], x[i+1]) with (w0 + w1, w2) -- exactly a stride-2 transposed conv with the
# 4-tap filter (w2, w1 + w2, w0 + w1, w0) and padding 1. Rows of this matrix map w to that filter.
_UP2_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upsample2_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(nearest_upsample_x2(x))`` for a 3x3/stride-1/padding-1 conv, as one stride-2 transposed conv.

    Same function, but the 4x larger upsampled tensor is never built (forward or backward) and each
    output pixel costs 4 instead of 9 taps. The generator is NaturalInversion's largest cost beside the
    teacher; this form measured 26-30 % faster than four interleaved phase convs and 2-3x faster than
    Upsample + Conv on CPU (bench/RESULTS.md).
    """
    m = _UP2_TAPS.to(conv.weight)
    kernel = torch.einsum("pk,oikl,ql->iopq", m, conv.weight, m)  # conv_transpose2d wants [in, out, kh, kw]
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


class UpsampleConv3x3(nn.Module):
    """The pair ``[nn.Upsample(scale_factor=2), conv]`` of table 6, computed without the upsampled tensor."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return upsample2_conv3x3(x, self.conv)


class ConditionalGenerator(nn.Module):
    """G(z | y): latent ⊕ one-hot label -> image-shaped tensor in the teacher's input space (unbounded)."""

    def __init__(self, latent_dim: int, num_classes: int, out_channels: int, height: int, width: int, base: int = 128):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.out_size = (height, width)
        n_up, self.init_h, self.init_w = plan_upsampling(height, width)
        self.base = base
        self.fc = nn.Linear(latent_dim + num_classes, base * self.init_h * self.init_w)
        # every "Upsample x2 -> Conv 3x3" pair of table 6 is computed as one UpsampleConv3x3 (same function)
        layers: list[nn.Module] = [nn.BatchNorm2d(base), nn.LeakyReLU(0.2, inplace=True)]
        res, ch = max(self.init_h, self.init_w) * 2, base
        for _ in range(n_up - 1):
            res *= 2
            w = min(base, _width(res))
            layers += [UpsampleConv3x3(nn.Conv2d(ch, w, 3, 1, 1)), nn.BatchNorm2d(w), nn.LeakyReLU(0.2, inplace=True)]
            ch = w
        last = min(base // 2, _width(res))
        layers += [UpsampleConv3x3(nn.Conv2d(ch, last, 3, 1, 1)), nn.BatchNorm2d(last), nn.LeakyReLU(0.2, inplace=True),
                   nn.Conv2d(last, out_channels, 3, 1, 1)]
        self.blocks = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference code's init: BN weight ~ N(1, 0.02), convs Kaiming-normal, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def latent(self, z: Tensor, labels: Tensor) -> Tensor:
        """z ⊕ one_hot(y): the conditional generator input."""
        return torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)

    def forward(self, zy: Tensor) -> Tensor:
        # channels_last inside (14 % faster fwd/bwd on CPU, the layout cuDNN prefers); plain NCHW out, so the
        # teacher passes run in the same layout whether or not a generator feeds them
        out = self.fc(zy).view(zy.shape[0], self.base, self.init_h, self.init_w)
        out = self.blocks(out.contiguous(memory_format=torch.channels_last))
        if tuple(out.shape[-2:]) != self.out_size:
            out = F.interpolate(out, size=self.out_size, mode="bilinear", align_corners=False)
        return out.contiguous()
