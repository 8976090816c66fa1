"""torch-pruning support for zoo modules it cannot see into (the option-A ``PadShortcut``).

Pass ``customized_pruners()`` as ``customized_pruners=`` to any torch-pruning pruner or
``DependencyGraph``. The shortcut is then pruned like a 1x1 conv: its input and output channels are
independent groups, and a pruned input channel simply stops being copied.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .resnet_cifar import PadShortcut


def _prune_out(layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
    index = layer.index if layer.index is not None else layer.default_index()
    drop = set(int(i) for i in idxs)
    keep = torch.tensor([i for i in range(layer.out_channels) if i not in drop], dtype=torch.long, device=index.device)
    layer.index = index.index_select(0, keep)
    layer.out_channels = int(keep.numel())
    return layer


def _prune_in(layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
    index = layer.index if layer.index is not None else layer.default_index()
    drop = set(int(i) for i in idxs)
    kept = [i for i in range(layer.in_channels) if i not in drop]
    new_zero = len(kept)
    remap = torch.full((layer.in_channels + 1,), new_zero, dtype=torch.long)
    remap[torch.tensor(kept, dtype=torch.long)] = torch.arange(new_zero)
    layer.index = remap.to(index.device)[index]
    layer.in_channels = new_zero
    return layer


def customized_pruners() -> dict[type, Any]:
    """``{PadShortcut: pruner}`` for torch-pruning (imported lazily: only pruning needs it)."""
    import torch_pruning as tp

    class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = (PadShortcut,)

        def prune_out_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
            return _prune_out(layer, idxs)

        def prune_in_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
            return _prune_in(layer, idxs)

        def get_out_channels(self, layer: PadShortcut) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: PadShortcut) -> int:
            return layer.in_channels

    return {PadShortcut: PadShortcutPruner()}
