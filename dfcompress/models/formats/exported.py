"""torch.export ``.pt2`` archives -> hookable GraphModules with real BatchNorm layers.

Why not the ONNX route used for TorchScript: the dynamo ONNX exporter's optimiser fuses BatchNorm
into the convolutions, and ``torch.export.unflatten`` restores the module tree but keeps the calls
functional (no ``nn.BatchNorm2d`` instances). Rewriting ``ep.module()``'s aten calls into submodules
(``fx_modules.modularize``) keeps the exact tensors and original layer names and needs no op coverage.

``torch.export.load`` itself unpickles some payloads with ``weights_only=False`` (pickled weights,
opaque constants, and sample inputs as a fallback), so those members are vetted first.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

from ...errors import UserError, first_line
from ..model_dir import DESCRIPTOR
from .common import Loaded, corrupted, metadata_fields
from .fx_modules import free_batch, modularize
from .pickled import pickle_refusal, safe_torch_load, unsafe_globals

PARITY_ATOL = 1e-4
_RISKY_PREFIXES = ("opaque",)


def _raw_payloads(z: zipfile.ZipFile) -> set[str]:
    """Member paths that the archive's configs declare as raw (never unpickled) tensor bytes."""
    raw: set[str] = set()
    for name in z.namelist():
        if not name.endswith("_config.json"):
            continue
        try:
            config = json.loads(z.read(name)).get("config", {})
        except (ValueError, AttributeError):
            continue
        folder = name.rsplit("/", 1)[0]
        for meta in config.values():
            if isinstance(meta, dict) and meta.get("use_pickle") is False and isinstance(meta.get("path_name"), str):
                raw.add(f"{folder}/{meta['path_name']}")
    return raw


def vet_archive(path: Path, *, allow_pickle: bool, label: str) -> None:
    """Refuse a .pt2 whose embedded payloads would be unpickled with arbitrary globals."""
    if allow_pickle:
        return
    try:
        with zipfile.ZipFile(path) as z:
            raw = _raw_payloads(z)
            for info in z.infolist():
                if info.filename in raw or info.is_dir():
                    continue
                base = info.filename.rsplit("/", 1)[-1]
                if base.startswith(_RISKY_PREFIXES):
                    raise pickle_refusal(label)
                data = z.read(info)
                if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
                    safe_torch_load(data, allow_pickle=False, label=label, what="a .pt2 archive")
                # protocol 0/1 pickles carry no 0x80 marker, yet torch.export.load's fallback unpickles them
                if not info.filename.endswith(".json") and unsafe_globals(_pickle_streams(data)):
                    raise pickle_refusal(label)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise corrupted(label, "a .pt2 archive", exc) from None


def _pickle_streams(data: bytes) -> bytes:
    """The pickle bytes of one archive member: itself, or the .pkl members of a nested torch.save zip."""
    if data[:4] != b"PK\x03\x04":
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            return b"".join(inner.read(n) for n in inner.namelist() if n.endswith(".pkl"))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return b""  # damage is reported by the loader in its own words


def _example_shape(gm: torch.fx.GraphModule) -> tuple[int, ...] | None:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 4:
                return tuple(int(s) if isinstance(s, int) else -1 for s in val.shape)
    return None


def load_pt2(path: Path, *, label: str, allow_pickle: bool) -> Loaded:
    vet_archive(path, allow_pickle=allow_pickle, label=label)
    extra: dict[str, str] = {DESCRIPTOR: ""}  # non-empty: torch.export.load replaces an empty dict
    try:
        ep = torch.export.load(io.BytesIO(path.read_bytes()), extra_files=extra)
        original = ep.module()
    except UserError:
        raise
    except Exception as exc:
        raise corrupted(label, "a torch.export .pt2 archive", exc) from None
    shape = _example_shape(original)
    module = modularize(ep.module()).eval()
    fixed = shape[0] if shape and shape[0] > 0 else None
    if fixed is not None:
        free_batch(module, fixed)
    fields: dict = {}
    extra_info: dict = {"converted_via": "fx"}
    if shape and all(s > 0 for s in shape[1:]):
        fields["input_shape"] = tuple(shape[1:])
        _check(original, module, tuple(shape[1:]), fixed, label)
    if fixed is not None:
        extra_info["exported_batch"] = fixed
    raw_meta = extra.get(DESCRIPTOR)
    if raw_meta:
        try:
            fields.update(metadata_fields(json.loads(raw_meta)))
        except ValueError:
            pass
    return Loaded(module=module, format="pt2", extra=extra_info, **fields)


def run_in_chunks(program: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``program`` (fixed batch size ``batch``) on any number of rows: chunks of ``batch``, the last one padded."""
    outs = []
    for start in range(0, x.shape[0], batch):
        part = x[start:start + batch]
        rows = part.shape[0]
        if rows < batch:
            part = torch.cat([part, part[:1].expand(batch - rows, *part.shape[1:])])
        outs.append(program(part)[:rows])
    return torch.cat(outs)


@torch.no_grad()
def _check(original: torch.nn.Module, module: torch.nn.Module, chw: tuple[int, ...], fixed: int | None, label: str) -> None:
    """Same logits as the exported program at its example batch size and at other batch sizes (a program
    exported with a fixed batch size is the reference there when run in chunks of that size)."""
    g = torch.Generator().manual_seed(1234)
    example = fixed or 2
    x = torch.randn(example, *chw, generator=g)
    try:
        ref, got = original(x), module(x)
    except Exception as exc:
        raise UserError(f"{label}: the exported program does not run on a {[example, *chw]} input ({first_line(exc)})") from None
    diff = _max_diff(ref, got)
    if not diff < PARITY_ATOL:
        raise UserError(f"{label}: the hookable rebuild of the exported program differs from it (max |Δlogit| = {diff:.3g}); "
                        "pass an ONNX export or the original weights with --arch instead")
    for n in sorted({example + 1, 1}):
        y = torch.randn(n, *chw, generator=g)
        try:
            diff = _max_diff(run_in_chunks(original, y, fixed) if fixed else original(y), module(y))
        except Exception:
            diff = float("inf")
        if not diff < PARITY_ATOL:
            raise UserError(f"{label} was exported with a fixed batch size of {fixed} that dfcompress could not free (a batch of {n} "
                            "gives other logits); re-export it with a dynamic batch dimension (torch.export.export(..., dynamic_shapes=...))")


def _max_diff(ref: object, got: object) -> float:
    ok = isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.shape == got.shape
    return float((ref - got).abs().max()) if ok else float("inf")
