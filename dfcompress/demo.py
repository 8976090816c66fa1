"""``dfcompress demo``: the whole pipeline on the embedded digits teacher, measured on real held-out digits.

synthesize -> distill a smaller student -> prune the teacher -> INT8-quantize the teacher -> export ->
evaluate everything on the real test split, one table. Each step writes into its own sub-folder and
resumes if the demo is re-run after an interruption.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .cli_common import Timer, owned_by
from .device import resolve_runtime
from .fileio import atomic_write_text, prepare_output_dir
from .progress import log
from .settings import Settings


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
    from .compress.distill import distill
    from .compress.prune import prune
    from .compress.quantize import quantize
    from .evaluate import evaluate
    from .export import export_model
    from .models.loading import load_teacher
    from .pipeline import real_eval_data, synthetic_set
    from .report import build_report, write_report

    timer = Timer()
    out = prepare_output_dir(out, overwrite=overwrite, resumable=owned_by("demo"))
    runtime = resolve_runtime(settings.device, amp=settings.amp)
    teacher = load_teacher(None)
    real = real_eval_data(teacher, None)
    log(f"demo: embedded teacher {teacher.arch}, real held-out split {real.source} ({len(real.y)} images) -> {out}")

    with timer.section("synthesize"):
        synth = synthetic_set(teacher, settings, runtime, data=None, out_dir=out / "synthetic")
    with timer.section("distill"):
        distilled = distill(teacher, settings.distill.student, synth, settings, out / "student", runtime, real)
    with timer.section("prune"):
        pruned = prune(teacher, synth, settings, out / "pruned", runtime, real)
    with timer.section("export"):
        import torch

        check = teacher.normalize(torch.rand((16, *teacher.input_shape), generator=torch.Generator().manual_seed(settings.seed)))
        teacher_onnx = out / "teacher.onnx"
        if not teacher_onnx.is_file():
            export_model(teacher.module, teacher, "onnx", teacher_onnx, check, opset=settings.export.opset)
    with timer.section("quantize"):
        int8 = quantize(teacher_onnx, synth, settings, out / "int8", eval_data=real, reference=teacher)

    with timer.section("evaluate"):
        rows = [_row("teacher (fp32)", evaluate(teacher, real, teacher, settings, onnx_path=teacher_onnx, runtime=runtime))]
        student = load_teacher(str(out / "student"))
        rows.append(_row(f"student {settings.distill.student}", evaluate(student, real, teacher, settings,
                                                                         onnx_path=_onnx(out / "student"), runtime=runtime)))
        pruned_model = load_teacher(str(out / "pruned"))
        rows.append(_row(f"pruned {settings.prune.ratio:.0%} ch", evaluate(pruned_model, real, teacher, settings,
                                                                          onnx_path=_onnx(out / "pruned"), runtime=runtime)))
        int8_path = _onnx(out / "int8")
        rows.append(_row("teacher int8", evaluate(int8_path, real, teacher, settings, onnx_path=int8_path, runtime=runtime)))
    table = format_table(rows)
    atomic_write_text(out / "summary.txt", table + "\n")
    report = build_report("demo", inputs={"teacher": teacher.source, "real_test_data": real.source}, settings=settings,
                          metrics={"rows": rows, "distill": distilled, "prune": pruned, "quantize": int8},
                          timings={**timer.timings, "total": timer.total()},
                          outputs={"folder": str(out), "preview": str(Path(synth) / "preview.png"),
                                   "onnx": [str(p) for p in sorted(out.glob("**/*.onnx"))]})
    write_report(report, out / "report.json")
    log(f"demo finished in {timer.total():.0f} s; report {out / 'report.json'}, preview {Path(synth) / 'preview.png'}")
    return {"table": table, "report": report, "rows": rows}


def _onnx(folder: Path) -> Path | None:
    from .models.model_dir import read_model_dir

    files = read_model_dir(folder).get("files", {})
    name = files.get("onnx")
    return folder / name if name else None
