"""Machinery shared by the inversion loops: statistics targets, frozen teacher, best-image keeping, logging.

Each synthesizer keeps its own explicit optimisation loop (they differ in what is optimised); what
they share lives here so the feature-statistics term, NaN handling and "keep the best iteration"
behave identically across methods.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ...device import Runtime
from ...errors import NumericalError, UserError
from ...models.taps import FeatureTaps, StatLayer, batchnorm_layers
from .. import losses
from .base import StepCallback


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration of a batch, restored afterwards.

    Gradients flow to the *input* only: this saves the weight-gradient half of every backward pass and
    leaves no ``.grad`` on the teacher, and BN layers use their running statistics, never batch ones.
    """
    modes = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    module.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, training in modes:  # per submodule: restores mixed train/eval states exactly
            m.training = training


# ----------------------------------------------------------------------------------------------
# feature-statistics term (BN running statistics or collected, possibly class-conditional, ones)


@dataclass
class StatTargets:
    """Where to read features and what their per-channel statistics should be."""

    layers: list[StatLayer]
    mean: list[Tensor]              # [C] global or [K, C] per class
    var: list[Tensor]
    per_class: bool
    valid: Optional[Tensor] = None  # [K] bool: classes that have statistics (per-class only)


def stat_targets(module: nn.Module, stats: Any = None, source: str = "the teacher") -> StatTargets:
    """BN running statistics when ``stats`` is None; otherwise the (duck-typed) ``FeatureStats``.

    A teacher without BatchNorm and without collected statistics cannot be inverted with a feature
    prior, which is the one thing worth stopping for with an actionable message.
    """
    if stats is None:
        bns = [(n, m) for n, m in batchnorm_layers(module) if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise UserError(
                f"{source} has no BatchNorm statistics (BN folded): collect class-conditional statistics with "
                "`dfcompress stats MODEL --seeds DIR -o stats.safetensors` and pass --stats"
            )
        return StatTargets(
            layers=[StatLayer(n, "input", m.num_features) for n, m in bns],
            mean=[m.running_mean.detach().float().clone() for _, m in bns],
            var=[m.running_var.detach().float().clone() for _, m in bns],
            per_class=False,
        )
    modules = dict(module.named_modules())
    layers = list(stats.layers)
    if not layers:
        raise UserError("the statistics file lists no layers; collect it again with `dfcompress stats`")
    for layer in layers:
        if layer.name not in modules:
            raise UserError(
                f"statistics layer {layer.name!r} does not exist in {source}: the statistics were collected from "
                "another model; collect them for this teacher with `dfcompress stats`"
            )
        width = stats.mean[layer.name].shape[-1]
        if width != layer.channels:
            raise UserError(f"statistics for {layer.name!r} have {width} channels, the layer has {layer.channels}")
    per_class = bool(getattr(stats, "per_class", False))
    valid = None
    counts = getattr(stats, "counts", None)
    if per_class and counts is not None:
        valid = torch.as_tensor(counts) > 0
    return StatTargets(
        layers=layers,
        mean=[stats.mean[l.name].detach().float() for l in layers],
        var=[stats.var[l.name].detach().float() for l in layers],
        per_class=per_class,
        valid=valid,
    )


class StatsTerm:
    """R_BN (eq. 3) or the class-conditional R_CC (You-Get-What-You-Sow eq. 7) from forward hooks.

    Hooks stay registered while the term is in use (``close()`` removes them); every teacher pass
    overwrites the recorded features, so call the term right after the pass it should describe.
    """

    def __init__(self, module: nn.Module, targets: StatTargets, device: torch.device, first_multiplier: float):
        self.targets = targets
        self.taps = FeatureTaps(module, targets.layers)
        self.mean = [m.to(device) for m in targets.mean]
        self.var = [v.to(device) for v in targets.var]
        self.valid = targets.valid.to(device) if targets.valid is not None else None
        self.weights = losses.layer_weights(len(targets.layers), first_multiplier)

    def __call__(self, index: losses.ClassIndex) -> Tensor:
        terms = []
        for layer, mean, var in zip(self.targets.layers, self.mean, self.var):
            feat = self.taps[layer.name]
            if self.targets.per_class:
                terms.append(losses.class_conditional_stat_loss(feat, index, mean, var, self.valid))
            else:
                terms.append(losses.global_stat_loss(feat, mean, var))
        return losses.weighted_sum(terms, self.weights)

    def close(self) -> None:
        self.taps.remove()


# ----------------------------------------------------------------------------------------------
# loop helpers


def image_priors(x: Tensor) -> dict[str, Tensor]:
    """TV and l2 priors of eq. 4 (unweighted)."""
    return {"tv": losses.total_variation(x), "l2": losses.l2_prior(x)}


class BestKeeper:
    """Keeps, per sample, the image from the iteration where that sample's loss was lowest.

    The per-sample score is the batch loss plus how much the sample's own cross-entropy deviates from
    the batch mean (the statistics term is only defined per batch), so the scores average to the batch
    loss and "best" means what DeepInversion's keep-the-best-iteration means, per image. Stays on the
    device: no host synchronisation.
    """

    def __init__(self) -> None:
        self.images: Optional[Tensor] = None
        self.score: Optional[Tensor] = None

    def update(self, images: Tensor, total: Tensor, ce_per_sample: Tensor, lambda_ce: float) -> None:
        ce = ce_per_sample.detach().float()
        score = total.detach().float() + lambda_ce * (ce - ce.mean())
        images = images.detach().float()
        if self.images is None or self.score is None:
            self.images, self.score = images.clone(), score
            return
        better = score < self.score
        self.score = torch.where(better, score, self.score)
        self.images = torch.where(better.view(-1, *([1] * (images.dim() - 1))), images, self.images)

    def best_loss(self) -> float:
        return float(self.score.mean().item()) if self.score is not None else float("nan")


def record(
    components: dict[str, Tensor], iteration: int, history: list[dict[str, float]],
    on_step: Optional[StepCallback], method: str,
) -> dict[str, float]:
    """One host sync per iteration: turn the loss components into floats, fail fast on NaN/inf."""
    names = list(components)
    values = torch.stack([components[n].detach().float().reshape(()) for n in names]).tolist()
    row = dict(zip(names, values))
    bad = [n for n in names if not math.isfinite(row[n])]
    if bad:
        raise NumericalError(
            f"{method}: loss became non-finite at iteration {iteration} ({', '.join(f'{n}={row[n]}' for n in bad)})"
        )
    history.append(row)
    if on_step is not None:
        on_step(iteration, row)
    return row


def adam(params: Any, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """Adam, fused where the device supports it (CPU and CUDA): the generator's 8M-weight Linear makes
    the unfused update a visible share of an iteration on CPU (about 7x slower there)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **kwargs)


class Stepper:
    """zero_grad / (scaled) backward / step for a set of optimisers; GradScaler is a no-op unless fp16.

    ``after_backward`` sees the gradients before the step (FOMAML sums them into its meta-gradient).
    """

    def __init__(self, runtime: Runtime, optimizers: Sequence[torch.optim.Optimizer],
                 after_backward: Optional[Callable[[], None]] = None):
        self.scaler = runtime.grad_scaler()
        self.optimizers = list(optimizers)
        self.after_backward = after_backward

    def __call__(self, loss: Tensor) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.after_backward is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)  # true gradients for the hook; step() does not unscale twice
            self.after_backward()
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()


def pixel_bounds(teacher: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """The [0, 1] pixel range expressed in the teacher's normalised space, [1, C, 1, 1] each."""
    ref = torch.zeros(1, len(teacher.mean), 1, 1, device=device)
    return teacher.normalize(ref), teacher.normalize(ref + 1.0)


def straight_through_clamp(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Forward: clamp to [lo, hi]; backward: identity, so saturated pixels still receive gradient."""
    return x + (torch.maximum(torch.minimum(x, hi), lo) - x).detach()


def to_pixels(teacher: Any, images: Tensor) -> Tensor:
    """Normalised-space images -> float32 pixel space [0, 1] on the CPU (contiguous NCHW)."""
    out = teacher.denormalize(images.detach().float()).clamp_(0.0, 1.0)
    return out.to("cpu").contiguous()
