"""inspect_teacher / count_params / count_macs on real pretrained teachers and small zoo models."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dfcompress.models.introspect import count_macs, count_params, inspect_teacher
from dfcompress.models.loading import load_teacher

KEYS = {"format", "source", "sha256", "arch", "input_shape", "input_shape_from", "output_head", "num_classes", "class_names", "mean", "std",
        "batchnorm_layers", "bn_folded", "batchnorm", "stages", "token_stages", "stat_layers", "pyramid", "params", "macs"}


def test_count_params_and_macs_by_hand() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5)).eval()
    assert count_params(net) == 3 * 8 * 9 + 8 * 5 + 5
    conv_macs = 8 * 16 * 16 * 3 * 9
    macs = count_macs(net, (3, 16, 16))
    # torch-pruning's counter: conv/linear MACs plus element ops of activations and pooling
    assert conv_macs + 40 <= macs <= conv_macs + 40 + 3 * 8 * 16 * 16 + 5
    assert net.training is False


def test_shared_resnet56_onnx_is_bn_folded(shared_dir: Path) -> None:
    t = load_teacher(shared_dir / "teachers" / "cifar10_resnet56_akamaster.onnx")
    info = inspect_teacher(t)
    assert set(info) == KEYS
    assert info["format"] == "onnx" and info["num_classes"] == 10 and info["input_shape"] == [3, 32, 32]
    assert info["bn_folded"] is True and info["batchnorm_layers"] == 0
    assert [s["channels"] for s in info["stages"]] == [16, 32, 64]
    assert [s["reduction"] for s in info["stages"]] == [1, 2, 4]
    assert info["sha256"].startswith("52ac2b95")
    assert abs(info["params"] - 853_018) < 3_000  # BN folded into conv biases: 850,986
    json.dumps(info)  # report-ready


def test_shared_resnet56_weights_keep_bn(shared_dir: Path) -> None:
    t = load_teacher(shared_dir / "teachers" / "original" / "resnet56-4bfd9763.th", arch="resnet56")
    info = inspect_teacher(t)
    assert info["format"] == "state_dict" and info["arch"] == "resnet56"
    assert info["batchnorm_layers"] == 55 and info["bn_folded"] is False
    assert info["params"] == 853_018
    assert [(s["channels"], s["height"]) for s in info["stages"]] == [(16, 32), (32, 16), (64, 8)]
    # ~125.5M conv/linear MACs for CIFAR ResNet-56, plus BN/ReLU element ops
    assert 125_000_000 < info["macs"] < 130_000_000


def test_macs_same_counter_for_every_format(shared_dir: Path) -> None:
    teachers = shared_dir / "teachers"
    eager = load_teacher(teachers / "original" / "resnet20-12fca82f.th", arch="resnet20")
    script = load_teacher(teachers / "cifar10_resnet20_akamaster.torchscript.pt")
    assert count_params(eager.module) == count_params(script.module) == 269_722
    assert count_macs(eager.module, (3, 32, 32)) == count_macs(script.module, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # counting must not disturb the module
        assert torch.equal(eager.module(x), eager.module(x))
    assert not eager.module.training
