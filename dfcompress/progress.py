"""Progress bars on stderr, only when stderr is a terminal (CI logs and pipes stay clean)."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator


class _Silent:
    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass

    def advance(self, *a, **k) -> None:
        pass


@contextmanager
def progress(enabled: bool | None = None) -> Iterator[object]:
    """Yield an object with rich.Progress's ``add_task``/``update``/``advance``."""
    if enabled is None:
        enabled = sys.stderr.isatty() and _rank() == 0  # under torchrun one bar (rank 0), not one per rank
    if not enabled:
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    ) as p:
        yield p


def log(message: str) -> None:
    """Human-readable status line on stderr (stdout is for machine-readable output); under torchrun
    lines from ranks other than 0 start with ``[rank N]``."""
    rank = _rank()
    print(f"[rank {rank}] {message}" if rank else message, file=sys.stderr, flush=True)


def _rank() -> int:
    """This process's rank when torchrun started several (RANK/WORLD_SIZE in the environment), else 0."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


class Timer:
    """Named wall-clock sections for the report's ``timings_s``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def section(self, name: str) -> "_Section":
        return _Section(self, name)

    def total(self) -> float:
        return time.perf_counter() - self._start


class _Section:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.timings[self.name] = self.timer.timings.get(self.name, 0.0) + time.perf_counter() - self.t0
