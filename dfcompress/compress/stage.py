"""The stage contract: what every compression stage (distill, prune, quantize, and the next one) promises.

A stage is a name, a predicate recognising the output folders it owns (so re-running resumes them),
whether it runs under torchrun, and a ``run`` that turns a loaded teacher + a synthetic set into a
details dict. ``figures`` maps those details onto one fixed before -> after schema, so the gate, the
summary, the report and the Python API never translate per-stage key names again.
The orchestrator that drives a stage (folder, ranks, load, synthetic set, gate, report) is
``pipeline.run_stage``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # types only: importing them at run time would load torch for `--help`
    from ..data.real import LabelledImages
    from ..device import Runtime
    from ..models.teacher import Teacher
    from ..progress import Timer
    from ..settings import Settings


@dataclass
class Figures:
    """One side (before or after) of a stage; None = not measured."""

    top1: Optional[float] = None
    agreement: Optional[float] = None
    params: Optional[int] = None
    macs: Optional[int] = None
    bytes: Optional[int] = None
    latency_ms: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, values: dict[str, Any]) -> "Figures":
        """From a dict (e.g. a report's ``metrics.before``), ignoring keys outside the schema."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class StageResult:
    """What every stage returns: fixed before/after figures, the stage's own details, its output folder."""

    stage: str
    before: Figures
    after: Figures
    output: Path
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The short machine document a command prints (``--json`` / piped)."""
        return {"output": str(self.output), "before": self.before.to_dict(), "after": self.after.to_dict()}

    def report_metrics(self) -> dict[str, Any]:
        """``metrics`` of report.json: the fixed ``stage/before/after`` plus the stage's details (flat, as before)."""
        return {"stage": self.stage, "before": self.before.to_dict(), "after": self.after.to_dict(), **self.details}


@dataclass
class StageInput:
    """Everything a stage's ``run`` may use; the orchestrator fills it."""

    teacher: "Teacher"
    synth: Path
    out: Path
    runtime: "Runtime"
    settings: "Settings"
    real: Optional["LabelledImages"]
    model: Optional[str]
    timer: "Timer"


@dataclass(frozen=True)
class Stage:
    """A compression stage: see the module docstring."""

    name: str
    run: Callable[[StageInput], dict[str, Any]]
    figures: Callable[[dict[str, Any]], tuple[Figures, Figures]]
    owns: Optional[Callable[[Path], bool]] = None  # None: never resumed; a non-empty folder needs --overwrite
    distributed: bool = False  # True: every torchrun rank runs it (rank 0 writes); False: one process

    def result(self, details: dict[str, Any], out: Path) -> StageResult:
        before, after = self.figures(details)
        return StageResult(self.name, before, after, Path(out), details)


def holdout_or_real_agreement(details: dict[str, Any]) -> Optional[float]:
    """Agreement on real data when measured, else on the held-out synthetic images, so ``--max-drop``
    always has something honest to gate on."""
    return details["agreement"] if details.get("agreement") is not None else details.get("holdout_agreement")


def quality_drop(before: Figures, after: Figures) -> tuple[str, float, float] | None:
    """(what, before, after) in percentage points: real top-1 when both have it, else teacher agreement."""
    if before.top1 is not None and after.top1 is not None:
        return "accuracy", float(before.top1), float(after.top1)
    if after.agreement is not None:
        return "teacher agreement", 100.0, float(after.agreement)
    return None
