"""torch-pruning plumbing: option-A shortcuts made prunable, and the guard against silently skipped layers.

Two things torch-pruning 1.6 does not handle by itself:

* **Option-A shortcuts** (CIFAR ResNet-20/32/44/56: stride-2 subsample + zero channel padding).
  The dependency graph treats ``F.pad`` as element-wise, so it couples the 16-channel input with the
  32-channel output index for index and the pruned model breaks. Before pruning we swap every
  ``PadShortcut`` for an exactly equivalent :class:`ChannelPadShortcut` ("put input channel i at
  output position gather[j], zeros elsewhere") and register a pruner for it whose input and output
  channels are *independent*: removing an output channel drops its gather entry, removing an input
  channel turns the output positions it fed into zeros. Stage boundaries become separate groups, so
  the residual stream of every stage is pruned too.
* **Layers skipped without a word.** Rounding a layer's remaining channels down to ``round_to`` can
  reach 0 (e.g. 12 channels, ratio 0.5, round_to 8: 6 -> 0), and so can a high ratio on a small layer
  (int(16 * 0.05) = 0). torch-pruning then asks to remove *every* channel, ``check_pruning_group``
  refuses, and the whole group is left unpruned. :class:`SkipGuard` records those refusals, and
  :func:`apply_guard` prunes each such group down to the smallest legal width instead (``round_to``
  channels, or 1), or reports it when the layer is already that small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from ..models.zoo.resnet_cifar import PadShortcut


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride``, then output j = input[gather[j]] (or 0 when gather[j] == in_channels)."""

    def __init__(self, in_channels: int, gather: Sequence[int] | Tensor, stride: int = 2):
        super().__init__()
        self.in_channels = int(in_channels)
        self.stride = int(stride)
        self.register_buffer("gather", torch.as_tensor(gather, dtype=torch.long).clone())

    @property
    def out_channels(self) -> int:
        return int(self.gather.numel())

    @classmethod
    def from_pad(cls, module: PadShortcut, in_channels: int) -> "ChannelPadShortcut":
        zero = in_channels
        gather = [zero] * module.pad + list(range(in_channels)) + [zero] * module.pad
        return cls(in_channels, gather, module.stride)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        x = F.pad(x, (0, 0, 0, 0, 0, 1))  # one extra all-zero channel at index in_channels
        return x.index_select(1, self.gather)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"


class ChannelPadPruner(tp.pruner.BasePruningFunc):
    """Pruning functions for ChannelPadShortcut; in and out channels are separate (no intra-layer coupling)."""

    TARGET_MODULES = ChannelPadShortcut

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = [j for j in range(layer.out_channels) if j not in drop]
        layer.gather = layer.gather[keep].clone()
        return layer

    def prune_in_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        kept = [i for i in range(layer.in_channels) if i not in drop]
        new_in = len(kept)
        remap = {old: new for new, old in enumerate(kept)}
        layer.gather = torch.tensor([remap.get(int(g), new_in) for g in layer.gather], dtype=torch.long)
        layer.in_channels = new_in
        return layer

    def get_out_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.in_channels


CUSTOM_PRUNERS = {ChannelPadShortcut: ChannelPadPruner()}


def make_prunable(model: nn.Module) -> int:
    """Swap every PadShortcut of ``model`` (in place) for an equivalent ChannelPadShortcut; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, PadShortcut)]
    if not targets:
        return 0
    in_ch: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: in_ch.__setitem__(n, int(args[0].shape[1])))
             for name, m in targets]
    try:
        with torch.no_grad():
            model(_probe_input(model))
    finally:
        for h in hooks:
            h.remove()
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, ChannelPadShortcut.from_pad(m, in_ch[name]))
    return len(targets)


def _probe_input(model: nn.Module) -> Tensor:
    """A tiny input matching the first conv (CIFAR ResNets: any spatial size works)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return torch.zeros(2, first.in_channels, 32, 32)


# ----------------------------------------------------------------------------------------------
# the skip guard


@dataclass
class SkipGuard:
    """Wraps ``DG.check_pruning_group`` of one pruner and remembers the groups it refused."""

    pruner: Any
    refused: list[tuple[nn.Module, Any]] = field(default_factory=list)

    def install(self) -> "SkipGuard":
        original = self.pruner.DG.check_pruning_group

        def check(group: Any) -> bool:
            ok = original(group)
            if not ok:
                dep = group[0][0]
                self.refused.append((dep.target.module, dep.handler))
            return ok

        self._original = original
        self.pruner.DG.check_pruning_group = check
        return self


def apply_guard(guard: SkipGuard, names: dict[nn.Module, str], round_to: int | None) -> list[dict[str, Any]]:
    """Prune each refused group to the smallest legal width; returns one record per refused group."""
    pruner, dg = guard.pruner, guard.pruner.DG
    step = round_to or 1
    records = []
    for module, handler in guard.refused:
        channels = dg.get_out_channels(module)
        name = names.get(module, type(module).__name__)
        reason = f"rounding to a multiple of {round_to} left 0 channels" if round_to else "the ratio left 0 channels"
        if channels is None or channels <= step:
            records.append({"layer": name, "channels": channels, "kept": channels, "action": "left unpruned",
                            "reason": f"{reason}; the layer has only {channels} channel(s)"})
            continue
        full = dg.get_pruning_group(module, handler, list(range(channels)))
        imp = pruner.estimate_importance(full)
        order = torch.argsort(imp.cpu()) if imp is not None else torch.arange(channels)
        group = dg.get_pruning_group(module, handler, order[: channels - step].tolist())
        if guard._original(group):
            group.prune()
            records.append({"layer": name, "channels": channels, "kept": step, "action": f"pruned to {step}", "reason": reason})
        else:
            records.append({"layer": name, "channels": channels, "kept": channels, "action": "left unpruned",
                            "reason": f"{reason}; torch-pruning refused {step} channels too"})
    return records
