"""Atomic, checksummed file output.

Every file dfcompress writes goes through here so that a crash (kill -9, full disk) never leaves a torn
file where a finished one is expected: data is written to a temporary file in the same directory,
fsync'ed, then renamed over the target (rename is atomic on POSIX filesystems).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (itself excluded) when it is not a folder, else None."""
    for parent in Path(path).parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def _disk_error(path: Path, exc: OSError) -> UserError:
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_ancestor(path)
        if blocker is not None:
            return UserError(f"cannot write {path}: {blocker} is a file, not a folder; choose another output path with -o")
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UserError(f"no space left while writing {path}: free disk space (finished files are kept) and re-run the same command to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: permission denied; choose a writable output path with -o")
    return UserError(f"cannot write {path}: {exc.strerror or exc}; check the output path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed onto ``path``.

    Use for writers that insist on a file name (torch.onnx.export, torch.jit.save, safetensors).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # keep the real suffix last: some writers (torch.export.save, onnx) dispatch on the extension
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix="".join(target.suffixes[-1:]), dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _disk_error(target, exc) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get normal permissions
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(target, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


REPORT_FILE = "report.json"  # written into every output folder (and wherever --report points)


def default_output(kind: str) -> Path:
    """``runs/<kind>-<timestamp>``: commands run as typed without -o and never clobber earlier runs."""
    import datetime as _dt

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{kind}-{stamp}"


def json_format(path: str | os.PathLike) -> str:
    """The ``format`` field of a JSON file ('' when missing, unreadable or not an object)."""
    obj = read_json_or_none(path)
    return str(obj.get("format", "")) if isinstance(obj, dict) else ""


def report_command(folder: str | os.PathLike) -> str | None:
    """Which command wrote ``folder/report.json`` (None without one): how output folders say who owns them."""
    obj = read_json_or_none(Path(folder) / REPORT_FILE)
    return obj.get("command") if isinstance(obj, dict) else None


def read_json_or_none(path: str | os.PathLike) -> Any:
    """The parsed JSON file, or None when it is missing, unreadable or not JSON: for probing files a
    crashed or foreign run may have left (callers decide what a missing answer means)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_json_document(path: Path, missing: str, fix: str) -> Any:
    """The parsed JSON file a finished run left; one-line UserErrors: ``missing`` when it is absent,
    ``cannot read PATH: why; fix`` when it is unreadable (callers then check that it is theirs)."""
    if not Path(path).is_file():
        raise UserError(missing)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {fix}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _holds_content(folder: Path, ignore: tuple[str, ...] = ()) -> bool:
    """True when ``folder`` (recursively) holds a file that is not hidden (temp files, probes) nor in ``ignore``."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.startswith(".") and name not in ignore:
                return True
    return False


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool,
                       resumable: bool | Callable[[Path], bool] = False) -> Path:
    """Create an output folder, refusing to clobber a foreign or finished one.

    ``resumable`` commands (synthesize, distill) may re-enter a folder they started: that is how a
    crashed run continues. Pass a predicate ``resumable(folder) -> bool`` that recognises the command's
    own (partial) output, so a folder holding anything else is refused; ``True`` accepts any folder.
    Anything else that is non-empty needs ``--overwrite``. A folder holding only hidden files (temp
    files of a run killed before it finished its first file) counts as empty.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is a file; pass a folder path to -o")
    if out.is_dir() and not overwrite and _holds_content(out):
        if not resumable:
            raise UserError(f"output folder {out} is not empty; pass --overwrite to replace it or choose another -o")
        if callable(resumable) and not resumable(out):
            raise UserError(f"output folder {out} is not empty and holds files this command did not write; "
                            "pass --overwrite to replace it or choose another -o")
    if overwrite and out.is_dir():
        import shutil

        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dfcompress-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _disk_error(out, exc) from None
    return out


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor-or-self of ``path`` that does not exist yet (what mkdir -p would create)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


@contextlib.contextmanager
def remove_if_failed(path: str | os.PathLike, *, enabled: bool = True, resumable: bool = True,
                     keep: tuple[str, ...] = ("run.json",)) -> Iterator[Path]:
    """Wrap a command that creates the output folder ``path``: if the command fails before anything
    worth keeping is written there, remove the folders this invocation created, so bad input never
    leaves a half-made output behind. For ``resumable`` commands finished files (shards, checkpoints:
    anything but hidden temp files and ``keep``) are kept, because re-running the same command resumes
    from them; a non-resumable command's partial output is useless and goes entirely."""
    out = Path(path)
    created = _first_missing(out) if enabled else None
    try:
        yield out
    except BaseException:
        if created is not None and out.is_dir() and (not resumable or not _holds_content(out, keep)):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            for parent in [out, *out.parents]:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only empty folders go; stops at the first one holding something
                if parent == created:
                    break
        raise


_TEMP_NAME = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+")


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete temp files that ``atomic_path`` left behind when a process was killed mid-write.

    Call only when no writer is active in ``folder`` (after a command finished). Returns how many went.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    walker = os.walk(root) if recursive else [(str(root), [], [p.name for p in root.iterdir() if p.is_file()])]
    for base, _dirs, files in walker:
        for name in files:
            if _TEMP_NAME.match(name):
                with contextlib.suppress(OSError):
                    (Path(base) / name).unlink()
                    removed += 1
    return removed
