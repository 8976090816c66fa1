"""Collect (class-conditional) feature statistics from a few real images.

BN-folded teachers have no running statistics, so the inversion needs measured ones: per class and
per channel, at every ``stat_layers`` place (BN inputs, or conv outputs and token stages when BN was
fused or never there; tokens count as positions). Sums and
sums of squares are accumulated in float64 while streaming over batches, so memory is independent of
the number of images and the result matches a one-shot float64 computation to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..device import place
from ..errors import UserError
from ..models.taps import FeatureTaps, stat_layers
from ..models.teacher import Teacher
from ..progress import log
from .store import FeatureStats


def _check_inputs(teacher: Teacher, images_uint8: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise UserError(f"statistics need uint8 images [N, C, H, W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if tuple(images_uint8.shape[1:]) != tuple(teacher.input_shape):
        raise UserError(f"images of shape {tuple(images_uint8.shape[1:])} do not match the teacher's input {tuple(teacher.input_shape)}")
    if images_uint8.shape[0] == 0:
        raise UserError("no images to collect statistics from; pass a folder or .npz with at least one image")
    if labels is not None:
        if labels.shape != (images_uint8.shape[0],):
            raise UserError(f"got {labels.shape[0] if labels.dim() else 0} labels for {images_uint8.shape[0]} images")
        if labels.min() < 0 or labels.max() >= teacher.num_classes:
            raise UserError(f"labels must lie in [0, {teacher.num_classes}) for this teacher, found {int(labels.min())}..{int(labels.max())}")


@torch.no_grad()
def collect_stats(teacher: Teacher, images_uint8: torch.Tensor, labels: Optional[torch.Tensor] = None,
                  per_class: bool = True, batch_size: int = 64, runtime=None, source: str = "images") -> FeatureStats:
    """Stream ``images_uint8`` through the teacher and return float64 FeatureStats.

    ``labels=None`` uses the teacher's argmax (recorded as ``extra["labels_from_teacher"]``). A class
    without images gets count 0 and the global statistics (listed in ``extra["empty_classes"]``).
    """
    _check_inputs(teacher, images_uint8, labels)
    module = teacher.module
    layers = stat_layers(module, teacher.input_shape)
    if not layers:
        raise UserError(f"{teacher.source} has neither BatchNorm nor Conv2d layers to take statistics from")
    device = place(module, runtime)
    k = teacher.num_classes if per_class else 1
    sums = {l.name: torch.zeros(k, l.channels, dtype=torch.float64, device=device) for l in layers}
    sqs = {l.name: torch.zeros(k, l.channels, dtype=torch.float64, device=device) for l in layers}
    pixels = {l.name: 0 for l in layers}  # spatial positions per image at each layer
    counts = torch.zeros(k, dtype=torch.int64)
    all_labels = []
    was_training = module.training
    module.eval()
    try:
        with FeatureTaps(module, layers, detach=True) as taps:
            for start in range(0, images_uint8.shape[0], batch_size):
                x = images_uint8[start:start + batch_size].to(device).float().div_(255.0)
                x = teacher.normalize(x)
                if runtime is not None:
                    x = runtime.tensor(x)
                taps.clear()
                logits = module(x)
                if labels is None:
                    y = logits.float().argmax(1).cpu()
                else:
                    y = labels[start:start + batch_size].to(torch.int64).cpu()
                all_labels.append(y)
                rows = y if per_class else torch.zeros_like(y)
                counts += torch.bincount(rows, minlength=k)
                # [K, B] 0/1 matrix: one float64 matmul adds each image's sums into its class row
                onehot = torch.nn.functional.one_hot(rows, k).to(device=device, dtype=torch.float64).T
                for l in layers:
                    f = taps[l.name]
                    if f.dim() not in (3, 4):
                        raise UserError(f"layer {l.name} produced a {f.dim()}-D feature; statistics need NCHW feature maps or tokens")
                    f = f.to(torch.float64).flatten(2)  # [B, C, positions]: H*W pixels or tokens
                    pixels[l.name] = f.shape[2]
                    sums[l.name] += onehot @ f.sum(dim=2)
                    sqs[l.name] += onehot @ (f * f).sum(dim=2)
    finally:
        module.train(was_training)
    mean, var, empty = _finish(layers, sums, sqs, pixels, counts, per_class)
    extra: dict = {"num_images": int(images_uint8.shape[0]), "variance": "population (biased) over images x positions"}
    if labels is None:
        extra["labels_from_teacher"] = True
    if per_class and empty:
        extra["empty_classes"] = empty
        log(f"warning: no images for class(es) {empty}; their statistics fall back to the global ones")
    return FeatureStats(layers=layers, mean=mean, var=var, counts=counts, per_class=per_class, kind="collected",
                        teacher_sha256=teacher.sha256, mean_pre=tuple(teacher.mean), std_pre=tuple(teacher.std),
                        source=source, extra=extra)


def _finish(layers, sums, sqs, pixels, counts, per_class: bool):
    """Turn sums into mean/var; empty classes get the global values (never NaN)."""
    mean, var = {}, {}
    empty = [int(c) for c in torch.nonzero(counts == 0).flatten()] if per_class else []
    n = counts.to(torch.float64)
    for l in layers:
        s, q = sums[l.name].cpu(), sqs[l.name].cpu()
        denom = (n * pixels[l.name]).unsqueeze(1)
        safe = denom.clamp_min(1.0)
        m = s / safe
        v = (q / safe - m * m).clamp_min(0.0)
        if empty:
            total = denom.sum()
            gm = s.sum(0) / total
            gv = (q.sum(0) / total - gm * gm).clamp_min(0.0)
            m[empty] = gm
            v[empty] = gv
        mean[l.name], var[l.name] = (m, v) if per_class else (m[0], v[0])
    return mean, var, empty
