"""Classifier outputs as dfcompress needs them: logits ``[N, K]``.

Many published classifiers end in ``Softmax`` (model-zoo ONNX files especially): cross-entropy and KD
temperatures on probabilities are silently wrong, so a final Softmax is dropped and the logits before it
used. Others return ``[N, K, 1, 1]`` (a 1x1-conv head without flatten); those trailing 1x1 dimensions
are squeezed. Both rewrites are checked numerically on a probe batch before they are kept.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...progress import log

aten = torch.ops.aten
_SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.Tensor.softmax, aten._softmax.default, aten.softmax.int}
_SHAPE_WORDS = ("flatten", "view", "reshape", "squeeze")


def logits_like(out: object) -> bool:
    """[N, K], or [N, K, 1, 1] (squeezed later)."""
    return isinstance(out, torch.Tensor) and (out.dim() == 2 or (out.dim() == 4 and tuple(out.shape[2:]) == (1, 1)))


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Softmax)
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _SOFTMAX_FUNCS or (name == "softmax_2d" and not (node.args[2:3] or [False])[0])
    return False


def _is_shape_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Flatten)
    name = str(getattr(node.target, "__name__", node.target)).lower()
    return node.op in ("call_function", "call_method") and any(w in name for w in _SHAPE_WORDS)


def _output_value(gm: fx.GraphModule) -> fx.Node | None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value: Any = out.args[0]
    while isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, fx.Node) else None


def _final_softmax(gm: fx.GraphModule) -> fx.Node | None:
    """A softmax node whose result reaches the output only through flatten/reshape-like nodes."""
    node = _output_value(gm)
    while node is not None:
        if _is_softmax(gm, node):
            return node if len(node.users) == 1 and isinstance(node.args[0], fx.Node) else None
        if not _is_shape_op(gm, node) or len(node.users) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _same_after_softmax(before: torch.Tensor, after: torch.Tensor) -> bool:
    return before.shape == after.shape and bool(torch.allclose(torch.softmax(after.flatten(1), 1), before.flatten(1), atol=1e-5))


def _drop_softmax_graph(gm: fx.GraphModule, x: torch.Tensor, before: torch.Tensor) -> bool:
    sm = _final_softmax(gm)
    if sm is None:
        return False
    src, (user,) = sm.args[0], list(sm.users)
    user.replace_input_with(sm, src)
    gm.recompile()
    with torch.no_grad():
        ok = _same_after_softmax(before, gm(x))
    if ok:
        gm.graph.erase_node(sm)
    else:
        user.replace_input_with(src, sm)
    gm.recompile()
    return ok


def _drop_softmax_module(module: nn.Module, x: torch.Tensor, before: torch.Tensor) -> bool:
    """The last leaf module to run, when it is an nn.Softmax producing the output itself, becomes Identity."""
    calls: list[tuple[str, torch.Tensor]] = []
    names = {m: n for n, m in module.named_modules()}
    handles = [m.register_forward_hook(lambda m, i, o: calls.append((names[m], o)))
               for m in module.modules() if not list(m.children()) and m is not module]
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    if not calls or calls[-1][1] is not out or not isinstance(module.get_submodule(calls[-1][0]), nn.Softmax):
        return False
    name = calls[-1][0]
    softmax = module.get_submodule(name)
    module.set_submodule(name, nn.Identity())
    with torch.no_grad():
        if _same_after_softmax(before, module(x)):
            return True
    module.set_submodule(name, softmax)
    return False


def _squeeze(module: nn.Module) -> None:
    if isinstance(module, fx.GraphModule):
        value = _output_value(module)
        out = next(n for n in reversed(module.graph.nodes) if n.op == "output")
        if value is not None:
            with module.graph.inserting_before(out):
                flat = module.graph.call_function(torch.flatten, (value, 1))
            out.replace_input_with(value, flat)
            module.recompile()
            return
    module.register_forward_hook(lambda _m, _i, o: o.flatten(1))


def to_logits(module: nn.Module, shape: tuple[int, int, int], label: str) -> list[str]:
    """Make ``module`` return logits [N, K] in place; returns what was changed, for ``inspect``."""
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = module(x)
    if not isinstance(before, torch.Tensor):
        return []
    notes = []
    drop = _drop_softmax_graph if isinstance(module, fx.GraphModule) else _drop_softmax_module
    if drop(module, x, before):  # type: ignore[arg-type]
        notes.append("ends in Softmax: dropped it, working on the logits before it")
    if before.dim() == 4 and tuple(before.shape[2:]) == (1, 1):
        _squeeze(module)
        notes.append(f"returns [N, {before.shape[1]}, 1, 1]: squeezed to [N, {before.shape[1]}]")
    for note in notes:
        log(f"{label} {note}")
    return notes
