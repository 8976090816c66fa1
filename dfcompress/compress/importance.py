"""Channel importance for pruning: magnitude (L1/L2) or data-driven (Taylor, Hessian/OBD) on our own images.

Torch-Pruning's data-driven criteria need gradients of a loss on real inputs; its examples use random
tensors. Here the gradients come from the training set the user gave or we synthesized: cross-entropy
of the model being pruned against the set's labels (the synthesis targets, or the teacher's top-1 for
unlabelled real images). KD against the teacher would give zero gradients: before pruning the model
*is* the teacher.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from ..errors import UserError
from ..models.teacher import Teacher

IMPORTANCES = ("l1", "l2", "taylor", "hessian")
DATA_DRIVEN = ("taylor", "hessian")

Batches = Sequence[tuple[Tensor, Tensor]]  # (normalised model input, int64 labels)


def make_importance(name: str, model: nn.Module, batches: Optional[Batches]) -> Any:
    """A torch-pruning importance for ``model``; data-driven ones have their gradients accumulated now."""
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name not in DATA_DRIVEN:
        raise UserError(f"unknown pruning importance {name!r}; use one of {', '.join(IMPORTANCES)}")
    if not batches:
        raise UserError(f"--importance {name} needs images to take gradients on, and none were given")
    for p in model.parameters():  # a copy of a frozen teacher: gradients are needed here, nowhere else
        p.requires_grad_(True)
    if name == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        _taylor_grads(model, batches)
    else:
        imp = tp.importance.GroupHessianImportance()
        _hessian_grads(model, batches, imp)
    return imp


def _taylor_grads(model: nn.Module, batches: Batches) -> None:
    """Sum of the loss gradients over all batches left in ``param.grad`` (what GroupTaylorImportance reads)."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        with torch.enable_grad():
            F.cross_entropy(model(x), y, reduction="sum").backward()


def _hessian_grads(model: nn.Module, batches: Batches, imp: Any) -> None:
    """OBD's diagonal Fisher: per-sample squared gradients, averaged, left in ``param.grad`` (where the
    importance reads them once its own accumulator is empty). Not ``imp.accumulate_grad``: torch-pruning
    1.x keys it by name on lookup but by parameter on store, so it keeps only the last sample."""
    acc: dict[nn.Parameter, Tensor] = {}
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for p in model.parameters():
                if p.grad is not None:
                    acc[p] = acc[p] + p.grad.detach().pow(2) if p in acc else p.grad.detach().pow(2)
            count += 1
    imp.zero_grad()
    for p in model.parameters():  # the mean squared gradient where GroupHessianImportance reads it
        p.grad = acc[p] / count if p in acc else None


def importance_batches(images01: Tensor, labels: Tensor, teacher: Teacher, batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """(normalised input, labels) batches of ``images01`` for the data-driven importances."""
    x = teacher.normalize(images01.float())
    return [(x[i:i + batch_size], labels[i:i + batch_size].long()) for i in range(0, x.shape[0], batch_size)]
