"""ONNX attribute/tensor decoding and the opset attribute→input migrations.

Between opsets many arguments moved from node attributes to inputs (Squeeze/Unsqueeze axes at 13,
ReduceMean axes at 18, Pad pads at 11, Slice starts/ends at 10, Clip min/max at 11, Split sizes at
13). Handlers read such arguments through :func:`input_or_attr`, which accepts either spelling, so
one handler covers every opset instead of branching on version numbers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, numpy_helper

from ...errors import UserError

ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype for an ONNX element type; exotic types (strings, fp8, uint64) are refused."""
    try:
        return ONNX_TO_TORCH_DTYPE[onnx_type]
    except KeyError:
        name = TensorProto.DataType.Name(onnx_type) if onnx_type in TensorProto.DataType.values() else onnx_type
        raise UserError(f"ONNX element type {name} is not supported by the dfcompress converter") from None


def tensor_from_proto(proto: TensorProto) -> torch.Tensor:
    """Decode an initializer/Constant tensor into a torch tensor (a copy, so it owns its memory)."""
    if proto.data_type == TensorProto.BFLOAT16:
        # numpy has no bfloat16: go through float32, which represents every bfloat16 exactly
        return torch.from_numpy(np.asarray(_to_array(proto), dtype=np.float32)).to(torch.bfloat16)
    dtype = torch_dtype(proto.data_type)
    return torch.from_numpy(np.array(_to_array(proto), copy=True)).to(dtype)


def _to_array(proto: TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(proto)
    except Exception as exc:  # truncated raw_data, missing external file, ...
        raise UserError(f"cannot read ONNX tensor '{proto.name}' ({exc}); the file is corrupt or its external data is missing") from exc


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attribute name → python value (ints, floats, strings, lists; tensors become torch tensors)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise UserError(f"ONNX node '{node.name}' ({node.op_type}) has a subgraph; control flow is not supported by the dfcompress converter")
        if attr.type == AttributeProto.TENSOR:
            out[attr.name] = tensor_from_proto(attr.t)
            continue
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8") for v in value]
        out[attr.name] = value
    return out


def as_int_list(value: Any) -> list[int]:
    """A constant tensor, list or scalar of integers as a python list."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def scalar(value: Any) -> float | int | None:
    """A one-element constant (tensor or number) as a python number; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return value.reshape(-1)[0].item()
    return value


def input_or_attr(inputs: list[Any], index: int, attrs: dict[str, Any], name: str, default: Any = None) -> Any:
    """Argument that newer opsets pass as input ``index`` and older ones as attribute ``name``."""
    if index < len(inputs) and inputs[index] is not None:
        return inputs[index]
    return attrs.get(name, default)
