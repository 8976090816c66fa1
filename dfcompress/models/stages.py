"""Find a classifier's resolution stages by probing shapes (timm's ``feature_info`` for any model).

NaturalInversion's Feature Transfer Pyramid taps "the last activation of each resolution stage";
instead of hard-coding ResNet layer names we run one forward pass on a dummy input, watch every leaf
module's output shape, and keep the last 4-D activation before each spatial halving. Token models
(vision transformers) also get token stages (:func:`probe_token_stages`): they carry statistics but
not the pyramid, which needs spatial maps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

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


@dataclass(frozen=True)
class TokenStage:
    """A place where a token model's residual stream ``[N, tokens, channels]`` enters a layer (its input is tapped)."""

    name: str        # submodule whose *input* is the token tensor
    tokens: int
    channels: int

    def to_dict(self) -> dict:
        return asdict(self)


# 4-D outputs that are not NCHW feature maps: attention maps [N, heads, T, T], and channels-last
# [N, H, W, C] tensors from layers acting on the last dim (ConvNeXt's LayerNorm and pointwise Linear)
_NOT_FEATURE_MAPS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Linear, nn.LayerNorm)
# modules whose 4-D output is NCHW for sure: they define which resolutions exist
_SPATIAL_MAKERS = (nn.Conv2d, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                   nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def _is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


@torch.no_grad()
def _run_with_hooks(module: nn.Module, input_shape: tuple[int, int, int], hooks: dict[str, Callable]) -> None:
    """One eval-mode forward pass on a zero batch of 1 with ``hooks`` (submodule name -> forward hook)."""
    modules = dict(module.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    was_training = module.training
    module.eval()
    try:
        module(torch.zeros(1, *input_shape, device=module_device(module)))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)


def probe_token_stages(module: nn.Module, input_shape: tuple[int, int, int]) -> list[TokenStage]:
    """Every LayerNorm whose input is a ``[N, tokens, channels]`` tensor (tokens > 1), in call order.

    Why LayerNorm inputs: they are the residual stream between transformer blocks (pre-norm: each
    block's input and its mid-block sum; post-norm: each block's sum before normalising), the place a
    BatchNorm input occupies in a CNN, and LayerNorm is a real module in every format dfcompress loads
    (``nn.TransformerEncoderLayer``, ONNX ``LayerNormalization``, ``.pt2`` ``aten.layer_norm``), whereas
    the blocks themselves are flattened away by ONNX and torch.export. Exports that decompose LayerNorm
    (ONNX opset < 17) fall back to the token inputs of the Linear layers. Statistics are taken per
    channel over images and tokens, as BN's are over images and positions. 4-D inputs (ConvNeXt's
    channels-last LayerNorm) are not tokens: the convolutions next to them already carry statistics.
    """
    for kind in (nn.LayerNorm, nn.Linear):
        found: dict[str, tuple[int, int]] = {}

        def hook(name: str, width: int) -> Callable:
            def record(mod: nn.Module, inp: tuple, out: Any) -> None:
                x = inp[0] if inp else None
                if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] > 1 and x.shape[2] == width:
                    found.setdefault(name, (int(x.shape[1]), int(x.shape[2])))
            return record

        hooks = {name: hook(name, m.normalized_shape[-1] if isinstance(m, nn.LayerNorm) else m.in_features)
                 for name, m in module.named_modules() if name and isinstance(m, kind)}
        if hooks:
            _run_with_hooks(module, input_shape, hooks)
        if found:
            return [TokenStage(name, t, c) for name, (t, c) in found.items()]
    return []


def probe_stages(module: nn.Module, input_shape: tuple[int, int, int]) -> list[Stage]:
    """Return one Stage per spatial resolution, ordered from high to low resolution.

    Only 4-D outputs of leaf modules are considered; the chosen tap of each resolution is the *last*
    leaf module that produced that resolution (e.g. a block's final ReLU), which is the stage output.
    Resolutions seen only once in passing (e.g. a stride-2 conv inside a downsampling block) still end
    up as the last module of their own resolution, which is what "where the spatial size halves" means.
    A map counts only if a convolution or pool produced a map of the same (C, H, W): other 4-D tensors
    are attention maps ``[N, heads, T, T]`` or channels-last ``[N, H, W, C]`` activations (ConvNeXt's
    GELU between its pointwise Linear layers), which would otherwise pose as odd resolutions.
    """
    order: list[tuple[str, tuple[int, ...]]] = []
    made_by_conv: set[tuple[int, ...]] = set()

    def hook(name: str) -> Callable:
        def record(mod: nn.Module, inp: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                order.append((name, tuple(out.shape)))
                if isinstance(mod, _SPATIAL_MAKERS):
                    made_by_conv.add(tuple(out.shape[1:]))
        return record

    _run_with_hooks(module, input_shape, {name: hook(name) for name, m in module.named_modules()
                                          if name and _is_leaf(m) and not isinstance(m, _NOT_FEATURE_MAPS)})
    order = [(name, shape) for name, shape in order if shape[1:] in made_by_conv]
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
