"""The Teacher: a loaded classifier plus everything needed to feed it.

Preprocessing is part of the teacher (a CIFAR model trained with ImageNet mean/std inverts to wrong
colours if you guess), so it travels with the module through every stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import nn


class InputSpec(Protocol):
    """What feeding a model needs (a Teacher, or the preprocessing a bare ONNX file records)."""

    input_shape: Sequence[int]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]


@dataclass
class Teacher:
    """A classifier taking *normalised* NCHW float input and returning logits [N, num_classes].

    ``module`` is always a differentiable ``nn.Module`` in eval mode on which forward hooks work
    (TorchScript and ONNX inputs are converted so that they do).
    """

    module: nn.Module
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format: str  # embedded | state_dict | torchscript | pt2 | onnx | pickle | folder
    source: str  # path, or "embedded:digits"
    sha256: str
    arch: str | None = None
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """Pixel space [0,1] -> the teacher's input space."""
        mean, std = self._stats(images01)
        return (images01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher input space -> pixel space (not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def describe(self) -> dict[str, Any]:
        """JSON-friendly identity, recorded in manifests and reports."""
        return {
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "arch": self.arch,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": self.class_names,
        }


def check_preprocessing(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    from ..errors import UserError

    if len(mean) != channels or len(std) != channels:
        raise UserError(
            f"--mean/--std need {channels} value(s) each (one per input channel), got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise UserError("--std values must be positive")
