"""The JSON report every command writes: what went in (with hashes), the resolved settings, what came
out (metrics), how long it took, and the software versions — so a CI step can gate on it and a person
can reproduce it."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .fileio import REPORT_FILE, atomic_write_json, sha256_file
from .progress import Timer
from .settings import Settings

REPORT_FORMAT = "dfcompress-report/1"


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("dfcompress", "torch", "torch_pruning", "onnx", "onnxruntime", "numpy", "safetensors"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # an optional package missing is worth recording, not failing on
            out[name] = "not installed"
    return out


def describe_input(value: str | os.PathLike | None) -> dict[str, Any] | None:
    """A file gets its sha256, a folder its descriptor hash if any; other strings are kept verbatim."""
    if value is None:
        return None
    p = Path(value)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}
    if p.is_dir():
        from .data.synthetic import MANIFEST
        from .models.model_dir import DESCRIPTOR

        for name in (DESCRIPTOR, MANIFEST):
            if (p / name).is_file():
                return {"path": str(p), name: sha256_file(p / name)}
        return {"path": str(p)}
    return {"value": str(value)}


def build_report(command: str, *, inputs: dict[str, Any], settings: Settings | None, metrics: dict[str, Any],
                 timings: dict[str, float], outputs: dict[str, Any] | None = None, status: str = "ok") -> dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "command": command,
        "status": status,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "inputs": {k: (describe_input(v) if isinstance(v, (str, os.PathLike)) or v is None else v) for k, v in inputs.items()},
        "settings": settings.to_dict() if settings is not None else None,
        "metrics": metrics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "outputs": outputs or {},
        "versions": versions(),
    }


def write_report(report: dict[str, Any], *paths: str | os.PathLike | None) -> list[Path]:
    written = []
    for p in paths:
        if p is None:
            continue
        atomic_write_json(p, report)
        written.append(Path(p))
    return written


def finish_report(command: str, out_dir: Path | None, report_path: str | os.PathLike | None, *, inputs: dict[str, Any],
                  settings: Settings | None, metrics: dict[str, Any], timer: Timer,
                  outputs: dict[str, Any] | None = None, status: str = "ok") -> dict[str, Any]:
    """Close ``timer`` and write the report into ``out_dir/report.json`` and/or ``report_path``."""
    timer.timings["total"] = timer.total()
    report = build_report(command, inputs=inputs, settings=settings, metrics=metrics, timings=timer.timings,
                          outputs=outputs, status=status)
    write_report(report, Path(out_dir) / REPORT_FILE if out_dir else None, report_path)
    return report
