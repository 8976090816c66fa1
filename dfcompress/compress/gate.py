"""The ``--max-drop`` quality gate: the job ran, but its result may be worse than the user allows.

Kept separate from the stages so the CLI can write the report (the result is still useful to look at)
before it turns a failed gate into exit code 3.
"""
from __future__ import annotations

import math
from typing import Optional

from ..errors import GateFailed, UserError
from .stage import Figures, quality_drop


def check_drop(before: float, after: float, max_drop: float | None, what: str = "accuracy") -> None:
    """Raise GateFailed when ``before - after`` exceeds ``max_drop`` (all in percentage points).

    ``max_drop=None`` disables the gate. A NaN metric always fails: nobody asked for an unmeasurable model.
    """
    if max_drop is None:
        return
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or math.isnan(max_drop) or max_drop < 0:
        raise UserError(f"--max-drop must be a non-negative number of percentage points, got {max_drop!r}")
    if math.isnan(before) or math.isnan(after):
        raise GateFailed(f"{what} could not be measured ({before} → {after}); --max-drop {max_drop:g} cannot be checked")
    drop = before - after
    # a tiny epsilon so that 91.0 -> 89.0 passes --max-drop 2 despite float rounding
    if drop > max_drop + 1e-9:
        raise GateFailed(f"{what} fell {drop:.1f} pt ({before:.1f} → {after:.1f}), more than --max-drop {max_drop:.1f}")


def check_max_drop(max_drop: Optional[float]) -> None:
    """Refuse a meaningless gate before any work starts (the gate itself runs only at the end)."""
    if max_drop is not None and (math.isnan(max_drop) or max_drop < 0):
        raise UserError(f"--max-drop must be a non-negative number of percentage points (e.g. --max-drop 2), got {max_drop}")


def gate(max_drop: Optional[float], before: Figures, after: Figures) -> None:
    """The ``--max-drop`` gate on a stage's figures: real top-1 when measured, else teacher agreement."""
    if max_drop is None:
        return
    drop = quality_drop(before, after)
    if drop is None:
        raise UserError("--max-drop needs an accuracy or agreement figure, and none was measured")
    what, b, a = drop
    check_drop(b, a, max_drop, what)
