"""Glue between stages that several commands share: where real evaluation data comes from, getting a
synthetic set (given or freshly synthesized), and the quality gate. Kept out of ``cli.py`` so the
Python API and the CLI run the same steps."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .device import Runtime
from .errors import UserError
from .models.teacher import Teacher
from .progress import log
from .settings import Settings


def real_eval_data(teacher: Teacher, data: Optional[str], limit: Optional[int] = None):
    """``--eval-data`` if given, else the real held-out split that ships with the teacher (embedded one)."""
    from .data.real import load_images

    source = data or teacher.extra.get("real_test_data")
    if not source:
        return None
    return load_images(source, teacher.input_shape, num_classes=teacher.num_classes, limit=limit)


def load_stats(teacher: Teacher, stats_path: Optional[str]):
    if not stats_path:
        return None
    from .stats.store import FeatureStats

    stats = FeatureStats.load(stats_path)
    stats.check_matches(teacher)
    return stats


def check_teacher_has_statistics(teacher: Teacher, stats) -> None:
    """A BN-fused teacher can only be inverted with collected class-conditional statistics."""
    from .models.taps import batchnorm_layers, no_batchnorm_statistics

    if stats is None and not batchnorm_layers(teacher.module):
        raise UserError(no_batchnorm_statistics(teacher.source, teacher.module, then=" and pass --stats stats.safetensors"))


def synthetic_set(teacher: Teacher, settings: Settings, runtime: Runtime, *, data: Optional[str | list[str]],
                  out_dir: Path, stats_path: Optional[str] = None, rank: int = 0, world_size: int = 1,
                  barrier=None) -> Path:
    """Return the folder of a complete training set for this teacher: the ``--data`` source(s) if given
    (one synthetic set is used in place; real images or several sources are mixed into
    ``out_dir/../training-set``, see data/training_set.py), else synthesize one into ``out_dir``."""
    if data:
        return given_training_set(teacher, settings, runtime, data, out_dir.parent, rank, barrier)
    stats = load_stats(teacher, stats_path or settings.synthesize.stats)
    check_teacher_has_statistics(teacher, stats)
    if rank == 0:
        log(f"synthesizing {settings.synthesize.num_images} images with {settings.synthesize.method} into {out_dir}"
            + (f" on {world_size} ranks" if world_size > 1 else ""))
    run_synthesis(teacher, settings, out_dir, runtime, stats, rank=rank, world_size=world_size, barrier=barrier)
    return out_dir


def given_training_set(teacher: Teacher, settings: Settings, runtime: Runtime, data: str | list[str], out_root: Path,
                       rank: int = 0, barrier=None) -> Path:
    """The ``--data`` set(s) as one synthetic-format folder; with several ranks rank 0 builds it first."""
    from .data.training_set import MIXED_DIR, training_set

    target = out_root / MIXED_DIR
    if rank == 0:
        path = training_set(teacher, data, target, settings.seed, runtime)
    if barrier is not None:
        barrier()
    if rank != 0:
        path = training_set(teacher, data, target, settings.seed, runtime)  # reuses rank 0's set (same key)
    return path  # type: ignore[return-value]


def run_synthesis(teacher: Teacher, settings: Settings, out_dir: Path, runtime: Runtime, stats, *, rank: int = 0,
                  world_size: int = 1, barrier=None) -> dict:
    """Synthesize on this rank's shards; with several ranks, rank 0 writes the manifest once all exist."""
    from .inversion.runner import finalize, synthesize

    result = synthesize(teacher, settings, out_dir, runtime, stats=stats, rank=rank, world_size=world_size, barrier=barrier)
    if world_size == 1:
        return result
    if barrier is not None:
        barrier()
    manifest = finalize(teacher, settings, out_dir, stats=stats) if rank == 0 else {}
    if barrier is not None:
        barrier()
    return manifest


def teacher_agreement_with_targets(synth_dir: Path) -> float:
    """% of synthetic images the teacher classifies as the class they were synthesized for."""
    from .data.synthetic import SyntheticSet

    ds = SyntheticSet(synth_dir)
    hits = total = 0
    for k in range(ds.num_shards):
        _, labels, logits = ds.shard(k)
        hits += int((logits.argmax(1) == labels).sum())
        total += int(labels.numel())
    return 100.0 * hits / max(1, total)


def quality_drop(metrics_before: dict[str, Any], metrics_after: dict[str, Any]) -> tuple[str, float, float] | None:
    """(what, before, after) in percentage points: real top-1 when both have it, else teacher agreement."""
    if metrics_before.get("top1") is not None and metrics_after.get("top1") is not None:
        return "accuracy", float(metrics_before["top1"]), float(metrics_after["top1"])
    if metrics_after.get("agreement") is not None:
        return "teacher agreement", 100.0, float(metrics_after["agreement"])
    return None


def before_after(stage: str, metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Put each stage's metrics into one before -> after shape for the gate, the summary and reports.

    ``agreement`` falls back to the held-out synthetic images when no real data was given, so
    ``--max-drop`` always has something honest to gate on.
    """
    agree = metrics.get("agreement") if metrics.get("agreement") is not None else metrics.get("holdout_agreement")
    if stage == "distill":
        before = {"top1": metrics.get("teacher_top1"), "params": metrics.get("teacher_params"), "macs": metrics.get("teacher_macs")}
        after = {"top1": metrics.get("top1"), "agreement": agree, "params": metrics.get("student_params"),
                 "macs": metrics.get("student_macs")}
    elif stage == "prune":
        before = {"top1": metrics.get("teacher_top1"), "params": metrics.get("params_before"), "macs": metrics.get("macs_before")}
        after = {"top1": metrics.get("top1"), "agreement": agree, "params": metrics.get("params_after"),
                 "macs": metrics.get("macs_after")}
    elif stage == "quantize":
        before = {"top1": metrics.get("top1_before"), "bytes": metrics.get("bytes_before")}
        after = {"top1": metrics.get("top1_after"), "agreement": agree, "bytes": metrics.get("bytes_after")}
    else:
        raise ValueError(stage)
    return before, after
