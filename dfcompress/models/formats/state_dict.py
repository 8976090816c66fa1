"""State dicts (torch.save'd or safetensors) + a zoo architecture name -> model.

Checkpoints come wrapped ({'state_dict': ...}, {'model': ...}) and DataParallel-prefixed
('module.conv1.weight'); we unwrap both and infer classes/input channels from the weights so that
``--arch resnet20`` alone is enough for the common case.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...errors import UserError
from .common import Loaded, corrupted

WRAPPER_KEYS = ("state_dict", "model", "net", "weights", "model_state_dict", "state")
STRIP_PREFIXES = ("module.", "_orig_mod.")  # always stripped
OPTIONAL_PREFIXES = ("model.", "net.", "backbone.")  # stripped only when that makes the keys fit
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and sum(isinstance(v, torch.Tensor) for v in obj.values()) > 0


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensor mapping inside a checkpoint (up to three wrapper levels), prefixes stripped; None if none."""
    for _ in range(3):
        if is_tensor_dict(obj) and not any(isinstance(obj.get(k), Mapping) for k in WRAPPER_KEYS):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not is_tensor_dict(obj):
        return None
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_safetensors(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and the metadata dfcompress writes beside them ({'arch': ..., 'dfcompress': json})."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ValueError on truncated headers
        raise corrupted(label, "a safetensors file", exc) from None
    meta: dict[str, Any] = {}
    try:
        inner = json.loads(header.get("dfcompress", "{}"))
        meta = inner if isinstance(inner, dict) else {}
    except ValueError:
        pass
    if header.get("arch") and header["arch"] != "None":
        meta.setdefault("arch", header["arch"])
    return tensors, meta


def _io_keys(model: nn.Module) -> tuple[str | None, str | None]:
    """State-dict keys of the model's first convolution weight and its classifier (last Linear, else last conv)."""
    first_conv = last_linear = last_conv = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            first_conv = first_conv or f"{name}.weight"
            last_conv = f"{name}.weight"
        elif isinstance(m, nn.Linear):
            last_linear = f"{name}.weight"
    return first_conv, last_linear or last_conv


def infer_io(sd: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> tuple[int | None, int | None]:
    """(num_classes, in_channels) from the weights: classifier rows and first-conv channels.

    Key names come from a reference ``model`` when given (safetensors files are sorted by key, so file
    order says nothing); otherwise the last 2-D weight and the first 4-D weight in file order.
    """
    conv_key, head_key = _io_keys(model) if model is not None else (None, None)
    num_classes = int(sd[head_key].shape[0]) if head_key in sd else None
    in_channels = int(sd[conv_key].shape[1]) if conv_key in sd and sd[conv_key].dim() == 4 else None
    if in_channels is None:
        in_channels = next((int(t.shape[1]) for n, t in sd.items() if n.endswith("weight") and t.dim() == 4), None)
    if num_classes is None:
        num_classes = next((int(t.shape[0]) for n, t in reversed(list(sd.items())) if n.endswith("weight") and t.dim() == 2), None)
    return num_classes, in_channels


def _brief(items: list[str], total: int) -> str:
    shown = ", ".join(items[:3])
    return shown + (", …" if total > 3 else "")


def mismatch_summary(model_sd: Mapping[str, torch.Tensor], file_sd: Mapping[str, torch.Tensor]) -> str | None:
    """A short 'N missing (a, b, c, …); M unexpected (…); K shape mismatches (…)' text, or None if they fit."""
    def keep(k: str) -> bool:
        return not k.endswith(_IGNORED_SUFFIXES)

    missing = [k for k in model_sd if keep(k) and k not in file_sd]
    unexpected = [k for k in file_sd if keep(k) and k not in model_sd]
    shapes = [
        f"{k} {list(file_sd[k].shape)} vs {list(v.shape)}"
        for k, v in model_sd.items() if k in file_sd and tuple(file_sd[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_brief(missing, len(missing))})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_brief(unexpected, len(unexpected))})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model: {_brief(shapes, len(shapes))})")
    return "; ".join(parts) or None


def _best_prefix_variant(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``sd`` or a copy with a common wrapper prefix removed, whichever matches the model's keys better."""
    best, best_hits = sd, sum(k in model_sd for k in sd)
    for prefix in OPTIONAL_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            cand = {k[len(prefix):]: v for k, v in sd.items()}
            hits = sum(k in model_sd for k in cand)
            if hits > best_hits:
                best, best_hits = cand, hits
    return best


def _skeleton(create_model, name: str, k: int, c: int, size: int) -> nn.Module:
    """The architecture on the meta device (no memory, no init cost); a CPU build if the builder needs data."""
    try:
        with torch.device("meta"):
            return create_model(name, num_classes=k, in_channels=c, input_size=size)
    except UserError:
        raise
    except Exception:
        return create_model(name, num_classes=k, in_channels=c, input_size=size)


def build_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    arch: str | None,
    label: str,
    num_classes: int | None = None,
    input_size: int | None = None,
) -> Loaded:
    """Instantiate ``arch`` from the zoo sized after the weights, and load them strictly."""
    from ..zoo import create_model, model_defaults, resolve_model_name

    if not arch:
        raise UserError(f"{label} is a state_dict (weights without the network): pass --arch NAME (see `dfcompress inspect --list-archs`)")
    name = resolve_model_name(arch)
    defaults = model_defaults(name)
    k0 = int(defaults["num_classes"])
    c0 = int(defaults.get("default_in_channels", defaults.get("in_channels", 3)))
    size = input_size or int(defaults["input_size"])
    reference = _skeleton(create_model, name, num_classes or k0, c0, size)  # key names and default shapes only
    sd = _best_prefix_variant(reference.state_dict(), sd)
    inferred_k, inferred_c = infer_io(sd, reference)
    k = num_classes or inferred_k or k0
    c = inferred_c or c0
    model = create_model(name, num_classes=k, in_channels=c, input_size=size)
    model_sd = model.state_dict()
    problem = mismatch_summary(model_sd, sd)
    if problem:
        raise UserError(f"{label} does not fit architecture '{name}': {problem}; check --arch")
    floats = {key: v.to(model_sd[key].dtype) if v.is_floating_point() else v for key, v in sd.items() if key in model_sd}
    model.load_state_dict(floats, strict=False)
    model.eval()
    return Loaded(module=model, format="state_dict", arch=name, num_classes=k, default_input_size=int(defaults["input_size"]),
                  extra={"in_channels": c})
