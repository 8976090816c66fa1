"""Safe ``torch.load``: weights only unless the user explicitly trusts the file.

Unpickling a file can run any Python code it names (``os.system`` in ``__reduce__``), so every
``torch.load`` goes through :func:`safe_torch_load`: ``weights_only=True`` first; if that fails we decide
*statically* (``pickletools`` never executes anything) whether the file names Python objects beyond
tensors — then it is refused without ``--allow-pickle`` — or is simply damaged.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError, describe_exception
from .common import Loaded, corrupted

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_OBJECT_OPS = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}


def pickle_refusal(label: str) -> UserError:
    return UserError(
        f"{label} contains pickled Python objects, which can run arbitrary code when loaded; "
        "re-run with --allow-pickle only if you trust its source"
    )


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou

    allowed = set(wou._get_allowed_globals())
    for obj in torch.serialization.get_safe_globals():
        target = obj[0] if isinstance(obj, tuple) else obj
        allowed.add(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}")
    return allowed


def unsafe_globals(stream: bytes) -> list[str]:
    """Globals named by the pickle stream(s) in ``stream`` that the weights-only loader does not allow.

    Scans consecutive pickles (legacy torch.save writes several) until the data stops parsing;
    ``STACK_GLOBAL`` whose operands cannot be resolved statically counts as unsafe.
    """
    allowed = _allowed_globals()
    found: list[str] = []
    buf = io.BytesIO(stream)
    while buf.tell() < len(stream):
        strings: list[str] = []
        start = buf.tell()
        try:
            for op, arg, _pos in pickletools.genops(buf):
                if op.name in _STRING_OPS:
                    strings.append(arg if isinstance(arg, str) else repr(arg))
                elif op.name == "GLOBAL":
                    name = str(arg).replace(" ", ".")
                    if name not in allowed:
                        found.append(name)
                elif op.name == "STACK_GLOBAL":
                    name = ".".join(strings[-2:]) if len(strings) >= 2 else "<unresolved>"
                    if name not in allowed:
                        found.append(name)
                elif op.name in _OBJECT_OPS:
                    found.append(f"<{op.name}>")
        except Exception:  # end of the pickles (raw storage bytes follow in legacy files) or damage
            break
        if buf.tell() <= start:
            break
    return found


def _pickle_streams(source: Path | bytes) -> bytes:
    """The pickle bytes of a checkpoint: ``*/data.pkl`` of a zip archive, or the raw file."""
    data = source.read_bytes() if isinstance(source, Path) else source
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                return b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return b""
    return data


def _weights_only_refused(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)


def safe_torch_load(source: Path | bytes, *, allow_pickle: bool, label: str, what: str = "a PyTorch checkpoint") -> Any:
    """``torch.load`` on CPU that refuses pickled Python objects unless ``allow_pickle``; damage -> UserError."""
    def load(weights_only: bool) -> Any:
        # a file object, not a path: torch.load dispatches some suffixes (.safetensors) by name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol-version chatter; the outcome is what matters
            if isinstance(source, bytes):
                return torch.load(io.BytesIO(source), map_location="cpu", weights_only=weights_only)
            with open(source, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=weights_only)

    try:
        return load(True)
    except Exception as exc:  # torch.load raises RuntimeError/EOFError/IndexError/... on damaged files
        if not _weights_only_refused(exc):
            raise corrupted(label, what, exc) from None
        if not allow_pickle:
            if "GLOBAL" in str(exc) or unsafe_globals(_pickle_streams(source)):
                raise pickle_refusal(label) from None
            raise corrupted(label, what, exc) from None
    try:
        return load(False)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{label} could not be unpickled even with --allow-pickle ({describe_exception(exc)}); "
                        "the code that defined its classes may be missing, or the file is damaged") from None


def as_module(obj: Any) -> nn.Module | None:
    """A pickled nn.Module, directly or inside a {'model'|'net'|'module': module} wrapper."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "net", "module", "ema", "model_ema"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def loaded_pickled_module(module: nn.Module) -> Loaded:
    """Wrap a trusted, unpickled module; TorchScript modules take the conversion route elsewhere."""
    module = module.float().eval()
    return Loaded(module=module, format="pickle")
