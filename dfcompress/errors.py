"""Exceptions that map to the CLI's exit codes.

Library code raises these instead of printing, so the same checks serve the Python API and the CLI:
the CLI turns them into one line on stderr and the documented exit code, never a traceback.
"""
from __future__ import annotations


class DFCompressError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(DFCompressError):
    """Bad input the user can fix (missing file, wrong flag, bad YAML). Exit code 2.

    The message must be one line that names the problem and what to do about it.
    """

    exit_code = 2


class GateFailed(DFCompressError):
    """A ``--max-drop`` quality gate failed: the job ran, the result is worse than allowed. Exit code 3."""

    exit_code = 3


class NumericalError(DFCompressError):
    """A computation produced NaN/inf and could not be recovered by retrying."""

    exit_code = 1


def first_line(exc: BaseException, limit: int | None = 160) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit`` characters:
    library tracebacks and multi-line messages are not for users, one line is."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def describe_exception(exc: BaseException, limit: int | None = 160) -> str:
    """``Type: first line`` (just ``Type`` for an empty message): one line naming what failed and how."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}" if str(exc).strip() else type(exc).__name__
