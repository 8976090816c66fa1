"""End to end through the CLI on the embedded digits teacher, data-free: synthesize -> distill -> prune
-> quantize -> export -> eval, measured on the *real* held-out digits split.

Small settings keep it to about a minute on a 2-core CPU; the assertions are on real accuracy (chance
is 10 %), on ONNX parity with onnxruntime, on pruned MACs, on the --max-drop gate and on resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dfcompress.cli import app
from dfcompress.models.embedded import digits_split, embedded_teacher

runner = CliRunner()
SYNTH = ("--profile", "digits", "-n", "320", "--iterations", "60", "--seed", "0")


def run(*args: str, code: int = 0):
    res = runner.invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def synth(workdir: Path) -> Path:
    out = workdir / "synth"
    run("synthesize", *SYNTH, "-o", str(out))
    return out


@pytest.fixture(scope="module")
def student(workdir: Path, synth: Path) -> Path:
    out = workdir / "student"
    run("distill", "--profile", "digits", "--data", str(synth), "--epochs", "25", "-o", str(out))
    return out


def real_top1_onnx(path: Path) -> float:
    """Top-1 of an ONNX model on the real held-out digits, run by onnxruntime (independent of our code)."""
    teacher = embedded_teacher()
    split = digits_split()
    x = teacher.normalize(split.x_test.float() / 255.0).numpy().astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == split.y_test.numpy()).mean() * 100)


def test_synthetic_set_is_recognised_by_the_teacher(synth: Path):
    manifest = json.loads((synth / "manifest.json").read_text())
    assert manifest["num_images"] == 320
    assert manifest["counts_per_class"] == [32] * 10
    assert (synth / "preview.png").stat().st_size > 0 and (synth / "loss.png").is_file()
    from dfcompress.data.synthetic import SyntheticSet

    ds = SyntheticSet(synth)
    logits = torch.stack([ds[i][2] for i in range(len(ds))])
    labels = ds.labels
    assert (logits.argmax(1) == labels).float().mean() > 0.5   # chance is 0.1: the teacher sees the target class


def test_data_free_student_beats_chance_on_real_digits(student: Path):
    report = json.loads((student / "report.json").read_text())
    after = report["metrics"]["after"]
    assert after["top1"] > 50.0, after           # chance is 10 %; measured on the real test split
    assert after["params"] < report["metrics"]["before"]["params"]
    # the exported ONNX file agrees with what the report says, scored by onnxruntime itself
    desc = json.loads((student / "dfcompress.json").read_text())
    onnx_top1 = real_top1_onnx(student / desc["files"]["onnx"])
    assert abs(onnx_top1 - after["top1"]) < 1.0


def test_prune_reduces_macs_and_keeps_accuracy(workdir: Path, synth: Path):
    out = workdir / "pruned"
    res = run("prune", "--profile", "digits", "--ratio", "0.5", "--data", str(synth), "--epochs", "5", "-o", str(out))
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["after"]["macs"] < 0.5 * summary["before"]["macs"]
    assert summary["after"]["top1"] > 50.0
    assert real_top1_onnx(out / "model.onnx") > 50.0


def test_prune_ratio_09_runs_as_typed_on_embedded_teacher(workdir: Path, synth: Path, monkeypatch):
    monkeypatch.chdir(workdir)
    res = run("prune", "--ratio", "0.9", "--data", str(synth), "--epochs", "1")
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert Path(summary["output"]).is_dir()
    assert summary["after"]["params"] < 0.1 * summary["before"]["params"]


def test_quantize_export_eval_chain(workdir: Path, synth: Path, student: Path):
    int8 = workdir / "int8"
    res = run("quantize", str(student), "--data", str(synth), "-o", str(int8))
    model = onnx.load(str(int8 / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert real_top1_onnx(int8 / "model.onnx") > 50.0
    exported = workdir / "student.onnx"
    res = run("export", str(student), "--format", "onnx", "-o", str(exported), "--data", str(synth))
    result = json.loads(res.stdout)
    assert result["max_abs_diff"] < 1e-3 and result["top1_agreement"] == 100.0
    res = run("eval", str(int8), "--against", "embedded")
    metrics = json.loads(res.stdout)
    assert metrics["top1"] > 50.0 and metrics["agreement"] > 50.0
    assert metrics["latency"]["batch_1"]["p50_ms"] > 0


def test_max_drop_gate_exits_3(workdir: Path, synth: Path):
    out = workdir / "gated"
    res = runner.invoke(app, ["distill", "--profile", "digits", "--data", str(synth), "--epochs", "1",
                              "--max-drop", "0.5", "-o", str(out)])
    assert res.exit_code == 3, res.output
    assert "more than --max-drop 0.5" in res.output
    assert json.loads((out / "report.json").read_text())["status"] == "gate-failed"


def test_distill_rerun_resumes(workdir: Path, synth: Path, student: Path):
    before = (student / "model.safetensors").read_bytes()
    res = run("distill", "--profile", "digits", "--data", str(synth), "--epochs", "25", "-o", str(student))
    assert (student / "model.safetensors").read_bytes() == before
    assert "resum" in res.output.lower()
