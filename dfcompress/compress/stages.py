"""The three compression stages as ``Stage`` objects: what each runs, owns and reports (see stage.py).

Each maps its own details dict onto the fixed before -> after ``Figures``; this is the only place that
knows a stage's key names (``teacher_params``, ``params_before``, ``bytes_after``...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..fileio import report_command
from .stage import Figures, Stage, StageInput, holdout_or_real_agreement


def owned_by_synthesize(folder: str | Path) -> bool:
    """A (partial) synthetic set folder, which re-running ``synthesize`` resumes: its run record or manifest."""
    from ..data.synthetic import FORMAT, MANIFEST
    from ..fileio import json_format
    from ..inversion.runner import RUN_FILE, RUN_FORMAT

    def family(fmt: str) -> str:  # "dfcompress-synthetic/1" -> "dfcompress-synthetic/": any version is ours
        return fmt.split("/")[0] + "/"

    d = Path(folder)
    return report_command(d) == "synthesize" or json_format(d / RUN_FILE).startswith(family(RUN_FORMAT)) or \
        json_format(d / MANIFEST).startswith(family(FORMAT))


def _owned_by_kd_stage(name: str) -> Callable[[Path], bool]:
    """distill/prune folders: their report or descriptor names them; a partial one holds their KD
    checkpoint or their own ``synthetic/`` sub-folder."""
    def owns(folder: Path) -> bool:
        from ..models.model_dir import created_by
        from .kd import CHECKPOINT

        folder = Path(folder)
        made_by = {report_command(folder), created_by(folder)} - {None}
        if made_by:  # a finished (or gate-failed) run says which command wrote it
            return made_by == {name}
        return (folder / "checkpoint" / CHECKPOINT).is_file() or owned_by_synthesize(folder / "synthetic")

    return owns


def _run_distill(i: StageInput) -> dict[str, Any]:
    from .distill import distill

    return distill(i.teacher, i.settings.distill.student, i.synth, i.settings, i.out, i.runtime, i.real)


def _distill_figures(d: dict[str, Any]) -> tuple[Figures, Figures]:
    return (Figures(top1=d.get("teacher_top1"), params=d.get("teacher_params"), macs=d.get("teacher_macs")),
            Figures(top1=d.get("top1"), agreement=holdout_or_real_agreement(d), params=d.get("student_params"),
                    macs=d.get("student_macs")))


def _run_prune(i: StageInput) -> dict[str, Any]:
    from .prune import prune

    return prune(i.teacher, i.synth, i.settings, i.out, i.runtime, i.real)


def _prune_figures(d: dict[str, Any]) -> tuple[Figures, Figures]:
    return (Figures(top1=d.get("teacher_top1"), params=d.get("params_before"), macs=d.get("macs_before")),
            Figures(top1=d.get("top1"), agreement=holdout_or_real_agreement(d), params=d.get("params_after"),
                    macs=d.get("macs_after")))


def _run_quantize(i: StageInput) -> dict[str, Any]:
    """Quantize MODEL's own ONNX file when it has one, else the teacher exported to ``fp32.onnx`` first."""
    from ..models.model_dir import onnx_file_of
    from .quantize import quantize

    onnx_source = onnx_file_of(i.model)
    if onnx_source is None:
        import torch

        from ..export import export_model

        with i.timer.section("export"):
            onnx_source = i.out / "fp32.onnx"
            g = torch.Generator().manual_seed(0)
            check = i.teacher.normalize(torch.rand((8, *i.teacher.input_shape), generator=g))
            export_model(i.teacher.module, i.teacher, "onnx", onnx_source, check, opset=i.settings.export.opset)
    return quantize(onnx_source, i.synth, i.settings, i.out, eval_data=i.real, reference=i.teacher)


def _quantize_figures(d: dict[str, Any]) -> tuple[Figures, Figures]:
    return (Figures(top1=d.get("top1_before"), bytes=d.get("bytes_before")),
            Figures(top1=d.get("top1_after"), agreement=holdout_or_real_agreement(d), bytes=d.get("bytes_after")))


DISTILL = Stage("distill", _run_distill, _distill_figures, owns=_owned_by_kd_stage("distill"), distributed=True)
PRUNE = Stage("prune", _run_prune, _prune_figures, owns=_owned_by_kd_stage("prune"), distributed=True)
QUANTIZE = Stage("quantize", _run_quantize, _quantize_figures)
STAGES = {s.name: s for s in (DISTILL, PRUNE, QUANTIZE)}
