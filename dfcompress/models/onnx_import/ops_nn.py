"""Handlers for ops that become submodules: weighted layers, normalisation, activations and pools.

Weights become real ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` parameters (BN in eval mode with
its running statistics) and activations/pools become modules, so forward hooks, BN-statistic
recovery and torch-pruning all see the layers they expect.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from . import runtime
from .attrs import input_or_attr, scalar
from .builder import GraphBuilder
from .modules import HardSigmoid, PaddedAvgPool
from .registry import NodeInfo, register


def f32(value: Any) -> float:
    """An ONNX float attribute (stored as float32) as the short decimal it was written as: 1e-3, not 0.0010000000474974513."""
    return float(f"{float(value):.7g}")


def _const_param(b: GraphBuilder, n: NodeInfo, what: str, *values: Any) -> None:
    if b.is_dynamic(*values):
        raise UserError(f"{n.label()} has a {what} computed at run time; the converter needs constant weights")


def _build(mod: nn.Module, params: dict[str, torch.Tensor | None], buffers: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fill a module made on the meta device with the ONNX tensors (no random init, no copies of copies)."""
    for name, t in params.items():
        setattr(mod, name, None if t is None else nn.Parameter(t.detach().clone().contiguous(), requires_grad=True))
    for name, t in (buffers or {}).items():
        setattr(mod, name, t.detach().clone().contiguous())
    return mod


def torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX [x1_begin, x2_begin, ..] / [x1_end, ..] → F.pad order (last dim first)."""
    out: list[int] = []
    for bgn, end in zip(reversed(begins), reversed(ends)):
        out += [bgn, end]
    return out


def resolve_padding(b: GraphBuilder, n: NodeInfo, x: Any, kernel: list[int], strides: list[int], dilations: list[int],
                    value: float, limit_half: bool = False) -> tuple[Any, list[int]]:
    """Turn pads/auto_pad into the module's symmetric ``padding``, pre-padding ``x`` with F.pad otherwise."""
    k = len(kernel)
    auto = n.attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return x, [0] * k
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        upper = auto == "SAME_UPPER"
        if any(s != 1 for s in strides):  # amount depends on the input size: computed at run time
            return b.call(runtime.same_pad, x, list(kernel), list(strides), list(dilations), upper, value), [0] * k
        totals = [(kk - 1) * d for kk, d in zip(kernel, dilations)]
        small = [t // 2 for t in totals]
        big = [t - t // 2 for t in totals]
        begins, ends = (small, big) if upper else (big, small)
    else:
        pads = list(n.attrs.get("pads", [0] * 2 * k))
        begins, ends = pads[:k], pads[k:]
    effective = [(kk - 1) * d + 1 for kk, d in zip(kernel, dilations)]
    fits = all(p <= e // 2 for p, e in zip(begins, effective)) or not limit_half
    if begins == ends and fits:
        return x, begins
    return b.call(F.pad, x, torch_pads(begins, ends), "constant", value), [0] * k


# ---------------------------------------------------------------- weighted layers

@register("Conv")
def conv(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x, w, bias = (inputs + [None, None])[:3]
    _const_param(b, n, "weight", w, bias)
    k = w.dim() - 2
    if k not in (1, 2, 3):
        raise UserError(f"{n.label()} has a {w.dim()}-D weight; only 1-D/2-D/3-D convolutions are supported")
    kernel = list(w.shape[2:])
    strides = list(n.attrs.get("strides", [1] * k))
    dilations = list(n.attrs.get("dilations", [1] * k))
    groups = int(n.attrs.get("group", 1))
    x, padding = resolve_padding(b, n, x, kernel, strides, dilations, 0.0)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[k]
    mod = cls(w.shape[1] * groups, w.shape[0], kernel, stride=strides, padding=padding, dilation=dilations,
              groups=groups, bias=bias is not None, device="meta", dtype=w.dtype)
    _build(mod, {"weight": w, "bias": bias})
    return [b.module(n.module_name, mod, x)]


@register("BatchNormalization")
def batchnorm(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x, scale, bias, mean, var = inputs[:5]
    _const_param(b, n, "scale/bias/running statistic", scale, bias, mean, var)
    if n.attrs.get("training_mode", 0):
        raise UserError(f"{n.label()} was exported in training mode; re-export the model in eval mode")
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}.get(n.rank(0, 4), nn.BatchNorm2d)
    momentum = f32(1.0 - f32(n.attrs.get("momentum", 0.9)))  # ONNX weights the *old* value, torch the new one
    mod = cls(scale.numel(), eps=f32(n.attrs.get("epsilon", 1e-5)), momentum=momentum, device="meta", dtype=scale.dtype)
    _build(mod, {"weight": scale.reshape(-1), "bias": bias.reshape(-1)},
           {"running_mean": mean.reshape(-1), "running_var": var.reshape(-1),
            "num_batches_tracked": torch.tensor(0, dtype=torch.long)})
    return [b.module(n.module_name, mod.eval(), x)]


@register("InstanceNormalization")
def instancenorm(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x, scale, bias = inputs[:3]
    _const_param(b, n, "scale/bias", scale, bias)
    cls = {3: nn.InstanceNorm1d, 5: nn.InstanceNorm3d}.get(n.rank(0, 4), nn.InstanceNorm2d)
    mod = cls(scale.numel(), eps=f32(n.attrs.get("epsilon", 1e-5)), affine=True, device="meta", dtype=scale.dtype)
    _build(mod, {"weight": scale.reshape(-1), "bias": bias.reshape(-1)})
    return [b.module(n.module_name, mod, x)]


@register("GroupNormalization")
def groupnorm(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    """A real ``nn.GroupNorm`` (the dynamo exporter emits this op from opset 21 on).

    Opset 18 gave ``scale``/``bias`` one value per *group* (deprecated for that); opset 21 one per
    channel, as torch does, so the per-group form is repeated over each group's channels.
    """
    x, scale, bias = inputs[:3]
    _const_param(b, n, "scale/bias", scale, bias)
    groups = int(n.attrs["num_groups"])
    channels = scale.numel()
    if n.opset < 21 and channels == groups:
        shape = n.shape(0)
        channels = shape[1] if shape is not None and len(shape) > 1 and shape[1] is not None else None
        if channels is None or channels % groups:
            raise UserError(f"{n.label()} (opset {n.opset}, per-group scale) needs the input's channel count, which "
                            "shape inference did not give; re-export at opset 21 or with static channels")
        scale, bias = (t.reshape(-1).repeat_interleave(channels // groups) for t in (scale, bias))
    mod = nn.GroupNorm(groups, channels, eps=f32(n.attrs.get("epsilon", 1e-5)), device="meta", dtype=scale.dtype)
    _build(mod, {"weight": scale.reshape(-1), "bias": bias.reshape(-1)})
    return [b.module(n.module_name, mod, x)]


@register("LayerNormalization")
def layernorm(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x, scale, bias = (inputs + [None, None])[:3]
    _const_param(b, n, "scale/bias", scale, bias)
    axis = int(n.attrs.get("axis", -1))
    rank = n.rank(0)
    if not (axis == -1 or (rank is not None and axis == rank - 1)) or scale.dim() != 1:
        raise UserError(f"{n.label()} normalises over several axes; only last-axis LayerNormalization is supported")
    mod = nn.LayerNorm(scale.numel(), eps=f32(n.attrs.get("epsilon", 1e-5)), bias=bias is not None, device="meta", dtype=scale.dtype)
    _build(mod, {"weight": scale, "bias": bias.reshape(-1) if bias is not None else None})
    return [b.module(n.module_name, mod, x)]


@register("LRN")
def lrn(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    a = n.attrs  # same formula as torch: x / (bias + alpha/size * sum(x^2 over the window))^beta
    mod = nn.LocalResponseNorm(int(a["size"]), f32(a.get("alpha", 1e-4)), f32(a.get("beta", 0.75)), f32(a.get("bias", 1.0)))
    return [b.module(n.module_name, mod, inputs[0])]


def _linear(w_out_in: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    mod = nn.Linear(w_out_in.shape[1], w_out_in.shape[0], bias=bias is not None, device="meta", dtype=w_out_in.dtype)
    return _build(mod, {"weight": w_out_in, "bias": bias})


@register("Gemm")
def gemm(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    a, w, c = (inputs + [None])[:3]
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    trans_a, trans_b = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
    if isinstance(w, torch.Tensor) and w.dim() == 2 and not trans_a and not b.is_dynamic(c):
        weight = (w if trans_b else w.t()) * alpha
        out_f = weight.shape[0]
        bias = None
        if c is not None and beta != 0.0:
            if c.numel() == 1 or (c.numel() == out_f and c.shape[-1] == out_f):
                bias = (c.reshape(-1) * beta).expand(out_f)
        if c is None or beta == 0.0 or bias is not None:
            return [b.module(n.module_name, _linear(weight, bias), a)]
    return [b.call(runtime.gemm, a, w, c, alpha, beta, trans_a, trans_b)]


@register("MatMul")
def matmul(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    a, w = inputs[:2]
    if isinstance(w, torch.Tensor) and w.dim() == 2 and b.is_dynamic(a) and a is not None:
        return [b.module(n.module_name, _linear(w.t(), None), a)]
    return [b.call(torch.matmul, a, w)]


# ---------------------------------------------------------------- activations

def _unary_module(make: Callable[[NodeInfo], nn.Module]) -> Callable:
    def handler(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
        return [b.module(n.module_name, make(n), inputs[0])]
    return handler


register("Relu")(_unary_module(lambda n: nn.ReLU()))
register("Sigmoid")(_unary_module(lambda n: nn.Sigmoid()))
register("Tanh")(_unary_module(lambda n: nn.Tanh()))
register("HardSwish")(_unary_module(lambda n: nn.Hardswish()))
register("Mish")(_unary_module(lambda n: nn.Mish()))
register("Softplus")(_unary_module(lambda n: nn.Softplus()))
register("Softsign")(_unary_module(lambda n: nn.Softsign()))
register("LeakyRelu")(_unary_module(lambda n: nn.LeakyReLU(f32(n.attrs.get("alpha", 0.01)))))
register("Elu")(_unary_module(lambda n: nn.ELU(float(n.attrs.get("alpha", 1.0)))))
register("Celu")(_unary_module(lambda n: nn.CELU(float(n.attrs.get("alpha", 1.0)))))
register("Gelu")(_unary_module(lambda n: nn.GELU(approximate=n.attrs.get("approximate", "none"))))


@register("HardSigmoid")
def hardsigmoid(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    alpha, beta = f32(n.attrs.get("alpha", 0.2)), f32(n.attrs.get("beta", 0.5))
    torch_like = math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5)
    return [b.module(n.module_name, nn.Hardsigmoid() if torch_like else HardSigmoid(alpha, beta), inputs[0])]


@register("Selu")
def selu(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    alpha, gamma = float(n.attrs.get("alpha", 1.67326319217681884765625)), float(n.attrs.get("gamma", 1.05070102214813232421875))
    if math.isclose(alpha, 1.6732632423543772, rel_tol=1e-6) and math.isclose(gamma, 1.0507009873554805, rel_tol=1e-6):
        return [b.module(n.module_name, nn.SELU(), inputs[0])]
    x = inputs[0]
    return [b.call(torch.mul, b.call(F.elu, x, alpha), gamma)]


@register("PRelu")
def prelu(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x, slope = inputs[:2]
    rank = n.rank(0)
    if isinstance(slope, torch.Tensor):
        channelwise = rank is not None and slope.dim() == rank - 1 and all(s == 1 for s in slope.shape[1:])
        if slope.numel() == 1 or channelwise:
            mod = _build(nn.PReLU(slope.numel(), device="meta", dtype=slope.dtype), {"weight": slope.reshape(-1)})
            return [b.module(n.module_name, mod, x)]
    return [b.call(torch.where, b.call(torch.ge, x, 0), x, b.call(torch.mul, x, slope))]


@register("Clip")
def clip(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    x = inputs[0]
    lo = input_or_attr(inputs, 1, n.attrs, "min")
    hi = input_or_attr(inputs, 2, n.attrs, "max")
    if b.is_dynamic(lo, hi):
        return [b.call(runtime.clip, x, lo, hi)]
    lo, hi = scalar(lo), scalar(hi)
    lo = None if lo is not None and lo <= -3.0e38 else lo  # opset < 11 defaults are ±FLT_MAX
    hi = None if hi is not None and hi >= 3.0e38 else hi
    if lo is None and hi is None:
        return [x]
    if lo == 0 and hi == 6:
        mod: nn.Module = nn.ReLU6()
    elif lo == 0 and hi is None:
        mod = nn.ReLU()
    else:
        mod = nn.Hardtanh(float(lo) if lo is not None else -math.inf, float(hi) if hi is not None else math.inf)
    return [b.module(n.module_name, mod, x)]


@register("Softmax", "LogSoftmax")
def softmax(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    log = n.op_type == "LogSoftmax"
    x, rank = inputs[0], n.rank(0)
    if n.opset >= 13:
        axis = int(n.attrs.get("axis", -1))
    else:  # before 13: softmax over the input flattened to 2-D at `axis`
        axis = int(n.attrs.get("axis", 1))
        if not (axis == -1 or (rank is not None and axis % rank == rank - 1)):
            return [b.call(runtime.softmax_2d, x, axis, log)]
    return [b.module(n.module_name, nn.LogSoftmax(dim=axis) if log else nn.Softmax(dim=axis), x)]


@register("Flatten")
def flatten(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    axis = int(n.attrs.get("axis", 1))
    if axis == 1:
        return [b.module(n.module_name, nn.Flatten(1, -1), inputs[0])]
    return [b.call(runtime.flatten, inputs[0], axis)]


@register("Dropout", "Identity")
def identity(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    return [inputs[0]]


# ---------------------------------------------------------------- pools

def _pool_geometry(n: NodeInfo) -> tuple[list[int], list[int], list[int], bool]:
    kernel = list(n.attrs["kernel_shape"])
    k = len(kernel)
    return kernel, list(n.attrs.get("strides", [1] * k)), list(n.attrs.get("dilations", [1] * k)), bool(n.attrs.get("ceil_mode", 0))


@register("MaxPool")
def maxpool(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    if len(n.outputs) > 1 and n.outputs[1]:
        raise UserError(f"{n.label()} returns argmax indices; only the pooled values are supported")
    kernel, strides, dilations, ceil = _pool_geometry(n)
    x, padding = resolve_padding(b, n, inputs[0], kernel, strides, dilations, -math.inf, limit_half=True)
    cls = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[len(kernel)]
    return [b.module(n.module_name, cls(kernel, strides, padding, dilations, ceil_mode=ceil), x)]


@register("AveragePool")
def avgpool(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
    kernel, strides, dilations, ceil = _pool_geometry(n)
    if any(d != 1 for d in dilations):
        raise UserError(f"{n.label()} uses dilations; dilated AveragePool is not supported")
    k = len(kernel)
    include = bool(n.attrs.get("count_include_pad", 0))
    auto = n.attrs.get("auto_pad", "NOTSET")
    pads = list(n.attrs.get("pads", [0] * 2 * k)) if auto == "NOTSET" else [0] * 2 * k
    cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[k]
    x = inputs[0]
    if include or auto in ("NOTSET", "VALID") and (pads[:k] == pads[k:] and all(p <= kk // 2 for p, kk in zip(pads[:k], kernel))):
        x, padding = resolve_padding(b, n, x, kernel, strides, dilations, 0.0, limit_half=True)
        return [b.module(n.module_name, cls(kernel, strides, padding, ceil_mode=ceil, count_include_pad=include), x)]
    if auto != "NOTSET":
        if any(s != 1 for s in strides):
            raise UserError(f"{n.label()} combines auto_pad={auto}, stride > 1 and count_include_pad=0; not supported")
        totals = [kk - 1 for kk in kernel]
        small, big = [t // 2 for t in totals], [t - t // 2 for t in totals]
        pads = small + big if auto == "SAME_UPPER" else big + small
    return [b.module(n.module_name, PaddedAvgPool(kernel, strides, torch_pads(pads[:k], pads[k:]), ceil), x)]


def _global_pool(avg: bool) -> Callable:
    def handler(b: GraphBuilder, n: NodeInfo, inputs: list[Any]) -> list[Any]:
        rank = n.rank(0, 4)
        if avg:
            cls = {3: nn.AdaptiveAvgPool1d, 5: nn.AdaptiveAvgPool3d}.get(rank, nn.AdaptiveAvgPool2d)
        else:
            cls = {3: nn.AdaptiveMaxPool1d, 5: nn.AdaptiveMaxPool3d}.get(rank, nn.AdaptiveMaxPool2d)
        return [b.module(n.module_name, cls(1), inputs[0])]
    return handler


register("GlobalAveragePool")(_global_pool(True))
register("GlobalMaxPool")(_global_pool(False))
