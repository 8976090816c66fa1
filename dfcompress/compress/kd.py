"""The one knowledge-distillation loop, shared by ``distill`` and the fine-tuning after ``prune``.

Hinton KD: KL divergence between temperature-softened teacher and student distributions, × T².
The teacher is queried on the *augmented* batch (not the stored logits), so crops and flips give new
targets every epoch. Everything random is derived from (seed, epoch), and a checkpoint is written
atomically after every epoch, so a killed run resumed from its folder ends with the same weights
(bit for bit on CPU) as one that never stopped.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..device import Runtime
from ..distillation import kd_loss
from ..errors import NumericalError, UserError
from ..fileio import atomic_write_bytes
from ..progress import log
from ..models.teacher import Teacher
from ..seeds import HOLDOUT, KD_AUGMENT, KD_GLOBAL_RNG, seeded_generator, stream_seed
from ..settings import DistillSettings, PruneSettings
from .loader import LOADER, KDLoader, unit_images

Section = DistillSettings | PruneSettings  # the settings a KD run reads (prune has no optimizer/augmentation)

CHECKPOINT = "kd-checkpoint.pt"
CHECKPOINT_FORMAT = "dfcompress-kd/1"


@dataclass(frozen=True)
class KDConfig:
    """The hyper-parameters of one KD run (a flat view over DistillSettings / PruneSettings)."""

    batch_size: int
    lr: float
    temperature: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    crop_padding: int = 0
    flip: bool = False
    mix: str = "none"

    @classmethod
    def from_section(cls, section: Section, fallback: Optional[Section] = None) -> "KDConfig":
        """Fields the section lacks (PruneSettings has no optimizer or augmentation) come from ``fallback``."""
        values = {}
        for name in cls.__dataclass_fields__:
            for source in (section, fallback):
                if source is not None and hasattr(source, name):
                    values[name] = getattr(source, name)
                    break
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# seams for torchrun / DDP (kept tiny so a launcher only has to initialise the process group)


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_rank_batch(batch_size: int, rank: int, world_size: int) -> int:
    """Per-rank batch under DDP: the ``world_size`` per-rank batches of one step form the global batch."""
    b = max(1, batch_size // world_size)
    if world_size > 1 and rank == 0 and b * world_size != batch_size:
        log(f"note: batch size {batch_size} is not a multiple of {world_size} ranks: each rank takes {b}, a step {b * world_size} images")
    return b


def wrap_model(student: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel (BatchNorm synchronised across ranks) when a process group exists, the
    module itself otherwise. Train through the result; ``student`` keeps its own layers and tensors."""
    if dist_info()[1] > 1:
        from ..distributed import ddp_model

        return ddp_model(student, runtime)
    return student


def _barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# pieces


def augment(x01: Tensor, g: torch.Generator, padding: int, flip: bool, rank: int = 0, world_size: int = 1) -> Tensor:
    """Random crop with zero ``padding`` (pixel space) and random horizontal flip; randomness from ``g`` (CPU).

    Under DDP every rank draws the random numbers of the whole global batch (``n * world_size``, from
    the same generator) and keeps positions ``rank::world_size`` — the images it holds (see
    loader.rank_positions) — so each image gets the augmentation one process would give it.
    """
    n, c, h, w = x01.shape
    total, pick = n * world_size, slice(rank, n * world_size, world_size)
    out = x01
    if padding > 0:
        padded = F.pad(x01, [padding] * 4)
        dy = torch.randint(0, 2 * padding + 1, (total,), generator=g)[pick].to(x01.device)
        dx = torch.randint(0, 2 * padding + 1, (total,), generator=g)[pick].to(x01.device)
        rows = (dy[:, None] + torch.arange(h, device=x01.device)[None])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x01.device)[None])[:, None, None, :]
        bidx = torch.arange(n, device=x01.device)[:, None, None, None]
        cidx = torch.arange(c, device=x01.device)[None, :, None, None]
        out = padded[bidx, cidx, rows, cols]
    if flip:
        mask = (torch.rand(total, generator=g) < 0.5)[pick].to(x01.device)[:, None, None, None]
        out = torch.where(mask, out.flip(3), out)
    return out


def mix_batch(x: Tensor, g: torch.Generator, how: str, rank: int = 0, world_size: int = 1) -> Tensor:
    """Mixup or CutMix of the batch with a shuffled copy of itself (Beta(1, 1) = uniform mixing ratio).

    The teacher labels the mixed images (KD queries it on the augmented batch), so mixing makes new
    training points between synthetic images at no synthesis cost. Every rank draws the same numbers
    (the global batch's), and pairs images within its own share: under DDP the pairs differ from
    one process's, so with mixing on, DDP training is no longer identical to one-process training.
    """
    if how == "none":
        return x
    n, _, h, w = x.shape
    total = n * world_size
    order = torch.rand(total, generator=g)[rank * n:(rank + 1) * n].argsort().to(x.device)
    lam = float(torch.rand(1, generator=g))
    if how == "mixup":
        return lam * x + (1.0 - lam) * x[order]
    # cutmix: a box of area (1 - lam) from the partner, centred uniformly
    cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
    bh, bw = h * (1.0 - lam) ** 0.5, w * (1.0 - lam) ** 0.5
    y0, y1 = int(max(0, cy - bh / 2)), int(min(h, cy + bh / 2))
    x0, x1 = int(max(0, cx - bw / 2)), int(min(w, cx + bw / 2))
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[order][:, :, y0:y1, x0:x1]
    return out


def make_optimizer(student: nn.Module, cfg: KDConfig) -> torch.optim.Optimizer:
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")


def make_scheduler(opt: torch.optim.Optimizer, cfg: KDConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay to 0 (or constant); per step so a 1-epoch run still anneals."""
    total = max(1, total_steps)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


# ----------------------------------------------------------------------------------------------
# checkpoints


def _fingerprint(student: nn.Module, cfg: KDConfig, epochs: int, seed: int, n: int, world: int) -> dict[str, Any]:
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in student.state_dict().items())
    return {**asdict(cfg), "epochs": epochs, "seed": seed, "dataset_size": n, "world_size": world, "loader": LOADER,
            "architecture": hashlib.sha256(shapes.encode()).hexdigest()[:16]}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(f"cannot read training checkpoint {path} ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a dfcompress KD checkpoint; delete it to start over")
    old = json.loads(state["fingerprint"])
    changed = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
    if changed:
        what = ", ".join(f"{k}={old.get(k)!r} now {fingerprint.get(k)!r}" for k in changed[:3])
        raise UserError(f"the checkpoint in {path.parent} belongs to a different run ({what}); re-run with the same settings to resume, or use --overwrite to start over")
    return state


# ----------------------------------------------------------------------------------------------
# the loop


def train_kd(student: nn.Module, teacher: Teacher, dataset: Dataset, settings_section: Section, runtime: Runtime,
             checkpoint_dir: Path, epochs: int, *, eval_fn: Optional[Callable[[nn.Module], dict]] = None,
             seed: int = 0, progress: Any = None, fallback_section: Optional[Section] = None, desc: str = "KD") -> dict[str, Any]:
    """Train ``student`` in place to match ``teacher`` on ``dataset`` (items ``(image01, label, logits)``).

    ``settings_section`` is a KDConfig or a settings section (DistillSettings, PruneSettings; missing
    fields from ``fallback_section``). Resumes from ``checkpoint_dir/kd-checkpoint.pt`` when present.
    Returns {history: [{epoch, loss, lr, seconds, **eval}], epochs, resumed_from_epoch, steps_per_epoch, seconds}.
    """
    cfg = settings_section if isinstance(settings_section, KDConfig) else KDConfig.from_section(settings_section, fallback_section)
    if epochs < 0:
        raise UserError(f"epochs must be >= 0, got {epochs}")
    if len(dataset) == 0:
        raise UserError("the training set is empty; synthesize more images (-n)")
    rank, world = dist_info()
    student = runtime.prepare(student)
    teacher_module = runtime.prepare(teacher.module).eval()
    model = wrap_model(student, runtime)
    loader = KDLoader(dataset, per_rank_batch(cfg.batch_size, rank, world), seed, rank, world,
                      pin_memory=runtime.is_cuda)
    steps = len(loader)
    opt = make_optimizer(student, cfg)
    sched = make_scheduler(opt, cfg, epochs * steps)
    scaler = runtime.grad_scaler()
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT
    fingerprint = _fingerprint(student, cfg, epochs, seed, len(dataset), world)
    start, history = 0, []
    if ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, fingerprint)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, history = int(state["epoch"]), json.loads(state["history"])
        if start < epochs:
            log(f"{desc}: resuming from epoch {start}/{epochs} ({ckpt_path})")
        else:
            log(f"{desc}: resuming finds all {epochs} epochs done ({ckpt_path}); nothing to train")
    t_start = time.perf_counter()
    task = progress.add_task(desc, total=max(0, epochs - start) * steps, info="") if progress is not None else None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        g_aug = seeded_generator(stream_seed(seed, epoch, 0, KD_AUGMENT))  # one stream for all ranks (augment picks)
        lr0 = opt.param_groups[0]["lr"]
        devices = [runtime.device] if runtime.device.type == "cuda" else []
        # dropout etc. draw from the global RNG: seed it per epoch, and leave the caller's state untouched
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(stream_seed(seed, epoch, rank, KD_GLOBAL_RNG))
            loss_sum, count = _run_epoch(model, teacher, teacher_module, loader.epoch(epoch), opt, sched, scaler, runtime, cfg, g_aug,
                                         epoch, progress, task, rank, world)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / max(1, count), "lr": lr0}
        if eval_fn is not None:
            student.eval()
            with torch.no_grad():
                record.update(eval_fn(student))
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        if rank == 0:
            _save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                # every random stream of epoch e is derived from (seed, e): that is the whole RNG state
                "rng": {"seed": seed, "next_epoch": epoch + 1},
                "fingerprint": json.dumps(fingerprint),
                "history": json.dumps(history),
            })
        _barrier()
    student.eval()
    return {"history": history, "epochs": epochs, "resumed_from_epoch": start, "steps_per_epoch": steps,
            "seconds": round(time.perf_counter() - t_start, 3), "config": asdict(cfg)}


def _run_epoch(model: nn.Module, teacher: Teacher, teacher_module: nn.Module, batches: Iterator, opt, sched, scaler,
               runtime: Runtime, cfg: KDConfig, g_aug: torch.Generator, epoch: int, progress: Any, task: Any,
               rank: int = 0, world: int = 1) -> tuple[float, int]:
    model.train()
    loss_sum, count = 0.0, 0
    for step, (images, _labels, _logits) in enumerate(batches):
        x = augment(unit_images(images.to(runtime.device, non_blocking=True)), g_aug, cfg.crop_padding, cfg.flip, rank, world)
        x = mix_batch(x, g_aug, cfg.mix, rank, world)
        x = runtime.tensor(teacher.normalize(x))
        with runtime.autocast():
            with torch.no_grad():
                t_logits = teacher_module(x)
            s_logits = model(x)
        loss = kd_loss(s_logits, t_logits, cfg.temperature)
        if not torch.isfinite(loss):
            raise NumericalError(f"KD loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; lower the learning rate (profile key distill.lr, or prune.lr when fine-tuning)")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        loss_sum += loss.item() * x.shape[0]
        count += x.shape[0]
        if progress is not None:
            progress.advance(task)
            progress.update(task, info=f"epoch {epoch + 1} loss {loss.item():.4f}")
    return loss_sum, count


# ----------------------------------------------------------------------------------------------
# data helpers shared by distill and prune


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """(train, holdout) subsets: a seeded random ``fraction`` kept out of training (None when 0)."""
    n = len(dataset)
    k = int(round(n * fraction))
    if fraction <= 0 or k == 0 or n - k < 1:
        return dataset, None
    perm = torch.randperm(n, generator=seeded_generator(stream_seed(seed, HOLDOUT))).tolist()
    return Subset(dataset, sorted(perm[k:])), Subset(dataset, sorted(perm[:k]))


def stack_images(dataset: Dataset, indices: Optional[Sequence[int]] = None, limit: Optional[int] = None) -> Tensor:
    """Images01 [N, C, H, W] of (part of) a dataset of ``(image01, label, logits)`` items."""
    idx = list(range(len(dataset))) if indices is None else list(indices)
    if limit is not None:
        idx = idx[:limit]
    if not idx:
        raise UserError("no images to evaluate on; synthesize more images (-n)")
    return torch.stack([dataset[i][0] for i in idx])
