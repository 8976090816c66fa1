"""``dfcompress demo``: the whole pipeline on the embedded digits teacher, measured on real held-out digits.

synthesize -> distill a smaller student -> prune the teacher -> INT8-quantize the teacher -> export ->
evaluate everything on the real test split, one table. Each step writes into its own sub-folder and
resumes if the demo is re-run after an interruption.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .compress.stages import DISTILL, PRUNE, QUANTIZE, Stage, owned_by_synthesize
from .device import resolve_runtime
from .fileio import REPORT_FILE, atomic_write_text, prepare_output_dir
from .models.teacher import Teacher
from .pipeline import StageRequest, run_stage
from .progress import Timer, log
from .settings import Settings

SUMMARY_FILE = "summary.txt"
FOLDERS = {"synthetic": "synthetic", "distill": "student", "prune": "pruned", "quantize": "int8"}


def owned_by_demo(folder: Path) -> bool:
    """A (partial) demo folder, which re-running resumes: its summary or any of its stage sub-folders."""
    folder = Path(folder)
    return (folder / SUMMARY_FILE).is_file() or owned_by_synthesize(folder / FOLDERS["synthetic"]) or \
        any(stage.owns(folder / FOLDERS[stage.name]) for stage in (DISTILL, PRUNE))


def _row(name: str, m: dict[str, Any]) -> dict[str, Any]:
    lat = m.get("latency") or {}
    b1 = (lat.get("batch_1") or {}).get("p50_ms") if isinstance(lat, dict) else None
    return {"model": name, "top1": m.get("top1"), "agreement": m.get("agreement"), "params": m.get("params"),
            "macs": m.get("macs"), "bytes": m.get("onnx_bytes") or m.get("bytes"), "latency_b1_p50_ms": b1}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<26}{'top-1 %':>9}{'agree %':>9}{'params':>12}{'MACs':>13}{'size KiB':>10}{'ms/img b1':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(v, spec):
            width = int(spec.split(".")[0].rstrip(",d"))
            return format(v, spec) if v is not None else "-".rjust(width)
        lines.append(f"{r['model']:<26}{f(r['top1'], '9.2f')}{f(r['agreement'], '9.2f')}{f(r['params'], '12,d')}"
                     f"{f(r['macs'], '13,d')}{f(r['bytes'] / 1024 if r['bytes'] else None, '10.1f')}{f(r['latency_b1_p50_ms'], '11.3f')}")
    return "\n".join(lines)


def run_demo(settings: Settings, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """synthesize once, then distill, prune and quantize through the same orchestrator as the commands,
    then evaluate every model on the real held-out split; returns {table, report, rows}."""
    from .evaluate import evaluate
    from .export import export_model
    from .models.loading import load_teacher
    from .pipeline import real_eval_data, synthetic_set
    from .report import build_report, write_report

    timer = Timer()
    out = prepare_output_dir(out, overwrite=overwrite, resumable=owned_by_demo)
    runtime = resolve_runtime(settings.device, amp=settings.amp)
    teacher = load_teacher(None)
    real = real_eval_data(teacher, None)
    log(f"demo: embedded teacher {teacher.arch}, real held-out split {real.source} ({len(real.y)} images) -> {out}")

    with timer.section("synthesize"):
        synth = synthetic_set(teacher, settings, runtime, data=None, out_dir=out / FOLDERS["synthetic"])
    with timer.section("export"):
        import torch

        check = teacher.normalize(torch.rand((16, *teacher.input_shape), generator=torch.Generator().manual_seed(settings.seed)))
        teacher_onnx = out / "teacher.onnx"
        if not teacher_onnx.is_file():
            export_model(teacher.module, teacher, "onnx", teacher_onnx, check, opset=settings.export.opset)

    def stage(s: Stage, model: Path | None = None) -> dict[str, Any]:
        # a resumable stage continues its folder; the others (quantize) redo theirs, as a re-run demo always did
        with timer.section(s.name):
            req = StageRequest(settings, lambda _: teacher, model=str(model) if model else None, data=str(synth),
                               output=out / FOLDERS[s.name], overwrite=s.owns is None)
            return run_stage(s, req).report_metrics()

    distilled, pruned, int8 = stage(DISTILL), stage(PRUNE), stage(QUANTIZE, teacher_onnx)

    with timer.section("evaluate"):
        rows = [_row("teacher (fp32)", evaluate(teacher, real, teacher, settings, onnx_path=teacher_onnx, runtime=runtime))]
        rows += [_row(label, _evaluate_folder(out / FOLDERS[name], real, teacher, settings, runtime))
                 for name, label in (("distill", f"student {settings.distill.student}"),
                                     ("prune", f"pruned {settings.prune.ratio:.0%} ch"), ("quantize", "teacher int8"))]
    table = format_table(rows)
    atomic_write_text(out / SUMMARY_FILE, table + "\n")
    report = build_report("demo", inputs={"teacher": teacher.source, "real_test_data": real.source}, settings=settings,
                          metrics={"rows": rows, "distill": distilled, "prune": pruned, "quantize": int8},
                          timings={**timer.timings, "total": timer.total()},
                          outputs={"folder": str(out), "preview": str(Path(synth) / "preview.png"),
                                   "onnx": [str(p) for p in sorted(out.glob("**/*.onnx"))]})
    write_report(report, out / REPORT_FILE)
    log(f"demo finished in {timer.total():.0f} s; report {out / REPORT_FILE}, preview {Path(synth) / 'preview.png'}")
    return {"table": table, "report": report, "rows": rows}


def _evaluate_folder(folder: Path, real: Any, teacher: Teacher, settings: Settings, runtime: Any) -> dict[str, Any]:
    """A stage's model folder on the real split: quantized graphs in onnxruntime, the others as loaded."""
    from .evaluate import evaluate
    from .models.loading import load_teacher
    from .models.model_dir import is_quantized_onnx, onnx_file_of

    onnx_path = onnx_file_of(folder)
    model = onnx_path if is_quantized_onnx(onnx_path) else load_teacher(str(folder))
    return evaluate(model, real, teacher, settings, onnx_path=onnx_path, runtime=runtime, preprocessing=teacher)
