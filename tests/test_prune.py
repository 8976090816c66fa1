"""Structured pruning with real torch-pruning on every zoo architecture, the round_to guard, the
params/MACs target search, and the full prune stage (KD fine-tuning, .pt2 + ONNX model folder).

The fine-tuning data are real digits stored as a synthetic set (see compress_helpers): a unit test of
the machinery, not a data-free quality claim.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress_helpers import digits_as_synthetic_set, digits_teacher, digits_test_data, fast_settings
from dfcompress.compress.prune import layer_widths, prune, prune_module, search_ratio
from dfcompress.device import resolve_runtime
from dfcompress.errors import UserError
from dfcompress.export import onnx_session, run_onnx
from dfcompress.models.introspect import count_macs, count_params
from dfcompress.models.model_dir import read_model_dir
from dfcompress.models.zoo import create_model, list_models

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_prunes_and_still_runs(name):
    model = create_model(name, num_classes=10, in_channels=3, input_size=32).eval()
    macs, params = count_macs(model, (3, 32, 32)), count_params(model)
    pruned, info = prune_module(model, X32, 0.5)
    with torch.no_grad():
        out = pruned(X32)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert count_macs(pruned, (3, 32, 32)) < 0.5 * macs and count_params(pruned) < 0.5 * params
    assert info["unchanged"] == [] and info["guard"] == [] and info["skipped_groups"] == []
    assert list(layer_widths(pruned).values())[-1] == 10  # the classifier keeps every class
    assert count_params(model) == params  # the input model is left alone


def _kill_stream_channel(net: nn.Module, blocks: list, producers: list, c: int) -> None:
    """Make residual-stream channel ``c`` identically zero (and of zero L1 norm) wherever it is produced."""
    with torch.no_grad():
        for conv, bn in producers:
            conv.weight[c] = 0
            bn.weight[c] = 0
            bn.bias[c] = 0


def test_option_a_resnet_prunes_across_stage_boundaries_exactly():
    """Removing dead residual channels through the real dependency graph must not change the logits.

    Stage-1 channel 5 feeds the stage-2 shortcut *input*; stage-2 channel 3 is one of its zero-padded
    *outputs*: both ends of the option-A shortcut are exercised.
    """
    net = create_model("resnet20", 10, 3, 32).eval()
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    stage1 = [(net.conv1, net.bn1)] + [(b.conv2, b.bn2) for b in net.layer1]
    stage2 = [(b.conv2, b.bn2) for b in net.layer2]
    _kill_stream_channel(net, net.layer1, stage1, 5)
    _kill_stream_channel(net, net.layer2, stage2, 3)
    with torch.no_grad():
        before = net(X32)
    from dfcompress.models.zoo import customized_pruners

    dg = tp.DependencyGraph().build_dependency(net, example_inputs=X32, customized_pruners=customized_pruners())
    for root, idx in ((net.conv1, 5), (net.layer2[0].conv2, 3)):
        group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=[idx])
        assert dg.check_pruning_group(group)
        group.prune()
    assert net.conv1.out_channels == 15 and net.layer2[0].conv2.out_channels == 31
    shortcut = net.layer2[0].shortcut
    assert (shortcut.in_channels, shortcut.out_channels) == (15, 31)
    with torch.no_grad():
        after = net(X32)
    assert torch.allclose(before, after, atol=1e-5)


class _LambdaPadNet(nn.Module):
    """The upstream akamaster option-A shortcut as an inline F.pad (what an imported ONNX graph looks like)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.conv_b = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        shortcut = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        out = torch.relu(self.conv_b(torch.relu(self.conv_a(x))) + shortcut)
        return self.fc(out.mean((2, 3)))


def test_groups_torch_pruning_cannot_follow_are_found_and_left_unpruned():
    torch.manual_seed(0)
    net = _LambdaPadNet().eval()
    # plain torch-pruning maps the 8 padded channels onto 16 index for index: it crashes or breaks the model
    raw = copy.deepcopy(net)
    with warnings.catch_warnings(), pytest.raises((IndexError, RuntimeError)):
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(raw, X32, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                             ignored_layers=[raw.fc]).step()
        raw(X32)
    pruned, info = prune_module(net, X32, 0.5)
    # one group (stem + conv_b + the pad that couples them) is left alone, the rest is pruned
    assert info["skipped_groups"] == ["conv_b"] and info["unchanged"] == []
    assert pruned.conv_a.out_channels == 6 and pruned.stem.out_channels == 8 and pruned.conv_b.out_channels == 16
    assert pruned(X32).shape == (2, 10)


def _odd_widths() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()


def test_round_to_guard_prunes_layers_torch_pruning_would_skip():
    x = torch.randn(2, 1, 8, 8)
    # the problem, shown on plain torch-pruning 1.6: 12 channels * 0.5 = 6, rounded down to 8 -> 0,
    # so it asks to drop all 12, refuses its own request and leaves the layer at 12 without a word
    raw = _odd_widths()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(raw, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                      round_to=8, ignored_layers=[raw[-1]])
        pruner.step()
    assert [raw[0].out_channels, raw[3].out_channels, raw[6].out_channels] == [12, 4, 8]

    guarded, info = prune_module(_odd_widths(), x, 0.5, round_to=8)
    assert [guarded[0].out_channels, guarded[3].out_channels, guarded[6].out_channels] == [8, 4, 8]
    by_layer = {r["layer"]: r for r in info["guard"]}
    assert by_layer["0"]["action"] == "pruned to 8" and "left 0 channels" in by_layer["0"]["reason"]
    assert by_layer["3"]["action"] == "left unpruned"  # 4 channels cannot be a positive multiple of 8
    assert all(c % 8 == 0 for c in (guarded[0].out_channels, guarded[6].out_channels))
    # the kept channels are the 8 with the largest group L1 importance in the original model
    fresh = _odd_widths()
    dg = tp.DependencyGraph().build_dependency(fresh, example_inputs=x)
    group = dg.get_pruning_group(fresh[0], tp.prune_conv_out_channels, idxs=list(range(12)))
    top = tp.importance.MagnitudeImportance(p=1)(group).argsort()[-8:].sort().values
    assert torch.equal(guarded[0].weight, fresh[0].weight[top])


def test_high_ratio_never_silently_skips_small_layers():
    model, info = prune_module(_odd_widths(), torch.randn(2, 1, 8, 8), 0.9)  # int(4 * 0.1) = 0 channels left
    assert model[3].out_channels == 1 and any(r["layer"] == "3" for r in info["guard"])
    assert model[0].out_channels == 1 and model[6].out_channels == 2


def test_global_pruning_and_round_to_on_mobilenetv2():
    model = create_model("mobilenetv2", 10, 3, 32).eval()
    before = layer_widths(model)
    model, _ = prune_module(model, X32, 0.4, global_pruning=True, round_to=8)
    after = layer_widths(model)
    changed = [n for n in after if after[n] != before[n]]
    assert changed and all(after[n] % 8 == 0 for n in changed)
    assert model(X32).shape == (2, 10)


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_target_search_hits_the_requested_fraction(kind):
    model = create_model("resnet20", 10, 3, 32).eval()
    measure = (lambda m: count_params(m)) if kind == "params" else (lambda m: count_macs(m, (3, 32, 32)))
    ratio, achieved = search_ratio(model, X32, measure, 0.6)
    pruned, _ = prune_module(model, X32, ratio, verbose=False)
    measured = 1 - measure(pruned) / measure(model)
    assert abs(measured - 0.6) <= 0.01 and abs(achieved - measured) < 1e-9


def test_unreachable_target_is_a_user_error():
    # 1000 classes: the classifier's 1000 biases and 1000 x (kept channels) weights cannot go
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 1000)).eval()
    with pytest.raises(UserError, match="at most 7"):
        search_ratio(model, X32, count_params, 0.9)


def test_prune_stage_finetunes_and_writes_pt2_and_onnx(tmp_path):
    teacher = digits_teacher()
    synth = digits_as_synthetic_set(tmp_path / "syn", teacher, n=384)
    settings = fast_settings(**{"prune.ratio": 0.5, "prune.target": "params", "prune.epochs": 2,
                                "prune.batch_size": 64, "prune.lr": 0.02})
    data = digits_test_data(limit=200)
    m = prune(teacher, synth, settings, tmp_path / "out", resolve_runtime("cpu"), eval_data=data)
    assert abs(m["params_removed"] - 0.5) <= 0.01 and m["macs_after"] < m["macs_before"]
    assert m["teacher_top1"] > 90 and m["top1"] is not None and m["agreement"] is not None
    # fine-tuning from the unpruned teacher recovers agreement (chance would be ~10%)
    assert m["agreement"] > 70 and m["agreement"] >= m["before_finetune"]["agreement"] - 5
    assert len(m["history"]) == 2
    desc = read_model_dir(tmp_path / "out")
    assert desc["created_by"] == "prune" and desc["arch"] is None and desc["base_arch"] == "digits_cnn"
    assert set(desc["files"]) == {"pt2", "onnx"}
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    x = (data.x[:7].float() / 255 - teacher.mean[0]) / teacher.std[0]
    onnx_out = run_onnx(onnx_session(tmp_path / "out" / "model.onnx"), x)
    assert torch.allclose(program(x), torch.from_numpy(onnx_out), atol=1e-3)
    assert program(x).shape == (7, 10)


def test_real_onnx_resnet20_teacher_prunes_inside_blocks(shared_dir):
    """The real akamaster ResNet-20 as a BN-folded ONNX file: its option-A pads are plain graph ops, so the
    residual stream is left alone and the block-internal channels are pruned; accuracy on the exact
    CIFAR-10 test images stays far above chance even without fine-tuning."""
    import numpy as np

    from dfcompress.evaluate import module_logits, top1
    from dfcompress.models.loading import load_teacher

    teacher = load_teacher(str(shared_dir / "teachers" / "cifar10_resnet20_akamaster.onnx"))
    exact = np.load(shared_dir / "cifar10" / "cifar10_test_lossless_first846.npz")
    x = torch.from_numpy(exact["x"][:400]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(exact["y"][:400])
    pruned, info = prune_module(teacher.module, X32, 0.1, verbose=False)
    assert len(info["skipped_groups"]) == 1 and info["unchanged"] == []
    assert count_params(pruned) < 0.92 * count_params(teacher.module)
    before = top1(module_logits(teacher.module, x, teacher), y)
    after = top1(module_logits(pruned, x, teacher), y)
    assert before > 88.0 and 60.0 < after <= before


def test_batchnorm_recalibration_is_the_exact_average_and_restores_modes():
    from dfcompress.compress.bn_recalibration import recalibrate_batchnorm
    from dfcompress.evaluate import to_input

    teacher = digits_teacher()
    model = copy.deepcopy(teacher.module).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    momentum = bn.momentum
    images = digits_test_data(limit=96).x
    assert recalibrate_batchnorm(model, images, teacher, batch_size=32) >= 1
    assert model.training and bn.training and bn.momentum == momentum  # modes and momenta are back
    with torch.no_grad():
        first = conv(to_input(images, teacher))  # the first BN reads the first conv's output
    assert torch.allclose(bn.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-5)


def test_prune_with_batchnorm_recalibration_starts_closer_to_the_teacher(tmp_path):
    """prune --recalibrate-bn N: right after pruning (no fine-tuning) the model agrees with the teacher far more
    often than the one that keeps the teacher's BN statistics."""
    from typer.testing import CliRunner

    from dfcompress.cli import app

    teacher = digits_teacher()
    synth = digits_as_synthetic_set(tmp_path / "syn", teacher, n=256)
    agree = {}
    for n in (0, 256):
        out = tmp_path / f"bn{n}"
        res = CliRunner().invoke(app, ["prune", "--profile", "ci-smoke", "--data", str(synth), "--ratio", "0.6",
                                       "--epochs", "0", "--recalibrate-bn", str(n), "-o", str(out), "--device", "cpu"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        metrics = json.loads((out / "report.json").read_text())["metrics"]
        assert metrics["bn_recalibration_images"] == min(n, 256 - metrics["holdout_images"])
        agree[n] = metrics["before_finetune"]["holdout_agreement"]
    assert agree[256] > agree[0] + 10, agree
