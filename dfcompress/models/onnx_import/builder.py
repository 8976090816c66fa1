"""Incremental torch.fx graph construction with constant folding.

A value during conversion is either a ``torch.Tensor`` (known at conversion time: initializers,
Constant outputs and everything computed only from them) or an ``fx.Node`` (depends on a graph
input). Calls whose arguments are all known are evaluated right away, so exporter noise such as the
Constant→ConstantOfShape→Concat→Reshape→Slice→Transpose→Cast chain that computes option-A Pad
amounts collapses into one literal, and weights reached through Identity/Cast stay constants that
Conv/Gemm handlers can turn into real parameters.
"""
from __future__ import annotations

import keyword
import math
import re
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

Value = Any  # torch.Tensor | fx.Node | python scalar/list

_RESERVED = set(dir(fx.GraphModule)) | set(vars(nn.Module())) | {"self", "graph", "code", "meta", "training"}


class OnnxTracer(fx.Tracer):
    """Tracer that keeps the run-time helpers as leaf calls.

    ``torch.save``/``pickle`` of a GraphModule stores only its generated code and re-traces it on
    load; the helpers branch on python values, so they must stay opaque calls rather than be traced.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from . import runtime
        super().__init__(autowrap_modules=(math, runtime))


def sanitize(name: str) -> str:
    """``/layer1/layer1.0/conv1/Conv`` → ``layer1_layer1_0_conv1_Conv``; '' when nothing usable is left."""
    out = re.sub(r"_+", "_", re.sub(r"\W", "_", name)).strip("_")
    if out and out[0].isdigit():
        out = "n" + out
    return out


class GraphBuilder:
    """Owns the root module (submodules, constant buffers) and the fx graph being built."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.ref: fx.Node | None = None  # first graph input: device reference for tensors made at run time
        self._names: set[str] = set()
        self._const_nodes: dict[int, fx.Node] = {}
        self._const_count = 0

    # ------------------------------------------------------------------ naming
    def unique(self, wanted: str) -> str:
        base = wanted if wanted and not keyword.iskeyword(wanted) and wanted not in _RESERVED else f"{wanted or 'op'}_"
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ values
    @staticmethod
    def is_dynamic(*values: Value) -> bool:
        leaves, _ = tree_flatten(list(values))
        return any(isinstance(v, fx.Node) for v in leaves)

    def materialize(self, value: Value) -> Value:
        """Constant tensors become (non-persistent) buffers read with get_attr; everything else passes."""
        if not isinstance(value, torch.Tensor):
            return value
        node = self._const_nodes.get(id(value))
        if node is None:
            name = self.unique(f"const_{self._const_count}")
            self._const_count += 1
            self.root.register_buffer(name, value, persistent=False)
            node = self.graph.get_attr(name)
            self._const_nodes[id(value)] = node
        return node

    def placeholder(self, onnx_name: str) -> fx.Node:
        node = self.graph.placeholder(self.unique(sanitize(onnx_name) or "input"))
        if self.ref is None:
            self.ref = node
        return node

    def call(self, fn: Callable, *args: Value, **kwargs: Value) -> Value:
        """Emit ``fn(*args, **kwargs)``, or evaluate it now when no argument depends on a graph input."""
        if not self.is_dynamic(args, kwargs):
            with torch.no_grad():
                return _as_const(fn(*args, **kwargs))
        args, kwargs = tree_map(self.materialize, (args, kwargs))
        return self.graph.call_function(fn, tuple(args), dict(kwargs))

    def call_multi(self, fn: Callable, n: int, *args: Value, **kwargs: Value) -> list[Value]:
        """Like :meth:`call` for functions returning a tuple; one value per output."""
        result = self.call(fn, *args, **kwargs)
        if isinstance(result, fx.Node):
            import operator
            return [self.graph.call_function(operator.getitem, (result, i)) for i in range(n)]
        return list(result)[:n]

    def module(self, wanted_name: str, mod: nn.Module, *args: Value) -> Value:
        """Add ``mod`` as a named submodule and call it (folded when its inputs are all constant)."""
        if not self.is_dynamic(args):
            with torch.no_grad():
                return _as_const(mod.eval()(*args))
        name = self.unique(wanted_name)
        self.root.add_module(name, mod)
        return self.graph.call_module(name, tuple(self.materialize(a) for a in args))

    def output(self, values: list[Value]) -> None:
        vals = [self.materialize(v) for v in values]
        self.graph.output(vals[0] if len(vals) == 1 else tuple(vals))

    def build(self, class_name: str = "OnnxGraphModule") -> fx.GraphModule:
        self.graph._tracer_cls = OnnxTracer
        gm = fx.GraphModule(self.root, self.graph, class_name=class_name)
        gm.graph.eliminate_dead_code()  # e.g. shape branches made redundant by constant folding
        gm.delete_all_unused_submodules()
        gm.recompile()
        gm.eval()
        return gm


def _as_const(result: Any) -> Any:
    """Folded results are stored as tensors (python shape values from the shape helpers included)."""
    if isinstance(result, torch.Tensor):
        return result.detach()
    if isinstance(result, tuple):
        return tuple(_as_const(r) for r in result)
    if isinstance(result, bool):
        return torch.tensor(result)
    if isinstance(result, int):
        return torch.tensor(result, dtype=torch.int64)
    if isinstance(result, float):
        return torch.tensor(result, dtype=torch.float32)
    if isinstance(result, list):
        return torch.tensor(result, dtype=torch.float32 if any(isinstance(r, float) for r in result) else torch.int64)
    return result
