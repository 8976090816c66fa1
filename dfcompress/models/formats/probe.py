"""Find the input shape a model accepts when the file does not say.

Order (most to least trusted): the --input-shape flag, the file's own metadata, the architecture's
default size, then probing: channels from the first convolution, spatial size from the first of
32/224/28/64/8 that gives [N, K] logits. Whatever is assumed is logged, never silent.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...errors import UserError, describe_exception
from ...progress import log
from .common import first_conv_in_channels
from .heads import logits_like

PROBE_SIZES = (32, 224, 28, 64, 8)


def _probe(forward: Callable[[torch.Tensor], object], shape: tuple[int, int, int]) -> object:
    """The output for a batch of 2 at ``shape``, or None when the model does not run at that size."""
    try:
        with torch.no_grad():
            return forward(torch.zeros(2, *shape))
    except Exception:
        return None


def check_channels(module: nn.Module, shape: tuple[int, int, int], label: str) -> None:
    c = first_conv_in_channels(module)
    if c is not None and c != shape[0]:
        raise UserError(f"--input-shape gives {shape[0]} channel(s) but the first convolution of {label} takes {c}; fix --input-shape")


def resolve_input_shape(
    module: nn.Module,
    *,
    label: str,
    flag: tuple[int, int, int] | None = None,
    metadata: tuple[int, int, int] | None = None,
    default_size: int | None = None,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> tuple[tuple[int, int, int], str]:
    """(C, H, W) and where it came from: flag | metadata | arch default | probe."""
    if flag is not None:
        shape = validate_input_shape(flag)
        check_channels(module, shape, label)
        return shape, "flag"
    if metadata is not None:
        return tuple(int(v) for v in metadata), "metadata"  # type: ignore[return-value]
    channels = first_conv_in_channels(module)
    if channels is None:
        raise UserError(f"cannot tell the input channels of {label} (no convolution found); pass --input-shape C,H,W")
    if default_size is not None:
        return (channels, default_size, default_size), "arch default"
    forward = forward or module
    ran_unlike_classifier = None
    for size in PROBE_SIZES:
        shape = (channels, size, size)
        out = _probe(forward, shape)
        if isinstance(out, torch.Tensor) and not logits_like(out):
            ran_unlike_classifier = ran_unlike_classifier or (size, tuple(out.shape))
        if logits_like(out) and out.shape[0] == 2:  # type: ignore[union-attr]
            log(f"{label}: input shape not recorded in the file; assuming {channels}x{size}x{size} (the first probed size "
                "that runs); pass --input-shape C,H,W if that is wrong")
            return shape, "probe"
    if ran_unlike_classifier:
        size, got = ran_unlike_classifier
        raise UserError(f"{label} is not a classifier: at {channels}x{size}x{size} it returns shape {list(got)}, not [N, classes]; "
                        "dfcompress compresses image classifiers")
    raise UserError(f"{label} accepted none of the probed input sizes {list(PROBE_SIZES)} with {channels} channel(s); pass --input-shape C,H,W")


SHAPE_BASIS = {
    "flag": "from --input-shape",
    "metadata": "recorded in the file",
    "traced example input": "the example input the file was traced with",
    "arch default": "the architecture's default size",
    "probe": f"GUESSED: not recorded in the file, the first of {'/'.join(map(str, PROBE_SIZES))} px that runs; pass --input-shape C,H,W if wrong",
}


def shape_basis(how: str | None) -> str:
    """What an input shape rests on, in words for ``inspect``."""
    return SHAPE_BASIS.get(how or "", how or "unknown")


MAX_CHANNELS, MAX_SIDE = 16, 2048


def validate_input_shape(flag: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in flag)
    except (TypeError, ValueError):
        raise UserError(f"--input-shape must be three positive integers C,H,W, got {flag!r}") from None
    if len(shape) != 3 or any(v <= 0 for v in shape):
        raise UserError(f"--input-shape must be three positive integers C,H,W, got {flag!r}")
    if shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIDE:
        # probing runs the model on this size: an absurd shape would exhaust memory instead of failing
        raise UserError(f"--input-shape {'x'.join(map(str, shape))} is larger than dfcompress handles "
                        f"(at most {MAX_CHANNELS} channels and {MAX_SIDE} px a side)")
    return shape  # type: ignore[return-value]


def probe_forward(forward: Callable[[torch.Tensor], object], shape: tuple[int, int, int], label: str) -> torch.Tensor:
    """Seeded random batch through the model; raises UserError with the reason if it does not run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g)
    try:
        with torch.no_grad():
            return forward(x)  # type: ignore[return-value]
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"a test forward pass of {label} on a {list(x.shape)} input failed ({describe_exception(exc)}); "
                        "pass --input-shape C,H,W if the model expects another size") from None
