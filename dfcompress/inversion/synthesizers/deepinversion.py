"""DeepInversion and Adaptive DeepInversion (Yin et al., CVPR 2020): optimise the pixels directly.

DeepInversion: pixels start as N(0, 1) in the teacher's normalised space and are optimised with Adam
against λ_ce CE + λ_bn R_stats (first layer weighted by ``first_bn_multiplier``) + λ_tv TV + λ_l2 l2
under jitter/flip; after each step the pixels are clipped to the valid [0, 1] pixel range.

ADI (``method="adi"``) adds the competition term 1 - JS(teacher, student)/ln2 so the images land where a
student still disagrees with the teacher. The student lives in the synthesizer: the runner calls
``after_batch(images01, teacher_logits)`` after each batch (a few KD steps) and persists it between
shards with ``state()`` / ``load_state()`` — which makes every ADI batch depend on the batches before
it, so all ADI shards are sequential.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..augment import jitter_flip
from .base import BatchResult, StepCallback, Synthesizer
from ...distillation import kd_loss
from ...seeds import ADI_STUDENT_SEED, seeded_build, seeded_generator
from .common import BestKeeper, adam, StatsTerm, Stepper, frozen, image_priors, pixel_bounds, record, to_pixels

LEARN_STEPS = 5          # KD steps on the student per synthesized batch
LEARN_LR = 0.01
LEARN_TEMPERATURE = 4.0
JS_TEMPERATURE = 3.0     # DeepInversion's ADI temperature


def default_student_name(input_size: int) -> str:
    """A small CIFAR ResNet for small inputs, ResNet-18 otherwise."""
    return "resnet20" if input_size <= 64 else "resnet18"


class DeepInversion(Synthesizer):
    """Pixel-space inversion; with ``settings.method == "adi"`` also the ADI competition against ``self.student``."""

    name = "deepinversion"

    def __init__(self, teacher, settings, runtime, stats=None):
        super().__init__(teacher, settings, runtime, stats)
        self.adi = settings.method == "adi"
        self.name = "adi" if self.adi else "deepinversion"
        self.lambda_adi = settings.lambda_adi if self.adi else 0.0  # 0 switches the competition off
        self.student: Optional[nn.Module] = None
        self._student_opt: Optional[torch.optim.Optimizer] = None
        if self.adi:
            self.student = runtime.prepare(self._build_student())
            self.student.eval()
            self._student_opt = torch.optim.SGD(self.student.parameters(), lr=LEARN_LR, momentum=0.9)

    def _build_student(self) -> nn.Module:
        from ...models.zoo import create_model

        c, h, w = self.teacher.input_shape
        name = self.settings.adi_student or default_student_name(max(h, w))
        return seeded_build(ADI_STUDENT_SEED, lambda: create_model(name, num_classes=self.teacher.num_classes, in_channels=c, input_size=max(h, w)))

    def synthesize_batch(self, labels: torch.Tensor, seed: int, on_step: Optional[StepCallback] = None) -> BatchResult:
        s, rt = self.settings, self.runtime
        dev = rt.device
        rng = seeded_generator(seed)
        y = labels.detach().to("cpu", torch.long).to(dev)
        b = y.shape[0]
        index = losses.ClassIndex(y)
        pixels = torch.randn(b, *self.teacher.input_shape, generator=rng).to(dev).requires_grad_(True)
        opt = adam([pixels], lr=s.lr_pixels, betas=(0.5, 0.9), eps=1e-8)
        step = Stepper(rt, [opt])
        lo, hi = pixel_bounds(self.teacher, dev)
        keeper, history = BestKeeper(), []

        with frozen(self.model) as model, self._frozen_student() as student:
            stats_term = StatsTerm(model, self.targets, dev, s.first_bn_multiplier)
            try:
                for it in range(s.iterations):
                    view = jitter_flip(pixels, s.jitter, s.flip, rng)
                    with rt.autocast():
                        logits = model(view)
                    ce_i = F.cross_entropy(logits.float(), y, reduction="none")
                    parts = {"ce": ce_i.mean(), "bn": stats_term(index), **image_priors(pixels)}
                    total = s.lambda_ce * parts["ce"] + s.lambda_bn * parts["bn"] + s.lambda_tv * parts["tv"] + s.lambda_l2 * parts["l2"]
                    if student is not None:
                        with rt.autocast():
                            student_logits = student(view)
                        parts["adi"] = losses.competition_loss(logits, student_logits, JS_TEMPERATURE)
                        total = total + self.lambda_adi * parts["adi"]
                    acc = (logits.detach().argmax(1) == y).float().mean()
                    record({"total": total, **parts, "acc": acc}, it, history, on_step, self.name)
                    keeper.update(pixels, total, ce_i, s.lambda_ce)
                    step(total)
                    with torch.no_grad():
                        pixels.copy_(torch.maximum(torch.minimum(pixels, hi), lo))
            finally:
                stats_term.close()
        assert keeper.images is not None
        return BatchResult(images01=to_pixels(self.teacher, keeper.images), history=history, best_loss=keeper.best_loss())

    def _frozen_student(self) -> contextlib.AbstractContextManager:
        return frozen(self.student) if self.student is not None else contextlib.nullcontext(None)

    # ------------------------------------------------------------------------------------------
    # ADI student

    def sequential_shards(self, num_shards: int) -> int:
        return num_shards if self.student is not None else 0

    def after_batch(self, images01: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        self.learn(images01, teacher_logits)

    def state(self) -> dict[str, Any]:
        return self.student_state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_student_state(state)

    def learn(self, images01: torch.Tensor, teacher_logits: torch.Tensor, steps: int = LEARN_STEPS) -> Optional[float]:
        """A few deterministic KD steps (SGD) of the student on a finished batch (and its mirror image).

        Returns the last KD loss, or None when this synthesizer has no student (plain DeepInversion).
        """
        if self.student is None or self._student_opt is None:
            return None
        rt = self.runtime
        x = self.teacher.normalize(rt.tensor(images01.float()))
        t = teacher_logits.detach().float().to(rt.device)
        x, t = torch.cat([x, x.flip(3)]), torch.cat([t, t])
        self.student.train()
        scaler = rt.grad_scaler()
        last = float("nan")
        try:
            for _ in range(steps):
                self._student_opt.zero_grad(set_to_none=True)
                with rt.autocast():
                    out = self.student(x)
                loss = kd_loss(out, t, LEARN_TEMPERATURE)
                scaler.scale(loss).backward()
                scaler.step(self._student_opt)
                scaler.update()
                last = float(loss.detach())
        finally:
            self.student.eval()
        return last

    def student_state(self) -> dict[str, Any]:
        """Student weights and optimiser state, for the runner to persist between shards."""
        if self.student is None or self._student_opt is None:
            return {}
        return {"model": self.student.state_dict(), "optimizer": self._student_opt.state_dict()}

    def load_student_state(self, state: dict[str, Any]) -> None:
        if self.student is None or self._student_opt is None or not state:
            return
        self.student.load_state_dict(state["model"])
        self._student_opt.load_state_dict(state["optimizer"])
