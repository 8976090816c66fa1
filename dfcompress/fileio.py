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


def _disk_error(path: Path, exc: OSError) -> UserError:
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


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool, resumable: bool = False) -> Path:
    """Create an output folder, refusing to clobber a foreign or finished one.

    ``resumable`` commands (synthesize, distill) may re-enter a folder they started: that is how a
    crashed run continues. Anything else that is non-empty needs ``--overwrite``.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is a file; pass a folder path to -o")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resumable):
        raise UserError(f"output folder {out} is not empty; pass --overwrite to replace it or choose another -o")
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
