"""The Synthesizer interface: every inversion method makes one batch of images for given labels.

The runner (``inversion/runner.py``) owns sharding, seeds, retries, teacher logits and files; a
synthesizer only turns (labels, seed) into images. Keeping that split makes each method a small,
testable optimisation loop and makes every shard a pure function of its inputs.

Some methods carry state from batch to batch (ADI's student, CMI's memory bank, fast NaturalInversion's
meta-generator). The whole contract the runner relies on is declared here, with do-nothing defaults,
so the runner calls it without probing:

* ``sequential_shards(n)``: how many leading shards depend on the ones before them. Those are made in
  order by one process; the state after the last of them is *frozen* and every later shard starts
  from it, so later shards are pure functions of their index again and ranks can make them in parallel;
* ``start_shard(k)``: called before shard k's first batch;
* ``after_batch(images01, teacher_logits)``: learning from a finished batch (only in sequential shards);
* ``state()`` / ``load_state(state)``: the carried state as a tree of tensors, which the runner saves
  after every sequential shard and loads to resume or to start the parallel shards.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ...device import Runtime
from ...models.teacher import Teacher
from ...settings import SynthesizeSettings
from ...stats.store import FeatureStats

StepCallback = Callable[[int, dict[str, float]], None]
State = dict[str, Any]   # nested dicts/lists of tensors and scalars (the runner persists it as safetensors)


@dataclass
class BatchResult:
    images01: torch.Tensor            # float32 [B, C, H, W] on CPU, pixel space, clamped to [0, 1]
    history: list[dict[str, float]] = field(default_factory=list)  # per-iteration loss components ("total", "ce", "bn", "tv", "l2", ...)
    best_loss: float = float("nan")   # loss of the kept (best) images


class Synthesizer(ABC):
    """Turns target labels into images the teacher recognises as those labels."""

    name: str = "base"

    def __init__(self, teacher: Teacher, settings: SynthesizeSettings, runtime: Runtime, stats: Optional[FeatureStats] = None):
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
        """Optimise one batch with all randomness drawn from ``seed`` (and the carried state, if any).

        Raises ``NumericalError`` when the loss becomes NaN/inf; the runner then retries with a new seed.
        """

    # -- carried state (stateless methods keep these defaults) -----------------------------------

    def sequential_shards(self, num_shards: int) -> int:
        """Leading shards that depend on earlier batches (0: every shard is independent)."""
        return 0

    def start_shard(self, index: int) -> None:
        """Called before the first batch of shard ``index``."""

    def after_batch(self, images01: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Learn from a finished batch (pixel-space images, the teacher's logits on their stored uint8 form)."""

    def state(self) -> State:
        """What carries over to the next batch; ``{}`` for stateless methods."""
        return {}

    def load_state(self, state: State) -> None:
        """Restore what ``state()`` returned (resume, or the frozen state for the parallel shards)."""
