"""ONNX graph walk: check every op is supported, then emit one fx node (or constant) per ONNX node."""
from __future__ import annotations

import ast
import os
from typing import Any

import onnx
from torch import fx

from ...errors import UserError, first_line
from . import runtime
from .attrs import parse_attrs, tensor_from_proto
from .builder import GraphBuilder
from .loader import default_opset, load_model, value_shapes
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


def _lookup(env: dict[str, Any], name: str, node: onnx.NodeProto, skipped: dict[str, str] | None = None) -> Any:
    try:
        return env[name]
    except KeyError:
        if skipped and name in skipped:
            raise UserError(f"ONNX node '{node.name}' ({node.op_type}) uses output '{name}' of {skipped[name]}, which the "
                            "dfcompress converter does not produce (training-only or index output)") from None
        raise UserError(f"ONNX node '{node.name}' ({node.op_type}) uses value '{name}' that no earlier node, initializer "
                        "or graph input defines; the file is truncated, corrupt or not topologically sorted") from None


def module_scope(node: onnx.NodeProto) -> str:
    """The torch module path of a dynamo-exported node, from its ``pkg.torch.onnx.name_scopes`` metadata.

    The value lists the module path prefixes then the fx node name (``['', 'blocks.0', 'blocks.0.norm1',
    'layer_norm']``); without it (other exporters, version-converted files) the node name is used.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    return ""


def onnx_to_torch(model: onnx.ModelProto | str | os.PathLike) -> fx.GraphModule:
    """Convert an ONNX classifier into an eval-mode ``torch.fx.GraphModule`` with real layer submodules.

    Submodules are named after the ONNX nodes (``/layer1/layer1.0/conv1/Conv`` →
    ``layer1_layer1_0_conv1_Conv``); the batch dimension stays dynamic; constants are folded.
    ``gm.meta["onnx"]`` records the opset, producer and graph input/output names and shapes.
    """
    proto, label = load_model(model)
    graph = proto.graph
    check_supported(graph)
    if graph.sparse_initializer:
        raise UserError(f"{label} uses sparse initializers; not supported by the dfcompress converter")
    opset = default_opset(proto)
    shapes = value_shapes(proto)
    b = GraphBuilder()
    env: dict[str, Any] = {init.name: tensor_from_proto(init) for init in graph.initializer}
    initialized = set(env)
    skipped: dict[str, str] = {}  # optional outputs a handler does not produce (Dropout mask, BN training stats)
    for inp in graph.input:  # older exporters also list initializers as inputs: those stay constants
        if inp.name not in env:
            env[inp.name] = b.placeholder(inp.name)
    for index, node in enumerate(graph.node):
        inputs = [_lookup(env, name, node, skipped) if name else None for name in node.input]
        info = NodeInfo(node.op_type, node.name, index, parse_attrs(node), opset, list(node.output),
                        [shapes.get(name) for name in node.input], module_scope(node))
        try:
            outputs = HANDLERS[node.op_type](b, info, inputs)
        except UserError:
            raise
        except Exception as exc:
            detail = first_line(exc, 300)
            raise UserError(f"could not convert {info.label()} of {label}: {detail}") from exc
        for i, name in enumerate(node.output):
            if name and i < len(outputs):
                env[name] = outputs[i]
            elif name:
                skipped[name] = info.label()
    results = []
    for out in graph.output:
        value = _lookup(env, out.name, graph.node[-1], skipped)
        results.append(b.call(runtime.to_output, value) if maybe_py(value) else value)
    b.output(results)
    gm = b.build()
    gm.meta["onnx"] = {  # for callers that infer input shape / class count from the file
        "opset": opset,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": shapes.get(i.name)} for i in graph.input if i.name not in initialized],
        "outputs": [{"name": o.name, "shape": shapes.get(o.name)} for o in graph.output],
    }
    return gm
