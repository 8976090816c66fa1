"""Recognise a model file by its bytes, never by its extension.

A checkpoint renamed to ``.onnx`` (or a pickle disguised as ``.pt2``) must be handled, and refused
when unsafe, by what it *is*: the magic bytes decide which reader runs.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from ...errors import UserError
from ..model_dir import DESCRIPTOR


# kinds returned by detect_format
FOLDER = "folder"
CHECKPOINT = "checkpoint"  # torch.save zip archive: state_dict or pickled module
TORCHSCRIPT = "torchscript"
PT2 = "pt2"
ONNX = "onnx"
PICKLE = "pickle"  # raw pickle stream (legacy torch.save or pickle.dump)
SAFETENSORS = "safetensors"

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def check_path(path: str | os.PathLike) -> Path:
    """The path as a Path, or a one-line UserError for missing/unreadable/empty inputs."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model file {p} does not exist; check the path")
    if p.is_dir():
        if not (p / DESCRIPTOR).is_file():
            raise UserError(f"{p} is a folder without {DESCRIPTOR}; pass a model file, or a folder written by a dfcompress command")
        return p
    if not p.is_file():
        raise UserError(f"{p} is not a regular file; pass a model file")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror or exc}") from None
    if size == 0:
        raise UserError(f"{p} is empty (0 bytes); re-download or re-export the model")
    return p


def zip_kind(names: list[str]) -> str | None:
    """Which PyTorch archive a zip's member names describe (names carry a top-level folder prefix)."""
    stripped = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(n in ("archive_format", "archive_version") or n.startswith("models/") and n.endswith(".json") for n in stripped) \
            or "serialized_exported_program.json" in stripped:
        return PT2
    if "constants.pkl" in stripped and any(n.startswith("code/") for n in stripped):
        return TORCHSCRIPT
    if "data.pkl" in stripped:
        return CHECKPOINT
    return None


def _safetensors_guess(head: bytes, size: int) -> str:
    """yes / corrupt (a header that claims more bytes than the file has) / no."""
    if len(head) < 10 or head[8:10] not in (b'{"', b"{}"):
        return "no"
    (n,) = struct.unpack("<Q", head[:8])
    if 2 <= n <= size - 8:
        return "yes"
    return "corrupt" if n < 1 << 30 else "no"


def detect_format(path: str | os.PathLike) -> str:
    """One of folder, checkpoint, torchscript, pt2, onnx, pickle, safetensors; UserError otherwise."""
    p = check_path(path)
    if p.is_dir():
        return FOLDER
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] in _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise UserError(f"{p} is a zip archive (PyTorch checkpoint, TorchScript or .pt2) but cannot be read: it is truncated or corrupted ({exc}); re-download or re-export it") from None
        kind = zip_kind(names)
        if kind is None:
            raise UserError(f"{p} is a zip archive but not a PyTorch checkpoint, TorchScript or .pt2 file; pass a supported model file")
        return kind
    if head[:1] == b"\x80":
        return PICKLE
    st_guess = _safetensors_guess(head, size)
    if st_guess == "yes":
        return SAFETENSORS
    if st_guess == "corrupt":
        raise UserError(f"{p} looks like a safetensors file but is shorter than its header says: it is truncated; re-download or re-export it")
    if p.name == DESCRIPTOR or head.lstrip()[:1] == b"{":
        if _is_descriptor_file(p):
            return FOLDER
    onnx_guess = _onnx_guess(p, head)
    if onnx_guess == "yes":
        return ONNX
    if onnx_guess == "corrupt":
        raise UserError(f"{p} looks like an ONNX model but cannot be parsed: it is truncated or corrupted; re-download or re-export it")
    if _is_old_protocol_pickle(p, size):
        return PICKLE
    raise UserError(
        f"{p} is not a recognised model file (expected a PyTorch checkpoint/state_dict, TorchScript, .pt2, ONNX or "
        "safetensors file, or a dfcompress model folder)"
    )


def _is_old_protocol_pickle(p: Path, size: int, limit: int = 64 << 20) -> bool:
    """Protocol 0/1 pickles have no 0x80 marker: parse the opcodes (nothing is executed) to recognise
    them, so they are refused with the --allow-pickle hint rather than called unknown."""
    import pickletools

    if size > limit:
        return False
    try:
        ops = list(pickletools.genops(p.read_bytes()))
    except Exception:  # not a (complete) pickle stream
        return False
    return len(ops) > 1 and ops[-1][0].name == "STOP"


def _is_descriptor_file(p: Path) -> bool:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("kind") == "model"


def _onnx_guess(p: Path, head: bytes) -> str:
    """yes / corrupt / no. Random bytes can parse as protobuf, so a versioned graph with nodes is required;
    a file that starts like an exported ONNX model (field 1 = ir_version varint) but fails is corrupt."""
    import onnx

    starts_like_onnx = head[:1] == b"\x08" and 0 < head[1] < 20
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # protobuf raises a zoo of exception types on garbage
        return "corrupt" if starts_like_onnx else "no"
    if model.ir_version > 0 and len(model.graph.node) > 0:
        return "yes"
    return "corrupt" if starts_like_onnx else "no"
