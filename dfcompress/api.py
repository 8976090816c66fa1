"""The Python API: the pipeline as functions for notebooks and other programs (``import dfcompress``).

These are the functions the CLI runs (distill/prune/quantize go through the same orchestrator,
``pipeline.run_stage``); they raise ``dfcompress.errors.UserError`` on bad input instead of exiting.
Settings: pass a ``Settings`` (``dfcompress.make_settings(profile, {"distill.epochs": 2})``) or let
each function resolve the defaults; ``overrides`` take the dotted keys a profile YAML uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch

    from .compress.stage import StageResult
    from .data.real import LabelledImages
    from .data.synthetic import SyntheticSet
    from .models.teacher import Teacher
    from .settings import Settings
    from .stats.store import FeatureStats

ModelLike = Union["Teacher", str, Path, None]  # a loaded teacher, a model file/folder, or None (the embedded teacher)


def make_settings(profile: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> "Settings":
    """Resolved settings: defaults < ``profile`` (a name from ``dfcompress profiles`` or a YAML path) < ``overrides``."""
    from .settings import resolve_settings

    return resolve_settings(profile, overrides or {})


def load_teacher(model: Union[str, Path, None] = None, **options: Any) -> "Teacher":
    """Load a classifier in any supported format (None: the embedded digits teacher).

    ``options``: ``arch``, ``allow_pickle``, ``mean``, ``std``, ``input_shape`` (as the CLI flags).
    """
    from .models.loading import load_teacher as _load

    return _load(None if model is None else str(model), **options)


def _teacher(model: ModelLike) -> "Teacher":
    from .models.teacher import Teacher

    return model if isinstance(model, Teacher) else load_teacher(model)


def _settings(given: Optional["Settings"], overrides: Optional[dict[str, Any]]) -> "Settings":
    if given is not None and overrides:
        from .settings import resolve_settings

        return resolve_settings(None, {**_flatten(given.to_dict()), **overrides})
    return given if given is not None else make_settings(None, overrides)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recover_stats(model: ModelLike = None) -> "FeatureStats":
    """The BatchNorm running statistics of a teacher, as the statistics synthesis matches."""
    from .stats.recover import recover_bn_stats

    return recover_bn_stats(_teacher(model))


def collect_stats(model: ModelLike, images: "torch.Tensor", labels: Optional["torch.Tensor"] = None, *,
                  per_class: bool = True, device: str = "auto") -> "FeatureStats":
    """(Class-conditional) feature statistics of uint8 ``images`` [N,C,H,W]: what a BN-folded teacher needs."""
    from .device import resolve_runtime
    from .stats.collect import collect_stats as _collect

    return _collect(_teacher(model), images, labels, per_class=per_class, runtime=resolve_runtime(device))


def synthesize(model: ModelLike, output: Union[str, Path], *, settings: Optional["Settings"] = None,
               overrides: Optional[dict[str, Any]] = None, stats: Union[str, Path, None] = None) -> "SyntheticSet":
    """Synthesize a set by model inversion into ``output`` (re-running resumes it); returns it opened."""
    from .data.synthetic import SyntheticSet
    from .device import resolve_runtime
    from .pipeline import synthetic_set

    s = _settings(settings, overrides)
    runtime = resolve_runtime(s.device, amp=s.amp)
    folder = synthetic_set(_teacher(model), s, runtime, data=None, out_dir=Path(output),
                           stats_path=None if stats is None else str(stats))
    return SyntheticSet(folder)


def _stage(name: str, model: ModelLike, data: Any, output: Union[str, Path, None], s: "Settings",
           eval_data: Optional[str], max_drop: Optional[float], overwrite: bool) -> "StageResult":
    from .compress.stages import STAGES
    from .pipeline import StageRequest, run_stage

    path = None if model is None or not isinstance(model, (str, Path)) else str(model)
    teacher = _teacher(model)
    data_dir = None if data is None else str(getattr(data, "dir", data))  # a SyntheticSet or its folder
    req = StageRequest(s, lambda _: teacher, model=path, data=data_dir, eval_data=eval_data,
                       output=None if output is None else Path(output), max_drop=max_drop, overwrite=overwrite)
    result = run_stage(STAGES[name], req)
    assert result is not None  # None only on torchrun ranks other than 0; the API runs as one process
    return result


def distill(model: ModelLike, data: Any = None, output: Union[str, Path, None] = None, *, student: Optional[str] = None,
            settings: Optional["Settings"] = None, overrides: Optional[dict[str, Any]] = None,
            eval_data: Optional[str] = None, max_drop: Optional[float] = None, overwrite: bool = False) -> "StageResult":
    """Knowledge-distil the teacher into a zoo ``student`` on ``data`` (a SyntheticSet or its folder; None:
    synthesize one). Writes a model folder; returns the before -> after figures (raises GateFailed past ``max_drop``)."""
    over = {**(overrides or {}), **({"distill.student": student} if student else {})}
    return _stage("distill", model, data, output, _settings(settings, over), eval_data, max_drop, overwrite)


def prune(model: ModelLike, data: Any = None, output: Union[str, Path, None] = None, *, ratio: Optional[float] = None,
          settings: Optional["Settings"] = None, overrides: Optional[dict[str, Any]] = None,
          eval_data: Optional[str] = None, max_drop: Optional[float] = None, overwrite: bool = False) -> "StageResult":
    """Structured channel pruning (``ratio`` of channels) then KD fine-tuning on ``data``; as ``distill``."""
    over = {**(overrides or {}), **({"prune.ratio": ratio} if ratio is not None else {})}
    return _stage("prune", model, data, output, _settings(settings, over), eval_data, max_drop, overwrite)


def quantize(model: ModelLike, data: Any = None, output: Union[str, Path, None] = None, *,
             settings: Optional["Settings"] = None, overrides: Optional[dict[str, Any]] = None,
             eval_data: Optional[str] = None, max_drop: Optional[float] = None, overwrite: bool = False) -> "StageResult":
    """INT8 static quantization (onnxruntime QDQ) calibrated on ``data``; a model file/folder with an ONNX
    file is quantized as is, anything else is exported first."""
    return _stage("quantize", model, data, output, _settings(settings, overrides), eval_data, max_drop, overwrite)


def export(model: ModelLike, path: Union[str, Path], *, format: str = "onnx", opset: int = 17,
           parity_images: int = 8, atol: float = 1e-3) -> dict[str, Any]:
    """Write ``model`` as onnx | torchscript | pt2 after a parity check on random images; returns the check's figures."""
    import torch

    from .export import export_model

    teacher = _teacher(model)
    check = teacher.normalize(torch.rand((parity_images, *teacher.input_shape), generator=torch.Generator().manual_seed(0)))
    return export_model(teacher.module, teacher, format, Path(path), check, opset=opset, atol=atol, prefer_cuda=False)


def evaluate(model: ModelLike, data: Union[str, Path, "LabelledImages", None] = None, *, against: ModelLike = None,
             settings: Optional["Settings"] = None, latency: bool = False) -> dict[str, Any]:
    """Top-1 on real labelled ``data`` (a folder/.npz or LabelledImages; None: the teacher's own test split
    if it has one), agreement with ``against``, params, MACs, bytes and (``latency=True``) onnxruntime latency.
    A model folder is a complete input: its recorded input shape and preprocessing are used."""
    from .data.real import LabelledImages
    from .device import resolve_runtime
    from .evaluate import evaluate as _evaluate
    from .models.model_dir import is_quantized_onnx, onnx_file_of
    from .pipeline import real_eval_data

    s = _settings(settings, None)
    teacher = _teacher(model)
    reference = None if against is None else _teacher(against)
    real = data if isinstance(data, LabelledImages) else real_eval_data(teacher, None if data is None else str(data))
    path = model if isinstance(model, (str, Path)) else None
    onnx_path = onnx_file_of(path)
    return _evaluate(onnx_path if is_quantized_onnx(onnx_path) else teacher, real, reference, s, onnx_path=onnx_path,
                     runtime=resolve_runtime(s.device, amp=s.amp), latency=latency, preprocessing=teacher)
