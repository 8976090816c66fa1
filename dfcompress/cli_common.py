"""What every CLI command shares: option types, error handling, settings resolution, reports.

Commands in ``cli.py`` only parse, validate and call the library; the plumbing they all need lives here
so exit codes, ``--dry-run``/``--save-config``/``--report`` and error messages behave identically.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from .errors import DFCompressError, UserError, describe_exception, first_line
from .settings import Settings, resolve_settings

# ---------------------------------------------------------------------------------------------
# option types (typer.Annotated aliases keep each command's signature short and consistent)

ModelArg = Annotated[Optional[str], typer.Argument(help="Teacher: .pt/.pth/.th state_dict (+--arch), TorchScript, .pt2, .onnx, a dfcompress output folder; omitted = the embedded digits teacher.", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture of a state_dict teacher (see `dfcompress inspect --list-archs`).")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickled Python objects (can execute code: only for files you trust).")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Input normalisation mean, comma-separated per channel (e.g. 0.485,0.456,0.406).")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Input normalisation std, comma-separated per channel.")]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-shape", help="Teacher input as CxHxW (e.g. 3x32x32) when the file does not say.")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile name (`dfcompress profiles`) or YAML path; explicit flags override it.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Global seed (same seed + command = same result on CPU).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda[:N].")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Also write the JSON report to this path.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved settings and exit.")]
SaveConfigOpt = Annotated[Optional[Path], typer.Option("--save-config", help="Write the resolved settings as a YAML profile.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="Exit 3 when accuracy (or teacher agreement without real data) falls by more than this many points.")]
JsonOpt = Annotated[Optional[bool], typer.Option("--json/--text", help="--json: the JSON document on stdout; --text: the short summary. Default: the summary on a terminal, the JSON when stdout is a pipe or a file.", show_default=False)]


def debug_enabled() -> bool:
    return os.environ.get("DFCOMPRESS_DEBUG", "") not in ("", "0")


def echo_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def command(fn: Callable) -> Callable:
    """Turn library exceptions into one line on stderr + the documented exit code (no tracebacks).

    0 ok, 2 bad input (UserError), 3 quality gate failed, 1 internal error, 130 interrupted.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            check_finite_options(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except DFCompressError as exc:
            if debug_enabled():
                traceback.print_exc()
            echo_error(first_line(exc, None))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            echo_error("interrupted; re-run the same command to resume where it stopped")
            raise typer.Exit(130) from None
        except MemoryError:
            echo_error("out of memory; lower --batch-size")
            raise typer.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if debug_enabled():
                traceback.print_exc()
            echo_error(f"internal error ({describe_exception(exc, 300)}); re-run with DFCOMPRESS_DEBUG=1 for the traceback and report it")
            raise typer.Exit(1) from None

    return wrapper


def check_finite_options(options: dict[str, Any]) -> None:
    """Refuse NaN/inf in any float flag of any command (one check for all: NaN passes every range test)."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


# ---------------------------------------------------------------------------------------------
# parsing helpers


def parse_floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers such as 0.485,0.456,0.406; got {text!r}") from None
    if not values:
        raise UserError(f"{flag} needs at least one number")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} takes finite numbers such as 0.485,0.456,0.406; got {text!r}")
    return values


def parse_shape(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input-shape takes CxHxW such as 3x32x32; got {text!r}")
    from .models.formats.probe import validate_input_shape

    return validate_input_shape(shape)  # type: ignore[arg-type]


def resolve(profile: Optional[str], overrides: dict[str, Any], dry_run: bool, save_config: Optional[Path]) -> Settings:
    """Resolve settings; honour --save-config and --dry-run (which exits 0 after printing)."""
    settings = resolve_settings(profile, overrides)
    if save_config is not None:
        from .fileio import atomic_write_text

        atomic_write_text(save_config, settings.to_yaml())
        typer.echo(f"settings written to {save_config}", err=True)
    if dry_run:
        typer.echo(settings.to_yaml().rstrip())
        raise typer.Exit(0)
    return settings


def load_model(model: Optional[str], arch: Optional[str], allow_pickle: bool, mean: Optional[str], std: Optional[str],
               input_shape: Optional[str], settings: Optional[Settings] = None):
    """Load a teacher with preprocessing from flags > profile > file metadata."""
    from .models.loading import load_teacher

    mean_v = parse_floats(mean, "--mean") or (settings.preprocess.mean if settings else None)
    std_v = parse_floats(std, "--std") or (settings.preprocess.std if settings else None)
    shape = parse_shape(input_shape)
    teacher = load_teacher(model, arch=arch, allow_pickle=allow_pickle, mean=mean_v, std=std_v, input_shape=shape)
    if model is None:
        teacher = _embedded_with(teacher, mean_v, std_v, shape)
    return teacher


def _embedded_with(teacher, mean: Optional[list[float]], std: Optional[list[float]], shape):
    """The embedded teacher ignores nothing silently: --input-shape must match it, --mean/--std replace its own."""
    import dataclasses

    from .models.teacher import check_preprocessing

    if shape is not None and tuple(shape) != tuple(teacher.input_shape):
        c, h, w = teacher.input_shape
        raise UserError(f"--input-shape {'x'.join(map(str, shape))} does not match the embedded digits teacher ({c}x{h}x{w}); "
                        "drop --input-shape or pass a MODEL file")
    if mean is None and std is None:
        return teacher
    new_mean = tuple(mean) if mean is not None else tuple(teacher.mean)
    new_std = tuple(std) if std is not None else tuple(teacher.std)
    check_preprocessing(new_mean, new_std, teacher.input_shape[0])
    return dataclasses.replace(teacher, mean=new_mean, std=new_std)


# ---------------------------------------------------------------------------------------------
# output for people and for machines


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def wants_json(flag: Optional[bool]) -> bool:
    """--json / --text decide; otherwise JSON exactly when stdout is not a terminal (a pipe, a file, CI)."""
    return flag if flag is not None else not stdout_is_terminal()


def emit(document: Any, lines: list[str], json_flag: Optional[bool]) -> None:
    """Every command's last word: the short summary ``lines`` on stdout for a person at a terminal, or the
    JSON ``document`` on stdout for a machine, with the summary then on stderr (as progress lines are)."""
    if wants_json(json_flag):
        from .progress import log

        for line in lines:
            log(line)
        emit_json(document)
    else:
        typer.echo("\n".join(lines))


def fmt(value: Any) -> str:
    """A figure for people: thousands separators, two decimals, '-' when not measured."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def stage_summary(result: Any) -> list[str]:
    """The before -> after lines of a StageResult (measured figures only)."""
    before, after = result.before.to_dict(), result.after.to_dict()
    lines = [f"{result.stage}: result in {result.output}"]
    for key in before:
        if before[key] is not None or after[key] is not None:
            lines.append(f"  {key:10s} {fmt(before[key])} -> {fmt(after[key])}")
    return lines


def emit_json(obj: Any) -> None:
    import json

    from .fileio import _json_default

    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()
