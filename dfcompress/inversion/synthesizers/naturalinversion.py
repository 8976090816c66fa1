"""NaturalInversion (Kim et al., AAAI 2022): one fresh generator + Feature Transfer Pyramid + channel scaling per batch.

Per iteration (Algorithm 1), with at most two teacher passes:

1. g = G(z|y) (fresh conditional generator, table 6, sized from the teacher's input);
2. no-grad teacher pass on g; hooks on the stage modules give f_1..f_N (skipped without the pyramid);
3. I_hat = alpha ⊗ tanh(W1(g + FTP(f))) (without the pyramid: alpha ⊗ tanh(g)); optionally
   (``pixel_clamp``, off by default as in the paper) clamped to the valid pixel range with a
   straight-through gradient so the teacher judges exactly the [0, 1] pixels that get stored. Off,
   ~5-15% of pixels end up outside the range and are clamped only when stored; on the real
   CIFAR ResNet-20 the in-loop clamp did not help (teacher accuracy on 3 batches, 200 iterations:
   0.50/0.65/0.50 with it vs 0.75/0.70/0.55 without), on 8x8 digits with jitter it did;
4. teacher pass with gradients on jitter/flip(I_hat): L = λ_ce CE + λ_bn R_stats + λ_tv TV + λ_l2 ||I_hat||.

Pass 2 cannot be shared with pass 1: the loss is on T(I_hat) while the pyramid reads T(G(z|y)). Pass 1
is forward-only (the reference code also treats the features as constants) and teacher weights never
get gradients, so the teacher costs one forward plus one forward/backward-to-the-input per iteration.
The table-6 generator is not small next to a CIFAR ResNet (about half of ResNet-56's MACs per image, and it
needs weight gradients), so on ResNet-56 an iteration costs ~1.5x the bare teacher passes, on ResNet-34 ~1.2x
(bench/speed.py, bench/RESULTS.md).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ...models.stages import probe_stages
from .. import losses
from ..augment import jitter_flip
from ..generator import ConditionalGenerator
from ..pyramid import FeatureTransferPyramid, StageTaps
from ..scaling import ChannelScaling
from .base import BatchResult, StepCallback, Synthesizer
from ...seeds import child_seed, seeded_build, seeded_generator
from .common import (BestKeeper, adam, StatsTerm, Stepper, frozen, image_priors, pixel_bounds, record,
                     straight_through_clamp, to_pixels)


# named profiler ranges (bench/speed.py --profile reads them); near-free when no profiler runs
_scope = torch.profiler.record_function


class NaturalInversion(Synthesizer):
    """The default method. ``settings.use_pyramid`` / ``use_scaling`` switch its two additions off for ablations."""

    name = "naturalinversion"

    def __init__(self, teacher, settings, runtime, stats=None):
        super().__init__(teacher, settings, runtime, stats)
        self.stages = probe_stages(self.model, tuple(teacher.input_shape)) if settings.use_pyramid else []
        # token models (ViTs) may have no spatial stage to feed the pyramid: then NaturalInversion runs without it
        self.use_pyramid = settings.use_pyramid and bool(self.stages)

    def build_pyramid(self, seed: int) -> FeatureTransferPyramid:
        """A freshly initialised FTP for this teacher's stages."""
        return seeded_build(seed, lambda: FeatureTransferPyramid(self.stages, tuple(self.teacher.input_shape)))

    def build_generator(self, seed: int) -> ConditionalGenerator:
        c, h, w = self.teacher.input_shape
        return seeded_build(
            seed, lambda: ConditionalGenerator(self.settings.latent_dim, self.teacher.num_classes, c, h, w, base=self.settings.generator_width)
        )

    def synthesize_batch(self, labels: torch.Tensor, seed: int, on_step: Optional[StepCallback] = None) -> BatchResult:
        rng = seeded_generator(seed)
        gen = self.build_generator(child_seed(rng))
        ftp = self.build_pyramid(child_seed(rng)) if self.use_pyramid else None
        return self.optimise(gen, ftp, labels, rng, on_step)

    def optimise(self, gen: ConditionalGenerator, ftp: Optional[FeatureTransferPyramid], labels: torch.Tensor,
                 rng: torch.Generator, on_step: Optional[StepCallback] = None, *, learn_latent: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), after_backward: Optional[Callable[[], None]] = None) -> BatchResult:
        """Algorithm 1's loop for ``settings.iterations`` steps from the given generator and pyramid.

        ``gen``/``ftp`` are optimised in place (fast NaturalInversion reads them back afterwards); the
        channel scaling and the latent are drawn from ``rng`` here, fresh for every batch. ``learn_latent``
        also optimises z (Adam, ``lr_latent``), as Fast-DFKD does with its short inner loop.
        """
        s, rt = self.settings, self.runtime
        dev = rt.device
        labels_cpu = labels.detach().to("cpu", torch.long)
        b = labels_cpu.shape[0]
        c = self.teacher.input_shape[0]

        gen = rt.prepare(gen)
        ftp = rt.prepare(ftp) if ftp is not None else None
        acs = ChannelScaling(b, c, s.alpha_mean, s.alpha_std, rng, learnable=s.use_scaling).to(dev)
        z = torch.randn(b, s.latent_dim, generator=rng).to(dev)
        onehot = F.one_hot(labels_cpu, self.teacher.num_classes).to(z.dtype).to(dev)
        y = labels_cpu.to(dev)
        index = losses.ClassIndex(y)

        groups = [adam(gen.parameters(), lr=s.lr_generator, betas=betas)]
        zy = torch.cat([z, onehot], dim=1)  # fixed unless learnt
        if learn_latent:
            z.requires_grad_(True)
            groups.append(adam([z], lr=s.lr_latent, betas=betas))
        if ftp is not None:
            groups.append(adam(ftp.parameters(), lr=s.lr_pyramid, betas=betas))
        if s.use_scaling:
            groups.append(adam(acs.parameters(), lr=s.lr_scaling, betas=betas))
        step = Stepper(rt, groups, after_backward)
        keeper, history = BestKeeper(), []
        lo, hi = pixel_bounds(self.teacher, dev)

        with frozen(self.model) as model:
            stats_term = StatsTerm(model, self.targets, dev, s.first_bn_multiplier)
            stage_taps = StageTaps(model, self.stages) if ftp is not None else None
            try:
                for it in range(s.iterations):
                    with rt.autocast():
                        with _scope("ni/generator"):
                            g = gen(torch.cat([z, onehot], dim=1) if learn_latent else zy)
                        if ftp is not None and stage_taps is not None:
                            with _scope("ni/feature_pass"):
                                feats = stage_taps.capture(model, g.detach())
                            with _scope("ni/pyramid"):
                                x = ftp(g, feats)
                        else:
                            x = torch.tanh(g)
                    image = acs(x)
                    if s.pixel_clamp:
                        image = straight_through_clamp(image, lo, hi)
                    view = jitter_flip(image, s.jitter, s.flip, rng)
                    with _scope("ni/loss_pass"), rt.autocast():
                        logits = model(view)
                    with _scope("ni/losses"):
                        ce_i = F.cross_entropy(logits.float(), y, reduction="none")
                        parts = {"ce": ce_i.mean(), "bn": stats_term(index), **image_priors(image)}
                        total = (s.lambda_ce * parts["ce"] + s.lambda_bn * parts["bn"] + s.lambda_tv * parts["tv"]
                                 + s.lambda_l2 * parts["l2"])
                        acc = (logits.detach().argmax(1) == y).float().mean()
                        record({"total": total, **parts, "acc": acc}, it, history, on_step, self.name)
                        keeper.update(image, total, ce_i, s.lambda_ce)
                    with _scope("ni/backward_step"):
                        step(total)
            finally:
                stats_term.close()
                if stage_taps is not None:
                    stage_taps.remove()
        assert keeper.images is not None
        return BatchResult(images01=to_pixels(self.teacher, keeper.images), history=history, best_loss=keeper.best_loss())
