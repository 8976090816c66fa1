"""Inversion methods behind one interface; ``build_synthesizer`` picks one by name."""
from __future__ import annotations

from .base import BatchResult, Synthesizer


def build_synthesizer(teacher, settings, runtime, stats=None) -> Synthesizer:
    """``settings`` is a SynthesizeSettings; ``stats`` a FeatureStats (class-conditional) or None."""
    method = settings.method
    if method == "naturalinversion":
        from .naturalinversion import NaturalInversion as cls
    elif method == "fast-ni":
        from .fast_ni import FastNaturalInversion as cls
    elif method in ("deepinversion", "adi"):
        from .deepinversion import DeepInversion as cls
    elif method == "cmi":
        from .cmi import ContrastiveModelInversion as cls
    else:  # settings validation lists the choices; this is a programming error
        raise ValueError(f"unknown synthesis method {method!r}")
    return cls(teacher, settings, runtime, stats)


__all__ = ["BatchResult", "Synthesizer", "build_synthesizer"]
