"""The ``dfcompress`` command line: one typer app, one function per pipeline verb.

Each command parses and validates its flags, resolves settings (defaults < profile < flags), calls the
library and writes a report. Nothing here computes anything a notebook user could not call directly.
"""
from __future__ import annotations

from pathlib import Path
from inspect import Parameter, Signature, signature
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from . import __version__
from .cli_common import (AllowPickleOpt, ArchOpt, DeviceOpt, DryRunOpt, InputSizeOpt, JsonOpt, MaxDropOpt, MeanOpt,
                         ModelArg, OverwriteOpt, ProfileOpt, ReportOpt, SaveConfigOpt, SeedOpt, StdOpt, command, emit, fmt,
                         load_model, resolve, stage_summary)
from .errors import UserError
from .fileio import default_output
from .progress import Timer, log
from .report import finish_report
from .settings import Settings

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


# ---------------------------------------------------------------------------------------------
# inspect / profiles


@app.command()
@command
def inspect(
    model: ModelArg = None, arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, mean: MeanOpt = None,
    std: StdOpt = None, input_shape: InputSizeOpt = None, json_out: JsonOpt = None, report: ReportOpt = None,
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List the model zoo's architectures and exit.")] = False,
) -> None:
    """Show what was loaded: format, input shape, classes, BN layers or 'BN folded', stages, params, MACs."""
    if list_archs:
        from .models.zoo import list_models, model_defaults

        rows = {name: model_defaults(name) for name in list_models()}
        emit(rows, [f"{name:18s} input {d.get('input_size')}px  classes {d.get('num_classes')}" for name, d in rows.items()],
             json_out)
        return
    from .models.introspect import inspect_teacher

    timer = Timer()
    teacher = load_model(model, arch, allow_pickle, mean, std, input_shape)
    info = inspect_teacher(teacher)
    if report:
        finish_report("inspect", None, report, inputs={"model": model}, settings=None, metrics=info, timer=timer)
    emit(info, _inspect_lines(info), json_out)


def _stat_layer_kinds(info: dict) -> str:
    """What the statistics term constrains (taps.stat_layers): BN inputs, else conv outputs and token stages."""
    if info["batchnorm_layers"]:
        return "BatchNorm inputs"
    kinds = ["conv outputs"] + (["token stages"] if info["token_stages"] else [])
    return " and ".join(kinds) + "; statistics from `dfcompress stats MODEL --seeds DIR`"


def _inspect_lines(info: dict) -> list[str]:
    c, h, w = info["input_shape"]
    lines = [f"model      {info['source']}  ({info['format']}{', arch ' + info['arch'] if info.get('arch') else ''})",
             f"input      {c}x{h}x{w}   mean {list(info['mean'])}  std {list(info['std'])}",
             f"           size: {info['input_shape_from']}",
             f"classes    {info['num_classes']}"]
    lines += [f"output     {note}" for note in info["output_head"]]
    lines.append(f"batchnorm  {info['batchnorm']}" + ("" if info["batchnorm_layers"] else "; for inversion run `dfcompress stats MODEL --seeds DIR` first"))
    lines += [f"params     {info['params']:,}", f"MACs       {info['macs']:,}"]
    lines.append("stages     " + (", ".join(f"{s['channels']}ch@{s['height']}x{s['width']} (/{s['reduction']}, {s['name']})"
                                          for s in info["stages"]) or "none (no spatial feature maps)"))
    if info["token_stages"]:
        t = info["token_stages"]
        lines.append(f"tokens     {len(t)} token stages, {t[0]['tokens']} tokens x {t[0]['channels']}ch: " + ", ".join(s["name"] for s in t))
    lines.append(f"statistics {info['stat_layers']} layers ({_stat_layer_kinds(info)})")
    if not info["pyramid"]:
        lines.append("pyramid    none: NaturalInversion runs without its Feature Transfer Pyramid (no spatial stages)")
    return lines


@app.command()
@command
def profiles(name: Annotated[Optional[str], typer.Argument(help="Profile to show; omitted = list them.")] = None,
             json_out: JsonOpt = None) -> None:
    """List the shipped profiles (top-level profiles/ in the repository), or show one fully resolved (YAML)."""
    from .settings import describe_profile, list_profiles, profile_path, read_profile

    if name is None:
        rows = [{"name": p, "path": str(profile_path(p)),
                 "description": str(read_profile(p).get("description", "")).strip().split("\n")[0]} for p in list_profiles()]
        width = max((len(r["name"]) for r in rows), default=0)
        emit(rows, [f"{r['name']:{width}s}  {r['description'][:100]}" for r in rows], json_out)
        return
    typer.echo(describe_profile(name).rstrip())  # YAML: readable by people and machines alike


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
    json_out: JsonOpt = None,
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
    finish_report("stats", None, report, inputs={"model": model, "data": source}, settings=settings, metrics=metrics,
                  timer=timer, outputs={"stats": str(output)})
    emit({"stats": str(output), **metrics},
         [f"wrote {output}: {metrics['layers']} layers, {'per-class' if result.per_class else 'global'} ({result.kind})"], json_out)


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
    json_out: JsonOpt = None,
) -> None:
    """Synthesize a calibration/distillation set by model inversion (sharded, resumable).

    Re-running the same command after a crash skips the finished shards.
    """
    from .compress.stages import owned_by_synthesize
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
                prepare_output_dir(out, overwrite=overwrite and not dist.restarted, resumable=owned_by_synthesize)
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
        finish_report("synthesize", out, report, inputs={"model": model, "stats": settings.synthesize.stats},
                      settings=settings, metrics=metrics, timer=timer,
                      outputs={"synthetic_set": str(out), "preview": str(out / "preview.png")})
        emit({"synthetic_set": str(out), **metrics},
             [f"synthetic set ready: {out} ({manifest['num_images']} images, preview {out / 'preview.png'})",
              f"  teacher agrees with the target class on {metrics['teacher_agreement_with_targets']:.1f}% of them"
              + (f"; {metrics['retries']} batch(es) retried" if metrics["retries"] else "")], json_out)


def _check_batch(batch_size: int, num_images: int) -> None:
    if batch_size > num_images:
        raise UserError(f"--batch-size {batch_size} is larger than -n {num_images}; lower the batch size or synthesize more images")


# ---------------------------------------------------------------------------------------------
# distill / prune / quantize


def _stage_options(
    model: ModelArg = None, data: SynthDataOpt = None, num_images: NumImagesOpt = None, output: OutDirOpt = None,
    eval_data: EvalDataOpt = None, max_drop: MaxDropOpt = None, arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False,
    mean: MeanOpt = None, std: StdOpt = None, input_shape: InputSizeOpt = None, profile: ProfileOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, report: ReportOpt = None, dry_run: DryRunOpt = False,
    save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False, json_out: JsonOpt = None,
) -> None:
    """The options of every compression stage (declared once, given to each command by ``stage_command``)."""


def _training_options(epochs: EpochsOpt = None, method: MethodOpt = None, iterations: ItersOpt = None,
                      stats_file: StatsOpt = None) -> None:
    """distill and prune also train, and synthesize their set when no --data is given."""


def stage_command(*groups: Callable[..., None]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of ``groups`` after MODEL and its own, as typer reads a signature.

    The command takes its own options by name and the shared ones as ``**options``; typer sees one flat
    signature (``__signature__`` and ``__annotations__``), so ``--help`` and parsing are unchanged.
    """
    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in signature(fn, eval_str=True).parameters.values() if p.kind is not Parameter.VAR_KEYWORD]
        shared = [p for g in groups for p in signature(g, eval_str=True).parameters.values()]
        params = shared[:1] + own + shared[1:]  # MODEL stays the first argument
        fn.__signature__ = Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn
    return decorate


def _training_overrides(o: dict) -> dict:
    return {**_common_overrides(o["seed"], o["device"]), "synthesize.num_images": o["num_images"],
            "synthesize.method": o["method"], "synthesize.iterations": o["iterations"], "synthesize.stats": o["stats_file"]}


@app.command()
@command
@stage_command(_stage_options, _training_options)
def distill(
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Student architecture from the zoo (e.g. resnet18, wrn_16_1).")] = None,
    mix: Annotated[Optional[str], typer.Option("--mix", help="KD augmentation: none | mixup | cutmix (the teacher labels the mixed images).")] = None,
    **o: Any,
) -> None:
    """Knowledge-distil the teacher into a zoo student on a synthetic set (re-running resumes)."""
    from .models.zoo import resolve_model_name

    settings = resolve(o["profile"], {**_training_overrides(o), "distill.student": student, "distill.epochs": o["epochs"],
                                      "distill.mix": mix}, o["dry_run"], o["save_config"])
    resolve_model_name(settings.distill.student)  # fail fast on a typo, before any long work
    _run_stage("distill", settings, o)


@app.command()
@command
@stage_command(_stage_options, _training_options)
def prune(
    ratio: Annotated[Optional[float], typer.Option("--ratio", "-r", help="Fraction removed: of channels per layer (default), or of params/MACs with --target.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="What --ratio measures: channels | params | macs.")] = None,
    global_pruning: Annotated[Optional[bool], typer.Option("--global/--local", help="Rank channels across all layers instead of per layer.")] = None,
    round_to: Annotated[Optional[int], typer.Option("--round-to", help="Keep channel counts multiples of N (edge hardware).")] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help="Channel ranking: l1 (default) | l2 | taylor | hessian (gradients on the training set).")] = None,
    recalibrate_bn: Annotated[Optional[int], typer.Option("--recalibrate-bn", help="Re-estimate BatchNorm statistics on N training images after pruning (default 256; 0: off).")] = None,
    **o: Any,
) -> None:
    """L1-norm structured channel pruning (torch-pruning), then KD fine-tuning on the synthetic set."""
    settings = resolve(o["profile"], {**_training_overrides(o), "prune.ratio": ratio, "prune.target": target,
                                      "prune.global_pruning": global_pruning, "prune.round_to": round_to,
                                      "prune.epochs": o["epochs"], "prune.importance": importance,
                                      "prune.recalibrate_bn": recalibrate_bn},
                       o["dry_run"], o["save_config"])
    _run_stage("prune", settings, o)


def _run_stage(name: str, settings: Settings, o: dict) -> None:
    """distill/prune/quantize: flags -> settings -> the orchestrator; the summary follows the output rules."""
    from .compress.stages import STAGES
    from .pipeline import StageRequest, run_stage

    if not o["data"] and name != "quantize":
        _check_batch(settings.synthesize.batch_size, settings.synthesize.num_images)
    model, load_args = o["model"], (o["arch"], o["allow_pickle"], o["mean"], o["std"], o["input_shape"])
    req = StageRequest(settings, lambda s: load_model(model, *load_args, settings=s), model=model, data=o["data"],
                       eval_data=o["eval_data"], output=o["output"], max_drop=o["max_drop"], overwrite=o["overwrite"],
                       report=o["report"])
    run_stage(STAGES[name], req, summary=lambda r: emit(r.summary(), stage_summary(r), o["json_out"]))


@app.command()
@command
@stage_command(_stage_options)
def quantize(
    calibration_images: Annotated[Optional[int], typer.Option("--calibration-images", help="Synthetic images used for calibration.")] = None,
    calibrate_method: Annotated[Optional[str], typer.Option("--calibrate-method", help="Activation range estimator: minmax | entropy | percentile.")] = None,
    per_channel: Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel (default) or one per tensor.")] = None,
    symmetric_activations: Annotated[Optional[bool], typer.Option("--symmetric-activations/--asymmetric-activations", help="Activation zero point fixed at 0, or fitted (default).")] = None,
    **o: Any,
) -> None:
    """INT8 post-training quantization with onnxruntime (static, QDQ, per-channel), calibrated on synthetic images."""
    settings = resolve(o["profile"], {**_common_overrides(o["seed"], o["device"]), "synthesize.num_images": o["num_images"],
                                      "quantize.calibration_images": calibration_images, "quantize.calibrate_method": calibrate_method,
                                      "quantize.per_channel": per_channel, "quantize.symmetric_activations": symmetric_activations},
                       o["dry_run"], o["save_config"])
    _run_stage("quantize", settings, o)


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
    json_out: JsonOpt = None,
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
    finish_report("export", None, report, inputs={"model": model}, settings=settings, metrics=result, timer=timer,
                  outputs={"file": str(output)})
    emit(result, [f"exported {output} ({result.get('bytes', 0):,} bytes); max |Δlogit| {result.get('max_abs_diff')}, "
                  f"top-1 agreement {result.get('top1_agreement')}"], json_out)


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
    report: ReportOpt = None, dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, json_out: JsonOpt = None,
) -> None:
    """Top-1 on real data, agreement with a teacher, params, MACs, file size and onnxruntime latency."""
    from .evaluate import evaluate
    from .models.loading import load_teacher
    from .models.model_dir import is_quantized_onnx, onnx_file_of
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
    onnx_path = onnx_file_of(model)
    with timer.section("eval"):  # a quantized graph runs in onnxruntime, with MODEL's recorded (or given) preprocessing
        metrics = evaluate(onnx_path if is_quantized_onnx(onnx_path) else teacher, real, reference, settings,
                           onnx_path=onnx_path, runtime=runtime, latency=not no_latency, preprocessing=teacher)
    finish_report("eval", None, report, inputs={"model": model, "data": real.source if real else None, "against": against},
                  settings=settings, metrics=metrics, timer=timer)
    emit(metrics, _eval_lines(model, metrics), json_out)


def _eval_lines(model: Optional[str], m: dict) -> list[str]:
    b1 = ((m.get("latency") or {}).get("batch_1") or {}).get("p50_ms")
    return [f"{model or 'embedded teacher'}: top-1 {fmt(m.get('top1'))} %, agreement {fmt(m.get('agreement'))} % "
            f"on {m.get('num_images', 0)} images",
            f"  params {fmt(m.get('params'))}  MACs {fmt(m.get('macs'))}  bytes {fmt(m.get('onnx_bytes') or m.get('model_bytes'))}"
            f"  latency b1 p50 {fmt(b1)} ms"]


# ---------------------------------------------------------------------------------------------
# demo


@app.command()
@command
def demo(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for every artefact (default: runs/demo-<time>).")] = None,
    profile: ProfileOpt = None, seed: SeedOpt = None, device: DeviceOpt = None, report: ReportOpt = None,
    dry_run: DryRunOpt = False, save_config: SaveConfigOpt = None, overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """The whole pipeline on the embedded digits teacher: synthesize -> distill -> prune -> quantize -> export -> evaluate on real held-out digits."""
    from .demo import run_demo
    from .fileio import remove_if_failed

    settings = resolve(profile or "digits", _common_overrides(seed, device), dry_run, save_config)
    out = output or default_output("demo")
    with remove_if_failed(out):
        result = run_demo(settings, out, overwrite=overwrite)
    emit({"output": str(out), "rows": result["rows"]}, result["table"].splitlines(), json_out)
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
