"""Static INT8 quantization with real onnxruntime, calibrated on a (real-digits stand-in) synthetic set."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress_helpers import digits_as_synthetic_set, digits_teacher, digits_test_data, fast_settings
from dfcompress.compress.quantize import quantize
from dfcompress.errors import UserError
from dfcompress.export import onnx_session, run_onnx
from dfcompress.export import save_model_dir
from dfcompress.models.model_dir import read_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    teacher = digits_teacher()
    synth = digits_as_synthetic_set(root / "syn", teacher, n=256)
    check = (torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) - teacher.mean[0]) / teacher.std[0]
    folder = root / "fp32"
    save_model_dir(folder, teacher.module, teacher, "distill", "digits_cnn", ("state_dict", "onnx"), check)
    return teacher, synth, folder


def test_int8_model_is_qdq_runs_and_agrees(tmp_path, setup):
    teacher, synth, folder = setup
    settings = fast_settings(**{"quantize.calibration_images": 128})
    data = digits_test_data()
    m = quantize(folder, synth, settings, tmp_path / "int8", eval_data=data)
    model = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 5
    # weights are stored as int8 initializers
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    assert m["calibration_images"] == 128 and m["holdout_images"] == 128
    assert m["holdout_agreement"] > 90.0, m
    assert m["bytes_after"] < 0.5 * m["bytes_before"]
    assert m["top1_before"] > 90 and m["top1_after"] > m["top1_before"] - 5 and m["agreement"] > 90
    calib = np.load(tmp_path / "int8" / "calib.npz")
    assert list(calib.files) == ["input"] and calib["input"].shape == (128, 1, 8, 8) and calib["input"].dtype == np.float32
    # the calibration images are normalised synthetic images: min maps to (0 - mean) / std
    assert abs(float(calib["input"].min()) - (0 - teacher.mean[0]) / teacher.std[0]) < 1e-4
    desc = read_model_dir(tmp_path / "int8")
    assert desc["created_by"] == "quantize" and desc["files"] == {"onnx": "model.onnx"}
    assert desc["mean"] == list(teacher.mean) and desc["quantization"]["weights"] == "int8"
    # the INT8 file runs on its own in onnxruntime with any batch size
    x = (data.x[:3].float() / 255 - teacher.mean[0]) / teacher.std[0]
    assert run_onnx(onnx_session(tmp_path / "int8" / "model.onnx"), x).shape == (3, 10)


def test_bare_onnx_file_with_embedded_metadata(tmp_path, setup):
    teacher, synth, folder = setup
    bare = tmp_path / "bare.onnx"
    bare.write_bytes((folder / "model.onnx").read_bytes())
    settings = fast_settings(**{"quantize.calibration_images": 1000, "quantize.per_channel": False,
                                "quantize.calibrate_method": "percentile"})
    m = quantize(bare, synth, settings, tmp_path / "out")
    # a calibration request as large as the set leaves a quarter of it held out
    assert m["calibration_images"] == 192 and m["holdout_images"] == 64
    assert m["holdout_agreement"] > 85.0 and m["top1_before"] is None


def test_onnx_without_preprocessing_is_a_user_error(tmp_path, setup):
    teacher, synth, folder = setup
    proto = onnx.load(str(folder / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "anon.onnx"))
    with pytest.raises(UserError, match="mean"):
        quantize(tmp_path / "anon.onnx", synth, fast_settings(), tmp_path / "out")
    # with the teacher as reference it works
    m = quantize(tmp_path / "anon.onnx", synth, fast_settings(), tmp_path / "out2", reference=teacher)
    assert json.loads((tmp_path / "out2" / "dfcompress.json").read_text())["teacher_sha256"] == teacher.sha256
    assert m["holdout_agreement"] > 85.0


def test_cli_calibrator_and_granularity_options(tmp_path):
    """--calibrate-method / --per-tensor / --symmetric-activations reach onnxruntime and the report."""
    import json as _json

    import onnx
    from onnx import numpy_helper
    from typer.testing import CliRunner

    from compress_helpers import digits_as_synthetic_set, digits_teacher
    from dfcompress.cli import app

    synth = digits_as_synthetic_set(tmp_path / "synth", digits_teacher(), n=64, shard_size=64)
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", "--data", str(synth), "--calibration-images", "32", "--calibrate-method",
                                   "percentile", "--per-tensor", "--symmetric-activations", "-o", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    q = \
        _json.loads((out / "report.json").read_text())["metrics"]
    assert q["calibrate_method"] == "percentile" and q["per_channel"] is False and q["symmetric_activations"] is True
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    deq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weight_scales = [inits[n.input[1]] for n in deq if n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert weight_scales and all(s.size == 1 for s in weight_scales)  # one scale per conv weight tensor
    act_zero_points = [inits[n.input[2]] for n in deq if n.input[0] not in inits and len(n.input) > 2]
    assert act_zero_points and all(int(z) == 0 for z in act_zero_points)  # symmetric activations
    bad = CliRunner().invoke(app, ["quantize", "--data", str(synth), "--calibrate-method", "kl", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_entropy_calibrator_searches_a_threshold(tmp_path):
    """``--calibrate-method entropy`` must not be MinMax in disguise: ORT's quantize_static builds its entropy
    calibrator with as many histogram bins as quantized bins, which leaves the full range as the only candidate.
    Through the CLI, the activation scales of an entropy run are smaller than MinMax's on some tensor."""
    from onnx import numpy_helper
    from typer.testing import CliRunner

    from dfcompress.cli import app

    synth = digits_as_synthetic_set(tmp_path / "synth", digits_teacher(), n=64, shard_size=64)
    scales = {}
    for method in ("minmax", "entropy"):
        out = tmp_path / method
        res = CliRunner().invoke(app, ["quantize", "--data", str(synth), "--calibration-images", "32",
                                       "--calibrate-method", method, "-o", str(out)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        graph = onnx.load(str(out / "model.onnx")).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        scales[method] = {n.input[0]: float(inits[n.input[1]]) for n in graph.node
                          if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert scales["minmax"].keys() == scales["entropy"].keys()
    shrunk = [k for k in scales["minmax"] if scales["entropy"][k] < 0.9 * scales["minmax"][k]]
    assert shrunk, (scales["minmax"], scales["entropy"])
