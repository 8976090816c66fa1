"""dfcompress: data-free compression of image classifiers.

Pipeline (one subpackage per stage): models (load) -> stats -> inversion (synthesize) -> data -> compress
(distill | prune | quantize) -> export -> evaluate/report -> pipeline (the orchestrator) -> cli. The CLI
only parses flags and calls the same functions this package exports, so a notebook and a CI job run
the same code::

    import dfcompress
    teacher = dfcompress.load_teacher()          # the embedded digits teacher
    synth = dfcompress.synthesize(teacher, "synth")
    result = dfcompress.distill(teacher, synth, "student")
    print(result.before, result.after)

The functions live in ``dfcompress.api`` and load lazily, so ``import dfcompress`` stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["load_teacher", "collect_stats", "recover_stats", "synthesize", "SyntheticSet", "distill", "prune",
           "quantize", "export", "evaluate", "make_settings", "UserError", "GateFailed", "StageResult"]

_HOMES = {"SyntheticSet": "dfcompress.data.synthetic", "UserError": "dfcompress.errors", "GateFailed": "dfcompress.errors",
          "StageResult": "dfcompress.compress.stage"}


def __getattr__(name: str) -> Any:
    """Lazy public API (PEP 562): torch loads on first use, not on ``import dfcompress``."""
    if name not in __all__:
        raise AttributeError(f"module 'dfcompress' has no attribute {name!r}")
    import importlib

    if name in ("export", "evaluate"):  # also submodules: the module itself forwards calls (_callable.py)
        return importlib.import_module(f"dfcompress.{name}")
    return getattr(importlib.import_module(_HOMES.get(name, "dfcompress.api")), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
