"""ONNX graph walk: check every op is supported, then emit one fx node (or constant) per ONNX node."""
from __future__ import annotations

import os
from typing import Any

import onnx
from torch import fx

from ...errors import UserError
from . import runtime
from .attrs import parse_attrs, tensor_from_proto
from .builder import GraphBuilder
from .loader import default_opset, load_model, value_ranks
from .ops_tensor import maybe_py
from .registry import HANDLERS, NodeInfo

_DEFAULT_DOMAINS = ("", "ai.onnx")


def supported_ops() -> list[str]:
    return sorted(HANDLERS)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def check_supported(graph: onnx.GraphProto) -> None:
    """Raise one UserError naming every unsupported op type (with its first node) before building anything."""
    first: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        key = _op_key(node)
        if (node.domain not in _DEFAULT_DOMAINS or node.op_type not in HANDLERS) and key not in first:
            first[key] = node.name or f"#{i}"
    if not first:
        return
    listed = ", ".join(f"'{op}' (node '{name}')" for op, name in first.items())
    verb = "is" if len(first) == 1 else "are"
    noun = "op" if len(first) == 1 else "ops"
    raise UserError(f"ONNX {noun} {listed} {verb} not supported by the dfcompress converter; "
                    f"supported ops: {', '.join(supported_ops())}")


def _lookup(env: dict[str, Any], name: str, node: onnx.NodeProto) -> Any:
    try:
        return env[name]
    except KeyError:
        raise UserError(f"ONNX node '{node.name}' ({node.op_type}) uses value '{name}' that no earlier node, initializer "
                        "or graph input defines; the file is truncated, corrupt or not topologically sorted") from None


def onnx_to_torch(model: onnx.ModelProto | str | os.PathLike) -> fx.GraphModule:
    """Convert an ONNX classifier into an eval-mode ``torch.fx.GraphModule`` with real layer submodules.

    Submodules are named after the ONNX nodes (``/layer1/layer1.0/conv1/Conv`` →
    ``layer1_layer1_0_conv1_Conv``); the batch dimension stays dynamic; constants are folded.
    """
    proto, label = load_model(model)
    graph = proto.graph
    check_supported(graph)
    if graph.sparse_initializer:
        raise UserError(f"{label} uses sparse initializers; not supported by the dfcompress converter")
    opset = default_opset(proto)
    ranks = value_ranks(proto)
    b = GraphBuilder()
    env: dict[str, Any] = {init.name: tensor_from_proto(init) for init in graph.initializer}
    for inp in graph.input:  # older exporters also list initializers as inputs: those stay constants
        if inp.name not in env:
            env[inp.name] = b.placeholder(inp.name)
    for index, node in enumerate(graph.node):
        inputs = [_lookup(env, name, node) if name else None for name in node.input]
        info = NodeInfo(node.op_type, node.name, index, parse_attrs(node), opset, list(node.output),
                        [ranks.get(name) for name in node.input])
        try:
            outputs = HANDLERS[node.op_type](b, info, inputs)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"could not convert {info.label()} of {label}: {exc}") from exc
        for name, value in zip(node.output, outputs):
            if name:
                env[name] = value
    results = []
    for out in graph.output:
        value = _lookup(env, out.name, graph.node[-1])
        results.append(b.call(runtime.to_output, value) if maybe_py(value) else value)
    b.output(results)
    return b.build()
