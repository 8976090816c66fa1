"""torch-pruning plumbing: zoo modules it cannot see into, and the guard against silently skipped layers.

Two things torch-pruning 1.6 does not handle by itself:

* **Option-A shortcuts** (CIFAR ResNet-20/32/44/56: stride-2 subsample + zero channel padding).
  Its dependency graph treats ``F.pad`` as element-wise, couples the 16-channel input with the
  32-channel output index for index, and the pruned model breaks ("mat1 and mat2 shapes cannot be
  multiplied"). The zoo's ``PadShortcut`` therefore has its own pruner (``zoo.pruning``): input and
  output channels are *independent* groups; a removed output channel drops its entry of the shortcut's
  channel ``index``, a removed input channel turns the outputs it fed into zeros. Stage boundaries
  become separate groups, so the residual stream of every stage is pruned too.
* **Layers skipped without a word.** Rounding a layer's remaining channels down to ``round_to`` can
  reach 0 (e.g. 12 channels, ratio 0.5, round_to 8: 6 -> 0), and so can a high ratio on a small layer
  (int(16 * 0.05) = 0). torch-pruning then asks to remove *every* channel, ``check_pruning_group``
  refuses, and the whole group is left unpruned. :class:`SkipGuard` records those refusals, and
  :func:`apply_guard` prunes each such group down to the smallest legal width instead (``round_to``
  channels, or 1), or reports it when the layer is already that small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn



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
