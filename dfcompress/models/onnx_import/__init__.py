"""ONNX → PyTorch converter producing tappable, differentiable ``torch.fx.GraphModule``s.

Data-free inversion backpropagates to the input through the teacher and hooks its layers, so
weighted ops become real ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` submodules and activations
and pools become modules too; stateless ops become call_function nodes.
"""
from __future__ import annotations

from . import ops_nn, ops_tensor  # noqa: F401  (register the op handlers)
from .converter import check_supported, onnx_to_torch, supported_ops
from .registry import HANDLERS

SUPPORTED_OPS: list[str] = sorted(HANDLERS)

__all__ = ["SUPPORTED_OPS", "check_supported", "onnx_to_torch", "supported_ops"]
