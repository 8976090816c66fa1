"""The ``--max-drop`` quality gate: the job ran, but its result may be worse than the user allows.

Kept separate from the stages so the CLI can write the report (the result is still useful to look at)
before it turns a failed gate into exit code 3.
"""
from __future__ import annotations

import math

from ..errors import GateFailed, UserError


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
