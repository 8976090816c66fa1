"""No module imports from a layer above it (module-level and function-level imports alike).

Layers, low to high, as the package is laid out; a module may import its own layer and any below.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dfcompress"
LAYERS = [
    {"errors", "fileio", "progress", "device", "settings", "seeds", "distillation", "__init__"},
    {"models"}, {"stats"}, {"data"}, {"inversion"},  # the runner writes its shards through data/synthetic.py
    {"export", "evaluate", "distributed"},  # compress trains with DDP, checks exports and evaluates students
    {"compress"}, {"report"}, {"pipeline", "demo", "api", "_callable"}, {"cli_common", "cli", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
KNOWN = [  # existing exceptions, each a lazy import at the end of the module (export/evaluate become callable)
    ("export", "_callable"), ("evaluate", "_callable"),
]


def top(module: Path) -> str:
    return module.relative_to(PKG).parts[0].removesuffix(".py")


def imported(tree: ast.AST, module: Path) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("dfcompress."):
                out.add(node.module.split(".")[1])
            elif node.level > 0:
                depth = len(module.relative_to(PKG).parts) - node.level  # parts left above the package root
                parts = list(module.relative_to(PKG).parts[:depth]) + (node.module.split(".") if node.module else [])
                if parts:
                    out.add(parts[0].removesuffix(".py"))
                else:
                    out.update(a.name for a in node.names)
    return out


def test_no_module_imports_from_a_layer_above():
    bad = []
    for path in PKG.rglob("*.py"):
        me = top(path)
        for other in imported(ast.parse(path.read_text()), path):
            if other in LEVEL and LEVEL[other] > LEVEL[me] and (me, other) not in KNOWN:
                bad.append(f"{path.relative_to(PKG)} imports {other}")
    assert not bad, "\n".join(sorted(bad))
