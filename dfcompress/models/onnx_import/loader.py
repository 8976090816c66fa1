"""Read an ONNX model from a path, bytes or ModelProto, turning every failure into a UserError.

A truncated or foreign file should tell the user what is wrong with *their file*, not show a
protobuf traceback.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import onnx

from ...errors import UserError, first_line


def load_model(model: onnx.ModelProto | str | os.PathLike | bytes) -> tuple[onnx.ModelProto, str]:
    """The ModelProto and a label for messages (the path, or '<ModelProto>')."""
    if isinstance(model, onnx.ModelProto):
        proto, label = model, "<ModelProto>"
    elif isinstance(model, (bytes, bytearray)):
        label = "<bytes>"
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as exc:
            raise UserError(f"cannot parse the given bytes as an ONNX model ({first_line(exc, 200)})") from exc
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        label = str(path)
        if not path.is_file():
            raise UserError(f"ONNX file not found: {path}")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:
            raise UserError(f"cannot parse {path} as an ONNX model ({first_line(exc, 200)}); the file is truncated, corrupt or not ONNX") from exc
    else:
        raise UserError(f"expected an ONNX path or onnx.ModelProto, got {type(model).__name__}")
    graph = proto.graph
    if not graph.node or not graph.output:
        raise UserError(f"{label} has no graph nodes or outputs; the file is empty, truncated or not an ONNX model")
    return proto, label


def default_opset(proto: onnx.ModelProto) -> int:
    """Opset of the default ('' / 'ai.onnx') domain; files without one are assumed current."""
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return onnx.defs.onnx_opset_version()


def _without_weights(proto: onnx.ModelProto, keep_below: int = 1024) -> onnx.ModelProto:
    """A copy whose large initializers are typed graph inputs instead: inference needs their shapes,
    not their values, and serialising megabytes of weights for it dominated conversion time."""
    src = proto.graph
    light = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import, functions=proto.functions)
    g = light.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    listed = {i.name for i in src.input}
    for init in proto.graph.initializer:
        if math.prod(init.dims) < keep_below:
            g.initializer.append(init)
        elif init.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def value_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor shapes from ONNX shape inference (None for symbolic dims); empty when inference fails.

    Handlers use them to pick BatchNorm1d/2d/3d and the like, and to spot a batch size of 1 baked
    into a static-batch export.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(proto))
    except Exception:  # inference is an optimisation only; handlers fall back to 4-D defaults
        inferred = proto
    shapes: dict[str, list[int | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes
