"""Contrastive Model Inversion (Fang et al., IJCAI 2021, §3.2): inversion plus an instance-discrimination loss.

Per batch a re-initialised conditional generator (NaturalInversion's, no pyramid/scaling) with a
sigmoid output in pixel space and an optimised latent z. Each iteration makes two views of the images:

* global view (jitter/flip): CE + statistics term, and the teacher's penultimate features
  (the input of its last ``nn.Linear``, read by a hook) as contrastive *keys* — gradient stopped;
* local view (random resized crop + flip): penultimate features as *queries*, with gradient.

Both go through a small MLP projection head h; L_cr is InfoNCE where query i's positive is key i and
the negatives are the other images of the batch plus a memory bank of features of earlier batches.

The memory bank and the head carry over from batch to batch, as the paper intends: the bank holds the
features of the images of earlier batches (the negatives that make the loss contrastive across the
set, not only within a batch) and the head keeps learning. So every CMI shard depends on the ones
before it: the runner makes them in order (``sequential_shards``), feeds each finished batch to
``after_batch`` (which adds its stored images' features to the bank) and saves ``state()`` -- bank and
head -- after every shard, so a resumed run continues bit-identically. The head is initialised from
the seed of the first batch made.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError
from ...models.stages import probe_stages
from ...models.taps import FeatureTaps
from .. import losses
from ..augment import jitter_flip, random_resized_crop
from ..generator import ConditionalGenerator
from .base import BatchResult, StepCallback, Synthesizer
from ...seeds import child_seed, seeded_build, seeded_generator
from .common import BestKeeper, adam, StatsTerm, Stepper, frozen, image_priors, record, to_pixels


def embedding_tap(module: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str, str]:
    """Where to read the penultimate features: the input of the last ``nn.Linear``, else the last stage's output."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1], "input"
    stages = probe_stages(module, input_shape)
    if not stages:
        raise UserError("CMI needs a classifier with a final Linear layer or convolutional stages to embed images")
    return stages[-1].name, "output"


def _flat(feat: Tensor) -> Tensor:
    """[B, D] embeddings: global-average-pool spatial maps, flatten anything else."""
    feat = feat.float()
    if feat.dim() == 4:
        feat = feat.mean((2, 3))
    return feat.flatten(1)


class ProjectionHead(nn.Module):
    """h(.): the SimCLR-style MLP instance discriminator of CMI."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        hidden = max(out_dim, min(in_dim, 512))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ContrastiveModelInversion(Synthesizer):
    """CMI with a memory bank of penultimate features of earlier batches and a head that keeps learning."""

    name = "cmi"

    def __init__(self, teacher, settings, runtime, stats=None):
        super().__init__(teacher, settings, runtime, stats)
        self.embed_at = embedding_tap(self.model, tuple(teacher.input_shape))
        self.head: Optional[ProjectionHead] = None
        self.bank: Optional[Tensor] = None  # [M, D] pre-head features of the stored images of earlier batches

    # -- carried state: every shard depends on the batches before it ------------------------------

    def sequential_shards(self, num_shards: int) -> int:
        return num_shards

    @torch.no_grad()
    def after_batch(self, images01: Tensor, teacher_logits: Tensor) -> None:
        """Add the features of the batch as stored (uint8 pixels) to the bank, newest first."""
        size = self.settings.cmi_bank_size
        if size <= 0:
            return
        rt = self.runtime
        embed = FeatureTaps(self.model, [self.embed_at])
        try:
            with frozen(self.model) as model, rt.autocast():
                model(self.teacher.normalize(rt.tensor(images01.float())))
            feats = _flat(embed[self.embed_at[0]]).detach()
        finally:
            embed.remove()
        bank = feats if self.bank is None else torch.cat([feats, self.bank])
        self.bank = bank[:size]

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.head is not None:
            out["head"] = self.head.state_dict()
        if self.bank is not None:
            out["bank"] = self.bank
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        head = state.get("head")
        if head is not None:
            first, last = head["net.0.weight"], head["net.2.weight"]
            self.head = self.runtime.prepare(ProjectionHead(first.shape[1], last.shape[0]))
            self.head.load_state_dict(head)
        else:
            self.head = None
        bank = state.get("bank")
        self.bank = bank.to(self.runtime.device) if bank is not None else None

    def synthesize_batch(self, labels: torch.Tensor, seed: int, on_step: Optional[StepCallback] = None) -> BatchResult:
        s, rt = self.settings, self.runtime
        dev = rt.device
        rng = seeded_generator(seed)
        labels_cpu = labels.detach().to("cpu", torch.long)
        y = labels_cpu.to(dev)
        b = y.shape[0]
        c, h, w = self.teacher.input_shape
        index = losses.ClassIndex(y)

        gen = rt.prepare(seeded_build(child_seed(rng), lambda: ConditionalGenerator(s.latent_dim, self.teacher.num_classes, c, h, w, base=s.generator_width)))
        head_seed = child_seed(rng)
        z = torch.randn(b, s.latent_dim, generator=rng).to(dev).requires_grad_(True)
        onehot = F.one_hot(y, self.teacher.num_classes).float()

        keeper, history = BestKeeper(), []
        with frozen(self.model) as model:
            stats_term = StatsTerm(model, self.targets, dev, s.first_bn_multiplier)
            embed = FeatureTaps(model, [self.embed_at])
            try:
                if self.head is None:
                    with torch.no_grad(), rt.autocast():
                        model(torch.zeros(1, c, h, w, device=dev))
                    dim = _flat(embed[self.embed_at[0]]).shape[1]
                    self.head = rt.prepare(seeded_build(head_seed, lambda: ProjectionHead(dim, s.cmi_head_dim)))
                head = self.head
                step = Stepper(rt, [
                    adam(gen.parameters(), lr=s.lr_generator),
                    adam([z], lr=s.lr_latent),
                    adam(head.parameters(), lr=s.lr_generator),
                ])
                for it in range(s.iterations):
                    with rt.autocast():
                        x01 = torch.sigmoid(gen(torch.cat([z, onehot], dim=1)).float())
                    image = self.teacher.normalize(x01)
                    with rt.autocast():
                        logits = model(jitter_flip(image, s.jitter, s.flip, rng))
                    ce_i = F.cross_entropy(logits.float(), y, reduction="none")
                    parts = {"ce": ce_i.mean(), "bn": stats_term(index), **image_priors(image)}
                    keys = _flat(embed[self.embed_at[0]]).detach()
                    if self.bank is not None:
                        keys = torch.cat([keys, self.bank])
                    with rt.autocast():
                        model(random_resized_crop(image, rng))
                        queries = head(_flat(embed[self.embed_at[0]]))
                        projected_keys = head(keys)
                    parts["cmi"] = losses.info_nce(queries, projected_keys, s.cmi_temperature)
                    total = (s.lambda_ce * parts["ce"] + s.lambda_bn * parts["bn"] + s.lambda_tv * parts["tv"]
                             + s.lambda_l2 * parts["l2"] + s.lambda_cmi * parts["cmi"])
                    acc = (logits.detach().argmax(1) == y).float().mean()
                    record({"total": total, **parts, "acc": acc}, it, history, on_step, self.name)
                    keeper.update(image, total, ce_i, s.lambda_ce)
                    step(total)
            finally:
                stats_term.close()
                embed.remove()
        assert keeper.images is not None
        return BatchResult(images01=to_pixels(self.teacher, keeper.images), history=history, best_loss=keeper.best_loss())
