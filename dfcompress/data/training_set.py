"""Training sets made of several sources: synthetic sets, real image folders and ``.npz`` files, mixed by weight.

Users often hold a few hundred unlabelled production images or the seed images they gave ``stats``.
``--data`` takes any of them, several times, each with an optional share (``--data synth/ --data
seeds.npz:0.2``). Rather than teaching every consumer (KD loader, calibration reader, hold-out split)
about many formats, the mixture is written once as an ordinary synthetic-format set (uint8 shards +
labels + the teacher's logits) in the output folder; everything downstream reads that folder as before.

A single synthetic set is used in place, untouched: the synthetic-only path (and its exact resume)
does not change. A mixed set is keyed by (teacher sha256, preprocessing, each source's fingerprint and
weight, seed); a resumed run with the same key reuses it, so the teacher's logits are computed once.
Labels are optional: unlabelled images take the teacher's top-1 class as label (KD uses logits anyway).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import UserError
from ..progress import log
from ..seeds import MIX_DRAW, MIX_SHUFFLE, seeded_generator, stream_seed

MIXED_METHOD = "mixed"
MIXED_DIR = "training-set"
SHARD_SIZE = 256


@dataclass(frozen=True)
class DataSource:
    """One ``--data`` value: a path (synthetic set, ImageFolder, flat image folder, .npz, digits:*) and its share."""

    path: str
    weight: Optional[float] = None

    @property
    def kind(self) -> str:
        p = Path(self.path)
        if self.path.startswith("digits:"):
            return "digits"
        if p.is_dir() and (p / "manifest.json").is_file():
            return "synthetic"
        if p.is_dir():
            return "images"
        if p.suffix.lower() == ".npz":
            return "npz"
        return "unknown"


def parse_source(text: str) -> DataSource:
    """``PATH`` or ``PATH:WEIGHT``; the suffix after the last ':' is a weight only if it parses as a float
    (so ``digits:test`` and paths holding colons stay paths)."""
    text = str(text).strip()
    if not text:
        raise UserError("--data needs a path (a synthetic set folder, an image folder or an .npz file)")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return DataSource(text)
        if not math.isfinite(weight) or weight <= 0:
            raise UserError(f"--data {text}: the weight after ':' must be a positive number, got {tail}")
        return DataSource(head, weight)
    return DataSource(text)


def parse_sources(values: Optional[Sequence[str] | str]) -> list[DataSource]:
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    sources = [parse_source(v) for v in items]
    if len(sources) == 1 and sources[0].weight is not None:
        log(f"note: --data {sources[0].path} is the only source; its weight {sources[0].weight} has no effect")
    return sources


def shares(sources: Sequence[DataSource], sizes: Sequence[int]) -> list[float]:
    """Fraction of the mixed set each source gets.

    Unweighted sources keep their natural share (size / total). Weighted ones get exactly their weight
    (a fraction of the whole), and the unweighted ones split what is left in proportion to their sizes;
    when every source is weighted, weights are relative (normalised to sum 1: ``a:2 b:1`` works).
    """
    weights = [s.weight for s in sources]
    if all(w is None for w in weights):
        total = sum(sizes)
        return [n / total for n in sizes]
    if all(w is not None for w in weights):
        total = sum(weights)  # type: ignore[arg-type]
        return [float(w) / total for w in weights]  # type: ignore[arg-type]
    fixed = sum(w for w in weights if w is not None)
    if fixed >= 1.0:
        raise UserError(f"the --data weights add up to {fixed:g}, leaving nothing for the sources without a weight; "
                        "give weights that sum below 1, or weight every source")
    free = sum(n for n, w in zip(sizes, weights) if w is None)
    return [w if w is not None else (1.0 - fixed) * n / free for n, w in zip(sizes, weights)]


def counts_for(shares_: Sequence[float], total: int) -> list[int]:
    """Integer image counts summing to ``total`` (largest remainder), at least 1 per source."""
    raw = [s * total for s in shares_]
    counts = [max(1, int(math.floor(r))) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts


def draw(n_available: int, n_wanted: int, seed: int) -> torch.Tensor:
    """Seeded indices: a random subset when shrinking, every image once plus a random remainder when growing."""
    g = torch.Generator().manual_seed(int(seed))
    reps, rest = divmod(n_wanted, n_available)
    idx = [torch.arange(n_available)] * reps + [torch.randperm(n_available, generator=g)[:rest].sort().values]
    return torch.cat(idx)


# -- loading each source as (uint8 images, labels or None, logits or None) -----------------------------

@dataclass
class _Loaded:
    images: torch.Tensor             # uint8 [N, C, H, W]
    labels: Optional[torch.Tensor]   # int64 [N] or None
    logits: Optional[torch.Tensor]   # float32 [N, K] when the source carries this teacher's logits
    fingerprint: str


def _file_fingerprint(path: Path) -> str:
    """Cheap identity of a file or folder tree: names, sizes and mtimes (content hashing every image is slow)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _load(source: DataSource, teacher: Any) -> _Loaded:
    from .real import load_images
    from .synthetic import SyntheticSet

    kind = source.kind
    if kind == "synthetic":
        ds = SyntheticSet(source.path)
        check_set_matches(ds, teacher, source.path)
        if not ds.num_shards:
            raise UserError(f"synthetic set {source.path} holds no images")
        images, labels, logits = ds.tensors()
        same_teacher = (ds.manifest.get("teacher") or {}).get("sha256") == teacher.sha256
        fp = hashlib.sha256(json.dumps([s["sha256"] for s in ds.manifest["shards"]]).encode()).hexdigest()
        return _Loaded(images, labels, logits if same_teacher else None, fp)
    if kind == "unknown":
        p = Path(source.path)
        if not p.exists():
            raise UserError(f"--data {source.path} not found; pass a synthetic set folder, an image folder or an .npz file")
        raise UserError(f"--data {source.path}: use a synthetic set folder, an image folder (one sub-folder per class, or flat) or an .npz with x (uint8 NHWC)")
    data = load_images(source.path, teacher.input_shape, num_classes=teacher.num_classes, labels_optional=True)
    fp = source.path if kind == "digits" else _file_fingerprint(Path(source.path))
    return _Loaded(data.x, data.y, None, fp)


def check_set_matches(ds: Any, teacher: Any, where: str) -> None:
    """A synthetic set must have been made for this teacher's input shape and class count."""
    recorded = ds.manifest.get("teacher", {})
    if list(ds.input_shape) != list(teacher.input_shape) or ds.num_classes != teacher.num_classes:
        raise UserError(f"synthetic set {where} was made for a {list(ds.input_shape)} / {ds.num_classes}-class "
                        f"teacher, but this teacher takes {list(teacher.input_shape)} / {teacher.num_classes} classes")
    if recorded.get("sha256") and recorded.get("sha256") != teacher.sha256:
        log(f"note: synthetic set {where} was made from another teacher file (sha256 {recorded['sha256'][:12]}…)")


# -- the mixed set -------------------------------------------------------------------------------------

def mixture_key(teacher: Any, sources: Sequence[DataSource], fingerprints: Sequence[str], seed: int) -> str:
    """What decides the mixed set's bytes: teacher file + preprocessing, sources, weights, seed."""
    ident = {"teacher": teacher.sha256, "input_shape": list(teacher.input_shape), "mean": list(teacher.mean),
             "std": list(teacher.std), "seed": int(seed),
             "sources": [[s.path, s.weight, fp] for s, fp in zip(sources, fingerprints)]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def build_training_set(teacher: Any, sources: Sequence[DataSource], out_dir: Path, seed: int, runtime: Any = None) -> Path:
    """Write (or reuse) the mixed synthetic-format set of ``sources`` in ``out_dir``; returns its folder.

    The set holds as many images as the sources together, split by ``shares``; every source and its
    share is recorded in the manifest under ``sources``.
    """
    from .synthetic import build_manifest, read_manifest, teacher_logits, write_manifest, write_shard

    loaded = [_load(s, teacher) for s in sources]
    sizes = [int(item.images.shape[0]) for item in loaded]
    for s, n in zip(sources, sizes):
        if n == 0:
            raise UserError(f"--data {s.path} holds no images")
    key = mixture_key(teacher, sources, [item.fingerprint for item in loaded], seed)
    out = Path(out_dir)
    if (out / "manifest.json").is_file():
        try:
            if read_manifest(out).get("key") == key:
                log(f"training set: reusing {out} (same sources, teacher and seed)")
                return out
        except UserError:
            pass
    if out.exists():
        shutil.rmtree(out)
    fractions = shares(sources, sizes)
    counts = counts_for(fractions, sum(sizes))
    images, labels, logits, records = [], [], [], []
    for i, (src, item, n) in enumerate(zip(sources, loaded, counts)):
        idx = draw(sizes[i], n, stream_seed(seed, MIX_DRAW, i))
        x = item.images[idx].contiguous()
        z = item.logits[idx] if item.logits is not None else teacher_logits(teacher, x, runtime)
        y = item.labels[idx] if item.labels is not None else z.argmax(1)
        images.append(x), labels.append(y.to(torch.int64)), logits.append(z.float())
        records.append({"path": src.path, "kind": src.kind, "weight": src.weight, "available": sizes[i], "images": n,
                        "share": round(n / sum(counts), 6), "labels": "given" if item.labels is not None else "teacher",
                        "logits": "stored" if item.logits is not None else "teacher"})
        log(f"training set: {src.path} ({src.kind}) -> {n} images, {n / sum(counts):.1%}"
            + ("" if n <= sizes[i] else f" (each of {sizes[i]} images used ~{n / sizes[i]:.1f}x)"))
    x, y, z = torch.cat(images), torch.cat(labels), torch.cat(logits)
    perm = torch.randperm(x.shape[0], generator=seeded_generator(stream_seed(seed, MIX_SHUFFLE)))
    x, y, z = x[perm].contiguous(), y[perm].contiguous(), z[perm].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    entries = [write_shard(out, k, x[s:s + SHARD_SIZE], y[s:s + SHARD_SIZE], z[s:s + SHARD_SIZE], teacher.num_classes)
               for k, s in enumerate(range(0, x.shape[0], SHARD_SIZE))]
    write_manifest(out, build_manifest(method=MIXED_METHOD, settings={}, seed=seed, teacher=teacher, shards=entries,
                                       shard_size=SHARD_SIZE, extra={"key": key, "sources": records}))
    return out


def describe_sources(manifest: dict[str, Any], where: str | Path) -> list[dict[str, Any]]:
    """Every source of a training set and its share, for reports (a plain synthetic set is its own source)."""
    if manifest.get("sources"):
        return manifest["sources"]
    return [{"path": str(where), "kind": "synthetic", "weight": None, "available": manifest.get("num_images"),
             "images": manifest.get("num_images"), "share": 1.0, "labels": "synthesized", "logits": "stored"}]


def training_set(teacher: Any, values: Optional[Sequence[str] | str], out_dir: Path, seed: int,
                 runtime: Any = None) -> Optional[Path]:
    """The folder to train/calibrate on for ``--data`` values, or None when none were given.

    One synthetic set is used where it is (checked); anything else is built into ``out_dir``.
    """
    sources = parse_sources(values)
    if not sources:
        return None
    if len(sources) == 1 and sources[0].kind == "synthetic":
        from .synthetic import SyntheticSet

        check_set_matches(SyntheticSet(sources[0].path), teacher, sources[0].path)
        return Path(sources[0].path)
    return build_training_set(teacher, sources, out_dir, seed, runtime)
