"""``load_teacher``: any shipped model file -> a checked, hookable :class:`Teacher`.

The format is detected from the bytes (``formats.detect``); one reader per format produces a module
plus whatever metadata the file carried; this module then applies the same precedence for input shape
and preprocessing to all of them (flags > file metadata > architecture defaults > probing) and refuses
anything that is not a finite classifier before a long job starts on it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..fileio import sha256_file
from ..progress import log
from .formats import detect
from .formats.common import Loaded, metadata_fields
from .formats.descriptor import pick_model_file, read_descriptor
from .formats.pickled import as_module, loaded_pickled_module, safe_torch_load
from .formats.heads import to_logits
from .formats.probe import probe_forward, resolve_input_shape, validate_input_shape
from .formats.state_dict import build_from_state_dict, load_safetensors, unwrap_state_dict
from .model_dir import DESCRIPTOR
from .teacher import Teacher, check_preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_teacher(
    path: str | os.PathLike | None,
    *,
    arch: str | None = None,
    allow_pickle: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Teacher:
    """Load a teacher from a file or model folder (``None`` -> the embedded digits teacher)."""
    if path is None:
        from .embedded import embedded_teacher

        return embedded_teacher()
    if input_shape is not None:
        input_shape = validate_input_shape(input_shape)
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise UserError(f"--num-classes must be a positive integer, got {num_classes!r}")
    p = detect.check_path(path)
    kind = detect.detect_format(p)
    if kind == detect.FOLDER:
        return _load_folder(p if p.is_dir() else p.parent, arch=arch, allow_pickle=allow_pickle, mean=mean, std=std,
                            num_classes=num_classes, input_shape=input_shape)
    loaded = read_model(p, kind, arch=arch, allow_pickle=allow_pickle, num_classes=num_classes, input_shape=input_shape)
    return finish(loaded, source=str(p), sha256=sha256_file(p), mean=mean, std=std, num_classes=num_classes, input_shape=input_shape)


def read_model(
    p: Path,
    kind: str,
    *,
    arch: str | None,
    allow_pickle: bool,
    num_classes: int | None,
    input_shape: tuple[int, int, int] | None,
    metadata_shape: tuple[int, int, int] | None = None,
) -> Loaded:
    """Dispatch one detected file to its reader."""
    label = str(p)
    size = (input_shape or metadata_shape or (None, None, None))[1]
    if kind == detect.SAFETENSORS:
        tensors, meta = load_safetensors(p, label)
        fields = metadata_fields(meta)
        size = (input_shape or metadata_shape or fields.get("input_shape") or (None, None, None))[1]
        loaded = build_from_state_dict(tensors, arch=arch or fields.get("arch"), label=label,
                                       num_classes=num_classes or fields.get("num_classes"), input_size=size)
        for key in ("input_shape", "mean", "std", "class_names"):
            if key in fields:
                setattr(loaded, key, fields[key])
        return loaded
    if kind in (detect.CHECKPOINT, detect.PICKLE):
        obj = safe_torch_load(p, allow_pickle=allow_pickle, label=label)
        module = as_module(obj)
        if isinstance(module, torch.jit.ScriptModule):
            raise UserError(f"{label} holds a pickled TorchScript module; save it with torch.jit.save and pass that file")
        if module is not None:
            return loaded_pickled_module(module)
        sd = unwrap_state_dict(obj)
        if sd is None:
            raise UserError(f"{label} holds no model weights (found {type(obj).__name__}); pass a state_dict, checkpoint or model file")
        return build_from_state_dict(sd, arch=arch, label=label, num_classes=num_classes, input_size=size)
    if kind == detect.TORCHSCRIPT:
        from .formats.torchscript import load_torchscript

        return load_torchscript(p, label=label, input_shape=input_shape or metadata_shape)
    if kind == detect.PT2:
        from .formats.exported import load_pt2

        return load_pt2(p, label=label, allow_pickle=allow_pickle)
    if kind == detect.ONNX:
        from .formats.onnx_file import load_onnx

        return load_onnx(p, label=label)
    raise UserError(f"{label}: unsupported model format {kind!r}")


def _load_folder(folder: Path, *, arch, allow_pickle, mean, std, num_classes, input_shape) -> Teacher:
    desc = read_descriptor(folder)
    meta = metadata_fields(desc)
    kind, file = pick_model_file(folder, desc, arch)
    inner = detect.detect_format(file)
    if kind == "state_dict" and inner not in (detect.SAFETENSORS, detect.CHECKPOINT, detect.PICKLE):
        raise UserError(f"{file} is listed as a state_dict in {folder / DESCRIPTOR} but is a {inner} file")
    loaded = read_model(file, inner, arch=arch or meta.get("arch"), allow_pickle=allow_pickle,
                        num_classes=num_classes or meta.get("num_classes"), input_shape=input_shape,
                        metadata_shape=meta.get("input_shape"))
    for key in ("input_shape", "num_classes", "mean", "std", "class_names", "arch"):
        if key in meta:
            setattr(loaded, key, meta[key])
    loaded.extra.update({"inner_format": loaded.format, "file": str(file), "created_by": desc.get("created_by"),
                         "teacher_sha256": desc.get("teacher_sha256")})
    loaded.format = "folder"
    return finish(loaded, source=str(folder), sha256=sha256_file(file), mean=mean, std=std, num_classes=num_classes, input_shape=input_shape)


def _non_finite_weights(module: nn.Module) -> str | None:
    """First parameter with NaN/inf, or buffer with NaN (converted graphs may keep legitimate -inf constants)."""
    for name, t in module.named_parameters():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    for name, t in module.named_buffers():
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            return name
    return None


def _runs(module: nn.Module, shape: tuple[int, int, int]) -> bool:
    """Whether a probe batch goes through (else probe_forward below reports why, in one line)."""
    try:
        with torch.no_grad():
            module(torch.zeros(2, *shape))
        return True
    except Exception:
        return False


def default_preprocessing(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB (what most pretrained models use), 0.5/0.5 (i.e. [-1, 1]) otherwise."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def finish(
    loaded: Loaded,
    *,
    source: str,
    sha256: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    num_classes: int | None,
    input_shape: tuple[int, int, int] | None,
) -> Teacher:
    """Resolve shape and preprocessing, run the sanity checks, build the Teacher."""
    label = source
    module = loaded.module.eval()
    bad = _non_finite_weights(module)
    if bad:
        raise UserError(f"{label} has NaN/inf values in its weights ({bad}); it cannot be used as a teacher")
    shape, how = resolve_input_shape(module, label=label, flag=input_shape, metadata=loaded.input_shape,
                                     default_size=loaded.default_input_size)
    head = to_logits(module, shape, label) if _runs(module, shape) else []
    out = probe_forward(module, shape, label)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{label} is not a classifier: it returns {got} for a batch of 2, expected logits [N, num_classes]")
    if not bool(torch.isfinite(out).all()):
        raise UserError(f"{label} produces NaN/inf logits on a test input; it cannot be used as a teacher")
    k = int(out.shape[1])
    if num_classes is not None and num_classes != k:
        raise UserError(f"--num-classes is {num_classes} but {label} outputs {k} logits; fix --num-classes or the model")
    if loaded.num_classes is not None and loaded.num_classes != k:
        log(f"{label}: its metadata says {loaded.num_classes} classes but it outputs {k} logits; using {k}")
    mean_t, std_t = _preprocessing(loaded, shape[0], mean, std, label)
    names = loaded.class_names if loaded.class_names and len(loaded.class_names) == k else None
    extra = dict(loaded.extra, input_shape_from=loaded.extra.get("input_shape_from", how), output_head=head)
    return Teacher(module=module, input_shape=shape, num_classes=k, mean=mean_t, std=std_t, format=loaded.format,
                   source=source, sha256=sha256, arch=loaded.arch, class_names=names, extra=extra)


def _preprocessing(loaded: Loaded, channels: int, mean, std, label: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    d_mean, d_std = default_preprocessing(channels)
    m = tuple(float(v) for v in (mean if mean is not None else loaded.mean if loaded.mean is not None else d_mean))
    s = tuple(float(v) for v in (std if std is not None else loaded.std if loaded.std is not None else d_std))
    check_preprocessing(m, s, channels)  # before any log line: a bad flag gets exactly one line
    if mean is None and loaded.mean is None or std is None and loaded.std is None:
        which = "ImageNet mean/std" if channels == 3 else "mean 0.5 / std 0.5"
        log(f"{label}: no input normalisation recorded; assuming {which} — pass --mean/--std if it was trained with other values")
    return m, s
