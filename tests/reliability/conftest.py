"""Session fixtures of the reliability suite: real bad input files, a tiny synthetic set, and the
uninterrupted reference runs that the crash-safety and determinism tests compare against."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reliability_helpers import KD_PROFILE, SYNTH_ARGS, TINY_SYNTH, invoke, run_cli

def _onnx_models(folder: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 4, 4])
    w = numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "W")
    k = numpy_helper.from_array(np.array([3], dtype=np.int64), "K")
    flat_gemm = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Gemm", ["f", "W"], ["g"], transB=1)]
    opset = [helper.make_opsetid("", 17)]
    # a classifier head followed by TopK, an op the converter does not support
    topk = helper.make_graph(flat_gemm + [helper.make_node("TopK", ["g", "K"], ["v", "i"], axis=1)], "topk", [x],
                             [helper.make_tensor_value_info("v", TensorProto.FLOAT, [None, 3])], initializer=[w, k])
    model = helper.make_model(topk, opset_imports=opset)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "topk.onnx")
    # a detector-style head: class scores from the image, then NonMaxSuppression over fixed boxes
    x1 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    w8 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W8")
    boxes = numpy_helper.from_array(rng.random((1, 8, 4)).astype(np.float32), "boxes")
    shape = numpy_helper.from_array(np.array([1, 1, 8], dtype=np.int64), "shape")
    nms = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"], axis=1),
                             helper.make_node("Gemm", ["f", "W8"], ["g"], transB=1),
                             helper.make_node("Reshape", ["g", "shape"], ["scores"]),
                             helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"])], "nms", [x1],
                            [helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])], initializer=[w8, boxes, shape])
    model = helper.make_model(nms, opset_imports=opset)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "nms.onnx")
    # two graph inputs (image and a second tensor): not a single-input classifier
    two = helper.make_graph([helper.make_node("Add", ["x", "x2"], ["s"])] + [
        helper.make_node("Flatten", ["s"], ["f"], axis=1), helper.make_node("Gemm", ["f", "W"], ["g"], transB=1)], "two",
        [x, helper.make_tensor_value_info("x2", TensorProto.FLOAT, [None, 1, 4, 4])],
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, [None, 10])], initializer=[w])
    onnx.save(helper.make_model(two, opset_imports=opset), folder / "two_inputs.onnx")
    # a classifier with a NaN weight
    wn = rng.standard_normal((10, 16)).astype(np.float32)
    wn[3, 5] = np.nan
    nan = helper.make_graph(flat_gemm, "nan", [x], [helper.make_tensor_value_info("g", TensorProto.FLOAT, [None, 10])],
                            initializer=[numpy_helper.from_array(wn, "W")])
    onnx.save(helper.make_model(nan, opset_imports=opset), folder / "nan_weight.onnx")
    # an ONNX file whose external weights live outside its folder (path traversal)
    ext = onnx.TensorProto()
    ext.name, ext.data_type = "W", TensorProto.FLOAT
    ext.dims.extend([10, 16])
    ext.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../outside-weights.bin"), ("offset", "0"), ("length", "640")):
        entry = ext.external_data.add()
        entry.key, entry.value = key, value
    (folder.parent / "outside-weights.bin").write_bytes(np.ones(160, np.float32).tobytes())
    trav = helper.make_graph(flat_gemm, "trav", [x], [helper.make_tensor_value_info("g", TensorProto.FLOAT, [None, 10])],
                             initializer=[ext])
    onnx.save(helper.make_model(trav, opset_imports=opset), folder / "traversal.onnx")


@pytest.fixture(scope="session")
def materials(tmp_path_factory) -> Path:
    """Real bad input files, built once (read-only afterwards)."""
    from safetensors.torch import load_file

    from dfcompress.models.embedded import ASSET

    root = tmp_path_factory.mktemp("materials")
    d = root / "m"
    d.mkdir()
    rng = np.random.default_rng(0)
    sd = load_file(str(ASSET))
    torch.save(sd, d / "digits_sd.pt")
    whole = (d / "digits_sd.pt").read_bytes()
    (d / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    nan_sd = {k: v.clone() for k, v in sd.items()}
    nan_sd["fc.weight"][0, 0] = float("nan")
    torch.save(nan_sd, d / "nan_weights.pt")
    huge = {k: v.clone() for k, v in sd.items()}
    huge["fc.weight"] = huge["fc.weight"].abs() * 1e38  # finite weights, but the logits overflow to inf
    huge["fc.bias"] = torch.full_like(huge["fc.bias"], 3e38)
    torch.save(huge, d / "inf_logits.pt")
    (d / "empty.pt").write_bytes(b"")
    for ext in (".pt", ".pth", ".onnx", ".pt2", ".safetensors", ".bin"):
        (d / f"random{ext}").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())

    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()  # feature map out, not logits
    torch.jit.save(torch.jit.trace(conv, torch.randn(1, 3, 8, 8)), d / "conv_only.torchscript.pt")
    torch.onnx.export(conv, (torch.randn(1, 3, 8, 8),), str(d / "conv_only.onnx"), dynamo=False,
                      input_names=["x"], output_names=["y"])
    onnx_bytes = (d / "conv_only.onnx").read_bytes()
    (d / "truncated.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    _onnx_models(d)

    np.savez(d / "rgb.npz", x=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y=np.arange(20) % 10)
    np.savez(d / "no_xy.npz", images=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8))
    np.savez(d / "labels_20.npz", x=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y=np.arange(20))
    np.savez(d / "float_x.npz", x=rng.random((20, 8, 8)).astype(np.float32), y=np.arange(20) % 10)
    (d / "no_images" / "0").mkdir(parents=True)
    (d / "no_images" / "0" / "readme.txt").write_text("not an image")
    (d / "bad_image" / "3").mkdir(parents=True)
    (d / "bad_image" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (d / "not_a_set").mkdir()
    (d / "not_a_set" / "notes.txt").write_text("just a folder")
    (d / "escape").mkdir()
    (d / "escape" / "dfcompress.json").write_text(
        '{"kind": "model", "files": {"onnx": "../conv_only.onnx"}, "input_shape": [3, 8, 8], "num_classes": 10}')
    (d / "somefile.txt").write_text("a regular file, not a folder")
    (d / "bad_key.yaml").write_text("synthesize:\n  iteratons: 5\n")
    (d / "bad_type.yaml").write_text("synthesize:\n  iterations: [1, 2]\n")
    (d / "bad_float.yaml").write_text("distill:\n  epochs: 1.5\n")
    (d / "malformed.yaml").write_text("synthesize: {iterations: [1, 2\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "kd.yaml").write_text(KD_PROFILE)
    for p in d.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    return d


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> Path:
    """A tiny but real synthetic set of the embedded teacher (16 images, 2 shards)."""
    out = tmp_path_factory.mktemp("tiny") / "set"
    res = invoke(["synthesize", "-o", out, *TINY_SYNTH])
    assert res.exit_code == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def corrupted_set(tiny_set: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corrupt") / "set"
    shutil.copytree(tiny_set, out)
    shard = out / "shards" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # one flipped bit pattern in the payload: same size, different bytes
    shard.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="session")
def reference_set(tmp_path_factory) -> Path:
    """An uninterrupted ``dfcompress synthesize`` run (a real process), the yardstick for resumed runs."""
    work = tmp_path_factory.mktemp("reference")
    res = run_cli(["synthesize", "-o", "ref", *SYNTH_ARGS], cwd=work)
    assert res.returncode == 0, res.stderr
    return work / "ref"


@pytest.fixture(scope="session")
def kd_profile(materials: Path) -> Path:
    return materials / "kd.yaml"


@pytest.fixture(scope="session")
def reference_student(reference_set: Path, kd_profile: Path, tmp_path_factory) -> Path:
    """An uninterrupted ``dfcompress distill --seed 1`` on the reference set (a real process)."""
    work = tmp_path_factory.mktemp("reference_kd")
    res = run_cli(["distill", "--data", reference_set, "-o", "student", "--profile", kd_profile, "--seed", "1"], cwd=work)
    assert res.returncode == 0, res.stderr
    return work / "student"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
