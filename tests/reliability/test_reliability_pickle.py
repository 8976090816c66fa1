"""Guarantee 1: an untrusted model file never executes code unless --allow-pickle.

Each file below carries a live payload (a control test proves it runs when unpickled through the same
CLI with --allow-pickle); ``dfcompress inspect FILE`` and ``dfcompress synthesize FILE ...`` must refuse
it with exit 2 and a message that says how to opt in, and the marker file must never appear.
TorchScript, .pt2 and ONNX files are loaded without running Python from the file."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from pickle_payloads import ExecWrite, Touch
from reliability_helpers import (TINY_SYNTH, assert_one_line_error, diff_snapshots, invoke, raw_pickle, run_cli, snapshot,
                                 tiny_classifier)

OPT_IN = "re-run with --allow-pickle only if you trust its source"


def _zip_checkpoint(path: Path, marker: Path, payload=ExecWrite) -> Path:
    """torch.save of a normal-looking checkpoint dict with one malicious object inside (zip format)."""
    torch.save({"state_dict": tiny_classifier().state_dict(), "epoch": 3, "extra": payload(marker)}, path)
    return path


def _swap_member(src: Path, dst: Path, match: Callable[[str], bool], data: bytes, edit_json=None) -> Path:
    """Copy a zip archive, replacing the members whose name matches (fresh ZipFile per copy: writestr mutates infos)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            content = zin.read(info.filename)
            if match(info.filename):
                content = data
            elif edit_json is not None and info.filename.endswith(".json"):
                content = edit_json(info.filename, content)
            zout.writestr(info.filename, content)
    return dst


def _pt2(path: Path) -> Path:
    model = tiny_classifier()
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 8, 8),)), path)
    return path


def _pickled_weight_config(name: str, content: bytes) -> bytes:
    """Declare weight_0 of a .pt2 as pickled (use_pickle: true), so torch.export.load unpickles it."""
    if not name.endswith("model_weights_config.json"):
        return content
    cfg = json.loads(content)
    for meta in cfg["config"].values():
        if meta.get("path_name") == "weight_0":
            meta["use_pickle"] = True
    return json.dumps(cfg).encode()


# id -> builder(folder, marker) -> file; every builder plants a payload that writes ``marker``
PAYLOADS: dict[str, Callable[[Path, Path], Path]] = {
    "raw-pickle-proto2.pt": lambda d, m: raw_pickle({"state_dict": {"w": torch.zeros(1)}, "x": Touch(m)}, d / "evil.pt", 2),
    "raw-pickle-proto4.pth": lambda d, m: raw_pickle({"model": ExecWrite(m)}, d / "evil.pth", 4),
    "raw-pickle-proto5.th": lambda d, m: raw_pickle([Touch(m)], d / "evil.th", 5),
    "raw-pickle-proto0.pt": lambda d, m: raw_pickle(Touch(m), d / "evil0.pt", 0),
    "raw-pickle-proto1.pth": lambda d, m: raw_pickle(ExecWrite(m), d / "evil1.pth", 1),
    "legacy-torch-save.pt": lambda d, m: (torch.save({"state_dict": tiny_classifier().state_dict(), "x": Touch(m)},
                                                     d / "legacy.pt", _use_new_zipfile_serialization=False), d / "legacy.pt")[1],
    "zip-checkpoint.pt": lambda d, m: _zip_checkpoint(d / "ckpt.pt", m),
    "zip-checkpoint-as.onnx": lambda d, m: _zip_checkpoint(d / "model.onnx", m),
    "zip-checkpoint-as.pt2": lambda d, m: _zip_checkpoint(d / "model.pt2", m, Touch),
    "zip-checkpoint-as.bin": lambda d, m: _zip_checkpoint(d / "pytorch_model.bin", m),
    "zip-checkpoint-as.safetensors": lambda d, m: _zip_checkpoint(d / "model.safetensors", m),
    "raw-pickle-as.onnx": lambda d, m: raw_pickle({"x": Touch(m)}, d / "raw.onnx", 2),
    "raw-pickle-as.safetensors": lambda d, m: raw_pickle({"x": ExecWrite(m)}, d / "raw.safetensors", 3),
    "whole-module-with-payload.pt": lambda d, m: (torch.save({"model": tiny_classifier(), "hook": Touch(m)}, d / "module.pt"),
                                                  d / "module.pt")[1],
    # .pt2 archives whose members torch.export.load would unpickle with weights_only=False
    "pt2-sample-inputs-zip-pickle": lambda d, m: _swap_member(
        _pt2(d / "good.pt2"), d / "evil_zip.pt2", lambda n: "sample_inputs" in n,
        (lambda b: (torch.save(((Touch(m),), {}), b), b.getvalue())[1])(io.BytesIO())),
    "pt2-sample-inputs-proto0-pickle": lambda d, m: _swap_member(
        _pt2(d / "good.pt2"), d / "evil_p0.pt2", lambda n: "sample_inputs" in n, pickle.dumps(Touch(m), protocol=0)),
    "pt2-sample-inputs-proto1-pickle": lambda d, m: _swap_member(
        _pt2(d / "good.pt2"), d / "evil_p1.pt2", lambda n: "sample_inputs" in n, pickle.dumps(ExecWrite(m), protocol=1)),
    "pt2-weight-declared-pickled": lambda d, m: _swap_member(
        _pt2(d / "good.pt2"), d / "evil_w.pt2", lambda n: n.endswith("weights/weight_0"), pickle.dumps(Touch(m), protocol=0),
        edit_json=_pickled_weight_config),
}

# protocol 0/1 raw pickles do not start with the 0x80 marker: they are refused as "not a model file"
# (still exit 2, still nothing runs), not with the opt-in hint


@pytest.mark.parametrize("command", ["inspect", "synthesize"])
@pytest.mark.parametrize("case", sorted(PAYLOADS))
def test_payload_never_runs(case: str, command: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    files = tmp_path / "files"
    files.mkdir()
    path = PAYLOADS[case](files, marker)
    assert not marker.exists(), "building the file must not run the payload"
    args = [command, path] + (["-o", "out", *TINY_SYNTH] if command == "synthesize" else [])
    before = snapshot(tmp_path)
    res = invoke(args)
    assert not marker.exists(), f"the payload ran: {case}"
    needles = ["pickled Python objects", OPT_IN]  # protocol 0/1 pickles too (recognised by their opcodes)
    assert_one_line_error(args, res, needles)
    assert diff_snapshots(before, snapshot(tmp_path)) == []
    # naming an architecture (the state_dict route) changes nothing
    res = invoke(args + ["--arch", "digits_cnn"])
    assert res.exit_code == 2 and not marker.exists()


@pytest.mark.parametrize("case", ["raw-pickle-proto2.pt", "zip-checkpoint-as.onnx", "pt2-sample-inputs-proto0-pickle"])
def test_control_the_payload_is_live_with_allow_pickle(case: str, tmp_path: Path, monkeypatch) -> None:
    """With the explicit opt-in the same CLI path unpickles the file and the payload does run, so the
    refusals above are meaningful (these files are not models, so the command then fails normally)."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    (tmp_path / "files").mkdir()
    path = PAYLOADS[case](tmp_path / "files", marker)
    res = invoke(["inspect", path, "--allow-pickle", "--arch", "digits_cnn"])
    assert marker.exists(), f"control failed: the payload did not run with --allow-pickle ({res.stderr!r})"
    assert "Traceback" not in res.stderr


def test_payload_refused_in_a_real_process(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = _zip_checkpoint(tmp_path / "teacher.pt2", marker, Touch)
    res = run_cli(["synthesize", path, "-o", "out", *TINY_SYNTH], cwd=tmp_path)
    assert res.returncode == 2 and not marker.exists()
    assert res.stderr == f"error: {path} contains pickled Python objects, which can run arbitrary code when loaded; {OPT_IN}\n"
    assert not (tmp_path / "out").exists()


def test_model_folder_listing_a_malicious_pt2_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A dfcompress model folder is only as safe as the files it lists."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    folder = tmp_path / "model"
    folder.mkdir()
    _swap_member(_pt2(tmp_path / "good.pt2"), folder / "model.pt2", lambda n: "sample_inputs" in n,
                 pickle.dumps(Touch(marker), protocol=0))
    (folder / "dfcompress.json").write_text(json.dumps({"kind": "model", "files": {"pt2": "model.pt2"}, "input_shape": [1, 8, 8],
                                                        "num_classes": 10, "mean": [0.5], "std": [0.5]}))
    for args in (["inspect", folder], ["eval", "--against", folder, "--no-latency"]):
        res = invoke(args)
        assert not marker.exists()
        assert_one_line_error(args, res, ["pickled Python objects", "--allow-pickle"])


# ------------------------------------------------------------------------------------------------
# formats that carry no Python: loading them runs nothing from the file


def _torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.trace(tiny_classifier(), torch.randn(1, 1, 8, 8)), path)
    return path


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_with_python_pickle_is_refused_without_running_it(member: str, tmp_path: Path, monkeypatch) -> None:
    """TorchScript's own (C++) unpickler knows no Python callables: a planted os.system is an unknown type."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = _swap_member(_torchscript(tmp_path / "good.torchscript.pt"), tmp_path / "evil.torchscript.pt",
                        lambda n: n.endswith("/" + member), pickle.dumps(Touch(marker), protocol=2))
    for args in (["inspect", evil], ["inspect", evil, "--allow-pickle"], ["synthesize", evil, "-o", "out", *TINY_SYNTH]):
        res = invoke(args)
        assert not marker.exists()
        assert_one_line_error(args, res, ["TorchScript archive", "cannot be read"])


def test_torchscript_side_pickles_are_never_unpickled(tmp_path: Path, monkeypatch) -> None:
    """Payloads in members the loader never unpickles (traced inputs, debug info) stay inert; the model loads."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = _swap_member(_torchscript(tmp_path / "good.torchscript.pt"), tmp_path / "side.torchscript.pt",
                        lambda n: n.endswith("traced_inputs.pkl") or n.endswith(".debug_pkl"),
                        pickle.dumps(Touch(marker), protocol=2))
    res = invoke(["inspect", evil, "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["num_classes"] == 10
    assert not marker.exists()


def test_pt2_and_onnx_load_without_opt_in(tmp_path: Path, monkeypatch) -> None:
    """Clean .pt2 and ONNX files need no --allow-pickle (the checks above do not refuse everything)."""
    monkeypatch.chdir(tmp_path)
    good = _pt2(tmp_path / "good.pt2")
    res = invoke(["inspect", good, "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["format"] == "pt2"
    torch.onnx.export(tiny_classifier(), (torch.randn(1, 1, 8, 8),), str(tmp_path / "good.onnx"), dynamo=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    res = invoke(["inspect", tmp_path / "good.onnx", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["num_classes"] == 10


def test_onnx_python_op_is_refused(tmp_path: Path, monkeypatch) -> None:
    """An ONNX node asking for a Python callback (onnxruntime's PyOp, domain com.microsoft) is refused by name."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    w = numpy_helper.from_array(np.ones((10, 16), np.float32), "W")
    nodes = [helper.make_node("PyOp", ["x"], ["y"], domain="com.microsoft", module="os", class_name="system",
                              compute=f"touch {marker}", input_types=[TensorProto.FLOAT], output_types=[TensorProto.FLOAT]),
             helper.make_node("Flatten", ["y"], ["f"], axis=1), helper.make_node("Gemm", ["f", "W"], ["g"], transB=1)]
    graph = helper.make_graph(nodes, "pyop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 4, 4])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, [None, 10])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "pyop.onnx")
    args = ["synthesize", tmp_path / "pyop.onnx", "-o", "out", *TINY_SYNTH]
    res = invoke(args)
    assert not marker.exists()
    assert_one_line_error(args, res, ["PyOp"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["pt2-sample-inputs-proto0-pickle", "pt2-weight-declared-pickled"])
def test_library_api_refuses_proto0_pickle_in_pt2(case: str, tmp_path: Path) -> None:
    from dfcompress.errors import UserError
    from dfcompress.models.loading import load_teacher

    marker = tmp_path / "MARKER"
    (tmp_path / "files").mkdir()
    path = PAYLOADS[case](tmp_path / "files", marker)
    try:
        with pytest.raises(UserError, match="--allow-pickle"):
            load_teacher(path)
    finally:
        ran = marker.exists()
        marker.unlink(missing_ok=True)
    assert not ran, "the payload ran through load_teacher"
