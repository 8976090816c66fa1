"""What every format reader returns, plus helpers the readers share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...errors import UserError, first_line


@dataclass
class Loaded:
    """A hookable module in eval mode and the metadata its file recorded (``None`` = unknown)."""

    module: nn.Module
    format: str
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    arch: str | None = None
    class_names: list[str] | None = None
    default_input_size: int | None = None  # from the architecture, when known
    extra: dict[str, Any] = field(default_factory=dict)


def corrupted(label: str, what: str, exc: BaseException | None = None) -> UserError:
    detail = f" ({first_line(exc)})" if exc is not None else ""
    return UserError(f"{label} looks like {what} but cannot be read: it is truncated or corrupted{detail}; re-download or re-export it")


def first_conv_in_channels(module: nn.Module) -> int | None:
    """Input channels of the first convolution, from the module tree or else from the first 4-D weight."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    for _name, p in module.named_parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None


def metadata_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """Normalise a dfcompress.json-style dict into ``Loaded`` keyword arguments (bad values ignored)."""
    out: dict[str, Any] = {}
    shape = meta.get("input_shape")
    if isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape):
        out["input_shape"] = tuple(int(v) for v in shape)
    k = meta.get("num_classes")
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        out["num_classes"] = k
    for key in ("mean", "std"):
        v = meta.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            out[key] = tuple(float(x) for x in v)
    names = meta.get("class_names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        out["class_names"] = names
    arch = meta.get("arch")
    if isinstance(arch, str) and arch:
        out["arch"] = arch
    return out
