"""Fast NaturalInversion: NaturalInversion with a meta-learned generator (after Fast-DFKD, Fang et al., AAAI 2022).

NaturalInversion re-initialises its generator and pyramid for every batch and optimises them for
thousands of steps. Here one *meta* generator (and, by default, one meta pyramid) is the starting
point of every batch: a batch copies it, adapts the copy for only ``iterations`` = K steps (K = 2-20
instead of 2,000) together with a fresh latent and fresh Adaptive Channel Scaling, and keeps the best
images, exactly NaturalInversion's loss and loop (table 6 generator, Feature Transfer Pyramid on the
teacher's stage features, ACS, CE + statistics + TV + l2, class-conditional statistics when given).
After the batch the meta-generator learns from the adaptation:

* ``reptile`` (default): meta-gradient = meta weights - adapted weights;
* ``fomaml``: meta-gradient = the sum of the inner steps' gradients;

applied with Adam, betas (0.5, 0.999) and lr = ``meta_lr`` (default ``lr_generator`` x K, the reference
code's choice). The meta-state (meta modules + meta optimiser) carries from batch to batch, so the
first ``meta_shards`` shards are *sequential*: made in order, the state saved after each (resume is
exact). After them the meta-initialisation is frozen and every later shard is a pure function of its
index and that frozen state, so ranks make them in parallel (``runner.py``).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from ...progress import log
from ...seeds import child_seed, seeded_generator
from .base import BatchResult, StepCallback
from .common import adam
from .naturalinversion import NaturalInversion

FAST_METHOD = "fast-ni"
MAX_USEFUL_STEPS = 50       # past this, K steps per batch cost what NaturalInversion's fresh start costs
META_BETAS = (0.5, 0.999)   # Fast-DFKD's meta and inner Adam


class FastNaturalInversion(NaturalInversion):
    """NaturalInversion whose generator (and pyramid) start every batch from a meta-learned initialisation."""

    name = FAST_METHOD

    def __init__(self, teacher, settings, runtime, stats=None):
        super().__init__(teacher, settings, runtime, stats)
        if settings.iterations > MAX_USEFUL_STEPS:
            log(f"note: fast-ni adapts the meta-generator for --iterations {settings.iterations} steps per batch; it is "
                f"meant for 2-20 (profile cifar10-fast: 10), so this run costs as much as NaturalInversion")
        self.meta: Optional[nn.ModuleDict] = None          # "generator" (+ "pyramid"), on the runtime device
        self.meta_opt: Optional[torch.optim.Optimizer] = None
        self._adapted: Optional[nn.ModuleDict] = None       # the last batch's adapted copy (reptile)
        self._grad_sum: Optional[list[torch.Tensor]] = None  # the last batch's summed inner gradients (fomaml)

    # -- meta-initialisation ----------------------------------------------------------------------

    @property
    def meta_lr(self) -> float:
        s = self.settings
        return s.meta_lr if s.meta_lr is not None else s.lr_generator * s.iterations

    def _build_meta(self, seed: int) -> None:
        """The meta modules, initialised as NaturalInversion initialises a fresh batch's, from ``seed``."""
        g = seeded_generator(seed)
        parts: dict[str, nn.Module] = {"generator": self.build_generator(child_seed(g))}
        if self.use_pyramid and self.settings.meta_pyramid:
            parts["pyramid"] = self.build_pyramid(child_seed(g))
        self.meta = self.runtime.prepare(nn.ModuleDict(parts))
        self.meta_opt = adam(self.meta.parameters(), lr=self.meta_lr, betas=META_BETAS)

    def synthesize_batch(self, labels: torch.Tensor, seed: int, on_step: Optional[StepCallback] = None) -> BatchResult:
        rng = seeded_generator(seed)
        meta_seed, pyramid_seed = child_seed(rng), child_seed(rng)
        if self.meta is None:  # first batch of the run: its seed initialises the meta modules
            self._build_meta(meta_seed)
        assert self.meta is not None
        fast = copy.deepcopy(self.meta)
        if self.use_pyramid and "pyramid" not in fast:  # meta_pyramid off: a fresh pyramid per batch
            fast["pyramid"] = self.runtime.prepare(self.build_pyramid(pyramid_seed))
        ftp = fast["pyramid"] if self.use_pyramid else None

        meta_params = list(self.meta.parameters())
        fast_params = [p for name, p in fast.named_parameters() if name.split(".")[0] in self.meta]
        grad_sum = [torch.zeros_like(p) for p in meta_params] if self.settings.meta_update == "fomaml" else None

        def accumulate() -> None:
            if grad_sum is not None:
                for acc, p in zip(grad_sum, fast_params):
                    if p.grad is not None:
                        acc.add_(p.grad)

        result = self.optimise(fast["generator"], ftp, labels, rng, on_step, learn_latent=True, betas=META_BETAS,
                               after_backward=accumulate if grad_sum is not None else None)
        self._adapted, self._grad_sum = fast, grad_sum
        return result

    # -- meta-learning: the runner calls these only in the sequential shards ------------------------

    def sequential_shards(self, num_shards: int) -> int:
        limit = self.settings.meta_shards
        return num_shards if limit is None else min(num_shards, limit)

    def after_batch(self, images01: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """One meta step toward the last batch's adaptation (reptile) or along its summed gradients (fomaml)."""
        if self.meta is None or self.meta_opt is None or self._adapted is None:
            return
        adapted = dict(self._adapted.named_parameters())
        self.meta_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for i, (name, p) in enumerate(self.meta.named_parameters()):
                if self._grad_sum is not None:
                    p.grad = self._grad_sum[i].clone()
                else:
                    p.grad = p.detach() - adapted[name].detach()
        self.meta_opt.step()
        self._adapted, self._grad_sum = None, None

    def state(self) -> dict[str, Any]:
        if self.meta is None or self.meta_opt is None:
            return {}
        return {"meta": self.meta.state_dict(), "optimizer": self.meta_opt.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        if not state:
            self.meta, self.meta_opt = None, None
            return
        if self.meta is None:
            self._build_meta(0)  # the architecture; every weight is overwritten below
        assert self.meta is not None and self.meta_opt is not None
        self.meta.load_state_dict(state["meta"])
        self.meta_opt.load_state_dict(state["optimizer"])
        self._adapted, self._grad_sum = None, None
