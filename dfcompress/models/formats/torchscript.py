"""TorchScript archives -> hookable modules, via an in-memory ONNX round trip.

ScriptModules ignore Python forward hooks, yet inversion needs intermediate feature statistics. We
export the ScriptModule with the legacy (TorchScript-based) ONNX exporter and rebuild it with
``onnx_to_torch`` into a GraphModule of real ``nn.Conv2d``/``nn.BatchNorm2d`` submodules.
The exporter fuses BatchNorm into the preceding convolution only in
``TrainingMode.EVAL`` (its "eval peephole"), which would lose the running statistics DeepInversion
matches; ``TrainingMode.PRESERVE`` on the eval-mode ScriptModule skips that fusion while still exporting
inference-mode BatchNormalization nodes, and ``do_constant_folding=True`` still folds the shape
arithmetic (``do_constant_folding=False`` also keeps BN but leaves Shape/Gather/Unsqueeze chains). The
result must reproduce the ScriptModule's logits before we hand it out.
"""
from __future__ import annotations

import io
import json
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from ...errors import UserError, first_line
from ..model_dir import DESCRIPTOR
from .common import Loaded, corrupted, metadata_fields
from .probe import resolve_input_shape

PARITY_ATOL = 1e-4


def read_torchscript(path: Path, label: str) -> tuple[torch.jit.ScriptModule, dict]:
    """The ScriptModule (eval, CPU, float) and its ``dfcompress.json`` extra file as a dict ({} if absent)."""
    extra = {DESCRIPTOR: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation notice: this is exactly the migration path
            ts = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # RuntimeError from the C++ reader on damaged archives
        raise corrupted(label, "a TorchScript archive", exc) from None
    meta: dict = {}
    raw = extra.get(DESCRIPTOR) or b""
    if raw:
        try:
            obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            meta = obj if isinstance(obj, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    ts.eval()
    return ts, meta


_OPERATOR = re.compile(r"operator '([\w:.]+)'")
_UNSUPPORTED = re.compile(r"Unsupported: ONNX export of (.+?)\.?\s*(?:\[|$)", re.S)
_SCOPE = re.compile(r"torch\.nn\.modules\.[\w.]*?\.(\w+)::([\w.]+)")


def failing_construct(exc: BaseException) -> str:
    """What the exporter choked on, in a few words: ``transpose for tensor of unknown rank (in MultiheadAttention
    blocks.0.self_attn)`` or ``operator aten::is_autocast_enabled``; the exporter's own first line otherwise.

    Traced attention layers lose the tensor ranks the exporter needs, scripted ones keep control flow
    (``aten::is_autocast_enabled``) it cannot express; neither is fixable after the fact, so the message
    names the construct and the formats that carry the model instead.
    """
    text = str(exc)
    op = _OPERATOR.search(text)
    if op:
        return f"operator {op.group(1)}"
    unsupported = _UNSUPPORTED.search(text)
    if not unsupported:
        return first_line(exc)
    scope_line = re.search(r"scope: (\S+)", text)
    where = _SCOPE.findall(scope_line.group(1)) if scope_line else []
    scope = f" (in {where[-1][0]} {'.'.join(w[1] for w in where)})" if where else ""
    return f"{unsupported.group(1).strip()}{scope}"


def script_to_onnx(ts: torch.jit.ScriptModule, input_shape: tuple[int, int, int], label: str):
    """Export to an in-memory ONNX ModelProto that keeps BatchNormalization nodes."""
    import onnx

    buf = io.BytesIO()
    x = torch.zeros(1, *input_shape)
    try:
        # torch's exporter enables its log by mistake and dumps the whole IR graph to stdout on failure
        with warnings.catch_warnings(), mock.patch.object(torch._C, "_jit_onnx_log", lambda *args: None):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                ts, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=True,
                training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:
        raise UserError(f"{label}: the TorchScript model cannot be made hookable: its internal ONNX export fails on "
                        f"{failing_construct(exc)}; export the original model as .pt2 (torch.export) or ONNX instead, "
                        "or load its weights with --arch") from None
    model = onnx.load_from_string(buf.getvalue())
    return model


def script_to_hookable(ts: torch.jit.ScriptModule, input_shape: tuple[int, int, int], label: str) -> nn.Module:
    """A GraphModule equivalent to ``ts`` (checked: max |Δlogit| < 1e-4 on random batches)."""
    from ..onnx_import import onnx_to_torch

    module = onnx_to_torch(script_to_onnx(ts, input_shape, label)).eval()
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(3, *input_shape, generator=g)
    try:
        with torch.no_grad():
            ref, got = ts(x), module(x)
        diff = float((ref - got).abs().max()) if ref.shape == got.shape else float("inf")
    except Exception as exc:
        raise UserError(f"{label}: the module converted from TorchScript does not run like the original ({first_line(exc)}); "
                        "load the original weights with --arch, or pass an ONNX/.pt2 export") from None
    if not diff < PARITY_ATOL:
        raise UserError(f"{label}: the module converted from TorchScript differs from the original (max |Δlogit| = {diff:.3g} "
                        f">= {PARITY_ATOL}), so its features could not be trusted; load the original weights with --arch, or pass an ONNX/.pt2 export")
    return module


def traced_input_shape(path: Path) -> tuple[int, int, int] | None:
    """C,H,W of the example input ``torch.jit.trace`` stored (``traced_inputs.pkl``, torch >= 2.0; absent in
    scripted modules), read statically from the pickle opcodes: nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/traced_inputs.pkl")), None)
            data = z.read(name) if name else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        return None
    marks: list[list] = []
    tensor_seen = False
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name == "GLOBAL" and "_rebuild_tensor" in str(arg):
                tensor_seen = True
            elif op.name == "MARK":
                marks.append([])
            elif op.name == "TUPLE" and marks:
                items = marks.pop()  # the first all-int 4-tuple after a tensor rebuild is its size
                if tensor_seen and len(items) == 4 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
                    return tuple(items[1:])  # type: ignore[return-value]
            elif marks and arg is not None:
                marks[-1].append(arg)
    except Exception:  # damaged or unexpected layout: fall back to probing
        return None
    return None


def load_torchscript(path: Path, *, label: str, input_shape: tuple[int, int, int] | None) -> Loaded:
    ts, meta = read_torchscript(path, label)
    fields = metadata_fields(meta)
    traced = None if input_shape or fields.get("input_shape") else traced_input_shape(path)
    if traced is not None:
        shape, how = traced, "traced example input"
    else:
        shape, how = resolve_input_shape(ts, label=label, flag=input_shape, metadata=fields.get("input_shape"), forward=ts)
    module = script_to_hookable(ts, shape, label)
    fields["input_shape"] = shape
    return Loaded(module=module, format="torchscript", extra={"input_shape_from": how, "converted_via": "onnx"}, **fields)
