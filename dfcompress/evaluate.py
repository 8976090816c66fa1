"""Measure a model: top-1 on real labelled images, agreement with its teacher, size, and onnxruntime latency.

The same figures are computed for every stage's result (a Teacher, a trained student module or an
exported/quantized ONNX file), so before → after comparisons in reports are like for like.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .data.real import LabelledImages
from .device import Runtime, run_batched
from .errors import UserError, first_line
from .models.teacher import InputSpec, Teacher
from .settings import Settings
from .progress import log

LATENCY_BATCHES = (1, 32)
WARMUP_RUNS = 3


# ----------------------------------------------------------------------------------------------
# small metrics


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(1).cpu() == labels.cpu()).float().mean().item() * 100.0)


def agreement(a_logits: Tensor, b_logits: Tensor) -> float:
    """How often two models predict the same class, in percent."""
    if len(a_logits) == 0:
        return float("nan")
    return float((a_logits.argmax(1).cpu() == b_logits.argmax(1).cpu()).float().mean().item() * 100.0)


def to_input(images: Tensor, teacher_like: InputSpec) -> Tensor:
    """uint8 pixels or float [0,1] images -> the model's normalised float input."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(teacher_like.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(teacher_like.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def module_logits(module: nn.Module, images: Tensor, teacher_like: InputSpec, runtime: Optional[Runtime] = None,
                  batch_size: int = 256) -> Tensor:
    """float32 CPU logits of an eval-mode module on uint8/[0,1] images (normalised with ``teacher_like``)."""
    outs = run_batched(module, images, lambda b, dev: to_input(b, teacher_like).to(dev), runtime, batch_size, autocast=True)
    return torch.cat(outs) if outs else torch.zeros(0)


def onnx_logits(path_or_session: Any, images: Tensor, teacher_like: InputSpec, batch_size: int = 256) -> Tensor:
    """float32 logits of an ONNX model (file or onnxruntime session) on uint8/[0,1] images."""
    from .export import onnx_session, run_onnx

    session = onnx_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    return torch.from_numpy(run_onnx(session, to_input(images, teacher_like), batch_size))


# ----------------------------------------------------------------------------------------------
# latency


def onnx_latency(path: str | Path, input_shape: tuple[int, int, int], runs: int = 20,
                 batch_sizes: tuple[int, ...] = LATENCY_BATCHES, prefer_cuda: bool = True) -> dict[str, Any]:
    """p50/p90 wall time in ms of ``session.run`` per batch size, after WARMUP_RUNS untimed runs."""
    from .export import onnx_session

    session = onnx_session(path, prefer_cuda=prefer_cuda)
    name = session.get_inputs()[0].name
    g = np.random.default_rng(0)
    result: dict[str, Any] = {"provider": session.get_providers()[0], "runs": int(runs), "warmup": WARMUP_RUNS,
                              "threads": os.environ.get("OMP_NUM_THREADS")}
    for bs in batch_sizes:
        x = g.standard_normal((bs, *input_shape)).astype(np.float32)
        try:
            for _ in range(WARMUP_RUNS):
                session.run(None, {name: x})
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, {name: x})
                times.append((time.perf_counter() - t0) * 1000.0)
        except Exception as exc:  # noqa: BLE001 - e.g. a user's ONNX with a fixed batch of 1
            result[f"batch_{bs}"] = {"error": first_line(exc, 200)}
            continue
        result[f"batch_{bs}"] = {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
                                 "images_per_s": float(bs * 1000.0 / np.percentile(times, 50))}
    return result


# ----------------------------------------------------------------------------------------------
# evaluate


def _onnx_params(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path))
    return int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in proto.graph.initializer))


def _file_size(source: Any) -> Optional[int]:
    try:
        p = Path(str(source))
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        pass
    return None


def evaluate(model: Teacher | nn.Module | str | Path, data: Optional[LabelledImages], teacher: Optional[Teacher], settings: Settings,
             onnx_path: str | Path | None = None, *, runtime: Optional[Runtime] = None, latency: bool = True,
             preprocessing: Optional[InputSpec] = None) -> dict[str, Any]:
    """Top-1 on ``data`` (LabelledImages), agreement with ``teacher``, params, MACs, sizes, ORT latency.

    ``model`` is a Teacher (as load_teacher returns), a bare nn.Module (preprocessing taken from
    ``teacher``) or a path to an ONNX file (e.g. a quantized model). Without ``onnx_path`` a module is
    exported to a temporary ONNX file for the latency figures. Absent inputs give None entries.
    ``preprocessing`` (a Teacher, e.g. the model folder as loaded) gives input shape, mean and std to an
    ONNX path or bare module, so ``teacher`` is needed for agreement only.
    """
    from .models.introspect import count_macs, count_params

    batch = settings.eval.batch_size
    is_onnx = isinstance(model, (str, Path))
    like = model if hasattr(model, "module") and hasattr(model, "mean") else (preprocessing or teacher)
    if like is None:
        raise UserError("evaluating a bare model needs its teacher (for the input shape and --mean/--std)")
    input_shape = tuple(like.input_shape)
    out: dict[str, Any] = {"top1": None, "agreement": None, "num_images": 0, "params": None, "macs": None,
                           "model_bytes": None, "onnx_bytes": None, "latency": None}
    if is_onnx:
        onnx_file = Path(model)
        if not onnx_file.is_file():
            raise UserError(f"ONNX model {onnx_file} not found")
        out["params"] = _onnx_params(onnx_file)
        out["model_bytes"] = onnx_file.stat().st_size
        module = None
    else:
        module = model.module if hasattr(model, "module") and hasattr(model, "mean") else model
        out["params"] = int(count_params(module))
        out["macs"] = int(count_macs(module, input_shape))
        out["model_bytes"] = _file_size(getattr(model, "source", None)) if hasattr(model, "source") else None

    def logits_of(images: Tensor) -> Tensor:
        if module is None:
            return onnx_logits(onnx_file, images, like, batch)
        return module_logits(module, images, like, runtime, batch)

    if data is not None and len(data.x):
        if tuple(data.x.shape[1:]) != input_shape:
            raise UserError(f"evaluation images have shape {tuple(data.x.shape[1:])}, the model expects {input_shape}")
        logits = logits_of(data.x)
        out["num_images"] = int(len(data.x))
        if data.y is not None:
            out["top1"] = top1(logits, data.y)
        if teacher is not None and teacher is not model:
            out["agreement"] = agreement(logits, module_logits(teacher.module, data.x, teacher, runtime, batch))
    if latency:
        out.update(_latency_figures(model, module, like, settings, onnx_path))
    return out


def _latency_figures(model: Teacher | nn.Module | str | Path, module: Optional[nn.Module], like: InputSpec, settings: Settings,
                     onnx_path: str | Path | None) -> dict[str, Any]:
    runs = settings.eval.latency_runs
    shape = tuple(like.input_shape)
    if onnx_path is None and isinstance(model, (str, Path)):
        onnx_path = model
    if onnx_path is None and getattr(model, "format", None) == "onnx" and Path(str(model.source)).is_file():
        onnx_path = model.source
    if onnx_path is not None:
        return {"onnx_bytes": Path(onnx_path).stat().st_size, "latency": onnx_latency(onnx_path, shape, runs)}
    from .export import export_model

    with tempfile.TemporaryDirectory(prefix="dfcompress-eval-") as tmp:
        path = Path(tmp) / "model.onnx"
        check = torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))
        try:
            export_model(module, like, "onnx", path, check, opset=settings.export.opset, atol=settings.export.parity_atol)
        except UserError as exc:
            log(f"eval: no latency figures, the model does not export to ONNX ({exc})")
            return {"latency": {"error": str(exc)}}
        return {"onnx_bytes": path.stat().st_size, "latency": onnx_latency(path, shape, runs)}


from ._callable import make_callable  # noqa: E402 - must run once the module is complete

make_callable(__name__, "evaluate")
