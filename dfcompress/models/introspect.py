"""What a loaded teacher is: format, input, classes, BN state, stages, size and cost.

``dfcompress inspect`` prints this, and the choice of inversion method depends on it: a teacher with
BatchNorm running statistics supports DeepInversion-style losses directly, a BN-folded one needs
collected statistics first.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..device import module_device
from .formats.probe import shape_basis
from .stages import probe_stages, probe_token_stages
from .taps import batchnorm_layers, batchnorm_summary, other_norm_layers, stat_layers
from .teacher import Teacher


def count_params(module: nn.Module) -> int:
    """Distinct parameters (shared tensors counted once), buffers excluded."""
    return int(sum(p.numel() for p in module.parameters()))


def _hook_macs(module: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Fallback: multiply-accumulates of Conv2d and Linear layers only."""
    total = 0

    def hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() // out.shape[0] * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape, device=module_device(module)))
    finally:
        for h in handles:
            h.remove()
    return int(total)


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Operations for one image as torch-pruning counts them (conv/linear MACs plus BN, activation and
    pooling element ops), the same counter for every format so figures compare (a BN-folded export
    counts slightly fewer). Hook-based Conv/Linear MACs only if torch-pruning cannot run the module."""
    import torch_pruning as tp

    was_training = module.training
    try:
        ops, _params = tp.utils.count_ops_and_params(module, torch.zeros(1, *input_shape, device=module_device(module)))
        return int(ops)
    except Exception:
        return _hook_macs(module, input_shape)
    finally:
        module.train(was_training)


def inspect_teacher(teacher: Teacher) -> dict[str, Any]:
    """JSON-friendly summary of a loaded teacher (for ``dfcompress inspect`` and reports)."""
    module = teacher.module
    bns = batchnorm_layers(module)
    stages = probe_stages(module, teacher.input_shape)
    tokens = probe_token_stages(module, teacher.input_shape)
    return {
        "format": teacher.format,
        "source": teacher.source,
        "sha256": teacher.sha256,
        "arch": teacher.arch,
        "input_shape": list(teacher.input_shape),
        "input_shape_from": shape_basis(teacher.extra.get("input_shape_from")),
        "output_head": list(teacher.extra.get("output_head", [])),
        "num_classes": teacher.num_classes,
        "class_names": teacher.class_names,
        "mean": list(teacher.mean),
        "std": list(teacher.std),
        "batchnorm_layers": len(bns),
        "bn_folded": len(bns) == 0 and not other_norm_layers(module),  # no BN and no other norm: most likely folded
        "batchnorm": batchnorm_summary(module),
        "stages": [s.to_dict() for s in stages],
        "token_stages": [s.to_dict() for s in tokens],
        "stat_layers": len(stat_layers(module, teacher.input_shape)),
        # the Feature Transfer Pyramid reads spatial maps only; token stages feed the statistics term
        "pyramid": len(stages) > 0,
        "params": count_params(module),
        "macs": count_macs(module, teacher.input_shape),
    }
