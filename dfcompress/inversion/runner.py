"""The synthesis runner: sharding, seeds, balanced labels, NaN retries, teacher logits, resume, files.

A synthesizer turns (labels, seed) into images; everything that makes a run reproducible and
crash-safe lives here. Each shard is a pure function of (teacher, settings, seed, shard index):
its labels and per-batch seeds come from stable hashes, never from global RNG state or from which
shards ran before. A finished shard is marked by a sidecar JSON written *after* the shard, so a
crashed run re-entered with the same command skips what is done and produces byte-identical files
on CPU. ``manifest.json`` is written last and means "complete".

Methods with carried state (ADI's student, CMI's memory bank, fast NaturalInversion's meta-generator)
declare how many leading shards depend on the batches before them (``Synthesizer.sequential_shards``).
Those are made in order on one process, and the state after shard k is saved as
``shards/state-0000k.safetensors`` to resume exactly. The state after the last sequential shard is
frozen: every later shard starts from it, so later shards are pure functions of their index again and
ranks make them in parallel once rank 0 has finished the sequential ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from pathlib import Path
import time
from typing import Any, Callable, Optional

import torch

from ..data.images import save_curves_png, save_image_grid
from ..data.synthetic import (MANIFEST, SHARD_DIR, build_manifest, shard_file, teacher_logits, to_uint8,
                              write_manifest, write_shard)
from ..device import Runtime
from ..errors import NumericalError, UserError
from ..fileio import (atomic_path, atomic_write_json, atomic_write_text, read_json_or_none, remove_stale_temps,
                      sha256_file)
from ..models.teacher import Teacher
from ..progress import log
from ..progress import progress as progress_ctx
from ..seeds import SHARD_LABELS, seeded_generator, synthesis_seed
from ..settings import Settings
from .synthesizers.base import BatchResult, Synthesizer
from .synthesizers.fast_ni import FAST_METHOD

RUN_FILE = "run.json"
RUN_FORMAT = "dfcompress-synthesize-run/1"
# settings that do not change what any finished shard contains, so they may differ on resume
# (num_images: a larger -n extends a set; shards whose size changed are redone)
_NOT_IN_KEY = ("num_images", "max_retries", "preview_per_class")
PREVIEW_MAX_CLASSES = 20
LABEL_RULE = "image i has class i % K (balanced), shuffled within its shard"


# -- pure helpers --------------------------------------------------------------------------------

def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """Shard k covers global image indices [k*S, min(N, (k+1)*S))."""
    return [(s, min(num_images, s + shard_size)) for s in range(0, num_images, shard_size)]


def shard_labels(seed: int, index: int, start: int, stop: int, num_classes: int) -> torch.Tensor:
    """Balanced labels (global image i -> class i % K), shuffled within the shard by (seed, index)."""
    labels = torch.arange(start, stop, dtype=torch.int64) % num_classes
    g = seeded_generator(synthesis_seed(seed, SHARD_LABELS, index))
    return labels[torch.randperm(stop - start, generator=g)]


def _stats_fingerprint(stats) -> Optional[dict[str, Any]]:
    if stats is None:
        return None
    h = hashlib.sha256()
    for name in stats.layer_names:
        for t in (stats.mean[name], stats.var[name]):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(stats.counts.cpu().numpy().tobytes())
    return {"kind": stats.kind, "per_class": stats.per_class, "source": stats.source, "sha256": h.hexdigest()}


def run_record(teacher: Teacher, settings: Settings, stats=None) -> dict[str, Any]:
    """What a partial set was made with; ``key`` hashes everything that determines shard contents."""
    synth = dataclasses.asdict(settings.synthesize)
    keyed = {k: v for k, v in synth.items() if k not in _NOT_IN_KEY}
    identity = {"settings": keyed, "seed": settings.seed, "teacher_sha256": teacher.sha256,
                "mean": list(teacher.mean), "std": list(teacher.std), "stats": _stats_fingerprint(stats)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"format": RUN_FORMAT, "run_key": key, "seed": settings.seed, "teacher": teacher.describe(),
            "settings": synth, "stats": identity["stats"]}


# -- files ---------------------------------------------------------------------------------------

def _sidecar(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"shard-{k:05d}.json"


def _loss_file(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"shard-{k:05d}.loss.json"


def _state_file(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"state-{k:05d}.safetensors"


def _shard_done(out: Path, k: int, count: int, key: str, sequential: bool) -> Optional[dict]:
    """The sidecar of a finished, intact shard of this run; None when it must be (re)made."""
    side = read_json_or_none(_sidecar(out, k))
    shard = out / shard_file(k)
    if not side or side.get("run_key") != key or side.get("count") != count or not shard.is_file():
        return None
    if not _loss_file(out, k).is_file() or (sequential and not _state_file(out, k).is_file()):
        return None
    if sha256_file(shard) != side.get("sha256"):
        return None
    return side


def _check_run(out: Path, record: dict) -> None:
    """Refuse to mix shards of different runs in one folder; record this run when the folder is fresh."""
    path = out / RUN_FILE
    has_work = ((out / SHARD_DIR).is_dir() and any((out / SHARD_DIR).iterdir())) or (out / MANIFEST).is_file()
    existing = read_json_or_none(path) if path.is_file() else None  # read after has_work: another rank may be starting
    if existing is None:
        if has_work:
            raise UserError(f"{out} holds files that are not from a resumable synthesize run; pass --overwrite to start over or choose another -o")
        atomic_write_json(path, record)
        return
    if existing.get("run_key") != record["run_key"] and has_work:
        old, new = existing.get("settings", {}), record["settings"]
        diff = sorted(k for k in new if k not in _NOT_IN_KEY and old.get(k) != new.get(k))
        if existing.get("seed") != record["seed"]:
            diff.append("seed")
        if (existing.get("teacher") or {}).get("sha256") != record["teacher"]["sha256"]:
            diff.append("teacher")
        what = ", ".join(diff) or "statistics or preprocessing"
        raise UserError(f"{out} holds a partial synthetic set made with different {what}; pass --overwrite to start over, or choose another -o")
    if existing != record:  # only num_images/max_retries/preview differ: keep run.json current
        atomic_write_json(path, record)


def _encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Nested state (dicts with int/str keys, lists, tensors, scalars) -> JSON tree + flat tensor dict."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:  # keep distinct leaves distinct even if their paths print alike
            key += "_"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"t": key}
    if isinstance(obj, dict):
        return {"d": [[k, _encode_tree(v, tensors, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l": [_encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"cannot persist {type(obj).__name__} in a synthesizer state")


def _decode_tree(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "t" in node:
        return tensors[node["t"]]
    if "d" in node:
        return {k: _decode_tree(v, tensors) for k, v in node["d"]}
    if "l" in node:
        items = [_decode_tree(v, tensors) for v in node["l"]]
        return tuple(items) if node.get("tuple") else items
    return node["v"]


_STATE_KEY = "dfcompress-synthesizer-state/1"


def _save_state(synth: Synthesizer, path: Path) -> None:
    """The synthesizer's carried state (``Synthesizer.state()``) as safetensors, written atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode_tree(synth.state(), tensors)
    with atomic_path(path) as tmp:
        # one metadata key: safetensors does not keep the order of several, which would break byte-identity
        save_file(tensors, str(tmp), metadata={_STATE_KEY: json.dumps(tree, sort_keys=True)})


def _load_state(synth: Synthesizer, path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path} is missing, so the {synth.name} run cannot resume exactly; pass --overwrite to start over")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = _decode_tree(json.loads((f.metadata() or {})[_STATE_KEY]), tensors)
    synth.load_state(state)


# -- one shard -----------------------------------------------------------------------------------

def _make_batch(synth: Synthesizer, labels: torch.Tensor, seed: int, k: int, b: int, max_retries: int,
                on_step, expected_shape: tuple[int, ...]) -> tuple[BatchResult, int, int]:
    """Run one batch, retrying with a new seed on NaN/inf; returns (result, attempts used - 1, seed used)."""
    last = None
    for attempt in range(max_retries + 1):
        batch_seed = synthesis_seed(seed, k, b, attempt)
        try:
            res = synth.synthesize_batch(labels, batch_seed, on_step)
            if not torch.isfinite(res.images01).all():
                raise NumericalError("the synthesizer returned non-finite pixels")
        except NumericalError as exc:
            last = exc
            log(f"shard {k} batch {b}: loss became NaN/inf (attempt {attempt + 1} of {max_retries + 1}); retrying with a new seed")
            continue
        if tuple(res.images01.shape) != expected_shape:
            raise RuntimeError(f"synthesizer returned images {tuple(res.images01.shape)}, expected {expected_shape}")
        return res, attempt, batch_seed
    raise NumericalError(
        f"shard {k} batch {b}: the loss became NaN/inf in all {max_retries + 1} attempts ({last}); "
        "lower the learning rates or the loss weights, or raise synthesize.max_retries"
    )


def _make_shard(synth: Synthesizer, teacher: Teacher, runtime: Runtime, settings: Settings, out: Path, k: int,
                start: int, stop: int, key: str, on_step, learn: bool) -> dict:
    """Make shard k; ``learn``: a sequential shard (the synthesizer learns after every batch, state saved)."""
    s = settings.synthesize
    labels = shard_labels(settings.seed, k, start, stop, teacher.num_classes)
    synth.start_shard(k)
    images, logits, batches, rows = [], [], [], []
    components: list[str] = []
    retries = 0
    for b, lo in enumerate(range(0, stop - start, s.batch_size)):
        lab = labels[lo:lo + s.batch_size]
        res, attempt, used_seed = _make_batch(synth, lab, settings.seed, k, b, s.max_retries,
                                              lambda it, comp, b=b: on_step(k, b, it, comp),
                                              (lab.shape[0], *teacher.input_shape))
        retries += attempt
        u8 = to_uint8(res.images01)
        lg = teacher_logits(teacher, u8, runtime)
        if learn:
            synth.after_batch(u8.float() / 255.0, lg)
        images.append(u8)
        logits.append(lg)
        for it, comp in enumerate(res.history):
            for name in comp:
                if name not in components:
                    components.append(name)
            rows.append([b, it] + [comp.get(name) for name in components])
        final = res.history[-1] if res.history else {}
        batches.append({"batch": b, "seed": used_seed, "retries": attempt, "best_loss": _num(res.best_loss),
                        "final": {n: _num(v) for n, v in final.items()}})
    entry = write_shard(out, k, torch.cat(images), labels, torch.cat(logits), teacher.num_classes, retries)
    width = len(components)
    atomic_write_json(_loss_file(out, k), {"components": components, "rows": [r + [None] * (2 + width - len(r)) for r in rows]})
    if learn:
        _save_state(synth, _state_file(out, k))
    side = dict(entry, index=k, run_key=key, loss={"batches": batches})
    atomic_write_json(_sidecar(out, k), side)
    return side


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- public API ----------------------------------------------------------------------------------

def synthesize(teacher: Teacher, settings: Settings, out_dir: str | Path, runtime: Runtime, stats=None,
               rank: int = 0, world_size: int = 1, progress=None, synthesizer: Optional[Synthesizer] = None,
               barrier: Optional[Callable[[], None]] = None) -> dict:
    """Make (or resume) the synthetic set in ``out_dir``; returns the manifest (rank 0, world size 1).

    With ``world_size > 1`` rank r makes the parallel shards k with k % world_size == r (after rank 0 has
    made the sequential ones, see the module docstring; ``barrier`` waits for it, default
    ``torch.distributed.barrier``) and returns ``{"rank", "shards"}``; after a barrier rank 0 calls
    ``finalize(...)`` to write the manifest. ``synthesizer`` overrides ``build_synthesizer`` (tests, custom methods).
    """
    s = settings.synthesize
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if stats is not None:
        stats.check_matches(teacher)
    record = run_record(teacher, settings, stats)
    runtime.prepare(teacher.module)
    teacher.module.eval()
    _check_teacher(teacher, runtime)
    _check_run(out, record)
    if synthesizer is None:
        from .synthesizers import build_synthesizer

        synthesizer = build_synthesizer(teacher, s, runtime, stats)
    ranges = shard_ranges(s.num_images, s.shard_size or s.batch_size)
    num_seq = min(len(ranges), max(0, synthesizer.sequential_shards(len(ranges))))
    sequential = list(range(num_seq)) if rank == 0 else []
    parallel = [k for k in range(num_seq, len(ranges)) if k % world_size == rank]
    if world_size > 1 and num_seq and rank != 0:
        log(f"rank {rank}: waiting for rank 0 to make the first {num_seq} shard(s) in order ({s.method} learns from every batch there)")
    key = record["run_key"]

    with contextlib.ExitStack() as stack:
        bar = progress if progress is not None else stack.enter_context(progress_ctx())
        task = bar.add_task(f"synthesize ({s.method})", total=len(sequential) + len(parallel), info="")
        projection = _Projection(s, len(sequential) + len(parallel))

        def on_step(k: int, b: int, it: int, comp: dict) -> None:
            projection.step(it)
            if it % 10 == 0:
                total = comp.get("total")
                bar.update(task, info=f"shard {k} batch {b} it {it}" + (f" loss {total:.4g}" if total is not None else ""))

        done = {k for k in sequential + parallel if _shard_done(out, k, ranges[k][1] - ranges[k][0], key, k < num_seq)}
        if done:
            log(f"resuming {out}: {len(done)} of {len(sequential) + len(parallel)} shards already finished")
        state_is_current = True  # the synthesizer's in-memory state is the one shard k needs
        for k in sequential:
            if k in done:
                state_is_current = False
                bar.advance(task)
                continue
            if not state_is_current and k > 0:
                _load_state(synthesizer, _state_file(out, k - 1))
            state_is_current = True
            _make_shard(synthesizer, teacher, runtime, settings, out, k, *ranges[k], key, on_step, learn=True)
            bar.advance(task)
        if world_size > 1 and num_seq and num_seq < len(ranges):
            _wait_for(barrier)  # every rank starts the parallel shards from rank 0's frozen state
        if parallel and num_seq:
            _load_state(synthesizer, _state_file(out, num_seq - 1))  # the frozen state, identical on every rank
        for k in parallel:
            if k not in done:
                _make_shard(synthesizer, teacher, runtime, settings, out, k, *ranges[k], key, on_step, learn=False)
            bar.advance(task)
    if world_size > 1:
        return {"rank": rank, "shards": sequential + parallel}
    return finalize(teacher, settings, out, stats=stats)


def _wait_for(barrier: Optional[Callable[[], None]]) -> None:
    if barrier is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("world_size > 1 needs a barrier (or an initialised torch.distributed process group)")
        barrier = dist.barrier
    barrier()


class _Projection:
    """Times the first iterations of the first batch made and logs the projected synthesis time, once.

    A CPU run of the paper protocol is hours; saying so up front (and what would be faster) beats a
    progress bar that only reveals it slowly.
    """

    WARMUP, MEASURE = 1, 3   # skip the first iteration (allocations), time the next ones
    SAY_AFTER_S = 300.0      # runs of a few minutes need no forecast (and their output stays as it was)
    LONG_S = 600.0

    def __init__(self, settings, shards: int):
        self.settings = settings
        self.batches = shards * math.ceil((settings.shard_size or settings.batch_size) / settings.batch_size)
        self.stamps: list[float] = []

    def step(self, iteration: int) -> None:
        if len(self.stamps) > self.MEASURE or self.batches == 0:
            return
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.MEASURE + 1:
            per_it = (self.stamps[-1] - self.stamps[self.WARMUP]) / (self.MEASURE - self.WARMUP)
            if per_it * self.settings.iterations * self.batches >= self.SAY_AFTER_S:
                log(self.message(per_it))

    def message(self, per_iteration_s: float) -> str:
        s = self.settings
        total = per_iteration_s * s.iterations * self.batches
        text = (f"projected synthesis time: {_duration(total)} ({per_iteration_s:.2f} s per iteration x {s.iterations} "
                f"iterations x {self.batches} batch(es) of {s.batch_size})")
        if total > self.LONG_S and s.method == "naturalinversion":
            text += (f"; --method {FAST_METHOD} (profile cifar10-fast) starts every batch from a meta-learned generator "
                     f"and needs about 10 iterations per batch instead of {s.iterations}: a run this long makes "
                     f"{max(1, s.iterations // 10)}x more images (student accuracy per teacher pass: bench/RESULTS.md)")
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@torch.no_grad()
def _check_teacher(teacher: Teacher, runtime: Runtime) -> None:
    """Refuse a teacher that yields NaN/inf on ordinary images before spending hours on it."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (2, *teacher.input_shape), generator=g, dtype=torch.uint8)
    probe = torch.cat([probe, torch.full((1, *teacher.input_shape), 128, dtype=torch.uint8)])
    teacher_logits(teacher, probe, runtime)


def finalize(teacher: Teacher, settings: Settings, out_dir: str | Path, stats=None) -> dict:
    """Rank 0, after every shard exists: write preview.png, loss.csv, loss.png, then manifest.json (last)."""
    s = settings.synthesize
    out = Path(out_dir)
    record = run_record(teacher, settings, stats)
    ranges = shard_ranges(s.num_images, s.shard_size or s.batch_size)
    sides = []
    for k, (start, stop) in enumerate(ranges):
        side = read_json_or_none(_sidecar(out, k))
        if not side or side.get("run_key") != record["run_key"] or side.get("count") != stop - start \
                or not (out / shard_file(k)).is_file() or sha256_file(out / shard_file(k)) != side.get("sha256"):
            raise UserError(f"shard {k} of {out} is missing or incomplete; re-run the same `dfcompress synthesize` command to finish it")
        sides.append(side)
    _remove_stale(out, len(ranges))
    remove_stale_temps(out)  # temp files of writes cut short by a kill: every rank is done, none is in use
    preview_classes = _write_preview(out, sides, teacher.num_classes, s.preview_per_class)
    loss_summary = _write_losses(out, len(ranges))
    entries = [{k: side[k] for k in ("file", "sha256", "count", "counts_per_class", "retries")} for side in sides]
    manifest = build_manifest(
        method=s.method, settings=dataclasses.asdict(s), seed=settings.seed, teacher=teacher, shards=entries,
        shard_size=s.shard_size or s.batch_size,
        extra={"run_key": record["run_key"], "stats": record["stats"], "label_rule": LABEL_RULE,
               "sequential_shards": sum(_state_file(out, k).is_file() for k in range(len(ranges))),
               "preview_classes": preview_classes, "loss": loss_summary,
               "files": {"preview": "preview.png", "loss_csv": "loss.csv", "loss_png": "loss.png"}},
    )
    write_manifest(out, manifest)
    return manifest


def _remove_stale(out: Path, num_shards: int) -> None:
    """Drop shards beyond this run's count (left by an earlier, larger -n) so the folder matches the manifest."""
    for f in sorted((out / SHARD_DIR).glob("*-*")):
        stem = f.name.split(".")[0]
        try:
            idx = int(stem.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if idx >= num_shards:
            f.unlink(missing_ok=True)


def _write_preview(out: Path, sides: list[dict], num_classes: int, per_class: int) -> list[int]:
    """One row per class (at most PREVIEW_MAX_CLASSES, evenly spread), up to ``per_class`` images each."""
    from safetensors import safe_open

    if num_classes <= PREVIEW_MAX_CLASSES:
        classes = list(range(num_classes))
    else:
        classes = sorted({round(i * (num_classes - 1) / (PREVIEW_MAX_CLASSES - 1)) for i in range(PREVIEW_MAX_CLASSES)})
    picked: dict[int, list[torch.Tensor]] = {c: [] for c in classes}
    shape = None
    for side in sides:
        if all(len(v) >= per_class for v in picked.values()):
            break
        with safe_open(str(out / side["file"]), framework="pt", device="cpu") as f:
            labels = f.get_tensor("labels")
            images = f.get_slice("images")
            for row, c in enumerate(labels.tolist()):
                if c in picked and len(picked[c]) < per_class:
                    img = images[row:row + 1]
                    shape = img.shape[1:]
                    picked[c].append(img)
    if shape is None:
        return classes
    blank = torch.full((1, *shape), 255, dtype=torch.uint8)
    tiles = [t for c in classes for t in picked[c] + [blank] * (per_class - len(picked[c]))]
    save_image_grid(torch.cat(tiles), out / "preview.png", nrow=per_class)
    return classes


def _write_losses(out: Path, num_shards: int) -> dict[str, Any]:
    """loss.csv (shard, batch, iteration, components) and loss.png (mean per iteration across batches)."""
    frags = [read_json_or_none(_loss_file(out, k)) or {"components": [], "rows": []} for k in range(num_shards)]
    components: list[str] = []
    for f in frags:
        for c in f["components"]:
            if c not in components:
                components.append(c)
    if "total" in components:
        components.remove("total")
        components.insert(0, "total")
    lines = [",".join(["shard", "batch", "iteration"] + components)]
    sums: dict[str, list[float]] = {c: [] for c in components}
    counts: dict[str, list[int]] = {c: [] for c in components}
    for k, f in enumerate(frags):
        cols = f["components"]
        for row in f["rows"]:
            b, it, vals = row[0], row[1], dict(zip(cols, row[2:]))
            lines.append(",".join([str(k), str(b), str(it)] + ["" if vals.get(c) is None else repr(float(vals[c])) for c in components]))
            for c in components:
                v = vals.get(c)
                if v is None or not math.isfinite(float(v)):
                    continue
                while len(sums[c]) <= it:
                    sums[c].append(0.0)
                    counts[c].append(0)
                sums[c][it] += float(v)
                counts[c][it] += 1
    atomic_write_text(out / "loss.csv", "\n".join(lines) + "\n")
    series = {c: [s / n if n else float("nan") for s, n in zip(sums[c], counts[c])] for c in components}
    batches = sum(len({r[0] for r in f["rows"]}) for f in frags)
    save_curves_png(series, out / "loss.png", title=f"synthesis loss, mean over {batches} batch(es)")
    return {c: (v[-1] if v and math.isfinite(v[-1]) else None) for c, v in series.items()}
