"""timm-style model registry: one factory over named builders, with aliases and per-model defaults.

Names are matched case-insensitively with ``-`` treated as ``_`` so that the spellings people type
(``WRN-16-1``, ``resnet20_cifar``, ``mobilenet_v2``) all land on one canonical entry.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ...errors import UserError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture and the input it was designed for."""

    name: str
    builder: Builder
    family: str
    default_input_size: int
    default_num_classes: int
    default_in_channels: int
    aliases: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelEntry] = {}
_LOOKUP: dict[str, str] = {}  # normalised name or alias -> canonical name


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_model(
    name: str,
    *,
    family: str,
    aliases: tuple[str, ...] | list[str] = (),
    default_input_size: int = 224,
    default_num_classes: int = 1000,
    default_in_channels: int = 3,
) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(num_classes, in_channels, input_size)`` under ``name``."""

    def deco(builder: Builder) -> Builder:
        canonical = _norm(name)
        keys = [canonical, *(_norm(a) for a in aliases)]
        for key in keys:
            if key in _LOOKUP:
                raise ValueError(f"model name {key!r} registered twice")
        _REGISTRY[canonical] = ModelEntry(
            canonical, builder, family, default_input_size, default_num_classes, default_in_channels, tuple(aliases)
        )
        for key in keys:
            _LOOKUP[key] = canonical
        return builder

    return deco


def list_models() -> list[str]:
    """Canonical names, sorted."""
    return sorted(_REGISTRY)


def resolve_model_name(name: str) -> str:
    """Canonical name for ``name`` or an alias; unknown names raise UserError with the closest match."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("architecture name is empty (see `dfcompress inspect --list-archs`)")
    key = _norm(name)
    if key in _LOOKUP:
        return _LOOKUP[key]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.6)
    hint = f"; did you mean '{_LOOKUP[close[0]]}'?" if close else ""
    raise UserError(f"unknown architecture '{name}'{hint} (see `dfcompress inspect --list-archs`)")


def get_entry(name: str) -> ModelEntry:
    return _REGISTRY[resolve_model_name(name)]


def model_defaults(name: str) -> dict[str, Any]:
    """The input the architecture expects when the user gives none: input_size, num_classes, family, in_channels."""
    e = get_entry(name)
    return {
        "input_size": e.default_input_size,
        "num_classes": e.default_num_classes,
        "default_in_channels": e.default_in_channels,
        "in_channels": e.default_in_channels,
        "family": e.family,
    }


def create_model(name: str, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224) -> nn.Module:
    """Build a freshly initialised model (train mode, like torchvision) for the given input/classes."""
    entry = get_entry(name)
    for label, value, lo in (("num_classes", num_classes, 1), ("in_channels", in_channels, 1), ("input_size", input_size, 4)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise UserError(f"{label} must be an integer >= {lo} for architecture '{entry.name}', got {value!r}")
    return entry.builder(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
