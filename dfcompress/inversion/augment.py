"""Differentiable augmentations applied to the images before each teacher pass.

Random translation ("jitter") and flips are DeepInversion's cheap image prior: the images must keep
their class under small shifts, which suppresses pixel-exact adversarial patterns. All draws come
from a caller-owned CPU ``torch.Generator`` so a batch stays a function of its seed on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def jitter_flip(x: Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Roll the batch by one random (dy, dx) in [-max_shift, max_shift] and mirror a random half of the samples."""
    out = x
    if max_shift > 0:
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
        if dy or dx:
            out = torch.roll(out, shifts=(dy, dx), dims=(2, 3))
    if flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        if bool(mask.any()):
            mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
            out = torch.where(mask, out.flip(3), out)
    return out


def random_resized_crop(
    x: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
) -> Tensor:
    """Per-sample random crop (area fraction in ``scale``) resized back to the input size, plus a random flip.

    Implemented with one ``affine_grid``/``grid_sample`` call, so it is differentiable and batched;
    this is the "local view" of Contrastive Model Inversion.
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    sw = (area * aspect).sqrt().clamp(max=1.0)   # crop width / image width
    sh = (area / aspect).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sw * sign
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = ty
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
