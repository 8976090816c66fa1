"""Recover the teacher's training-data feature statistics from its BatchNorm running buffers.

This is DeepInversion's premise: a BN layer remembers the mean/variance of its input over the
training set, so it needs no data at all. BN-folded teachers (ONNX exports) have lost them.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..models.taps import batchnorm_layers, no_batchnorm_statistics, stat_layers
from ..models.teacher import Teacher
from .store import FeatureStats


def recover_bn_stats(teacher: Teacher) -> FeatureStats:
    """Global float64 stats at every BatchNorm2d input (the layers ``stat_layers`` picks for BN models)."""
    bns = dict(batchnorm_layers(teacher.module))
    layers = [l for l in stat_layers(teacher.module) if l.name in bns] if bns else []
    if not layers:
        raise UserError(no_batchnorm_statistics(teacher.source, teacher.module, then=" (or --data DIR)"))
    mean, var = {}, {}
    for l in layers:
        bn = bns[l.name]
        mean[l.name] = bn.running_mean.detach().to("cpu", torch.float64).clone()
        var[l.name] = bn.running_var.detach().to("cpu", torch.float64).clone()
    return FeatureStats(
        layers=layers, mean=mean, var=var, counts=torch.zeros(1, dtype=torch.int64), per_class=False,
        kind="bn-running", teacher_sha256=teacher.sha256, mean_pre=tuple(teacher.mean), std_pre=tuple(teacher.std),
        source=f"batchnorm running statistics of {teacher.source}",
    )
