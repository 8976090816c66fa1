"""The Synthesizer interface: every inversion method makes one batch of images for given labels.

The runner (``inversion/runner.py``) owns sharding, seeds, retries, teacher logits and files; a
synthesizer only turns (labels, seed) into images. Keeping that split makes each method a small,
testable optimisation loop and makes every shard a pure function of its inputs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ...device import Runtime
from ...models.teacher import Teacher
from ...settings import SynthesizeSettings

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class BatchResult:
    images01: torch.Tensor            # float32 [B, C, H, W] on CPU, pixel space, clamped to [0, 1]
    history: list[dict[str, float]] = field(default_factory=list)  # per-iteration loss components ("total", "ce", "bn", "tv", "l2", ...)
    best_loss: float = float("nan")   # loss of the kept (best) images


class Synthesizer(ABC):
    """Turns target labels into images the teacher recognises as those labels."""

    name: str = "base"

    def __init__(self, teacher: Teacher, settings: SynthesizeSettings, runtime: Runtime, stats: Optional["FeatureStats"] = None):  # noqa: F821
        from .common import stat_targets

        self.teacher = teacher
        self.settings = settings
        self.runtime = runtime
        self.stats = stats
        # every method matches feature statistics: BN running stats, or the class-conditional ``stats``
        self.model = runtime.prepare(teacher.module)
        self.targets = stat_targets(self.model, stats, teacher.source)

    @abstractmethod
    def synthesize_batch(self, labels: torch.Tensor, seed: int, on_step: Optional[StepCallback] = None) -> BatchResult:
        """Optimise one batch from scratch (fresh generator/pixels) with all randomness drawn from ``seed``.

        Raises ``NumericalError`` when the loss becomes NaN/inf; the runner then retries with a new seed.
        """
