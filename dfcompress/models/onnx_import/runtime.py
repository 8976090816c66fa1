"""Functions the converted graph calls at run time for stateless ONNX ops (the call_function nodes).

Shape plumbing stays in python: ``Shape`` returns a list of ints, ``Gather`` on it an int, and
``Concat``/``Unsqueeze``/``Slice`` keep lists, so ``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)),
[-1]))`` becomes ``x.reshape([x.shape[0], -1])`` with a live batch dimension instead of a baked-in
one. Every helper therefore accepts python ints/lists wherever ONNX has a small int64 tensor, and
the same helpers run eagerly on constant tensors when the converter folds constants.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

PyValue = int | float | list
Value = torch.Tensor | PyValue


_SCALARS = (int, float, torch.SymInt, torch.SymFloat)  # Sym*: sizes under torch.export


def _is_scalar(v: Any) -> bool:
    return isinstance(v, _SCALARS) and not isinstance(v, bool)


def _is_py(v: Any) -> bool:
    return _is_scalar(v) or isinstance(v, (list, tuple))


def as_list(v: Value) -> list:
    """A shape-like value (tensor, list or scalar) as a flat python list."""
    if isinstance(v, torch.Tensor):
        if torch.jit.is_tracing():  # sizes are traced 0-d tensors: keep them symbolic (legacy ONNX re-export)
            return list(v.reshape(-1).unbind(0))
        return v.reshape(-1).tolist()
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def as_tensor(v: Value, like: torch.Tensor | None = None) -> torch.Tensor:
    """A python shape value as a tensor on ``like``'s device (int64 for ints, float32 for floats)."""
    if isinstance(v, torch.Tensor):
        return v
    device = like.device if isinstance(like, torch.Tensor) else None
    flat = as_list(v)
    dtype = torch.float32 if any(isinstance(e, float) for e in flat) else torch.int64
    return torch.tensor(v if isinstance(v, (list, tuple)) else v, dtype=dtype, device=device)


def to_output(v: Value) -> torch.Tensor:
    """Graph outputs are tensors even when ONNX computed them from shapes."""
    return as_tensor(v)


# ---------------------------------------------------------------- shape family

def shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> list:
    return list(x.shape)[start:end]


def size(x: torch.Tensor) -> int:
    return x.numel()


def gather(data: Value, indices: Value, axis: int = 0) -> Value:
    if _is_py(data) and axis == 0:
        seq = as_list(data)
        if _is_scalar(indices) or (isinstance(indices, torch.Tensor) and indices.dim() == 0):
            return seq[int(indices)]
        if isinstance(indices, torch.Tensor) and indices.dim() == 1 or isinstance(indices, (list, tuple)):
            return [seq[int(i)] for i in as_list(indices)]
    data = as_tensor(data, like=indices if isinstance(indices, torch.Tensor) else None)
    idx = as_tensor(indices, like=data).long()
    axis = axis % data.dim()
    dim = data.shape[axis]
    idx = torch.where(idx < 0, idx + dim, idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])


def unsqueeze(data: Value, axes: Sequence[int]) -> Value:
    axes = list(axes)
    if _is_scalar(data) and axes in ([0], [-1]):
        return [data]
    data = as_tensor(data)
    rank = data.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        data = data.unsqueeze(a)
    return data


def squeeze(data: Value, axes: Sequence[int] | None = None) -> Value:
    if isinstance(data, (list, tuple)) and len(data) == 1 and (axes is None or list(axes) in ([0], [-1])):
        return data[0]
    data = as_tensor(data)
    if axes is None:
        return data.squeeze()
    return data.squeeze(tuple(a % data.dim() for a in axes)) if len(axes) else data


def concat(*inputs: Value, axis: int = 0) -> Value:
    if any(_is_py(v) for v in inputs):
        out: list = []
        for v in inputs:
            out.extend(as_list(v))
        return out
    return torch.cat(list(inputs), dim=axis)


def cast(x: Value, dtype: torch.dtype) -> Value:
    if _is_py(x):
        if not dtype.is_floating_point and dtype != torch.bool:
            to_int = lambda v: v if isinstance(v, (int, torch.SymInt)) else int(v)  # noqa: E731  (int() would specialise a SymInt)
            return [to_int(v) for v in x] if isinstance(x, (list, tuple)) else to_int(x)
        x = as_tensor(x)
    return x.to(dtype)


def reshape(x: Value, new_shape: Value, allowzero: int = 0) -> torch.Tensor:
    x = as_tensor(x)
    dims = [int(d) if isinstance(d, bool) else d for d in as_list(new_shape)]
    if not allowzero:
        dims = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def flatten(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    axis = axis % x.dim() if x.dim() else 0
    lead = math.prod(x.shape[:axis]) if axis else 1
    return x.reshape(lead, -1)


def expand(x: Value, new_shape: Value) -> torch.Tensor:
    x = as_tensor(x)
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(as_list(new_shape))))


def tile(x: torch.Tensor, repeats: Value) -> torch.Tensor:
    return as_tensor(x).repeat(as_list(repeats))


def constant_of_shape(new_shape: Value, value: float | int = 0.0, dtype: torch.dtype = torch.float32,
                      like: torch.Tensor | None = None) -> torch.Tensor:
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.full([int(d) for d in as_list(new_shape)], value, dtype=dtype, device=device)


def arange(start: Value, limit: Value, delta: Value, like: torch.Tensor | None = None) -> torch.Tensor:
    vals = [as_list(v)[0] for v in (start, limit, delta)]
    dtype = start.dtype if isinstance(start, torch.Tensor) else (torch.float32 if isinstance(vals[0], float) else torch.int64)
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.arange(*vals, dtype=dtype, device=device)


def transpose(x: Value, perm: Sequence[int] | None = None) -> torch.Tensor:
    x = as_tensor(x)
    return x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))


def _slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
    """ONNX Slice clamping (differs from python for negative steps, where end=-1 means 'past 0')."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def slice_(data: Value, starts: Value, ends: Value, axes: Value | None = None, steps: Value | None = None) -> Value:
    starts, ends = as_list(starts), as_list(ends)
    axes = as_list(axes) if axes is not None else list(range(len(starts)))
    steps = as_list(steps) if steps is not None else [1] * len(starts)
    if _is_py(data):
        seq = as_list(data)
        s, e = _slice_bounds(len(seq), starts[0], ends[0], steps[0])
        return [seq[i] for i in range(s, e, steps[0])]
    for a, st, en, sp in zip(axes, starts, ends, steps):
        a = a % data.dim()
        s, e = _slice_bounds(data.shape[a], int(st), int(en), int(sp))
        if sp > 0:
            data = data[(slice(None),) * a + (slice(s, max(s, e), sp),)]
        else:
            idx = torch.arange(s, e, sp, device=data.device)
            data = data.index_select(a, idx)
    return data


def split(x: torch.Tensor, sizes: Value | None, axis: int = 0, num_outputs: int = 1) -> tuple:
    if sizes is None:
        dim = x.shape[axis]
        chunk = -(-dim // num_outputs)  # ceil: ONNX puts the remainder in the last piece
        return tuple(torch.split(x, chunk, dim=axis))
    return tuple(torch.split(x, [int(s) for s in as_list(sizes)], dim=axis))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def pad(x: torch.Tensor, pads: Value, value: float = 0.0, axes: Value | None = None, mode: str = "constant") -> torch.Tensor:
    """ONNX Pad ([begins..., ends...] over ``axes``) via F.pad (pairs from the last dim backwards)."""
    pads = [int(p) for p in as_list(pads)]
    rank = x.dim()
    axes = [a % rank for a in as_list(axes)] if axes is not None else list(range(rank))
    n = len(pads) // 2
    full = [(0, 0)] * rank
    for a, b, e in zip(axes, pads[:n], pads[n:]):
        full[a] = (b, e)
    torch_pads: list[int] = []
    for d in reversed(range(rank)):
        torch_pads += list(full[d])
    while torch_pads and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if not torch_pads:
        return x
    if mode == "constant":
        return F.pad(x, torch_pads, value=float(value))
    return F.pad(x, torch_pads, mode=_PAD_MODES[mode])


def same_pad(x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             upper: bool = True, value: float = 0.0) -> torch.Tensor:
    """auto_pad SAME_UPPER/SAME_LOWER: output = ceil(input / stride), extra pad at the end (upper) or start."""
    torch_pads: list[int] = []
    spatial = x.shape[2:]
    for i in reversed(range(len(kernel))):
        size_in, s = spatial[i], strides[i]
        out = -(-size_in // s)
        total = max((out - 1) * s + (kernel[i] - 1) * dilations[i] + 1 - size_in, 0)
        small, big = total // 2, total - total // 2
        torch_pads += [small, big] if upper else [big, small]
    return F.pad(x, torch_pads, value=value)


# ---------------------------------------------------------------- elementwise

def _py_elementwise(fn: Callable, a: PyValue, b: PyValue) -> PyValue:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) == 1:
            a = list(a) * len(b)
        if len(b) == 1:
            b = list(b) * len(a)
        return [fn(x, y) for x, y in zip(a, b)]
    if isinstance(a, (list, tuple)):
        return [fn(x, b) for x in a]
    if isinstance(b, (list, tuple)):
        return [fn(a, y) for y in b]
    return fn(a, b)


def _int_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _like(v: PyValue, other: torch.Tensor) -> torch.Tensor:
    """A python operand as a tensor of the other operand's dtype/device (ONNX operands share a type)."""
    return torch.tensor(v, dtype=other.dtype, device=other.device)


def _binary(py_fn: Callable, torch_fn: Callable) -> Callable:
    def run(a: Value, b: Value) -> Value:
        if _is_py(a) and _is_py(b):
            return _py_elementwise(py_fn, a, b)
        if _is_py(a):
            a = _like(a, b)
        if _is_py(b):
            b = _like(b, a)
        return torch_fn(a, b)
    return run


def _torch_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.dtype.is_floating_point and not b.dtype.is_floating_point:
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates like C
    return torch.div(a, b)


def _py_div(a: Any, b: Any) -> Any:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return a // b  # symbolic sizes are non-negative, so floor division is C truncation
    return _int_div(a, b) if isinstance(a, int) and isinstance(b, int) else a / b


add = _binary(operator.add, torch.add)
add.__name__ = add.__qualname__ = "add"
sub = _binary(operator.sub, torch.sub)
sub.__name__ = sub.__qualname__ = "sub"
mul = _binary(operator.mul, torch.mul)
mul.__name__ = mul.__qualname__ = "mul"
div = _binary(_py_div, _torch_div)
div.__name__ = div.__qualname__ = "div"


def _py_mod(a: Any, b: Any) -> Any:
    """ONNX Mod with fmod=0 (python %: the result takes the divisor's sign); float operands never get here."""
    return a % b


mod = _binary(_py_mod, torch.remainder)  # fmod=0: integer Mod, sign of the divisor (the exporters' `x % n`)
mod.__name__ = mod.__qualname__ = "mod"
fmod = _binary(math.fmod, torch.fmod)  # fmod=1: C fmod, sign of the dividend (required for float inputs)
fmod.__name__ = fmod.__qualname__ = "fmod"


def _tensors(*vals: Value) -> list[torch.Tensor]:
    like = next((v for v in vals if isinstance(v, torch.Tensor)), None)
    return [as_tensor(v, like=like) for v in vals]


def _comparison(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str) -> Callable[[Value, Value], torch.Tensor]:
    """An ONNX comparison on tensors or shape values (lists/ints), named for the generated graph code."""
    def compare(a: Value, b: Value) -> torch.Tensor:
        a, b = _tensors(a, b)
        return op(a, b)
    compare.__name__ = compare.__qualname__ = name
    return compare


equal = _comparison(torch.eq, "equal")
less = _comparison(torch.lt, "less")
greater = _comparison(torch.gt, "greater")
less_equal = _comparison(torch.le, "less_equal")
greater_equal = _comparison(torch.ge, "greater_equal")


def trilu(x: torch.Tensor, k: Value = 0, upper: int = 1) -> torch.Tensor:
    """ONNX Trilu (attention masks): keep the upper (``upper=1``) or lower triangle from diagonal ``k``."""
    k = int(as_list(k)[0])
    return torch.triu(x, k) if upper else torch.tril(x, k)


def where(cond: Value, a: Value, b: Value) -> torch.Tensor:
    cond, a, b = _tensors(cond, a, b)
    return torch.where(cond.bool(), a, b)


def pow_(a: Value, b: Value) -> torch.Tensor:
    a, b = _tensors(a, b)
    out = torch.pow(a, b)
    return out.to(a.dtype)  # ONNX Pow keeps the base's type


_VARIADIC = {"max": torch.maximum, "min": torch.minimum, "sum": torch.add}


def variadic(op: str, *vals: Value) -> torch.Tensor:
    """ONNX Max/Min/Sum/Mean over any number of broadcastable inputs (``op`` by name: fx prints it)."""
    tensors = _tensors(*vals)
    out = tensors[0]
    for t in tensors[1:]:
        out = _VARIADIC["sum" if op == "mean" else op](out, t)
    return out / len(tensors) if op == "mean" else out


def clip(x: torch.Tensor, lo: Value | None = None, hi: Value | None = None) -> torch.Tensor:
    lo = as_tensor(lo, like=x) if lo is not None and _is_py(lo) else lo
    hi = as_tensor(hi, like=x) if hi is not None and _is_py(hi) else hi
    return torch.clamp(x, lo, hi)


# ---------------------------------------------------------------- reductions, matmul, softmax

def reduce(x: torch.Tensor, axes: Value | None, keepdims: int = 1, noop_with_empty_axes: int = 0, op: str = "mean") -> torch.Tensor:
    x = as_tensor(x)
    dims = [int(a) for a in as_list(axes)] if axes is not None else []
    if not dims:
        if noop_with_empty_axes:
            return x
        dims = list(range(x.dim()))
    keep = bool(keepdims)
    if op == "mean":
        return torch.mean(x, dim=dims, keepdim=keep)
    if op == "sum":
        return torch.sum(x, dim=dims, keepdim=keep)
    if op == "max":
        return torch.amax(x, dim=dims, keepdim=keep)
    if op == "min":
        return torch.amin(x, dim=dims, keepdim=keep)
    if op == "prod":
        out = x
        for d in sorted((d % x.dim() for d in dims), reverse=True):
            out = torch.prod(out, dim=d, keepdim=keep)
        return out
    if op == "l2":
        return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))
    if op == "l1":
        return torch.sum(torch.abs(x), dim=dims, keepdim=keep)
    if op == "sumsquare":
        return torch.sum(x * x, dim=dims, keepdim=keep)
    raise ValueError(op)


def arg_reduce(x: torch.Tensor, axis: int = 0, keepdims: int = 1, select_last_index: int = 0, largest: bool = True) -> torch.Tensor:
    if select_last_index:
        flipped = torch.flip(x, dims=[axis])
        idx = torch.argmax(flipped, dim=axis, keepdim=bool(keepdims)) if largest else torch.argmin(flipped, dim=axis, keepdim=bool(keepdims))
        return x.shape[axis] - 1 - idx
    return torch.argmax(x, dim=axis, keepdim=bool(keepdims)) if largest else torch.argmin(x, dim=axis, keepdim=bool(keepdims))


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 1.0,
         trans_a: int = 0, trans_b: int = 0) -> torch.Tensor:
    a = a.t() if trans_a else a
    b = b.t() if trans_b else b
    out = torch.matmul(a, b)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


def softmax_2d(x: torch.Tensor, axis: int = 1, log: bool = False) -> torch.Tensor:
    """Opset < 13 Softmax: flatten to [prod(dims[:axis]), prod(dims[axis:])], softmax rows, reshape back."""
    flat = flatten(x, axis)
    out = torch.log_softmax(flat, dim=1) if log else torch.softmax(flat, dim=1)
    return out.reshape(x.shape)


def _per_axis(p: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A QDQ scale/zero-point: scalar, or 1-D along ``axis`` (per-channel weights)."""
    if p.dim() == 0 or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return p.reshape(shape)


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], axis: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    zp = _per_axis(zero_point, x, axis).to(torch.float32) if zero_point is not None else 0.0
    info = torch.iinfo(dtype)
    q = torch.clamp(torch.round(x / _per_axis(scale, x, axis)) + zp, info.min, info.max)
    return q.to(dtype)


def dequantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], axis: int) -> torch.Tensor:
    """ONNX DequantizeLinear: (x - zero_point) * scale, in float32."""
    zp = _per_axis(zero_point, x, axis).to(torch.float32) if zero_point is not None else 0.0
    return (x.to(torch.float32) - zp) * _per_axis(scale, x, axis)
