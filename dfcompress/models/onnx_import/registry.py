"""The op-handler table: ONNX op type → function that emits the equivalent torch code.

A handler receives the builder, a :class:`NodeInfo` and the node's input values (``None`` for
omitted optional inputs) and returns one value per ONNX output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .builder import GraphBuilder, sanitize

Handler = Callable[[GraphBuilder, "NodeInfo", list[Any]], list[Any]]

HANDLERS: dict[str, Handler] = {}


@dataclass
class NodeInfo:
    """What a handler needs to know about one ONNX node besides its input values."""

    op_type: str
    name: str
    index: int
    attrs: dict[str, Any]
    opset: int
    outputs: list[str]
    input_shapes: list[list[int | None] | None] = field(default_factory=list)
    scope: str = ""  # the torch module path the dynamo exporter recorded for the node ('' when none)

    @property
    def module_name(self) -> str:
        """Submodule name: ``<module path>_<OpType>`` where the exporter recorded the module path (dynamo:
        ``blocks.0.norm1`` → ``blocks_0_norm1_LayerNormalization``, as the TorchScript exporter's node names
        give), else the sanitised ONNX node name, else ``<OpType>_<index>``."""
        if self.scope:
            return sanitize(f"{self.scope}/{self.op_type}")
        return sanitize(self.name) or f"{self.op_type}_{self.index}"

    def shape(self, i: int = 0) -> list[int | None] | None:
        """Inferred shape of input ``i`` (None entries are symbolic dims); None when unknown."""
        return self.input_shapes[i] if i < len(self.input_shapes) else None

    def rank(self, i: int = 0, default: int | None = None) -> int | None:
        s = self.shape(i)
        return len(s) if s is not None else default

    def label(self) -> str:
        return f"ONNX node '{self.name or self.index}' ({self.op_type})"


def register(*op_types: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in op_types:
            HANDLERS[op] = fn
        return fn
    return deco
