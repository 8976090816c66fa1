"""Helpers shared by the benchmarks in ``bench/`` (not part of the package, not run by CI).

Where the real data lives, how it is decoded, how the machine is described, how results are written.
Every figure a benchmark prints is measured in that run; nothing here invents or caches numbers.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = Path(os.environ.get("DFCOMPRESS_SHARED_DATA", str(REPO.parent / "shared" / "data")))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shared(*parts: str) -> Path:
    """A path under the shared data folder (``$DFCOMPRESS_SHARED_DATA``, default ``../shared/data``)."""
    return SHARED.joinpath(*parts)


RESNET56_TH = "teachers/original/resnet56-4bfd9763.th"
RESNET56_ONNX = "teachers/cifar10_resnet56_akamaster.onnx"
TEST_JPEG = "cifar10/cifar10_test_jpeg_decoded.npz"
TEST_EXACT = "cifar10/cifar10_test_lossless_first846.npz"
TRAIN_TAR = "cifar10/cifar10_yoongikim_jpeg_train.tar.gz"
LABELS = "cifar10/cifar10_labels_official.npz"


def ni_settings(n: int, batch: int, iterations: int, seed: int):
    """Profile cifar10 with a short NaturalInversion run on CPU: the synthetic set the calibration and
    pruning benches share the recipe of."""
    from dfcompress.settings import resolve_settings

    return resolve_settings("cifar10", {"seed": seed, "device": "cpu", "synthesize.method": "naturalinversion",
                                        "synthesize.num_images": n, "synthesize.batch_size": batch,
                                        "synthesize.iterations": iterations})


def require(*rel: str) -> None:
    """Stop with one clear line when shared data a benchmark needs is absent."""
    missing = [str(shared(r)) for r in rel if not shared(r).exists()]
    if missing:
        sys.exit(f"missing shared data: {', '.join(missing)} (set DFCOMPRESS_SHARED_DATA to the folder holding cifar10/ and teachers/)")


# ----------------------------------------------------------------------------------------------
# machine, threads, memory


def set_threads(n: Optional[int]) -> int:
    """Pin torch's intra-op threads (``None``: leave torch's default); returns the count in use."""
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: Optional[torch.device] = None) -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, memory, load, torch, threads, GPU, date."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "git": _git_commit(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return info


def load_note(info: dict[str, Any]) -> str:
    """A warning line when the machine was busy (timings then overstate the true cost)."""
    load = (info.get("load_avg_1_5_15") or [0])[0]
    cores = info.get("nproc") or 1
    if load > 1.25 * cores:
        return (f"machine busy while measuring (1-min load {load} on {cores} cores): absolute times are inflated; "
                "ratios measured in the same process are more reliable")
    return ""


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1024 * 1024) if sys.platform == "darwin" else r / 1024, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(store: dict[str, float], key: str, device: Optional[torch.device] = None) -> Iterator[None]:
    """``store[key] = seconds`` of the block (synchronising CUDA at both ends)."""
    if device is not None:
        sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if device is not None:
            sync(device)
        store[key] = round(time.perf_counter() - t0, 3)


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


# ----------------------------------------------------------------------------------------------
# real CIFAR-10 data


def load_npz_images(rel: str, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW, int64 labels) from one of the staged ``.npz`` test sets, first ``limit`` images."""
    data = np.load(shared(rel), allow_pickle=False)
    x, y = data["x"], data["y"]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64))


def load_train_jpegs(per_class: int, offset: int = 0) -> dict[str, Any]:
    """Images ``offset .. offset+per_class-1`` of every class from the staged train JPEG tarball.

    The file ``train/<class>/NNNN.jpg`` is the NNNN-th image of that class in official order
    (PROVENANCE.md), so each file maps to an official train index; the label comes from the folder
    name and is checked against ``cifar10_labels_official.npz`` through that mapping (every class must
    have as many files as official labels, and the mapped index must carry the folder's label).
    Returns {x uint8 [N,3,32,32], y int64 [N], index int64 [N] (official train index), check str}.
    """
    from PIL import Image

    wanted = {(c, k) for c in CIFAR10_CLASSES for k in range(offset, offset + per_class)}
    found: dict[tuple[str, int], np.ndarray] = {}
    files_per_class = {c: 0 for c in CIFAR10_CLASSES}
    with tarfile.open(shared(TRAIN_TAR), "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in files_per_class or not parts[2].endswith(".jpg"):
                continue
            cls, rank = parts[1], int(parts[2][:-4])
            files_per_class[cls] += 1
            if (cls, rank) in wanted:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                with Image.open(io.BytesIO(data)) as img:
                    found[(cls, rank)] = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()
    missing = sorted(wanted - set(found))
    if missing:
        raise SystemExit(f"{TRAIN_TAR} lacks {len(missing)} wanted images, e.g. {missing[:3]}")
    official = np.load(shared(LABELS), allow_pickle=False)["train_labels"].astype(np.int64)
    positions = {c: np.flatnonzero(official == i) for i, c in enumerate(CIFAR10_CLASSES)}
    bad_counts = {c: (files_per_class[c], len(positions[c])) for c in CIFAR10_CLASSES if files_per_class[c] != len(positions[c])}
    if bad_counts:
        raise SystemExit(f"train tarball and official labels disagree on per-class counts (files, labels): {bad_counts}")
    xs, ys, idx = [], [], []
    for rank in range(offset, offset + per_class):  # interleave classes: image j has class j % 10
        for i, c in enumerate(CIFAR10_CLASSES):
            xs.append(found[(c, rank)])
            ys.append(i)
            idx.append(int(positions[c][rank]))
    index = np.asarray(idx, dtype=np.int64)
    y = np.asarray(ys, dtype=np.int64)
    assert (official[index] == y).all()
    check = (f"labels from folder names; {len(y)} images mapped to official train indices via per-class rank; "
             f"per-class file counts equal official label counts ({files_per_class[CIFAR10_CLASSES[0]]} each)")
    return {"x": torch.from_numpy(np.stack(xs)), "y": torch.from_numpy(y), "index": torch.from_numpy(index), "check": check}


# ----------------------------------------------------------------------------------------------
# output


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str, data: dict[str, Any], markdown: str, out_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``, each written atomically."""
    from dfcompress.fileio import atomic_write_json, atomic_write_text

    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_json(jpath, data)
    atomic_write_text(mpath, markdown.rstrip() + "\n")
    return jpath, mpath


def machine_line(info: dict[str, Any]) -> str:
    gpu = info.get("gpu")
    parts = [f"{info['nproc']} × {info['cpu_model']}", f"{info.get('mem_total_gib')} GiB RAM",
             f"torch {info['torch']} ({info['torch_threads']} threads)"]
    if gpu:
        parts.append(f"GPU {gpu['name']} ({gpu['memory_gib']} GiB, CUDA {gpu['cuda']})")
    parts.append(f"load {info.get('load_avg_1_5_15')}")
    parts.append(info["date"])
    return ", ".join(parts)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
