"""Small BatchNorm-free teachers (a vision transformer and a LayerNorm ConvNeXt-style net) and their exports.

Shared by the converter parity tests and the end-to-end token-model tests; sizes are tiny (16x16 RGB,
4 classes) so every format exports and converts in well under a second.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (3, 16, 16)
CLASSES = 4


class TinyViT(nn.Module):
    """Patch conv, class token, two ``nn.TransformerEncoderLayer`` (batch_first), LayerNorm head."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4, norm_first: bool = True, activation: str = "gelu"):
        super().__init__()
        tokens = (SHAPE[1] // patch) ** 2 + 1
        self.patch = nn.Conv2d(SHAPE[0], dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.2)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation=activation,
                                                               batch_first=True, norm_first=norm_first) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> channels-last LayerNorm -> Linear -> GELU -> Linear -> layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Patchify stem + GroupNorm, two stages of ConvNeXt blocks with a strided-conv downsample, LayerNorm head."""

    def __init__(self, dims: tuple[int, int] = (8, 16)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(SHAPE[0], dims[0], 2, 2), nn.GroupNorm(2, dims[0]))
        self.stage1 = ConvNeXtBlock(dims[0])
        self.down = nn.Sequential(nn.GroupNorm(1, dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = ConvNeXtBlock(dims[1])
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((2, 3))))


def onnx_bytes(model: nn.Module, opset: int = 17) -> bytes:
    """TorchScript-based ONNX exporter (the dynamo one needs onnxscript), dynamic batch."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(2, *SHAPE), f, opset_version=opset, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return f.getvalue()


def save_pt2(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model.eval(), (torch.randn(2, *SHAPE),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path


def save_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(model.eval(), torch.randn(2, *SHAPE), check_trace=False)
    torch.jit.save(ts, str(path))
    return path


def save_all(model: nn.Module, folder: Path, stem: str) -> dict[str, Path]:
    """The model as ONNX, .pt2 and TorchScript files in ``folder``."""
    onnx_path = folder / f"{stem}.onnx"
    onnx_path.write_bytes(onnx_bytes(model))
    return {"onnx": onnx_path, "pt2": save_pt2(model, folder / f"{stem}.pt2"),
            "torchscript": save_torchscript(model, folder / f"{stem}.ts")}
