"""The orchestrator: ``run_stage`` drives any compression stage (compress/stage.py) the same way for the
CLI, ``demo`` and the Python API -- output folder, torchrun ranks, load, real evaluation data, synthetic
set (given or freshly synthesized), run, quality gate, report, summary. Also the glue several commands
share (synthesis on every rank, statistics)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .compress.gate import check_max_drop, gate
from .compress.stage import Stage, StageInput, StageResult
from .device import Runtime
from .errors import GateFailed, UserError
from .models.teacher import Teacher
from .progress import Timer, log
from .settings import Settings

if TYPE_CHECKING:
    from .data.real import LabelledImages
    from .stats.store import FeatureStats


def real_eval_data(teacher: Teacher, data: Optional[str], limit: Optional[int] = None) -> Optional["LabelledImages"]:
    """``--eval-data`` if given, else the real held-out split that ships with the teacher (embedded one)."""
    from .data.real import load_images

    source = data or teacher.extra.get("real_test_data")
    if not source:
        return None
    return load_images(source, teacher.input_shape, num_classes=teacher.num_classes, limit=limit)


def load_stats(teacher: Teacher, stats_path: Optional[str]) -> Optional["FeatureStats"]:
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
                  barrier: Optional[Callable[[], None]] = None) -> Path:
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
                  world_size: int = 1, barrier: Optional[Callable[[], None]] = None) -> dict:
    """Synthesize on this rank's shards; with several ranks, rank 0 writes the manifest once all exist.

    Returns the manifest on rank 0 (and in a single process), ``{}`` on the other ranks: one type everywhere
    (the runner's ``synthesize`` returns ``{"rank", "shards"}`` per rank when sharded)."""
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


@dataclass
class StageRequest:
    """What a caller asks of ``run_stage`` (flags -> settings -> this)."""

    settings: Settings
    load: Callable[[Settings], Teacher]  # how to get the teacher (a path + flags, or an already loaded one)
    model: Optional[str] = None  # MODEL as given: recorded in the report; quantize uses its ONNX file when it has one
    data: Optional[str] = None  # a finished synthetic set; None = synthesize one into OUT/synthetic
    eval_data: Optional[str] = None  # real labelled images for top-1 (the embedded teacher brings its own)
    output: Optional[Path] = None  # None = runs/<stage>-<time>
    max_drop: Optional[float] = None
    overwrite: bool = False
    report: Optional[Path] = None  # a second copy of report.json


def run_stage(stage: Stage, req: StageRequest,
              summary: Optional[Callable[[StageResult], None]] = None) -> Optional[StageResult]:
    """Run ``stage`` end to end; returns its result on rank 0 (None on other torchrun ranks).

    The report is written even when the ``--max-drop`` gate fails (status "gate-failed", then GateFailed
    propagates) so the result can still be inspected; ``summary`` is called in both cases.
    """
    from .distributed import DistContext, distributed_context
    from .fileio import default_output, prepare_output_dir, remove_if_failed, remove_stale_temps
    from .report import finish_report

    settings = req.settings
    check_max_drop(req.max_drop)
    timer = Timer()
    ranks = distributed_context(settings.device) if stage.distributed else contextlib.nullcontext(DistContext())
    with ranks as dist:
        out = Path(dist.broadcast(req.output or default_output(stage.name)))  # one folder for all ranks
        with remove_if_failed(out, enabled=dist.is_main, resumable=stage.owns is not None):
            if dist.is_main:  # once, before any rank writes; a torchrun restart resumes rather than re-applying --overwrite
                prepare_output_dir(out, overwrite=req.overwrite and not dist.restarted, resumable=stage.owns or False)
            dist.barrier()
            runtime = dist.runtime(settings)
            with timer.section("load"):
                teacher = req.load(settings)
                real = real_eval_data(teacher, req.eval_data)
            with timer.section("synthesize"):
                synth = synthetic_set(teacher, settings, runtime, data=req.data, out_dir=out / "synthetic",
                                      stats_path=settings.synthesize.stats, rank=dist.rank, world_size=dist.world_size,
                                      barrier=dist.barrier)
            with timer.section(stage.name):
                details = stage.run(StageInput(teacher, synth, out, runtime, settings, real, req.model, timer))
        if not dist.is_main:
            return None
        remove_stale_temps(out)
        result = stage.result(details, out)
        status = "ok"
        try:
            gate(req.max_drop, result.before, result.after)
        except GateFailed:
            status = "gate-failed"
            raise
        finally:
            finish_report(stage.name, out, req.report, settings=settings, metrics=result.report_metrics(), timer=timer,
                          inputs={"model": req.model, "data": str(synth),
                                  "eval_data": req.eval_data or (real.source if real else None)},
                          outputs={"model_dir": str(out)}, status=status)
            if summary is not None:
                summary(result)
        return result
