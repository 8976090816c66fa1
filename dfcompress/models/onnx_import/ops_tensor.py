"""Handlers for stateless ops: shape plumbing, elementwise math, reductions, data movement.

They become call_function nodes (or fold away when their inputs are constant). Small constant
integer tensors are passed to the run-time helpers as python ints/lists so the generated code reads
``reshape(x, [getitem(shape(x), 0), -1])`` rather than indexing buffers.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx

from ...errors import UserError
from . import runtime
from .attrs import as_int_list, input_or_attr, scalar, torch_dtype
from .builder import GraphBuilder
from .registry import NodeInfo, register

# run-time helpers that may hand back python ints/lists instead of tensors
PY_PRODUCERS = {runtime.shape, runtime.size, runtime.gather, runtime.unsqueeze, runtime.squeeze, runtime.concat,
                runtime.cast, runtime.slice_, runtime.add, runtime.sub, runtime.mul, runtime.div,
                runtime.mod, runtime.fmod}


def maybe_py(v: Any) -> bool:
    """Whether a value may be a python shape value at run time (so torch ops need the polymorphic helper)."""
    return isinstance(v, fx.Node) and v.op == "call_function" and (v.target in PY_PRODUCERS or v.target is operator.getitem)


def lit(v: Any) -> Any:
    """Small constant int tensors as python ints/lists; anything else unchanged."""
    if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool and v.dim() <= 1 and v.numel() <= 64:
        return int(v) if v.dim() == 0 else [int(e) for e in v.tolist()]
    return v


def _const_ints(b: GraphBuilder, n: NodeInfo, v: Any, what: str) -> list[int] | None:
    if v is None:
        return None
    if b.is_dynamic(v):
        raise UserError(f"{n.label()} computes its {what} at run time; only constant {what} are supported")
    return as_int_list(v)


@register("Constant")
def constant(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    a = n.attrs
    if "value" in a:
        return [a["value"]]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return [torch.tensor(a[key], dtype=dtype)]
    raise UserError(f"{n.label()} holds a sparse or string constant; not supported by the dfcompress converter")


@register("Shape")
def shape(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
    return [b.call(runtime.shape, inputs[0], start, None if end is None else int(end))]


@register("Size")
def size(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.size, inputs[0])]


@register("Gather")
def gather(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.gather, inputs[0], lit(inputs[1]), int(n.attrs.get("axis", 0)))]


@register("Unsqueeze")
def unsqueeze(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    axes = _const_ints(b, n, input_or_attr(inputs, 1, n.attrs, "axes"), "axes")
    return [b.call(runtime.unsqueeze, inputs[0], axes)]


@register("Squeeze")
def squeeze(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    axes = _const_ints(b, n, input_or_attr(inputs, 1, n.attrs, "axes"), "axes")
    return [b.call(runtime.squeeze, inputs[0], axes)]


@register("Concat")
def concat(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.concat, *[lit(v) for v in inputs if v is not None], axis=int(n.attrs.get("axis", 0)))]


@register("Cast")
def cast(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.cast, inputs[0], torch_dtype(int(n.attrs["to"])))]


@register("CastLike")
def cast_like(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x, target = inputs[:2]
    if isinstance(target, torch.Tensor):
        return [b.call(runtime.cast, x, target.dtype)]
    return [b.call(runtime.cast, x, b.call(getattr, target, "dtype"))]


@register("Reshape")
def reshape(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    target, allowzero = lit(inputs[1]), int(n.attrs.get("allowzero", 0))
    data_shape = n.shape(0)
    if (isinstance(target, list) and target and target[0] == 1 and not allowzero and b.is_dynamic(inputs[0])
            and data_shape and data_shape[0] == 1):
        # a static-batch export baked batch 1 in (x.view(1, -1)): copy dim 0 instead, so any batch runs
        target = [0, *target[1:]]
    return [b.call(runtime.reshape, inputs[0], target, allowzero)]


@register("Expand")
def expand(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.expand, inputs[0], lit(inputs[1]))]


@register("Tile")
def tile(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.tile, inputs[0], lit(inputs[1]))]


@register("ConstantOfShape")
def constant_of_shape(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    value = n.attrs.get("value", torch.zeros(1, dtype=torch.float32))
    shape_in = lit(inputs[0])
    like = b.ref if b.is_dynamic(shape_in) else None
    return [b.call(runtime.constant_of_shape, shape_in, value.reshape(-1)[0].item(), value.dtype, like)]


@register("Range")
def range_(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    like = b.ref if b.is_dynamic(*inputs) else None
    return [b.call(runtime.arange, *inputs[:3], like)]


@register("Transpose")
def transpose(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    perm = n.attrs.get("perm")
    return [b.call(runtime.transpose, inputs[0], None if perm is None else list(perm))]


@register("Slice")
def slice_(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    args = [lit(input_or_attr(inputs, i, n.attrs, key)) for i, key in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
    return [b.call(runtime.slice_, inputs[0], *args)]


@register("Split")
def split(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    sizes = lit(input_or_attr(inputs, 1, n.attrs, "split"))
    count = len(n.outputs)
    return b.call_multi(runtime.split, count, inputs[0], sizes, int(n.attrs.get("axis", 0)), int(n.attrs.get("num_outputs", count)))


@register("Pad")
def pad(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    mode = n.attrs.get("mode", "constant")
    if mode not in runtime._PAD_MODES:
        raise UserError(f"{n.label()} uses pad mode '{mode}'; supported: {', '.join(runtime._PAD_MODES)}")
    pads = lit(input_or_attr(inputs, 1, n.attrs, "pads"))
    value = input_or_attr(inputs, 2, n.attrs, "value", 0.0)
    value = value if b.is_dynamic(value) else (scalar(value) or 0.0)
    axes = lit(inputs[3]) if len(inputs) > 3 else None
    return [b.call(runtime.pad, inputs[0], pads, value, axes, mode)]


# ---------------------------------------------------------------- elementwise

def _binary(py_fn: Callable, tensor_fn: Callable) -> Callable:
    def handler(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
        x, y = lit(inputs[0]), lit(inputs[1])
        polymorphic = maybe_py(x) or maybe_py(y) or not isinstance(x, (fx.Node, torch.Tensor)) or not isinstance(y, (fx.Node, torch.Tensor))
        return [b.call(py_fn if polymorphic else tensor_fn, x if polymorphic else inputs[0], y if polymorphic else inputs[1])]
    return handler


register("Add")(_binary(runtime.add, torch.add))
register("Sub")(_binary(runtime.sub, torch.sub))
register("Mul")(_binary(runtime.mul, torch.mul))
register("Div")(_binary(runtime.div, runtime.div))
register("Pow")(_binary(runtime.pow_, runtime.pow_))
register("Equal")(_binary(runtime.equal, runtime.equal))
register("Less")(_binary(runtime.less, runtime.less))
register("Greater")(_binary(runtime.greater, runtime.greater))
register("LessOrEqual")(_binary(runtime.less_equal, runtime.less_equal))
register("GreaterOrEqual")(_binary(runtime.greater_equal, runtime.greater_equal))
register("And")(_binary(torch.logical_and, torch.logical_and))
register("Or")(_binary(torch.logical_or, torch.logical_or))


@register("Mod")
def mod(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    """Exporters emit integer ``Mod`` for negative-axis/shape arithmetic (``dim % rank`` in MultiheadAttention)."""
    fn = runtime.fmod if int(n.attrs.get("fmod", 0)) else runtime.mod
    return _binary(fn, fn)(b, n, inputs)


@register("Trilu")
def trilu(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    k = lit(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else 0
    return [b.call(runtime.trilu, inputs[0], k, int(n.attrs.get("upper", 1)))]


@register("Where")
def where(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.where, *[lit(v) for v in inputs[:3]])]


def _variadic(op: str) -> Callable:
    def handler(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
        vals = [v for v in inputs if v is not None]
        return [vals[0] if len(vals) == 1 else b.call(runtime.variadic, op, *vals)]
    return handler


register("Max")(_variadic("max"))
register("Min")(_variadic("min"))
register("Sum")(_variadic("sum"))
register("Mean")(_variadic("mean"))


_UNARY = {"Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
          "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
          "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Sign": torch.sign, "Not": torch.logical_not}


def _unary(fn: Callable) -> Callable:
    def handler(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
        x = inputs[0]
        if maybe_py(x):
            x = b.call(runtime.as_tensor, x, b.ref)
        return [b.call(fn, x)]
    return handler


for _op, _fn in _UNARY.items():
    register(_op)(_unary(_fn))


# ---------------------------------------------------------------- reductions

_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod",
           "ReduceL2": "l2", "ReduceL1": "l1", "ReduceSumSquare": "sumsquare"}


def _reduce(op: str) -> Callable:
    def handler(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
        axes = _const_ints(b, n, input_or_attr(inputs, 1, n.attrs, "axes"), "axes")
        return [b.call(runtime.reduce, inputs[0], axes, int(n.attrs.get("keepdims", 1)),
                       int(n.attrs.get("noop_with_empty_axes", 0)), op)]
    return handler


for _op, _kind in _REDUCE.items():
    register(_op)(_reduce(_kind))


@register("ArgMax", "ArgMin")
def arg_reduce(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [b.call(runtime.arg_reduce, inputs[0], int(n.attrs.get("axis", 0)), int(n.attrs.get("keepdims", 1)),
                   int(n.attrs.get("select_last_index", 0)), n.op_type == "ArgMax")]


@register("QuantizeLinear")
def quantize_linear(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    """QDQ (INT8) graphs from onnxruntime.quantization simulate integer arithmetic exactly in float32."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    if "output_dtype" in n.attrs and int(n.attrs["output_dtype"]) != 0:
        dtype = torch_dtype(int(n.attrs["output_dtype"]))
    else:
        dtype = zero_point.dtype if isinstance(zero_point, torch.Tensor) else torch.uint8
    return [b.call(runtime.quantize_linear, x, scale, zero_point, int(n.attrs.get("axis", 1)), dtype)]


@register("DequantizeLinear")
def dequantize_linear(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    zero_point = inputs[2] if len(inputs) > 2 else None
    return [b.call(runtime.dequantize_linear, inputs[0], inputs[1], zero_point, int(n.attrs.get("axis", 1)))]
