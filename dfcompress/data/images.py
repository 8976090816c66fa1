"""Small Pillow-only pictures: image grids (previews) and loss curves.

No matplotlib dependency: a preview and a loss plot are enough to see whether an inversion run went
right, and both must be deterministic (same data -> same PNG bytes) and written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..fileio import atomic_path

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _save_png(img, path: str | Path) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        img.save(tmp, format="PNG")
    return target


def save_image_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int, upscale_to: int = 64, pad: int = 2) -> Path:
    """Tile uint8 NCHW images, ``nrow`` per row, each enlarged (nearest neighbour) to about ``upscale_to`` px."""
    from PIL import Image

    if images_uint8.dim() != 4 or images_uint8.dtype != torch.uint8:
        raise ValueError("images must be uint8 [N, C, H, W]")
    n, c, h, w = images_uint8.shape
    nrow = max(1, int(nrow))
    scale = max(1, round(upscale_to / max(h, w)))
    th, tw = h * scale, w * scale
    rows = max(1, math.ceil(n / nrow))
    canvas = np.full((rows * (th + pad) + pad, nrow * (tw + pad) + pad, c), 255, dtype=np.uint8)
    arr = images_uint8.cpu().numpy().transpose(0, 2, 3, 1)
    for i in range(n):
        tile = arr[i].repeat(scale, axis=0).repeat(scale, axis=1)
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (th + pad), pad + col * (tw + pad)
        canvas[y0:y0 + th, x0:x0 + tw] = tile
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return _save_png(img, path)


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def save_curves_png(series: dict[str, Sequence[float]], path: str | Path, title: str, log_y: bool = True,
                    size: tuple[int, int] = (720, 420)) -> Path:
    """A line plot (axes, ticks, legend) of named series over their index; non-finite points are skipped.

    With ``log_y`` non-positive values are skipped too; if nothing positive remains it falls back to linear.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 150, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)

    pts = {k: [(i, float(v)) for i, v in enumerate(vals) if v is not None and math.isfinite(float(v))] for k, vals in series.items()}
    if log_y and not any(v > 0 for p in pts.values() for _, v in p):
        log_y = False
    if log_y:
        pts = {k: [(i, v) for i, v in p if v > 0] for k, p in pts.items()}
    values = [v for p in pts.values() for _, v in p]
    xmax = max((len(v) for v in series.values()), default=1) - 1
    xmax = max(xmax, 1)
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    if values:
        lo, hi = f(min(values)), f(max(values))
    else:
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    margin = 0.04 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    sx = lambda i: x0 + (x1 - x0) * i / xmax  # noqa: E731
    sy = lambda v: y1 - (y1 - y0) * (f(v) - lo) / (hi - lo)  # noqa: E731

    draw.rectangle((x0, y0, x1, y1), outline="black")
    # x ticks
    step = max(1, int(_nice_step(xmax)))
    for t in range(0, xmax + 1, step):
        x = sx(t)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 8, y1 + 6), str(t), fill="black", font=font)
    # y ticks: decades on a log axis (or a few nice values inside one decade), nice steps otherwise
    if log_y:
        ticks = [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) if lo - 1e-9 <= e <= hi + 1e-9]
        if len(ticks) < 2:
            ticks = [10 ** (lo + (hi - lo) * j / 4) for j in range(5)]
    else:
        st = _nice_step(hi - lo)
        ticks = [st * j for j in range(math.ceil(lo / st), math.floor(hi / st) + 1)]
    for t in ticks:
        y = sy(t)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.line((x0, y, x1, y), fill=(230, 230, 230))
        draw.text((4, y - 6), _fmt(t), fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    # curves and legend
    for j, (name, p) in enumerate(pts.items()):
        colour = _COLOURS[j % len(_COLOURS)]
        if len(p) == 1:
            x, y = sx(p[0][0]), sy(p[0][1])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        elif p:
            draw.line([(sx(i), sy(v)) for i, v in p], fill=colour, width=2)
        ly = y0 + 4 + 16 * j
        draw.line((x1 + 10, ly + 6, x1 + 30, ly + 6), fill=colour, width=3)
        draw.text((x1 + 35, ly), str(name)[:18], fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 20, height - 16), "iteration", fill="black", font=font)
    return _save_png(img, path)
