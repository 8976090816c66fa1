"""Untrusted model files must never execute code: real malicious payloads, the marker file must not appear."""
from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from dfcompress.errors import UserError
from dfcompress.models.loading import load_teacher
from pickle_payloads import ExecWrite, Touch

REFUSAL = "contains pickled Python objects, which can run arbitrary code when loaded; re-run with --allow-pickle"


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def _refused(path: Path, marker: Path) -> None:
    with pytest.raises(UserError) as info:
        load_teacher(path, arch="resnet20")
    assert REFUSAL in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("payload", [Touch, ExecWrite])
def test_payloads_are_live(tmp_path: Path, payload) -> None:
    """Control: a plain unpickle really runs them, so the refusals below are meaningful."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [Touch, ExecWrite])
def test_raw_pickle_refused(tmp_path: Path, payload) -> None:
    marker = tmp_path / "MARKER"
    for protocol in (2, pickle.DEFAULT_PROTOCOL):
        f = tmp_path / f"evil{protocol}.pt"
        f.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "x": payload(marker)}, protocol=protocol))
        _refused(f, marker)


def test_legacy_torch_save_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    f = tmp_path / "evil_legacy.pth"
    torch.save({"state_dict": _tiny().state_dict(), "x": Touch(marker)}, f, _use_new_zipfile_serialization=False)
    _refused(f, marker)


@pytest.mark.parametrize("suffix", [".pt", ".onnx", ".pt2", ".bin", ".safetensors"])
def test_zip_checkpoint_refused_whatever_its_extension(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "MARKER"
    src = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": _tiny().state_dict(), "epoch": 3, "x": ExecWrite(marker)}, src)
    f = src if suffix == ".pt" else src.rename(tmp_path / f"evil_zip{suffix}")
    _refused(f, marker)


def test_pickled_module_needs_flag_and_loads_with_it(tmp_path: Path) -> None:
    model = _tiny()
    f = tmp_path / "whole_model.pt"
    torch.save(model, f)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_teacher(f)
    disguised = tmp_path / "whole_model.onnx"
    shutil.copy(f, disguised)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_teacher(disguised)
    teacher = load_teacher(f, allow_pickle=True, input_shape=(3, 16, 16))
    assert teacher.format == "pickle" and teacher.num_classes == 5
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher.module(x), model(x), atol=1e-6)
    assert not teacher.module.training


def test_pickle_inside_pt2_archive_refused(tmp_path: Path) -> None:
    """A genuine .pt2 whose sample-inputs payload was swapped for a malicious pickle (torch falls back to weights_only=False)."""
    marker = tmp_path / "MARKER"
    model = _tiny()
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), good)
    evil_payload = io.BytesIO()
    torch.save(((Touch(marker),), {}), evil_payload)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if "sample_inputs" in info.filename:
                data = evil_payload.getvalue()
            zout.writestr(info, data)
    with pytest.raises(UserError) as info:
        load_teacher(bad)
    assert REFUSAL in str(info.value)
    assert not marker.exists()
    teacher = load_teacher(good)  # the untouched archive is fine without the flag
    assert teacher.format == "pt2"
