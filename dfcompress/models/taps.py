"""Feature taps: forward hooks that record intermediate activations without touching ``forward``.

Statistics recovery/collection and the inversion losses all read features through these hooks, so
they work on any ``nn.Module`` (zoo models, converted ONNX/TorchScript graphs) alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers that carry running statistics (the ones DeepInversion matches)."""
    return [
        (name, m) for name, m in module.named_modules()
        if isinstance(m, _BN_TYPES) and m.track_running_stats and m.running_mean is not None
    ]


_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
_OTHER_NORM_OPS = ("group_norm", "layer_norm", "instance_norm", "local_response_norm")


def other_norm_layers(module: nn.Module) -> list[str]:
    """Kinds of normalisation without running statistics (GroupNorm, LayerNorm, ...), as modules or graph calls."""
    kinds = {type(m).__name__ for m in module.modules() if isinstance(m, _OTHER_NORMS)}
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", ()):
        name = str(getattr(node.target, "__name__", node.target)) if node.op == "call_function" else ""
        kinds.update(op for op in _OTHER_NORM_OPS if op in name)
    return sorted(kinds)


def batchnorm_summary(module: nn.Module) -> str:
    """What is true about a model's BatchNorm statistics, in the words ``inspect`` and every error use.

    No BatchNorm may mean folded into the convolutions by an export, or a model that never had any
    (GroupNorm/LayerNorm only); either way there are no running statistics to recover.
    """
    n = len(batchnorm_layers(module))
    if n:
        return f"{n} BatchNorm layers"
    others = other_norm_layers(module)
    if others:
        return f"no BatchNorm layers ({', '.join(others)} only: no running statistics)"
    return "no BatchNorm layers (folded into the convolutions by the export, or never had any)"


def no_batchnorm_statistics(source: str, module: nn.Module, *, then: str = "") -> str:
    """The one message for 'this teacher has no BatchNorm statistics': what is true and what to do."""
    return (f"{source} has {batchnorm_summary(module)}; collect class-conditional statistics from a few real images "
            f"with `dfcompress stats MODEL --seeds DIR -o stats.safetensors`{then}")


@dataclass(frozen=True)
class StatLayer:
    """A place whose per-channel statistics describe the data: a BN input or, when BN was folded, a conv output.

    ``side="tokens"``: the module's input is a ``[N, tokens, C]`` token tensor (transformer residual
    stream); taps record it as ``[N, C, tokens]`` so every consumer treats tokens like spatial positions.
    """

    name: str
    side: Literal["input", "output", "tokens"]
    channels: int


def stat_layers(module: nn.Module, input_shape: tuple[int, int, int] | None = None) -> list[StatLayer]:
    """BN inputs when the model has BatchNorm; otherwise every Conv2d output (BN-fused models) and,
    given ``input_shape``, every token stage (``probe_token_stages``: LayerNorm inputs of token models).

    A BN input *is* the preceding conv's output, so both choices measure the same kind of feature;
    the fused case simply has no stored statistics and needs collected ones. Without the token stages a
    vision transformer would be constrained at its patch embedding only.
    """
    bns = batchnorm_layers(module)
    if bns:
        return [StatLayer(n, "input", m.num_features) for n, m in bns if isinstance(m, nn.BatchNorm2d)]
    convs = [StatLayer(n, "output", m.out_channels) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if input_shape is None:
        return convs
    from .stages import probe_token_stages
    return convs + [StatLayer(s.name, "tokens", s.channels) for s in probe_token_stages(module, tuple(input_shape))]


class FeatureTaps:
    """Record the input or output of named submodules on every forward pass.

    >>> with FeatureTaps(model, [("layer1", "output")]) as taps:
    ...     model(x); f = taps["layer1"]
    """

    def __init__(self, module: nn.Module, where: Iterable[tuple[str, str]] | Iterable[StatLayer], detach: bool = False):
        self.module = module
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        modules = dict(module.named_modules())
        for item in where:
            name, side = (item.name, item.side) if isinstance(item, StatLayer) else item
            if name not in modules:
                raise KeyError(f"no submodule named {name!r}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name, side)))

    def _hook(self, name: str, side: str):
        def hook(_mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            value = output if side == "output" else inputs[0].transpose(1, 2) if side == "tokens" else inputs[0]
            self.features[name] = value.detach() if self.detach else value
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.features[name]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
