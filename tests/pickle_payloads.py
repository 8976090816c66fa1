"""Malicious pickle payloads shared by the pickle-safety tests: each really runs when unpickled
(the control tests prove it), so a test that finds no marker file shows the loader refused them."""
from __future__ import annotations

import os
from pathlib import Path


class Touch:
    """Unpickling runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecWrite:
    """Unpickling runs builtins.exec, which writes MARKER (no shell)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))
