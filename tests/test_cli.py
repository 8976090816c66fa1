"""CLI conventions: profiles and their precedence, --dry-run/--save-config, exit codes, inspect."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dfcompress.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_profiles_list_and_show():
    res = invoke("profiles")
    assert res.exit_code == 0
    for name in ("cifar10", "cifar100", "imagenet", "digits", "ci-smoke"):
        assert name in res.output
    shown = yaml.safe_load(invoke("profiles", "cifar10").output)
    assert shown["synthesize"]["lambda_bn"] == 10.0 and shown["synthesize"]["iterations"] == 2000
    c100 = yaml.safe_load(invoke("profiles", "cifar100").output)
    assert c100["synthesize"]["lambda_bn"] == 3.0 and c100["synthesize"]["iterations"] == 4000


def test_flags_override_profile_in_dry_run():
    res = invoke("synthesize", "--profile", "cifar10", "--iterations", "7", "--dry-run")
    assert res.exit_code == 0
    resolved = yaml.safe_load(res.output)
    assert resolved["synthesize"]["iterations"] == 7          # flag wins
    assert resolved["synthesize"]["batch_size"] == 256       # profile value kept
    assert resolved["synthesize"]["lambda_tv"] == pytest.approx(6e-3)


def test_save_config_roundtrip(tmp_path):
    cfg = tmp_path / "mine.yaml"
    assert invoke("distill", "--profile", "digits", "--epochs", "3", "--save-config", str(cfg), "--dry-run").exit_code == 0
    res = invoke("distill", "--profile", str(cfg), "--dry-run")
    assert yaml.safe_load(res.output)["distill"]["epochs"] == 3


@pytest.mark.parametrize("content, needle", [
    ("synthesize:\n  iteratons: 5\n", "did you mean 'iterations'"),
    ("synthesize:\n  iterations: many\n", "expected int"),
    ("synthesize: [1, 2\n", "not valid YAML"),
    ("prune:\n  ratio: 1.5\n", "must be < 1.0"),
    ("synthesize:\n  method: naturalinversoin\n", "did you mean 'naturalinversion'"),
])
def test_bad_profiles_exit_2_with_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    res = invoke("synthesize", "--profile", str(path), "--dry-run")
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output


def test_unknown_profile_name_suggests():
    res = invoke("synthesize", "--profile", "cifar-10", "--dry-run")
    assert res.exit_code == 2 and "cifar10" in res.output


def test_inspect_embedded_json():
    res = invoke("inspect", "--json")
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["num_classes"] == 10 and info["input_shape"] == [1, 8, 8]
    assert info["bn_folded"] is False and info["batchnorm_layers"] == 5
    assert [s["height"] for s in info["stages"]] == [8, 4, 2]


def test_inspect_shared_resnet56_onnx_is_bn_folded(shared_dir):
    res = invoke("inspect", str(shared_dir / "teachers" / "cifar10_resnet56_akamaster.onnx"))
    assert res.exit_code == 0, res.output
    assert "classes    10" in res.output and "3x32x32" in res.output and "no BatchNorm layers (folded" in res.output


def test_missing_model_file_exit_2(tmp_path):
    res = invoke("inspect", str(tmp_path / "nope.pt"))
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_unknown_student_suggests_closest():
    res = invoke("distill", "--student", "resnet81", "-n", "8", "--dry-run")
    assert res.exit_code == 0  # dry-run only resolves settings
    res = invoke("distill", "--student", "resnt18", "--data", "nowhere")
    assert res.exit_code == 2 and "resnet18" in res.output


def test_cuda_requested_without_gpu_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = invoke("stats", "--device", "cuda", "-o", "x.safetensors")
    assert res.exit_code == 2 and "--device cuda" in res.output
