"""Static INT8 quantization of an ONNX model with onnxruntime, calibrated on synthetic images.

Activation ranges are what static quantization needs data for; the synthetic set stands in for the
training data it never saw. QDQ format keeps the graph readable by every ONNX runtime (and by TensorRT),
and the figures compare the INT8 model with its fp32 source on synthetic images it was *not*
calibrated on, plus real labelled images when given.
"""
from __future__ import annotations

import importlib
import io
import json
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data.real import LabelledImages
from ..data.synthetic import SyntheticSet
from ..errors import UserError, describe_exception
from ..models.teacher import InputSpec
from ..fileio import atomic_path, atomic_write_bytes
from ..progress import log
from ..seeds import CALIBRATION_SPLIT, seeded_generator, stream_seed
from ..settings import Settings

CALIB_BATCH = 16
HOLDOUT_MAX = 1024
MODEL_FILE = "model.onnx"
CALIB_FILE = "calib.npz"


@dataclass
class Preprocessing:
    """What quantize needs to feed an ONNX file: shape, classes, mean/std (a Teacher works too)."""

    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: Optional[list[str]] = None
    sha256: Optional[str] = None


def resolve_onnx(model: str | Path, reference: Optional[InputSpec] = None) -> tuple[Path, InputSpec, dict]:
    """(onnx file, preprocessing, source descriptor) for an .onnx file or a model folder."""
    from ..export import read_export_metadata
    from ..models.model_dir import DESCRIPTOR, read_model_dir

    path = Path(model)
    desc: dict = {}
    if path.is_dir():
        desc = read_model_dir(path)
        if "onnx" not in desc["files"]:
            raise UserError(f"{path} has no ONNX file to quantize; re-create it with export enabled or run `dfcompress export {path}`")
        onnx_file = path / desc["files"]["onnx"]
    elif path.is_file() and path.suffix.lower() == ".onnx":
        onnx_file = path
        sibling = path.parent / DESCRIPTOR
        if sibling.is_file():
            desc = read_model_dir(path.parent)
    else:
        raise UserError(f"quantize needs an .onnx file or a model folder, got {path}")
    if reference is not None:
        return onnx_file, reference, desc
    meta = desc or read_export_metadata(onnx_file)
    if not meta:
        raise UserError(f"{onnx_file} carries no preprocessing metadata; pass the teacher (MODEL folder) or --mean/--std")
    like = Preprocessing(tuple(meta["input_shape"]), int(meta["num_classes"]), tuple(meta["mean"]), tuple(meta["std"]),
                         meta.get("class_names"), desc.get("teacher_sha256"))
    return onnx_file, like, desc


class SyntheticCalibrationReader:
    """onnxruntime CalibrationDataReader streaming normalised synthetic images in small batches."""

    def __init__(self, dataset: SyntheticSet, indices: Sequence[int], like: InputSpec, input_name: str, batch_size: int = CALIB_BATCH):
        self.dataset, self.indices, self.like = dataset, list(indices), like
        self.input_name, self.batch_size = input_name, batch_size
        self._pos = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        from ..evaluate import to_input
        from ..export import ort_input

        if self._pos >= len(self.indices):
            return None
        idx = self.indices[self._pos:self._pos + self.batch_size]
        self._pos += len(idx)
        images = torch.stack([self.dataset[i][0] for i in idx])
        return {self.input_name: ort_input(to_input(images, self.like))}

    def rewind(self) -> None:
        self._pos = 0

    def __iter__(self):
        self.rewind()
        while (batch := self.get_next()) is not None:
            yield batch


def _as_reader(reader: Any):
    """Wrap in onnxruntime's abstract base class (imported lazily: onnxruntime is heavy)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def rewind(self):
            reader.rewind()

    return _Reader()


def _split(n: int, calibration_images: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (calibration, held-out) indices; at least a quarter of a small set stays held out."""

    perm = torch.randperm(n, generator=seeded_generator(stream_seed(seed, CALIBRATION_SPLIT))).tolist()
    n_cal = min(calibration_images, n - max(1, n // 4)) if n >= 2 else n
    if n_cal < calibration_images:
        log(f"quantize: calibrating on {n_cal} of {n} synthetic images so that {n - n_cal} stay held out for the agreement check")
    return sorted(perm[:n_cal]), sorted(perm[n_cal:][:HOLDOUT_MAX])


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if name not in methods:
        raise UserError(f"unknown calibration method {name!r}; use one of {', '.join(methods)}")
    return methods[name]


ENTROPY_BINS = 2048  # histogram bins the KL search of the entropy calibrator chooses its threshold from


@contextmanager
def _entropy_histogram(bins: int = ENTROPY_BINS):
    """Make ORT's entropy calibrator search for a threshold at all.

    ``quantize_static`` builds its calibrator with 128 histogram bins and 128 quantized bins, so the KL
    search has a single candidate, the full range: "entropy" silently equals MinMax (checked on
    onnxruntime 1.32), and its extra_options cannot pass ``num_bins``. TensorRT's recipe, which ORT's
    search follows, takes 2048 bins; this patches that one argument into the factory for the duration
    of one quantize_static call."""
    # the module, not the package's same-named function ``onnxruntime.quantization.quantize``
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")

    original = ort_quantize.create_calibrator

    def with_bins(*args, extra_options=None, **kwargs):
        return original(*args, extra_options={"num_bins": bins, **(extra_options or {})}, **kwargs)

    ort_quantize.create_calibrator = with_bins
    try:
        yield
    finally:
        ort_quantize.create_calibrator = original


def static_qdq(source: str | Path, target: str | Path, reader: Any, *, per_channel: bool = True,
               calibrate_method: str = "minmax", symmetric_activations: bool = False,
               activation_bits: int = 8) -> None:
    """ORT static QDQ quantization (INT8 weights) of ``source`` into ``target``, calibrated by ``reader``
    (anything with get_next/rewind). Activations are per-tensor (the only granularity ORT has for them),
    INT8 unless ``activation_bits`` is 4 or 16 (for measuring calibration where INT8 is too easy)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    act = {8: QuantType.QInt8, 4: QuantType.QInt4, 16: QuantType.QInt16}.get(int(activation_bits))
    if act is None:
        raise UserError(f"activation bits must be 4, 8 or 16, got {activation_bits}")
    method = _calibration_method(calibrate_method)
    with _entropy_histogram() if calibrate_method == "entropy" else nullcontext():
        quantize_static(
            model_input=str(source), model_output=str(target), calibration_data_reader=_as_reader(reader),
            quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8,
            calibrate_method=method, extra_options={"ActivationSymmetric": bool(symmetric_activations)},
        )


def quantize(model_onnx_path: str | Path, synth_dir: str | Path, settings: Settings, out_dir: str | Path,
             eval_data: Optional[LabelledImages] = None, reference: Optional[InputSpec] = None) -> dict[str, Any]:
    """INT8 (QDQ, static) ``out_dir/model.onnx`` + ``calib.npz`` + descriptor; returns before → after metrics.

    ``model_onnx_path`` is an .onnx file or a model folder; ``reference`` (a Teacher) supplies the
    preprocessing when the file carries none.
    """
    import onnx
    from ..data.synthetic import SyntheticSet
    from ..data.training_set import describe_sources
    from ..evaluate import agreement, onnx_logits, top1
    from ..export import onnx_session, set_onnx_metadata
    from ..models.model_dir import DESCRIPTOR, model_metadata, write_descriptor

    qs = settings.quantize
    fp32_file, like, src_desc = resolve_onnx(model_onnx_path, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DESCRIPTOR).unlink(missing_ok=True)
    dataset = SyntheticSet(synth_dir)
    if tuple(dataset.input_shape) != tuple(like.input_shape):
        raise UserError(f"the synthetic set holds {tuple(dataset.input_shape)} images but the model takes {tuple(like.input_shape)}")
    dataset.verify()
    calib_idx, hold_idx = _split(len(dataset), qs.calibration_images, settings.seed)
    input_name = onnx_session(fp32_file, prefer_cuda=False).get_inputs()[0].name

    reader = SyntheticCalibrationReader(dataset, calib_idx, like, input_name)
    buf = io.BytesIO()
    np.savez(buf, **{input_name: np.concatenate([b[input_name] for b in reader], axis=0)})
    atomic_write_bytes(out / CALIB_FILE, buf.getvalue())
    reader.rewind()  # quantize_static reads from the current position

    with tempfile.TemporaryDirectory(prefix="dfcompress-quant-") as tmp:
        source = _preprocess(fp32_file, Path(tmp) / "pre.onnx")
        with atomic_path(out / MODEL_FILE) as target:
            static_qdq(source, target, reader, per_channel=qs.per_channel, calibrate_method=qs.calibrate_method,
                       symmetric_activations=qs.symmetric_activations)
            proto = onnx.load(str(target))
            set_onnx_metadata(proto, DESCRIPTOR, json.dumps(model_metadata(like)))
            onnx.save(proto, str(target))
            onnx_session(target, prefer_cuda=False)  # the INT8 file must load before it replaces anything

    int8_file = out / MODEL_FILE
    hold = torch.stack([dataset[i][0] for i in hold_idx])
    fp32_hold, int8_hold = onnx_logits(fp32_file, hold, like), onnx_logits(int8_file, hold, like)
    metrics: dict[str, Any] = {
        "format": "QDQ", "weights": "int8", "activations": "int8", "per_channel": qs.per_channel,
        "calibrate_method": qs.calibrate_method, "symmetric_activations": qs.symmetric_activations, "calibration_images": len(calib_idx), "holdout_images": len(hold_idx),
        "bytes_before": fp32_file.stat().st_size, "bytes_after": int8_file.stat().st_size,
        "holdout_agreement": agreement(int8_hold, fp32_hold),
        "holdout_max_abs_diff": float((int8_hold - fp32_hold).abs().max()),
        "top1_before": None, "top1_after": None, "agreement": None,
    }
    metrics["data_sources"] = describe_sources(dataset.manifest, synth_dir)
    metrics["size_ratio"] = metrics["bytes_before"] / max(1, metrics["bytes_after"])
    if eval_data is not None and len(eval_data):
        before, after = onnx_logits(fp32_file, eval_data.x, like), onnx_logits(int8_file, eval_data.x, like)
        metrics["agreement"] = agreement(after, before)
        metrics["eval_images"] = int(len(eval_data))
        if eval_data.y is not None:
            metrics["top1_before"], metrics["top1_after"] = top1(before, eval_data.y), top1(after, eval_data.y)
    extra = {"quantization": {k: metrics[k] for k in ("format", "weights", "activations", "per_channel", "calibrate_method", "symmetric_activations")},
             "source_model": str(fp32_file), "calibration": CALIB_FILE}
    if src_desc.get("arch"):
        extra["base_arch"] = src_desc["arch"]
    metrics["model_dir"] = write_descriptor(out, like, "quantize", {"onnx": MODEL_FILE}, extra=extra)
    return metrics


def _preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-processing (shape inference + graph optimisation); the original file if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception as exc:  # noqa: BLE001 - optional step; quantize_static works without it
        log(f"quantize: pre-processing skipped ({describe_exception(exc, 120)})")
        return src
