"""The ``dfcompress`` command line: one typer app, one function per pipeline verb.

Each command parses and validates its flags, resolves settings (defaults < profile < flags), calls the
library and writes a report. Nothing here computes anything a notebook user could not call directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from . import __version__
from .cli_common import (AllowPickleOpt, ArchOpt, DeviceOpt, DryRunOpt, InputSizeOpt, JsonOpt, MaxDropOpt, MeanOpt,
                         ModelArg, OverwriteOpt, ProfileOpt, ReportOpt, SaveConfigOpt, SeedOpt, StdOpt, Timer, command,
                         default_output, emit_json, load_model, owned_by, resolve)
from .errors import GateFailed, UserError
from .pipeline import before_after
from .progress import log

app = typer.Typer(
    name="dfcompress",
    help="Data-free compression of image classifiers: invert the teacher, then distill, prune, quantize and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

OutDirOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default: runs/<command>-<time>).")]
SynthDataOpt = Annotated[Optional[list[str]], typer.Option("--data", help="Training/calibration images: a synthetic set folder, an image folder (labels optional) or an .npz (x uint8 NHWC, y optional); repeat to mix sources, PATH:WEIGHT sets a source's share (e.g. --data synth/ --data seeds.npz:0.2). Default: synthesize a set first.")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="Real labelled test images (ImageFolder dir or .npz with x,y) for top-1; the embedded teacher uses its real digits test split.")]
NumImagesOpt = Annotated[Optional[int], typer.Option("--num-images", "-n", help="Number of images to synthesize.")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", help="naturalinversion | fast-ni | deepinversion | adi | cmi")]
ItersOpt = Annotated[Optional[int], typer.Option("--iterations", help="Optimisation steps per synthetic batch.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images optimised together.")]
StatsOpt = Annotated[Optional[str], typer.Option("--stats", help="Class-conditional statistics from `dfcompress stats` (needed for BN-folded teachers).")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Training / fine-tuning epochs.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dfcompress {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False) -> None:
    """Data-free compression of image classifiers."""
    _warn_duplicate_onnxruntime()


def _warn_duplicate_onnxruntime() -> None:
    """onnxruntime and onnxruntime-gpu share one import name; with both installed the last one wins."""
    import importlib.metadata as md

    present = set()
    for dist_name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.version(dist_name)
            present.add(dist_name)
        except md.PackageNotFoundError:
            pass
    if len(present) == 2:
        log("warning: both onnxruntime and onnxruntime-gpu are installed and share the import name 'onnxruntime'; "
            "uninstall one (pip uninstall onnxruntime for GPU use)")


def _runtime(settings):
    from .device import resolve_runtime

    return resolve_runtime(settings.device, amp=settings.amp)


def _common_overrides(seed: Optional[int], device: Optional[str]) -> dict:
    return {"seed": seed, "device": device}


def _finish(command_name: str, out_dir: Optional[Path], report_path: Optional[Path], *, inputs: dict, settings, metrics: dict,
            timer: Timer, outputs: Optional[dict] = None, status: str = "ok") -> dict:
    from .report import build_report, write_report

    timer.timings["total"] = timer.total()
    report = build_report(command_name, inputs=inputs, settings=settings, metrics=metrics, timings=timer.timings,
                          outputs=outputs, status=status)
    write_report(report, out_dir / "report.json" if out_dir else None, report_path)
    return report


def _check_max_drop(max_drop: Optional[float]) -> None:
    """Refuse a meaningless gate before any work starts (the gate itself runs only at the end)."""
    import math

    if max_drop is not None and (math.isnan(max_drop) or max_drop < 0):
        raise UserError(f"--max-drop must be a non-negative number of percentage points (e.g. --max-drop 2), got {max_drop}")


def _gate(max_drop: Optional[float], before: dict, after: dict) -> None:
    from .compress.gate import check_drop
    from .pipeline import quality_drop

    if max_drop is None:
        return
    drop = quality_drop(before, after)
    if drop is None:
        raise UserError("--max-drop needs an accuracy or agreement figure, and none was measured")
    what, b, a = drop
    check_drop(b, a, max_drop, what)


# ---------------------------------------------------------------------------------------------
# inspect / profiles


@app.command()
@command
def inspect(
    model: ModelArg = None, arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None,
    std: StdOpt = None, input_shape: InputSizeOpt = None, json_out: JsonOpt = False, report: ReportOpt = None,
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List the model zoo's architectures and exit.")] = False,
) -> None:
    """Show what was loaded: format, input shape, classes, BN layers or 'BN folded', stages, params, MACs."""
    if list_archs:
        from .models.zoo import list_models, model_defaults

        rows = {name: model_defaults(name) for name in list_models()}
        if json_out:
            emit_json(rows)
        else:
            for name, d in rows.items():
                typer.echo(f"{name:18s} input {d.get('input_size')}px  classes {d.get('num_classes')}")
        return
    from .models.introspect import inspect_teacher

    timer = Timer()
    teacher = load_model(model, arch, allow_pickle, mean, std, input_shape)
    info = inspect_teacher(teacher)
    if report:
        _finish("inspect", None, report, inputs={"model": model}, settings=None, metrics=info, timer=timer)
    if json_out:
        emit_json(info)
        return
    c, h, w = info["input_shape"]
    typer.echo(f"model      {info['source']}  ({info['format']}{', arch ' + info['arch'] if info.get('arch') else ''})")
    typer.echo(f"input      {c}x{h}x{w}   mean {list(info['mean'])}  std {list(info['std'])}")
    typer.echo(f"           size: {info['input_shape_from']}")
    typer.echo(f"classes    {info['num_classes']}")
    for note in info["output_head"]:
        typer.echo(f"output     {note}")
    typer.echo(f"batchnorm  {info['batchnorm']}" + ("" if info["batchnorm_layers"] else "; for inversion run `dfcompress stats MODEL --seeds DIR` first"))
    typer.echo(f"params     {info['params']:,}")
    typer.echo(f"MACs       {info['macs']:,}")
    typer.echo("stages     " + (", ".join(f"{s['channels']}ch@{s['height']}x{s['width']} (/{s['reduction']}, {s['name']})"
                                      for s in info["stages"]) or "none (no spatial feature maps)"))
    if info["token_stages"]:
        t = info["token_stages"]
        typer.echo(f"tokens     {len(t)} token stages, {t[0]['tokens']} tokens x {t[0]['channels']}ch: " + ", ".join(s["name"] for s in t))
    typer.echo(f"statistics {info['stat_layers']} layers" + ("" if info["bn_folded"] else " (BatchNorm inputs)"))
    if not info["pyramid"]:
        typer.echo("pyramid    none: NaturalInversion runs without its Feature Transfer Pyramid (no spatial stages)")


@app.command()
@command
def profiles(name: Annotated[Optional[str], typer.Argument(help="Profile to show; omitted = list them.")] = None) -> None:
    """List the shipped profiles, or show one fully resolved."""
    from .settings import describe_profile, list_profiles, read_profile

    if name is None:
        for p in list_profiles():
            desc = str(read_profile(p).get("description", "")).strip().split("\n")[0]
            typer.echo(f"{p:10s} {desc[:100]}")
        return
    typer.echo(describe_profile(name).rstrip())


# ---------------------------------------------------------------------------------------------
# stats


@app.command()
@command
def stats(
    model: ModelArg = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Statistics file to write (.safetensors).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Real images (ImageFolder dir, .npz x/y) to collect statistics from.")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="A few labelled seed images per class (ImageFolder dir or .npz).")] = None,
    per_class_count: Annotated[Optional[int], typer.Option("--per-class-count", help="Use at most K images per class from --seeds/--data.")] = None,
    per_class: Annotated[bool, typer.Option("--per-class/--global", help="Class-conditional (default when collecting) or global statistics.")] = True,
    label_by_teacher: Annotated[bool, typer.Option("--label-by-teacher", help="Ignore stored labels; label images by the teacher's prediction.")] = False,
    arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None, std: StdOpt = None,
    input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False,
) -> None:
    """Recover BatchNorm statistics, or collect (class-conditional) feature statistics from real images."""
    if data and seeds:
        raise UserError("give either --data or --seeds, not both")
    if per_class_count is not None and per_class_count < 1:
        raise UserError("--per-class-count must be >= 1")
    settings = resolve(profile, _common_overrides(seed, device), dry_run, save_config)
    output = output or Path("stats.safetensors")
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it or choose another -o")
    if output.is_dir():
        raise UserError(f"-o {output} is a folder; give a file name such as stats.safetensors")
    timer = Timer()
    runtime = _runtime(settings)
    with timer.section("load"):
        teacher = load_model(model, arch, allow_pickle, mean, std, input_shape, settings)
    source = data or seeds
    if source is None:
        from .stats.recover import recover_bn_stats

        with timer.section("recover"):
            result = recover_bn_stats(teacher)
    else:
        from .data.real import load_images
        from .stats.collect import collect_stats

        images = load_images(source, teacher.input_shape, num_classes=teacher.num_classes,
                             per_class=per_class_count, seed=settings.seed)
        labels = None if label_by_teacher else images.y
        with timer.section("collect"):
            result = collect_stats(teacher, images.x, labels, per_class=per_class, runtime=runtime)
        result.source = str(source)
    result.save(output)
    metrics = {"layers": len(result.layers), "per_class": result.per_class, "kind": result.kind,
               "counts": [int(c) for c in result.counts.tolist()]}
    log(f"wrote {output}: {metrics['layers']} layers, {'per-class' if result.per_class else 'global'} ({result.kind})")
    _finish("stats", None, report, inputs={"model": model, "data": source}, settings=settings, metrics=metrics,
            timer=timer, outputs={"stats": str(output)})
    emit_json({"stats": str(output), **metrics})


# ---------------------------------------------------------------------------------------------
# synthesize


@app.command()
@command
def synthesize(
    model: ModelArg = None, output: OutDirOpt = None, num_images: NumImagesOpt = None, method: MethodOpt = None,
    iterations: ItersOpt = None, batch_size: BatchOpt = None, stats_file: StatsOpt = None,
    arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None, std: StdOpt = None,
    input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False,
) -> None:
    """Synthesize a calibration/distillation set by model inversion (sharded, resumable).

    Re-running the same command after a crash skips the finished shards.
    """
    from .distributed import distributed_context
    from .fileio import prepare_output_dir, remove_if_failed  # stale temp files: the runner's finalize() sweeps them
    from .pipeline import check_teacher_has_statistics, load_stats, run_synthesis, teacher_agreement_with_targets

    settings = resolve(profile, {**_common_overrides(seed, device), "synthesize.num_images": num_images,
                                 "synthesize.method": method, "synthesize.iterations": iterations,
                                 "synthesize.batch_size": batch_size, "synthesize.stats": stats_file}, dry_run, save_config)
    _check_batch(settings.synthesize.batch_size, settings.synthesize.num_images)
    timer = Timer()
    with distributed_context(settings.device) as dist:
        out = dist.broadcast(output or default_output("synth"))  # one folder for all ranks (the default holds the time)
        with remove_if_failed(out, enabled=dist.is_main):
            if dist.is_main:  # once, before any rank writes; a torchrun restart resumes rather than re-applying --overwrite
                prepare_output_dir(out, overwrite=overwrite and not dist.restarted, resumable=owned_by("synthesize"))
            dist.barrier()
            runtime = dist.runtime(settings)
            with timer.section("load"):
                teacher = load_model(model, arch, allow_pickle, mean, std, input_shape, settings)
            stats = load_stats(teacher, settings.synthesize.stats)
            check_teacher_has_statistics(teacher, stats)
            with timer.section("synthesize"):
                manifest = run_synthesis(teacher, settings, out, runtime, stats, rank=dist.rank, world_size=dist.world_size,
                                         barrier=dist.barrier)
        if not dist.is_main:
            return
        metrics = {"num_images": manifest["num_images"], "counts_per_class": manifest["counts_per_class"],
                   "retries": sum(int(s.get("retries", 0)) for s in manifest["shards"]),
                   "teacher_agreement_with_targets": round(teacher_agreement_with_targets(out), 2)}
        _finish("synthesize", out, report, inputs={"model": model, "stats": settings.synthesize.stats}, settings=settings,
                metrics=metrics, timer=timer, outputs={"synthetic_set": str(out), "preview": str(out / "preview.png")})
        log(f"synthetic set ready: {out} ({manifest['num_images']} images, preview {out / 'preview.png'})")
        emit_json({"synthetic_set": str(out), **metrics})


def _check_batch(batch_size: int, num_images: int) -> None:
    if batch_size > num_images:
        raise UserError(f"--batch-size {batch_size} is larger than -n {num_images}; lower the batch size or synthesize more images")


# ---------------------------------------------------------------------------------------------
# distill / prune / quantize


@app.command()
@command
def distill(
    model: ModelArg = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Student architecture from the zoo (e.g. resnet18, wrn_16_1).")] = None,
    data: SynthDataOpt = None, num_images: NumImagesOpt = None, output: OutDirOpt = None, epochs: EpochsOpt = None,
    eval_data: EvalDataOpt = None, max_drop: MaxDropOpt = None, method: MethodOpt = None, iterations: ItersOpt = None,
    stats_file: StatsOpt = None, arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None,
    std: StdOpt = None, input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Knowledge-distil the teacher into a zoo student on a synthetic set (re-running resumes)."""
    from .compress.distill import distill as run_distill
    from .models.zoo import resolve_model_name

    settings = resolve(profile, {**_common_overrides(seed, device), "distill.student": student, "distill.epochs": epochs,
                                 "synthesize.num_images": num_images, "synthesize.method": method,
                                 "synthesize.iterations": iterations, "synthesize.stats": stats_file}, dry_run, save_config)
    resolve_model_name(settings.distill.student)  # fail fast on a typo, before any long work
    if not data:
        _check_batch(settings.synthesize.batch_size, settings.synthesize.num_images)
    _compress_command("distill", model, data, output, eval_data, max_drop, settings, report, overwrite,
                      (arch, allow_pickle, mean, std, input_shape),
                      lambda teacher, synth, out, runtime, real: run_distill(teacher, settings.distill.student, synth, settings, out, runtime, real))


@app.command()
@command
def prune(
    model: ModelArg = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", "-r", help="Fraction removed: of channels per layer (default), or of params/MACs with --target.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="What --ratio measures: channels | params | macs.")] = None,
    global_pruning: Annotated[Optional[bool], typer.Option("--global/--local", help="Rank channels across all layers instead of per layer.")] = None,
    round_to: Annotated[Optional[int], typer.Option("--round-to", help="Keep channel counts multiples of N (edge hardware).")] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help="Channel ranking: l1 (default) | l2 | taylor | hessian (gradients on the training set).")] = None,
    data: SynthDataOpt = None, num_images: NumImagesOpt = None, output: OutDirOpt = None, epochs: EpochsOpt = None,
    eval_data: EvalDataOpt = None, max_drop: MaxDropOpt = None, method: MethodOpt = None, iterations: ItersOpt = None,
    stats_file: StatsOpt = None, arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None,
    std: StdOpt = None, input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """L1-norm structured channel pruning (torch-pruning), then KD fine-tuning on the synthetic set."""
    from .compress.prune import prune as run_prune

    settings = resolve(profile, {**_common_overrides(seed, device), "prune.ratio": ratio, "prune.target": target,
                                 "prune.global_pruning": global_pruning, "prune.round_to": round_to, "prune.epochs": epochs,
                                 "prune.importance": importance,
                                 "synthesize.num_images": num_images, "synthesize.method": method,
                                 "synthesize.iterations": iterations, "synthesize.stats": stats_file}, dry_run, save_config)
    if not data:
        _check_batch(settings.synthesize.batch_size, settings.synthesize.num_images)
    _compress_command("prune", model, data, output, eval_data, max_drop, settings, report, overwrite,
                      (arch, allow_pickle, mean, std, input_shape),
                      lambda teacher, synth, out, runtime, real: run_prune(teacher, synth, settings, out, runtime, real))


def _compress_command(name: str, model, data, output, eval_data, max_drop, settings, report, overwrite, load_args, run) -> None:
    """Shared body of distill/prune: load, get a synthetic set, run, gate, report (rank 0 only)."""
    from .distributed import distributed_context
    from .fileio import prepare_output_dir, remove_if_failed, remove_stale_temps
    from .pipeline import real_eval_data, synthetic_set

    _check_max_drop(max_drop)
    timer = Timer()
    with distributed_context(settings.device) as dist:
        out = dist.broadcast(output or default_output(name))  # one folder for all ranks (the default holds the time)
        with remove_if_failed(out, enabled=dist.is_main):
            if dist.is_main:  # once, before any rank writes; a torchrun restart resumes rather than re-applying --overwrite
                prepare_output_dir(out, overwrite=overwrite and not dist.restarted, resumable=owned_by(name))
            dist.barrier()
            runtime = dist.runtime(settings)
            with timer.section("load"):
                teacher = load_model(model, *load_args, settings=settings)
                real = real_eval_data(teacher, eval_data)
            with timer.section("synthesize"):
                synth = synthetic_set(teacher, settings, runtime, data=data, out_dir=out / "synthetic",
                                      stats_path=settings.synthesize.stats, rank=dist.rank, world_size=dist.world_size,
                                      barrier=dist.barrier)
            with timer.section(name):
                metrics = run(teacher, synth, out, runtime, real)
        if not dist.is_main:
            return
        remove_stale_temps(out)
        before, after = before_after(name, metrics)
        status = "ok"
        try:
            _gate(max_drop, before, after)
        except GateFailed:
            status = "gate-failed"
            raise
        finally:
            _finish(name, out, report, inputs={"model": model, "data": str(synth), "eval_data": eval_data or (real.source if real else None)},
                    settings=settings, metrics={"before": before, "after": after, **metrics}, timer=timer,
                    outputs={"model_dir": str(out)}, status=status)
            _print_summary(name, out, before, after)


def _print_summary(name: str, out: Path, before: dict, after: dict) -> None:
    keys = [k for k in ("top1", "agreement", "params", "macs", "bytes") if before.get(k) is not None or after.get(k) is not None]
    log(f"{name}: result in {out}")
    for k in keys:
        log(f"  {k:10s} {_fmt(before.get(k))} -> {_fmt(after.get(k))}")
    emit_json({"output": str(out), "before": before, "after": after})


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@app.command()
@command
def quantize(
    model: ModelArg = None, data: SynthDataOpt = None, num_images: NumImagesOpt = None, output: OutDirOpt = None,
    eval_data: EvalDataOpt = None, max_drop: MaxDropOpt = None,
    calibration_images: Annotated[Optional[int], typer.Option("--calibration-images", help="Synthetic images used for calibration.")] = None,
    calibrate_method: Annotated[Optional[str], typer.Option("--calibrate-method", help="Activation range estimator: minmax | entropy | percentile.")] = None,
    per_channel: Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel (default) or one per tensor.")] = None,
    symmetric_activations: Annotated[Optional[bool], typer.Option("--symmetric-activations/--asymmetric-activations", help="Activation zero point fixed at 0, or fitted (default).")] = None,
    arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None, std: StdOpt = None,
    input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False,
) -> None:
    """INT8 post-training quantization with onnxruntime (static, QDQ, per-channel), calibrated on synthetic images."""
    from .compress.quantize import quantize as run_quantize
    from .export import export_model
    from .fileio import prepare_output_dir, remove_if_failed
    from .pipeline import real_eval_data, synthetic_set

    settings = resolve(profile, {**_common_overrides(seed, device), "synthesize.num_images": num_images,
                                 "quantize.calibration_images": calibration_images, "quantize.calibrate_method": calibrate_method,
                                 "quantize.per_channel": per_channel, "quantize.symmetric_activations": symmetric_activations},
                dry_run, save_config)
    _check_max_drop(max_drop)
    timer = Timer()
    out = output or default_output("quantize")
    with remove_if_failed(out, resumable=False):
        prepare_output_dir(out, overwrite=overwrite, resumable=False)
        runtime = _runtime(settings)
        with timer.section("load"):
            teacher = load_model(model, arch, allow_pickle, mean, std, input_shape, settings)
            real = real_eval_data(teacher, eval_data)
        with timer.section("synthesize"):
            synth = synthetic_set(teacher, settings, runtime, data=data, out_dir=out / "synthetic")
        onnx_source = _onnx_of(model)
        if onnx_source is None:
            import torch

            with timer.section("export"):
                onnx_source = out / "fp32.onnx"
                check = teacher.normalize(torch.rand((8, *teacher.input_shape), generator=torch.Generator().manual_seed(0)))
                export_model(teacher.module, teacher, "onnx", onnx_source, check, opset=settings.export.opset)
        with timer.section("quantize"):
            metrics = run_quantize(onnx_source, synth, settings, out, eval_data=real, reference=teacher)
    before, after = before_after("quantize", metrics)
    status = "ok"
    try:
        _gate(max_drop, before, after)
    except GateFailed:
        status = "gate-failed"
        raise
    finally:
        _finish("quantize", out, report, inputs={"model": model, "data": str(synth)}, settings=settings,
                metrics={"before": before, "after": after, **metrics},
                timer=timer, outputs={"model_dir": str(out)}, status=status)
        _print_summary("quantize", out, before, after)


def _onnx_of(model: Optional[str]) -> Optional[Path]:
    """An ONNX file to quantize directly: the MODEL itself, or the one in a dfcompress model folder."""
    if model is None:
        return None
    p = Path(model)
    if p.is_file() and p.suffix.lower() == ".onnx":
        return p
    if p.is_dir() and (p / "dfcompress.json").is_file():
        from .models.model_dir import read_model_dir

        files = read_model_dir(p).get("files", {})
        if files.get("onnx") and (p / files["onnx"]).is_file():
            return p / files["onnx"]
    return None


# ---------------------------------------------------------------------------------------------
# export / eval


@app.command()
@command
def export(
    model: ModelArg = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="onnx | torchscript | pt2")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default: model.<ext> in the current folder).")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (13-21).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Synthetic set whose images check parity (default: random images).")] = None,
    arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None, std: StdOpt = None,
    input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda[:N]: where onnxruntime checks parity (the file is traced on the CPU, so it runs anywhere).")] = None,
    report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False,
) -> None:
    """Export to ONNX (checked against onnxruntime), TorchScript or torch.export .pt2 (checked likewise)."""
    import torch

    from .export import export_model

    settings = resolve(profile, {**_common_overrides(seed, device), "export.format": fmt, "export.opset": opset}, dry_run, save_config)
    ext = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}[settings.export.format]
    output = output or Path("model" + ext)
    if output.is_dir():
        raise UserError(f"-o {output} is a folder; give a file name such as model{ext}")
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it or choose another -o")
    timer = Timer()
    runtime = _runtime(settings)  # an unusable --device fails here, as in every other command
    teacher = load_model(model, arch, allow_pickle, mean, std, input_shape, settings)
    n = settings.export.parity_images
    if data:
        from .data.synthetic import SyntheticSet
        from .evaluate import to_input

        synth = SyntheticSet(data)
        images = torch.stack([synth[i][0] for i in range(min(n, len(synth)))])
        check = to_input(images, teacher)
    else:
        check = teacher.normalize(torch.rand((n, *teacher.input_shape), generator=torch.Generator().manual_seed(settings.seed)))
    with timer.section("export"):
        result = export_model(teacher.module, teacher, settings.export.format, output, check, opset=settings.export.opset,
                              atol=settings.export.parity_atol, prefer_cuda=runtime.is_cuda)
    _finish("export", None, report, inputs={"model": model}, settings=settings, metrics=result, timer=timer,
            outputs={"file": str(output)})
    log(f"exported {output} ({result.get('bytes', 0):,} bytes); max |Δlogit| {result.get('max_abs_diff')}, top-1 agreement {result.get('top1_agreement')}")
    emit_json(result)


@app.command("eval")
@command
def eval_(
    model: ModelArg = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Real labelled images (ImageFolder dir or .npz x/y); the embedded teacher defaults to its digits test split.")] = None,
    against: Annotated[Optional[str], typer.Option("--against", help="Teacher to measure agreement with (a model path; 'embedded' for the default teacher).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate at most N images.")] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the onnxruntime latency measurement.")] = False,
    arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None, std: StdOpt = None,
    input_shape: InputSizeOpt = None, profile: ProfileOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None,
) -> None:
    """Top-1 on real data, agreement with a teacher, params, MACs, file size and onnxruntime latency."""
    from .evaluate import evaluate
    from .models.loading import load_teacher
    from .pipeline import real_eval_data

    settings = resolve(profile, _common_overrides(seed, device), dry_run, save_config)
    if limit is not None and limit < 1:
        raise UserError("--limit must be >= 1")
    timer = Timer()
    runtime = _runtime(settings)
    teacher = load_model(model, arch, allow_pickle, mean, std, input_shape, settings)
    reference = None
    if against:
        reference = load_teacher(None if against == "embedded" else against, allow_pickle=allow_pickle)
        if tuple(reference.input_shape) != tuple(teacher.input_shape) or reference.num_classes != teacher.num_classes:
            raise UserError(f"--against model takes {list(reference.input_shape)}/{reference.num_classes} classes but MODEL takes "
                            f"{list(teacher.input_shape)}/{teacher.num_classes}; they cannot be compared")
    real = real_eval_data(teacher, data, limit=limit)
    if real is None and reference is not None:
        real = real_eval_data(reference, None, limit=limit)
    onnx_path = _onnx_of(model)
    with timer.section("eval"):
        metrics = evaluate(onnx_path if _is_quantized(onnx_path) else teacher, real, reference, settings,
                           onnx_path=onnx_path, runtime=runtime, latency=not no_latency)
    _finish("eval", None, report, inputs={"model": model, "data": real.source if real else None, "against": against},
            settings=settings, metrics=metrics, timer=timer)
    emit_json(metrics)


def _is_quantized(onnx_path: Optional[Path]) -> bool:
    if onnx_path is None:
        return False
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in graph.node)


# ---------------------------------------------------------------------------------------------
# demo


@app.command()
@command
def demo(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for every artefact (default: runs/demo-<time>).")] = None,
    profile: ProfileOpt = None, seed: SeedOpt = None, device: DeviceOpt = None, report: ReportOpt = None,
    dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False,
) -> None:
    """The whole pipeline on the embedded digits teacher: synthesize -> distill -> prune -> quantize -> export -> evaluate on real held-out digits."""
    from .demo import run_demo
    from .fileio import remove_if_failed

    settings = resolve(profile or "digits", _common_overrides(seed, device), dry_run, save_config)
    out = output or default_output("demo")
    with remove_if_failed(out):
        result = run_demo(settings, out, overwrite=overwrite)
    typer.echo(result["table"])
    if report:
        from .fileio import atomic_write_json

        atomic_write_json(report, result["report"])


def main() -> None:
    """Console entry point: typer handles usage errors (exit 2); commands map library errors to codes."""
    import warnings

    # torch's own pytree deprecation notice fires while loading .pt2 files; it is not the user's to fix
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
