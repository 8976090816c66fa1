"""Model output folders: the weights/exports a command produced plus the ``dfcompress.json`` descriptor.

This module reads folders and writes the descriptor; writing the model files themselves (with their
parity checks) is ``export.save_model_dir``, one layer up.

The descriptor is what lets the next command take the folder as its MODEL (``distill -o s`` then
``quantize s``), so it carries the preprocessing and classes along with the file names. It is written
last, after every file it names passed its parity check: its presence means the folder is complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..errors import UserError
from ..fileio import atomic_write_json, read_json_document
from .teacher import InputSpec

DESCRIPTOR = "dfcompress.json"  # a model folder's descriptor file, and the metadata key inside every exported file
INPUT_NAME = "input"  # graph input / output names of every exported file
OUTPUT_NAME = "logits"
FILE_NAMES = {
    "state_dict": "model.safetensors",
    "pt2": "model.pt2",
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
}


def state_dict_bytes(module: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of a module's state_dict (CPU, contiguous, unshared copies)."""
    from safetensors.torch import save

    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in inner.state_dict().items()}
    return save(tensors, metadata=metadata)


def model_metadata(teacher: InputSpec) -> dict[str, Any]:
    """What a consumer of a bare exported file needs to feed it (embedded in every export)."""
    return {
        "input_shape": [int(v) for v in teacher.input_shape],
        "num_classes": int(teacher.num_classes),
        "mean": [float(v) for v in teacher.mean],
        "std": [float(v) for v in teacher.std],
        "class_names": list(teacher.class_names) if getattr(teacher, "class_names", None) else None,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    }


def write_descriptor(out_dir: str | Path, teacher: InputSpec, created_by: str, files: dict[str, str], *, arch: str | None = None,
                     exports: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``dfcompress.json`` for files already in ``out_dir`` (call it last); returns the dict."""
    meta = model_metadata(teacher)
    descriptor: dict[str, Any] = {
        "kind": "model",
        "files": dict(files),
        "arch": arch,
        "input_shape": meta["input_shape"],
        "num_classes": meta["num_classes"],
        "mean": meta["mean"],
        "std": meta["std"],
        "class_names": meta["class_names"],
        "teacher_sha256": getattr(teacher, "sha256", None),
        "created_by": created_by,
        "exports": exports or {},
        "dfcompress_version": __version__,
    }
    descriptor.update(extra or {})
    atomic_write_json(Path(out_dir) / DESCRIPTOR, descriptor)
    return descriptor


def read_model_dir(path: str | Path) -> dict[str, Any]:
    """The descriptor of a finished model folder, with every named file checked to exist."""
    d = Path(path)
    desc_path = d / DESCRIPTOR
    desc = read_json_document(desc_path, f"{d} has no {DESCRIPTOR}: it is not a finished dfcompress model folder; re-run the command that makes it",
                              f"re-run the command that made {d}")
    if not isinstance(desc, dict) or desc.get("kind") != "model" or not isinstance(desc.get("files"), dict):
        raise UserError(f"{desc_path} is not a dfcompress model descriptor (expected kind 'model' and 'files')")
    for kind, name in desc["files"].items():
        if not (d / name).is_file():
            raise UserError(f"{d} is incomplete: its {kind} file {name} is missing; re-run the command that made it")
    return desc


def created_by(path: str | Path) -> str | None:
    """The command recorded in a model folder's descriptor (None without a readable one)."""
    from ..fileio import read_json_or_none

    desc = read_json_or_none(Path(path) / DESCRIPTOR)
    return desc.get("created_by") if isinstance(desc, dict) else None


def onnx_file_of(model: str | Path | None) -> Path | None:
    """An ONNX file standing for MODEL: the MODEL itself, or the one a dfcompress model folder names."""
    if model is None:
        return None
    p = Path(model)
    if p.is_file() and p.suffix.lower() == ".onnx":
        return p
    if p.is_dir() and (p / DESCRIPTOR).is_file():
        name = read_model_dir(p).get("files", {}).get("onnx")
        if name and (p / name).is_file():
            return p / name
    return None


def is_quantized_onnx(path: str | Path | None) -> bool:
    """True for an ONNX graph holding quantize/dequantize ops (it runs in onnxruntime only, not as a torch module)."""
    if path is None:
        return False
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in graph.node)
