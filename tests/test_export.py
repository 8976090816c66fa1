"""Export parity with the real runtimes (onnxruntime, torch.jit, torch.export) and the model-folder descriptor."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dfcompress.errors import UserError
from dfcompress.export import ExportParityError, export_model, onnx_session, read_export_metadata, run_onnx, save_model_dir
from dfcompress.models.model_dir import DESCRIPTOR, read_model_dir
from dfcompress.models.teacher import Teacher
from dfcompress.models.zoo import create_model


def _teacher(module: nn.Module, shape=(3, 32, 32), k: int = 10) -> Teacher:
    return Teacher(module=module.eval(), input_shape=shape, num_classes=k, mean=(0.5,) * shape[0], std=(0.25,) * shape[0],
                   format="state_dict", source="test", sha256="ab" * 32, arch=None, class_names=[f"c{i}" for i in range(k)])


def _zoo(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = create_model(name, num_classes=10, in_channels=3, input_size=32)
    # non-trivial BN statistics, so BN folding in the exporters is really exercised
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


CHECK = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # 5: not the traced batch of 2


@pytest.mark.parametrize("arch", ["resnet20", "wrn_16_1"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_export_parity(tmp_path, arch, fmt):
    module = _zoo(arch)
    teacher = _teacher(module)
    path = tmp_path / f"m.{fmt}"
    r = export_model(module, teacher, fmt, path, CHECK, opset=17, atol=1e-3)
    assert r["format"] == fmt and r["path"] == str(path) and r["bytes"] == path.stat().st_size > 10_000
    assert r["max_abs_diff"] < 1e-3 and r["top1_agreement"] == 100.0 and r["check_images"] == 5
    meta = read_export_metadata(path)
    assert meta["input_shape"] == [3, 32, 32] and meta["class_names"][3] == "c3" and meta["mean"] == [0.5] * 3
    x = torch.randn(3, 3, 32, 32)  # yet another batch size: the batch axis is dynamic in every format
    with torch.no_grad():
        want = module(x)
    if fmt == "onnx":
        session = onnx_session(path)
        assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
        got = torch.from_numpy(run_onnx(session, x))
        import onnx

        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(path)).graph.initializer)
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
            got = torch.jit.load(str(path))(x)
    else:
        got = torch.export.load(str(path)).module()(x)
    assert torch.allclose(got, want, atol=1e-3)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


class _Drifting(nn.Module):
    """Adds how often it was called: the exporters freeze that number, so the file disagrees with eager mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.conv(x).mean((2, 3))) + float(self.calls)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_parity_failure_raises_and_writes_nothing(tmp_path, fmt):
    module = _Drifting()
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportParityError, match="differs from PyTorch"):
        export_model(module, _teacher(module), fmt, path, CHECK)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_a_user_error(tmp_path):
    module = _zoo("resnet20")
    with pytest.raises(UserError, match="unknown export format"):
        export_model(module, _teacher(module), "tflite", tmp_path / "x", CHECK)


def test_save_model_dir_writes_descriptor_last(tmp_path):
    module = _zoo("wrn_16_1")
    teacher = _teacher(module)
    out = tmp_path / "model"
    desc = save_model_dir(out, module, teacher, "distill", "wrn_16_1", ("state_dict", "onnx"), CHECK)
    on_disk = json.loads((out / DESCRIPTOR).read_text())
    assert on_disk == json.loads(json.dumps(desc))
    assert on_disk["kind"] == "model" and on_disk["files"] == {"state_dict": "model.safetensors", "onnx": "model.onnx"}
    for key, value in {"arch": "wrn_16_1", "input_shape": [3, 32, 32], "num_classes": 10, "mean": [0.5] * 3,
                       "std": [0.25] * 3, "teacher_sha256": "ab" * 32, "created_by": "distill"}.items():
        assert on_disk[key] == value
    assert on_disk["class_names"][:2] == ["c0", "c1"]
    assert on_disk["exports"]["onnx"]["max_abs_diff"] < 1e-3
    assert read_model_dir(out)["files"]["onnx"] == "model.onnx"
    from safetensors.torch import load_file

    fresh = create_model("wrn_16_1", 10, 3, 32).eval()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    logits = run_onnx(onnx_session(out / "model.onnx"), CHECK)
    with torch.no_grad():
        assert np.abs(fresh(CHECK).numpy() - logits).max() < 1e-3
    # a folder whose named file went missing is reported, not half-loaded
    (out / "model.onnx").unlink()
    with pytest.raises(UserError, match="missing"):
        read_model_dir(out)


def test_state_dict_needs_an_arch(tmp_path):
    module = _zoo("resnet20")
    with pytest.raises(ValueError, match="architecture"):
        save_model_dir(tmp_path, module, _teacher(module), "prune", None, ("state_dict",), CHECK)
