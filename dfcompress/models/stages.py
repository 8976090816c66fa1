"""Find a classifier's resolution stages by probing shapes (timm's ``feature_info`` for any model).

NaturalInversion's Feature Transfer Pyramid taps "the last activation of each resolution stage";
instead of hard-coding ResNet layer names we run one forward pass on a dummy input, watch every leaf
module's output shape, and keep the last 4-D activation before each spatial halving.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..device import module_device


@dataclass(frozen=True)
class Stage:
    name: str        # submodule whose output is tapped
    channels: int
    height: int
    width: int
    reduction: int   # input height / feature height

    def to_dict(self) -> dict:
        return asdict(self)


def _is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


@torch.no_grad()
def probe_stages(module: nn.Module, input_shape: tuple[int, int, int]) -> list[Stage]:
    """Return one Stage per spatial resolution, ordered from high to low resolution.

    Only 4-D outputs of leaf modules are considered; the chosen tap of each resolution is the *last*
    leaf module that produced that resolution (e.g. a block's final ReLU), which is the stage output.
    Resolutions seen only once in passing (e.g. a stride-2 conv inside a downsampling block) still end
    up as the last module of their own resolution, which is what "where the spatial size halves" means.
    """
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, m in module.named_modules():
        if name and _is_leaf(m):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: order.append((name, tuple(out.shape))) if isinstance(out, torch.Tensor) and out.dim() == 4 else None
            ))
    was_training = module.training
    module.eval()
    try:
        module(torch.zeros(1, *input_shape, device=module_device(module)))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if not order:
        return []
    # last leaf per distinct (H, W), keeping the order in which resolutions first appear
    last: dict[tuple[int, int], tuple[str, tuple[int, ...]]] = {}
    first_seen: list[tuple[int, int]] = []
    for name, shape in order:
        hw = (shape[2], shape[3])
        if hw not in last:
            first_seen.append(hw)
        last[hw] = (name, shape)
    stages = []
    prev_h = None
    for hw in sorted(first_seen, key=lambda s: -s[0] * s[1]):
        name, shape = last[hw]
        # 1x1 maps are global pooling, not a stage the pyramid could upsample from
        if hw == (1, 1) or (prev_h is not None and hw[0] >= prev_h):
            continue
        prev_h = hw[0]
        stages.append(Stage(name, shape[1], hw[0], hw[1], max(1, round(input_shape[1] / hw[0]))))
    return stages
