"""Export a classifier to ONNX, TorchScript or torch.export ``.pt2``, and prove the file computes the same thing.

An export that silently changes the logits is worse than no export, so every file is reloaded by the
runtime that will run it (onnxruntime, ``torch.jit.load``, ``torch.export.load``) on real check images
and compared with eager PyTorch before it is moved into place; a file that fails never appears.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .errors import NumericalError, UserError, first_line
from .fileio import atomic_path, atomic_write_bytes
from .models.model_dir import (DESCRIPTOR, FILE_NAMES, INPUT_NAME, OUTPUT_NAME, model_metadata, state_dict_bytes,
                               write_descriptor)
from .models.teacher import InputSpec, Teacher

FORMATS = ("onnx", "torchscript", "pt2")


class ExportParityError(NumericalError):
    """The exported file's logits differ from eager PyTorch by more than the tolerance."""


def set_onnx_metadata(proto: Any, key: str, value: str) -> None:
    """Set one metadata_props entry, replacing an inherited one: ONNX rejects duplicate keys."""
    for entry in list(proto.metadata_props):
        if entry.key == key:
            proto.metadata_props.remove(entry)
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def cpu_copy(module: nn.Module) -> nn.Module:
    """An fp32, contiguous-format, eval-mode CPU copy: exports must not depend on the training device."""
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    m = copy.deepcopy(inner).cpu().float().eval()
    return m.to(memory_format=torch.contiguous_format)


def onnx_providers(prefer_cuda: bool = True) -> list[str]:
    """onnxruntime execution providers to use, CUDA first when this onnxruntime build has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if prefer_cuda and p in available]
    return chosen + ["CPUExecutionProvider"]


def onnx_session(path: str | Path, prefer_cuda: bool = True, threads: int | None = None, fuse: bool = True):
    """An onnxruntime session; ``fuse=False`` runs the graph as written (QDQ stays simulated quantization),
    which is how 4/16-bit activation QDQ models run: ORT has no fused integer kernels for them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr otherwise
    if not fuse:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=onnx_providers(prefer_cuda))


def ort_input(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A contiguous float32 host array: onnxruntime reads numpy, so tensors leave any device here."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=np.float32)


def run_onnx(session: Any, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of an onnxruntime session on float32 NCHW input, in batches."""
    arr = ort_input(x)
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: arr[i:i + batch_size]})[0] for i in range(0, len(arr), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def parity(reference: torch.Tensor, got: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """(max |Δlogit|, top-1 agreement in %) between two logit arrays."""
    got_t = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got).float().cpu()
    ref = reference.float().cpu()
    if got_t.shape != ref.shape:
        raise ExportParityError(f"exported model returns shape {tuple(got_t.shape)}, expected {tuple(ref.shape)}")
    diff = (got_t - ref).abs().max().item() if ref.numel() else 0.0
    agree = (got_t.argmax(1) == ref.argmax(1)).float().mean().item() * 100.0
    return float(diff), float(agree)


def export_model(module: nn.Module, teacher: InputSpec, fmt: str, path: str | Path, check_images: torch.Tensor,
                 opset: int = 17, atol: float = 1e-3, prefer_cuda: bool = True) -> dict[str, Any]:
    """Write ``module`` as ``fmt`` to ``path`` (atomically) after a parity check on ``check_images``.

    ``teacher`` is anything with ``input_shape``/``num_classes``/``mean``/``std``/``class_names``.
    ``check_images`` are *normalised* float NCHW images. Returns {format, path, bytes, max_abs_diff,
    top1_agreement, opset, check_images, runtime}; raises ExportParityError when max |Δ| > atol.
    The file is always traced from an fp32 CPU copy (so it runs anywhere); ``prefer_cuda=False`` keeps
    the ONNX parity check on onnxruntime's CPU provider (``export --device cpu``).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    check = check_images.detach().float().cpu().contiguous()
    if check.dim() != 4 or check.shape[0] == 0:
        raise ValueError("check_images must be a non-empty float tensor [N, C, H, W]")
    model = cpu_copy(module)
    with torch.no_grad():
        reference = model(check).float()
    # two rows so torch.export/ONNX see a batch dimension that is not the special size 1
    example = check[:2] if check.shape[0] >= 2 else check.repeat(2, 1, 1, 1)
    meta = model_metadata(teacher)
    target = Path(path)
    writer = {"onnx": functools.partial(_write_onnx, prefer_cuda=prefer_cuda), "torchscript": _write_torchscript,
              "pt2": _write_pt2}[fmt]
    with atomic_path(target) as tmp:
        runtime_name, got = writer(model, example, check, tmp, meta, opset)
        max_diff, agree = parity(reference, got)
        if not max_diff <= atol:  # also catches NaN
            raise ExportParityError(
                f"{fmt} export of {target.name} differs from PyTorch by {max_diff:.3g} (> atol {atol:g}, "
                f"top-1 agreement {agree:.1f}%); the file was not written")
    return {
        "format": fmt,
        "path": str(target),
        "bytes": target.stat().st_size,
        "max_abs_diff": max_diff,
        "top1_agreement": agree,
        "opset": opset if fmt == "onnx" else None,
        "check_images": int(check.shape[0]),
        "runtime": runtime_name,
    }


def _write_onnx(model: nn.Module, example: torch.Tensor, check: torch.Tensor, tmp: Path, meta: dict,
                opset: int, prefer_cuda: bool = True) -> tuple[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
            # the TorchScript-based exporter: one self-contained file, works for zoo and pruned models alike
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - exporter errors are many and untyped
        raise UserError(f"ONNX export failed: {first_line(exc, 300)}; try --format pt2 or torchscript") from None
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)
    set_onnx_metadata(proto, DESCRIPTOR, json.dumps(meta))
    onnx.save(proto, str(tmp))
    session = onnx_session(tmp, prefer_cuda=prefer_cuda)
    got = run_onnx(session, check)
    return f"onnxruntime {ort.__version__} ({session.get_providers()[0]})", got


def _write_torchscript(model: nn.Module, example: torch.Tensor, check: torch.Tensor, tmp: Path, meta: dict,
                       opset: int) -> tuple[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={DESCRIPTOR: json.dumps(meta)})
        extra = {DESCRIPTOR: ""}
        loaded = torch.jit.load(str(tmp), map_location="cpu", _extra_files=extra)
    if json.loads(extra[DESCRIPTOR]) != meta:
        raise ExportParityError("TorchScript export lost its dfcompress.json metadata")
    with torch.no_grad():
        got = loaded(check)
    return f"torch.jit {torch.__version__}", got


def _write_pt2(model: nn.Module, example: torch.Tensor, check: torch.Tensor, tmp: Path, meta: dict,
               opset: int) -> tuple[str, torch.Tensor]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"torch.export failed: {first_line(exc, 300)}; try --format onnx or torchscript") from None
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={DESCRIPTOR: json.dumps(meta)})
    tmp.write_bytes(buf.getvalue())
    extra = {DESCRIPTOR: ""}
    loaded = torch.export.load(str(tmp), extra_files=extra)
    if json.loads(extra[DESCRIPTOR]) != meta:
        raise ExportParityError(".pt2 export lost its dfcompress.json metadata")
    with torch.no_grad():
        got = loaded.module()(check)
    return f"torch.export {torch.__version__}", got


def read_export_metadata(path: str | Path) -> dict[str, Any] | None:
    """The dfcompress.json metadata embedded in an exported file, or None (for loaders and eval)."""
    p = Path(path)
    try:
        if p.suffix == ".onnx":
            import onnx

            proto = onnx.load(str(p), load_external_data=False)
            for entry in proto.metadata_props:
                if entry.key == DESCRIPTOR:
                    return json.loads(entry.value)
            return None
        extra = {DESCRIPTOR: ""}
        if p.suffix == ".pt2":
            torch.export.load(str(p), extra_files=extra)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
        return json.loads(extra[DESCRIPTOR]) if extra[DESCRIPTOR] else None
    except (OSError, ValueError, RuntimeError):
        return None


# ----------------------------------------------------------------------------------------------
# model output folders (the descriptor itself is models/model_dir.py)

def _random_check_images(teacher: InputSpec, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, *teacher.input_shape), generator=g)


def save_model_dir(out_dir: str | Path, module: nn.Module, teacher: Teacher, created_by: str, arch: str | None,
                   files_to_write: Iterable[str] = ("state_dict", "onnx"), check_images: torch.Tensor | None = None,
                   *, opset: int = 17, atol: float = 1e-3, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``module`` in each of ``files_to_write`` into ``out_dir`` and then ``dfcompress.json``.

    ``teacher`` supplies input shape, classes and preprocessing (the student inherits them) and its
    sha256. ``check_images`` (normalised float NCHW) drive the export parity checks; without them a
    fixed random batch is used. Returns the descriptor dict (with per-export parity under ``exports``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = list(dict.fromkeys(files_to_write))
    unknown = [k for k in kinds if k not in FILE_NAMES]
    if unknown:
        raise ValueError(f"unknown model file kind(s) {unknown}; known: {sorted(FILE_NAMES)}")
    if "state_dict" in kinds and not arch:
        raise ValueError("a state_dict is only loadable with its architecture name: pass arch or write pt2/onnx")
    # an interrupted re-run must not leave an old descriptor pointing at half-replaced files
    (out / DESCRIPTOR).unlink(missing_ok=True)
    meta = model_metadata(teacher)
    files: dict[str, str] = {}
    exports: dict[str, Any] = {}
    for kind in kinds:
        name = FILE_NAMES[kind]
        if kind == "state_dict":
            # one metadata key: safetensors does not keep the order of several, so bytes would vary per process
            st_meta = {"dfcompress": json.dumps({**meta, "arch": str(arch)}, sort_keys=True)}
            atomic_write_bytes(out / name, state_dict_bytes(module, st_meta))
        else:
            images = check_images if check_images is not None else _random_check_images(teacher)
            result = export_model(module, teacher, kind, out / name, images, opset=opset, atol=atol)
            result["path"] = name
            exports[kind] = result
        files[kind] = name
    return write_descriptor(out, teacher, created_by, files, arch=arch, exports=exports, extra=extra)


from ._callable import make_callable  # noqa: E402 - must run once the module is complete

make_callable(__name__, "export")

