"""Re-estimate BatchNorm running statistics of a pruned network on the training images.

Removing input channels of a convolution changes its output distribution, so the BN layer after it
normalises with statistics of a network that no longer exists: right after pruning, a ResNet-56 at
50 % of channels is at chance level (bench/RESULTS.md). Re-estimating the running mean/var on a few
hundred (synthetic) images - "adaptive BN" (Li et al., EagleEye, ECCV 2020) - costs one forward pass
per image and no labels, and is what makes the pruned model usable before, and a better start for,
fine-tuning.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..device import Runtime, place
from ..models.teacher import InputSpec
from ..evaluate import to_input

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images01: Tensor, spec: InputSpec, runtime: Optional[Runtime] = None,
                          batch_size: int = 128) -> int:
    """Replace every BN layer's running statistics by their exact average over ``images01``; returns how many
    BN layers were re-estimated. Only the BN layers switch to training mode (dropout stays off), and the
    model's modes and momenta are restored afterwards."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns or images01.shape[0] == 0:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    device = place(model, runtime)
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
        bn.train()
    try:
        for start in range(0, images01.shape[0], batch_size):
            model(to_input(images01[start:start + batch_size], spec).to(device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return len(bns)
