"""The on-disk synthetic set: ``DIR/manifest.json`` plus safetensors shards, read back as a streaming Dataset.

Images are stored as uint8 in *pixel space* (de-normalised, clamped, ``round(x * 255)``) so a set is
independent of the teacher's preprocessing, small on disk, and exactly what a student will be shown;
the teacher's logits are computed on those stored uint8 images, so KD targets match the stored
pixels bit for bit. Shards are serialised deterministically (same tensors -> same bytes), which is
what makes resumed runs byte-identical. ``manifest.json`` is written last: its presence means the
set is complete.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save
from torch.utils.data import Dataset

from .. import __version__
from ..device import run_batched
from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json, read_json_document, sha256_bytes, sha256_file
from ..models.teacher import Teacher

FORMAT = "dfcompress-synthetic/1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"


def shard_file(index: int) -> str:
    """Relative path of shard ``index`` inside a set folder."""
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """Pixel-space float [0,1] -> uint8 with a fixed rule (clamp, round(x*255)); never per-image min-max."""
    return (images01.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def counts_per_class(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.long().cpu(), minlength=num_classes).tolist()


@torch.no_grad()
def teacher_logits(teacher: Teacher, images_uint8: torch.Tensor, runtime=None, batch_size: int = 256) -> torch.Tensor:
    """The teacher's float32 logits on stored uint8 images (re-normalised), eval mode, on CPU.

    Raises UserError when the teacher yields NaN/inf: such targets would poison every student.
    """
    outs = run_batched(teacher.module, images_uint8, lambda b, dev: teacher.normalize(b.to(dev).float() / 255.0),
                       runtime, batch_size)
    logits = torch.cat(outs) if outs else torch.zeros(0, teacher.num_classes)
    if not torch.isfinite(logits).all():
        raise UserError(f"the teacher {teacher.source} produces NaN/inf logits on valid images; check the model file and its --mean/--std")
    return logits.contiguous()


def encode_shard(images_uint8: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> bytes:
    """Deterministic safetensors bytes for one shard (validated dtypes/shapes, contiguous CPU tensors)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError("images must be uint8 [N, C, H, W]")
    n = images_uint8.shape[0]
    if labels.shape != (n,) or logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"labels [N] and logits [N, K] must match {n} images")
    tensors = {
        "images": images_uint8.cpu().contiguous(),
        "labels": labels.to(torch.int64).cpu().contiguous(),
        "logits": logits.to(torch.float32).cpu().contiguous(),
    }
    return _st_save(tensors, metadata={"format": FORMAT})


def write_shard(out_dir: str | Path, index: int, images_uint8: torch.Tensor, labels: torch.Tensor,
                logits: torch.Tensor, num_classes: int, retries: int = 0) -> dict[str, Any]:
    """Atomically write shard ``index``; returns its manifest entry (file, sha256, count, counts_per_class, retries)."""
    data = encode_shard(images_uint8, labels, logits)
    rel = shard_file(index)
    atomic_write_bytes(Path(out_dir) / rel, data)
    return {
        "file": rel,
        "sha256": sha256_bytes(data),
        "count": int(images_uint8.shape[0]),
        "counts_per_class": counts_per_class(labels, num_classes),
        "retries": int(retries),
    }


def versions() -> dict[str, str]:
    """Only what decides a shard's bytes (report.versions() records the whole environment)."""
    import safetensors

    return {"dfcompress": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def build_manifest(*, method: str, settings: dict | None, seed: int | None, teacher: Teacher,
                   shards: list[dict[str, Any]], shard_size: int, extra: dict | None = None) -> dict[str, Any]:
    """The manifest dict; ``shards`` in index order."""
    total = [0] * teacher.num_classes
    for s in shards:
        total = [a + b for a, b in zip(total, s["counts_per_class"])]
    manifest = {
        "format": FORMAT,
        "method": method,
        "settings": settings or {},
        "seed": seed,
        "teacher": teacher.describe(),
        "num_images": sum(int(s["count"]) for s in shards),
        "num_classes": teacher.num_classes,
        "input_shape": list(teacher.input_shape),
        "shard_size": int(shard_size),
        "shards": shards,
        "counts_per_class": total,
        "retries": sum(int(s.get("retries", 0)) for s in shards),
        "versions": versions(),
    }
    manifest.update(extra or {})
    return manifest


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(out_dir) / MANIFEST
    atomic_write_json(path, manifest)
    return path


def write_synthetic_set(out_dir: str | Path, images_uint8: torch.Tensor, labels: torch.Tensor,
                        logits: Optional[torch.Tensor], teacher: Teacher, method: str = "external",
                        settings: dict | None = None, shard_size: int = 256, seed: int | None = None) -> Path:
    """Write a complete, valid set (shards + manifest) from given tensors; ``logits=None`` computes them.

    For tests and for importing images made elsewhere; ``dfcompress synthesize`` uses the runner.
    """
    n = images_uint8.shape[0]
    if tuple(images_uint8.shape[1:]) != tuple(teacher.input_shape):
        raise UserError(f"images of shape {tuple(images_uint8.shape[1:])} do not match the teacher's input {tuple(teacher.input_shape)}")
    labels = labels.to(torch.int64).cpu()
    if n and (labels.min() < 0 or labels.max() >= teacher.num_classes):
        raise UserError(f"labels must lie in [0, {teacher.num_classes})")
    if logits is None:
        logits = teacher_logits(teacher, images_uint8)
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, start + shard_size)
        entries.append(write_shard(out, k, images_uint8[sl], labels[sl], logits[sl], teacher.num_classes))
    write_manifest(out, build_manifest(method=method, settings=settings, seed=seed, teacher=teacher,
                                       shards=entries, shard_size=shard_size))
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and check ``DIR/manifest.json`` (UserError when missing, unfinished or not ours)."""
    d = Path(directory)
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"synthetic set {d} not found; create it with `dfcompress synthesize MODEL -o {d}`")
    manifest = read_json_document(path, f"{d} has no manifest.json, so it is not a finished synthetic set; re-run the same "
                                  "`dfcompress synthesize` command to resume it", "re-run `dfcompress synthesize` to rebuild the set")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a dfcompress synthetic-set manifest (expected format {FORMAT!r})")
    return manifest


class SyntheticSet(Dataset):
    """Streaming map-style Dataset over a synthetic set: ``(image float32 [0,1] CxHxW, label int64, logits float32 [K])``.

    Rows are read with safetensors ``get_slice`` from at most ``max_open`` memory-mapped shards
    (LRU), so memory does not grow with the number of images. Each shard's sha256 is checked against
    the manifest the first time it is opened.
    """

    def __init__(self, directory: str | Path, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 max_open: int = 2):
        self.dir = Path(directory)
        self.transform = transform
        self.max_open = max(1, int(max_open))
        self._manifest = read_manifest(self.dir)
        self._shards = self._manifest["shards"]
        self._starts: list[int] = []
        total = 0
        for s in self._shards:
            self._starts.append(total)
            total += int(s["count"])
        self._len = total
        self._open: "OrderedDict[int, Any]" = OrderedDict()
        self._verified: set[int] = set()
        self._labels: Optional[torch.Tensor] = None

    # -- properties -----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def num_classes(self) -> int:
        return int(self._manifest["num_classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self._manifest["input_shape"])  # type: ignore[return-value]

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def labels(self) -> torch.Tensor:
        """All labels (int64 [N]); reads only the small ``labels`` tensor of each shard."""
        if self._labels is None:
            parts = [self._handle(k).get_tensor("labels") for k in range(len(self._shards))]
            self._labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return self._labels

    # -- Dataset --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        k, row = self.locate(index)
        h = self._handle(k)
        image = h.get_slice("images")[row:row + 1][0].float().div_(255.0)
        label = h.get_slice("labels")[row:row + 1][0]
        logits = h.get_slice("logits")[row:row + 1][0]
        if self.transform is not None:
            image = self.transform(image)
        return image, label, logits

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row in that shard) of item ``index``."""
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def shard(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole shard ``k`` as (images uint8, labels, logits): fast sequential access for callers that want it."""
        h = self._handle(k)
        return h.get_tensor("images"), h.get_tensor("labels"), h.get_tensor("logits")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole set as (images uint8, labels, logits) in index order, read shard by shard."""
        images, labels, logits = (torch.cat(column) for column in zip(*(self.shard(k) for k in range(self.num_shards))))
        return images, labels, logits

    def verify(self) -> None:
        """Check every shard against the manifest now (streaming, one at a time), not on first use:
        a command that would otherwise log progress first fails with one clear line instead."""
        for k in range(self.num_shards):
            self._check(k)

    # -- internals ------------------------------------------------------------------------------
    def _check(self, k: int) -> Path:
        entry = self._shards[k]
        path = self.dir / entry["file"]
        if not path.is_file():
            raise UserError(f"synthetic set {self.dir} is missing shard {entry['file']}; re-run `dfcompress synthesize` with the same options to regenerate it")
        if k not in self._verified:
            if sha256_file(path) != entry["sha256"]:
                raise UserError(f"shard {path} is corrupted (sha256 does not match manifest.json); delete it and re-run the same `dfcompress synthesize` command to regenerate it")
            self._verified.add(k)
        return path

    def _handle(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        path = self._check(k)
        handle = safe_open(str(path), framework="pt", device="cpu")
        self._open[k] = handle
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    @property
    def open_shards(self) -> int:
        """How many shard files are mapped right now (bounded by ``max_open``)."""
        return len(self._open)

    def __getstate__(self) -> dict:
        # safetensors handles cannot cross process boundaries (DataLoader workers): reopen lazily there
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state
