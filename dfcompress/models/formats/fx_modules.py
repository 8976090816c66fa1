"""Turn functional aten calls in an exported graph back into real ``nn`` submodules.

``torch.export`` programs compute ``aten.conv2d(x, w, b)`` / ``aten.batch_norm(...)`` as functions, so
there is no ``nn.BatchNorm2d`` to hook and no running statistics for DeepInversion to find. We rewrite
those calls into ``call_module`` nodes on real modules that *share* the original parameter tensors
(the numbers are untouched, so the result is bit-identical), placed at the original module paths
recorded in ``nn_module_stack`` (``layer1.0.bn1``) so that names stay meaningful.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn

aten = torch.ops.aten


def _bind(node: fx.Node) -> dict[str, Any]:
    """Arguments of an aten call by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _fetch(root: nn.Module, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError("not a stored tensor")
    obj: Any = root
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise LookupError("not a tensor")
    return obj


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _conv(root: nn.Module, a: dict[str, Any]) -> nn.Module | None:
    w, b = _fetch(root, a["weight"]), _fetch(root, a.get("bias"))
    if w is None or w.dim() != 4 or a.get("transposed", False):
        return None
    groups = int(a.get("groups", 1))
    padding = a.get("padding", 0)
    m = nn.Conv2d(int(w.shape[1]) * groups, int(w.shape[0]), tuple(w.shape[2:]), stride=tuple(a.get("stride", 1)),
                  padding=padding if isinstance(padding, str) else tuple(padding), dilation=tuple(a.get("dilation", 1)),
                  groups=groups, bias=b is not None)
    m.weight = _param(w)
    if b is not None:
        m.bias = _param(b)
    return m


def _batchnorm(root: nn.Module, a: dict[str, Any], dims: int) -> nn.Module | None:
    if a.get("training", False):
        return None
    mean, var = _fetch(root, a["running_mean"]), _fetch(root, a["running_var"])
    w, b = _fetch(root, a.get("weight")), _fetch(root, a.get("bias"))
    if mean is None or var is None:
        return None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(dims)
    if cls is None:
        return None
    m = cls(int(mean.shape[0]), eps=float(a["eps"]), momentum=float(a["momentum"]), affine=w is not None)
    if w is not None:
        m.weight = _param(w)
        m.bias = _param(b) if b is not None else nn.Parameter(torch.zeros_like(w), requires_grad=False)
    m.running_mean, m.running_var = mean, var
    return m.eval()


def _linear(root: nn.Module, a: dict[str, Any]) -> nn.Module | None:
    w, b = _fetch(root, a["weight"]), _fetch(root, a.get("bias"))
    if w is None or w.dim() != 2:
        return None
    m = nn.Linear(int(w.shape[1]), int(w.shape[0]), bias=b is not None)
    m.weight = _param(w)
    if b is not None:
        m.bias = _param(b)
    return m


def _hardtanh(a: dict[str, Any]) -> nn.Module:
    lo, hi = float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0))
    return nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi)


_ACTIVATIONS: dict[Any, Callable[[dict[str, Any]], nn.Module]] = {
    aten.relu.default: lambda a: nn.ReLU(),
    aten.relu_.default: lambda a: nn.ReLU(),
    aten.hardtanh.default: _hardtanh,
    aten.hardtanh_.default: _hardtanh,
    aten.silu.default: lambda a: nn.SiLU(),
    aten.silu_.default: lambda a: nn.SiLU(),
    aten.gelu.default: lambda a: nn.GELU(approximate=str(a.get("approximate", "none"))),
    aten.sigmoid.default: lambda a: nn.Sigmoid(),
    aten.tanh.default: lambda a: nn.Tanh(),
    aten.hardswish.default: lambda a: nn.Hardswish(),
    aten.hardswish_.default: lambda a: nn.Hardswish(),
    aten.hardsigmoid.default: lambda a: nn.Hardsigmoid(),
    aten.leaky_relu.default: lambda a: nn.LeakyReLU(float(a.get("negative_slope", 0.01))),
}
_CONVS = {aten.conv2d.default, aten.convolution.default, getattr(aten.conv2d, "padding", None)}
_BNS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def _input_dims(node: fx.Node) -> int:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else 4


def _build(root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_function":
        return None
    try:
        if node.target in _CONVS:
            return _conv(root, _bind(node))
        if node.target in _BNS:
            return _batchnorm(root, _bind(node), _input_dims(node))
        if node.target is aten.linear.default:
            return _linear(root, _bind(node))
        if node.target in _ACTIVATIONS:
            return _ACTIVATIONS[node.target](_bind(node))
    except LookupError:
        return None
    return None


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = getattr(parent, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if parts[-1] in parent._modules:
        parent._modules[parts[-1]] = module
    else:
        parent.add_module(parts[-1], module)


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Would calling ``a`` compute exactly what ``b`` does (same type, settings and tensors)?"""
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    ta, tb = dict(a.named_parameters()) | dict(a.named_buffers()), dict(b.named_parameters()) | dict(b.named_buffers())
    return ta.keys() == tb.keys() and all(ta[k] is tb[k] for k in ta)


def _placeholder_owner(existing: nn.Module, new: nn.Module) -> bool:
    """An unlifted stand-in (plain nn.Module holding only tensors the new module also has)."""
    names = {n for n, _ in existing.named_parameters(recurse=False)} | {n for n, _ in existing.named_buffers(recurse=False)}
    new_names = {n for n, _ in new.named_parameters()} | {n for n, _ in new.named_buffers()}
    return type(existing) is nn.Module and not existing._modules and names <= new_names


def _place(root: nn.Module, node: fx.Node, new: nn.Module, taken: set[str]) -> str:
    """Module path for ``new``: its recorded source path when that fits, else a fresh sibling name."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    inner_path, inner_type = (str(stack[-1][0]), str(stack[-1][1])) if stack else ("", "")
    owner_path = ""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, fx.Node) and w.op == "get_attr" and "." in str(w.target):
        owner_path = str(w.target).rsplit(".", 1)[0]
    candidates = []
    if inner_path and inner_type.rsplit(".", 1)[-1].strip("'>") == type(new).__name__:
        candidates.append(inner_path)
    if owner_path:
        candidates.append(owner_path)
    for path in candidates:
        existing = _get(root, path)
        if existing is None or (path not in taken and _placeholder_owner(existing, new)):
            return path
        if path in taken and _same(existing, new):
            return path
    base = f"{inner_path}." if inner_path and _get(root, inner_path) is not None else ""
    stem = type(new).__name__.lower()
    i = 0
    while _get(root, f"{base}{stem}_{i}") is not None:
        i += 1
    return f"{base}{stem}_{i}"


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule computing the same function with Conv/BN/Linear/activation calls as submodules."""
    graph = gm.graph
    taken: set[str] = set()
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)  # shape guards pin the example batch size; the parity check replaces them
            continue
        new = _build(gm, node)
        if new is None:
            continue
        users = list(node.users)
        if node.target is aten._native_batch_norm_legit_no_training.default:
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
                continue
        path = _place(gm, node, new, taken)
        if path not in taken:
            _install(gm, path, new)
            taken.add(path)
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        if node.target is aten._native_batch_norm_legit_no_training.default:
            for u in users:
                u.replace_all_uses_with(call)
                graph.erase_node(u)
        else:
            node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    out = fx.GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


def _size_arguments(node: fx.Node) -> list[tuple[int | str, list]]:
    """(position or keyword, value) of the size-list arguments (``size``/``shape``) of an aten call."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.name not in ("size", "shape") or not ("[]" in str(arg.type) or str(arg.type).startswith("List[")):
            continue
        where: int | str = i if i < len(node.args) else arg.name
        value = node.args[i] if isinstance(where, int) else node.kwargs.get(arg.name)
        if isinstance(value, (list, tuple)) and value:
            out.append((where, list(value)))
    return out


def free_batch(gm: fx.GraphModule, batch: int) -> int:
    """Let a program exported at a fixed batch size run at any batch size; returns the arguments rewritten.

    ``torch.export.export(model, (x,))`` bakes ``x.size(0)`` into size arguments (``view(x, [B, -1])``,
    ``expand(t, [B, ...])``). Every size list whose first entry is ``B`` on a node whose output has ``B``
    rows now reads the input's batch size at run time instead. At ``B == 1`` only nodes computed from the
    input qualify (a parameter reshaped to ``[1, C, 1, 1]`` is not a batch). Chunking the batch instead
    would be exact for logits but not for forward hooks: batch statistics of chunks are not those of the
    batch. The caller checks the result against the original program run in chunks.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return 0
    data = placeholders[0]
    from_input: set[fx.Node] = {data}
    size_node: fx.Node | None = None
    changed = 0
    for node in list(graph.nodes):
        if node.op == "placeholder" or node is size_node:
            continue
        if any(a in from_input for a in node.all_input_nodes):
            from_input.add(node)
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[0] == batch):
            continue
        if batch == 1 and node not in from_input:
            continue
        for where, value in _size_arguments(node):
            if value[0] != batch or isinstance(value[0], fx.Node):
                continue
            if size_node is None:
                with graph.inserting_after(data):
                    size_node = graph.call_function(aten.sym_size.int, (data, 0))
            value[0] = size_node
            if isinstance(where, int):
                args = list(node.args)
                args[where] = value
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, where: value}
            changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed
