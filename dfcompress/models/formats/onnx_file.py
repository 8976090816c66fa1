"""ONNX models -> hookable GraphModules via ``onnx_to_torch``; shapes come from the graph's declared dims."""
from __future__ import annotations

from pathlib import Path

from ...errors import UserError, first_line
from ..model_dir import DESCRIPTOR
from .common import Loaded, corrupted, metadata_fields


def _dims(value_info) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def read_onnx(path: Path, label: str):
    """The checked ModelProto; damage and checker failures become one-line UserErrors."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, missing external data, ...
        text = first_line(exc)
        if "outside" in text or "external" in text.lower():
            raise UserError(f"{label} refers to external weight data that cannot be read ({text}); keep the weights "
                            "inside the model's folder, or re-export as one file") from None
        raise corrupted(label, "an ONNX model", exc) from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserError(f"{label} is not a valid ONNX model ({first_line(exc)}); re-export it") from None
    return model


def graph_io(model) -> tuple[tuple[int, int, int] | None, int | None, int | None]:
    """(input C,H,W if static, num_classes if static, fixed batch size or None) from the graph signature."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"the ONNX model has {len(inputs)} inputs; a classifier teacher needs exactly one image input")
    dims = _dims(inputs[0])
    shape = tuple(dims[1:]) if len(dims) == 4 and all(d is not None for d in dims[1:]) else None
    classes = None
    if model.graph.output:
        out = _dims(model.graph.output[0])
        if len(out) == 2 and out[1] is not None:
            classes = out[1]
    batch = dims[0] if dims else None
    return shape, classes, batch  # type: ignore[return-value]


def load_onnx(path: Path, *, label: str) -> Loaded:
    from ..onnx_import import onnx_to_torch

    model = read_onnx(path, label)
    shape, classes, batch = graph_io(model)
    meta = {p.key: p.value for p in model.metadata_props}
    fields: dict = {}
    if DESCRIPTOR in meta:
        import json

        try:
            fields = metadata_fields(json.loads(meta[DESCRIPTOR]))
        except ValueError:
            fields = {}
    if shape is not None:
        fields.setdefault("input_shape", shape)
    if classes is not None:
        fields.setdefault("num_classes", classes)
    module = onnx_to_torch(model).eval()
    return Loaded(module=module, format="onnx", extra={"onnx_fixed_batch": batch}, **fields)
