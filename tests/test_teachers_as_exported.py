"""Teachers as people export them (issue 12, section 4): static-batch .pt2 programs, classifiers ending in
Softmax or returning [N, K, 1, 1], models without BatchNorm, traced TorchScript files -- through the CLI
where users meet them."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dfcompress.cli import app
from dfcompress.models.loading import load_teacher

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from reliability_helpers import assert_one_line_error  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class GroupNormNet(nn.Module):
    """A classifier that never had BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def groupnorm_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gn") / "gn.pt2"
    torch.manual_seed(0)
    torch.export.save(torch.export.export(GroupNormNet().eval(), (torch.zeros(2, 3, 16, 16),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    return path


def test_inspect_says_no_batchnorm_not_folded(groupnorm_pt2: Path):
    res = invoke("inspect", groupnorm_pt2, "--text")  # the summary (piped output defaults to JSON)
    assert res.exit_code == 0, res.output
    line = next(l for l in res.stdout.splitlines() if l.startswith("batchnorm"))
    assert "no BatchNorm layers (group_norm only" in line and "folded" not in line
    assert "stats MODEL --seeds" in line
    info = json.loads(invoke("inspect", groupnorm_pt2, "--json").stdout)
    assert info["batchnorm_layers"] == 0 and info["bn_folded"] is False


def test_recovering_bn_stats_of_groupnorm_model_says_what_is_true(groupnorm_pt2: Path, tmp_path: Path):
    args = ["stats", groupnorm_pt2, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "-o", tmp_path / "s.safetensors"]
    line = assert_one_line_error(args, invoke(*args), needles=("no BatchNorm layers (group_norm only", "--seeds"))
    assert "folded" not in line


# ---------------------------------------------------------------- .pt2 exported with a fixed batch size

class SizedNet(nn.Module):
    """Bakes the batch size into a static export twice: ``expand(x.size(0), ...)`` and ``reshape(x.size(0), -1)``."""

    def __init__(self, fold_batch: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.token = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.fold_batch = fold_batch
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))) + self.token.expand(x.size(0), -1, -1, -1)
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn2(self.conv2(h))), 4)
        if self.fold_batch:  # batch moved off the leading dimension: nothing to free safely
            return self.fc(h.reshape(x.size(0), -1).t().reshape(128, x.size(0)).t())
        return self.fc(h.reshape(x.size(0), -1))


def _export(model: nn.Module, path: Path, batch: int, dynamic: bool = False) -> Path:
    dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    torch.export.save(torch.export.export(model, (torch.zeros(batch, 3, 16, 16),), dynamic_shapes=dyn), str(path))
    return path


@pytest.fixture(scope="module")
def sized(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sized")
    torch.manual_seed(0)
    model = SizedNet().eval()
    return {"model": model, "static1": _export(model, d / "b1.pt2", 1), "static4": _export(model, d / "b4.pt2", 4),
            "dynamic": _export(model, d / "dyn.pt2", 2, dynamic=True)}


@pytest.mark.parametrize("which", ["static1", "static4"])
def test_static_batch_pt2_loads_and_scores_any_batch(sized: dict, which: str):
    res = invoke("inspect", sized[which], "--json")
    assert res.exit_code == 0, res.output
    teacher = load_teacher(sized[which], mean=[0.5] * 3, std=[0.5] * 3)
    for n in (1, 3, 9):
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert torch.allclose(teacher.module(x), sized["model"](x), atol=1e-5)


def _inversion_step(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DeepInversion's loss on one batch (CE + BN statistics at every BN input) and its gradient w.r.t. the images."""
    from dfcompress.inversion.losses import global_stat_loss
    from dfcompress.models.taps import FeatureTaps, batchnorm_layers, stat_layers

    x = x.clone().requires_grad_(True)
    bns = dict(batchnorm_layers(module))
    layers = stat_layers(module)
    with FeatureTaps(module, layers) as taps:
        logits = module(x)
        stat = sum(global_stat_loss(taps[l.name], bns[l.name].running_mean, bns[l.name].running_var) for l in layers)
        shapes = {l.name: tuple(taps[l.name].shape) for l in layers}
    loss = nn.functional.cross_entropy(logits, torch.arange(x.shape[0]) % 6) + stat
    loss.backward()
    return loss.detach(), x.grad, shapes


def test_inversion_on_static_batch_pt2_equals_dynamic(sized: dict):
    """Gradients to the input and BN batch statistics over the WHOLE batch of 10, not chunks of 4."""
    x = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    loss_d, grad_d, shapes_d = _inversion_step(load_teacher(sized["dynamic"], mean=[0.5] * 3, std=[0.5] * 3).module, x)
    loss_s, grad_s, shapes_s = _inversion_step(load_teacher(sized["static4"], mean=[0.5] * 3, std=[0.5] * 3).module, x)
    assert len(shapes_s) == 2 and all(s[0] == 10 for s in shapes_s.values())
    assert shapes_s == shapes_d
    assert torch.allclose(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_s, grad_d, rtol=1e-4, atol=1e-7)


def test_static_batch_that_cannot_be_freed_is_refused_in_one_line(tmp_path: Path):
    torch.manual_seed(0)
    path = _export(SizedNet(fold_batch=True).eval(), tmp_path / "folded.pt2", 2)
    args = ["inspect", path]
    assert_one_line_error(args, invoke(*args), needles=("fixed batch size of 2", "dynamic_shapes"))


# ---------------------------------------------------------------- Softmax heads and [N, K, 1, 1] outputs

class ConvHead(nn.Module):
    """A 1x1-conv head without flatten: returns [N, K, 1, 1]."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.head = nn.Conv2d(10, 10, 1)

    def forward(self, x):
        return self.head(self.base(x)[:, :, None, None])


def _zoo_with(head: str) -> tuple[nn.Module, nn.Module]:
    """(model as exported, the logits [N, K] dfcompress should work on) around a small zoo model."""
    from dfcompress.models.zoo import create_model

    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=10).eval()
    if head == "softmax":
        return nn.Sequential(base, nn.Softmax(dim=1)).eval(), base
    model = ConvHead(base).eval()
    return model, nn.Sequential(model, nn.Flatten()).eval()


def _write_model(model: nn.Module, fmt: str, d: Path) -> Path:
    x = torch.zeros(1, 3, 32, 32)
    if fmt == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(d / "m.onnx"), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["out"], dynamic_axes={"input": {0: "b"}, "out": {0: "b"}})
        return d / "m.onnx"
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, x, check_trace=False), str(d / "m.ts"))
        return d / "m.ts"
    if fmt == "pt2":
        torch.export.save(torch.export.export(model, (x,)), str(d / "m.pt2"))
        return d / "m.pt2"
    torch.save(model, d / "m.pkl")
    return d / "m.pkl"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2", "pickle"])
@pytest.mark.parametrize("head", ["softmax", "conv1x1"])
def test_softmax_and_1x1_heads_give_logits(tmp_path: Path, fmt: str, head: str):
    model, logits_of = _zoo_with(head)
    path = _write_model(model, fmt, tmp_path)
    extra = ["--allow-pickle"] if fmt == "pickle" else []
    res = invoke("inspect", path, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--input-shape", "3x32x32", "--text", *extra)
    assert res.exit_code == 0, res.output
    want = "ends in Softmax: dropped it" if head == "softmax" else "returns [N, 10, 1, 1]: squeezed"
    assert f"output     {want}" in res.stdout
    teacher = load_teacher(path, allow_pickle=True, input_shape=(3, 32, 32), mean=[0.5] * 3, std=[0.5] * 3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, expected = teacher.module(x), logits_of(x)
    assert logits.shape == (3, 10)
    assert torch.allclose(logits, expected, atol=1e-4)


# ---------------------------------------------------------------- input size of traced TorchScript files

class WideHead(nn.Module):
    """1000 classes, strided enough that 32 px and 224 px both run: only the file can say which it was traced at."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 7, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1000)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_traced_torchscript_uses_its_traced_size(tmp_path: Path):
    path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(WideHead().eval(), torch.zeros(1, 3, 224, 224)), str(path))
    res = invoke("inspect", path, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--text")
    assert res.exit_code == 0, res.output
    assert "3x224x224" in res.stdout and "the example input the file was traced with" in res.stdout
    assert "assuming" not in res.stderr


def test_scripted_torchscript_keeps_the_warning_and_shows_the_guess(tmp_path: Path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(WideHead().eval()), str(path))
    res = invoke("inspect", path, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--text")
    assert res.exit_code == 0, res.output
    assert "assuming 3x32x32" in res.stderr
    assert "3x32x32" in res.stdout and "GUESSED" in res.stdout and "--input-shape" in res.stdout
