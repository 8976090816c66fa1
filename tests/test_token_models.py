"""Teachers without BatchNorm through the CLI: a small ViT and a LayerNorm ConvNeXt-style net, as ONNX
(TorchScript-based exporter here, dynamo exporter from tests/data/dynamo), .pt2 and TorchScript:
inspect -> stats --seeds -> synthesize -> distill, with the real onnxruntime.

What is proved: the ViT's transformer blocks carry statistics in every format that loads (LayerNorm
inputs, or the token Linear inputs of a .pt2), the statistics term is non-zero on them during synthesis,
and TorchScript attention that the ONNX round trip cannot convert is refused in one line that names
the construct and the formats that work. Tiny sizes: 16x16 inputs, 4 classes, a few iterations.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dfcompress.cli import app
from dfcompress.models.loading import load_teacher
from dfcompress.models.stages import probe_stages, probe_token_stages
from dfcompress.stats.store import FeatureStats

from token_models import CLASSES, SHAPE, TinyConvNeXt, TinyViT, save_all

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
NORM = ("--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")


def run(*args: str, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


# the same nets through the dynamo exporter (checked in: it needs onnxscript); the ViT at 18 keeps the
# exporter's module-scope metadata and Erf GELU, the ConvNeXt at 21 has GroupNormalization and Gelu ops
DYNAMO = {"vit": Path(__file__).parent / "data/dynamo/vit_op18.onnx",
          "cnx": Path(__file__).parent / "data/dynamo/cnx_op21.onnx"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("token_models")
    torch.manual_seed(0)
    out = {"vit": save_all(TinyViT(), folder, "vit"), "cnx": save_all(TinyConvNeXt(), folder, "cnx")}
    for net, path in DYNAMO.items():
        out[net]["dynamo-onnx"] = path
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """Three labelled 'real' images per class (smooth random blobs; the teacher's argmax is not needed)."""
    g = np.random.default_rng(0)
    base = g.integers(0, 256, (CLASSES * 3, 4, 4, SHAPE[0]), dtype=np.uint8)
    x = base.repeat(4, axis=1).repeat(4, axis=2)
    path = tmp_path_factory.mktemp("seeds") / "seeds.npz"
    np.savez(path, x=x, y=np.repeat(np.arange(CLASSES), 3))
    return path


PIPELINES = [("vit", "onnx"), ("vit", "pt2"), ("vit", "dynamo-onnx"), ("cnx", "onnx"), ("cnx", "pt2"),
             ("cnx", "torchscript"), ("cnx", "dynamo-onnx")]


@pytest.mark.parametrize("net,fmt", PIPELINES)
def test_inspect_stats_synthesize_distill(files, seeds, tmp_path, net, fmt):
    model = files[net][fmt]
    shape = ("--input-shape", "3x16x16")
    info = json.loads(run("inspect", model, *NORM, *shape, "--json").stdout)
    assert info["batchnorm_layers"] == 0 and info["pyramid"]  # patch conv / stem: a spatial stage for the pyramid
    assert re.match(r"no BatchNorm layers \(.*(layer_?norm|group_?norm)", info["batchnorm"], re.I)  # not "folded"
    if net == "vit":
        # every transformer block is constrained, not just the patch embedding
        blocks = {m.group(1) for s in info["token_stages"] if (m := re.match(r"blocks[._](\d)[._]", s["name"]))}
        assert blocks == {"0", "1"} and len(info["token_stages"]) >= 4
        assert all(s["tokens"] == 17 for s in info["token_stages"])
        assert info["stat_layers"] == 1 + len(info["token_stages"])
        text = run("inspect", model, *NORM, *shape, "--text").stdout
        assert re.search(r"statistics +\d+ layers \(conv outputs and token stages; .*--seeds", text), text
    else:  # channels-last LayerNorm/Linear tensors are neither tokens nor fake resolutions
        assert info["token_stages"] == [] and [s["height"] for s in info["stages"]] == [8, 4]
    stats = tmp_path / "cc.safetensors"
    run("stats", model, *NORM, *shape, "--seeds", seeds, "--per-class-count", "3", "-o", stats)
    fs = FeatureStats.load(stats)
    assert len(fs.layers) == info["stat_layers"] and fs.per_class
    tokens = [l for l in fs.layers if l.side == "tokens"]
    assert len(tokens) == len(info["token_stages"])
    for layer in tokens:  # measured over images x tokens: real spread, not a constant
        assert fs.mean[layer.name].shape == (CLASSES, layer.channels) and float(fs.var[layer.name].min()) > 0
    synth = tmp_path / "synth"
    run("synthesize", model, *NORM, *shape, "--stats", stats, "--profile", "ci-smoke", "-n", "8", "-b", "8",
        "--iterations", "3", "-o", synth)
    history = (synth / "loss.csv").read_text().splitlines()
    header = history[0].split(",")
    bn = [float(row.split(",")[header.index("bn")]) for row in history[1:]]
    assert bn and all(np.isfinite(bn)) and bn[0] > 0
    student = tmp_path / "student"
    run("distill", model, *NORM, *shape, "--student", "digits_cnn_small", "--data", synth, "--profile", "ci-smoke",
        "-o", student)
    assert json.loads((student / "dfcompress.json").read_text())["num_classes"] == CLASSES


def test_token_stages_feed_the_statistics_term(files, seeds, tmp_path):
    """Statistics on the ViT's token stages change the synthesis loss: the blocks are really constrained."""
    from dfcompress.inversion.synthesizers.common import StatsTerm, stat_targets
    from dfcompress.inversion import losses
    from dfcompress.stats.collect import collect_stats

    teacher = load_teacher(str(files["vit"]["onnx"]), mean=[0.5] * 3, std=[0.25] * 3)
    data = np.load(seeds)
    fs = collect_stats(teacher, torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(data["y"]))
    targets = stat_targets(teacher.module, fs)
    term = StatsTerm(teacher.module, targets, torch.device("cpu"), 1.0)
    x = torch.randn(4, *SHAPE, requires_grad=True)
    teacher.module(x)
    names = [l.name for l in targets.layers if l.side == "tokens"]
    per_layer = {n: losses.class_conditional_stat_loss(term.taps[n], losses.ClassIndex(torch.arange(4)),
                                                        fs.mean[n].float(), fs.var[n].float())
                 for n in names}
    term.close()
    assert all(v > 0 for v in per_layer.values())
    per_layer[names[-1]].backward()  # the deepest block's statistics reach the input
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_traced_vit_torchscript_is_refused_in_one_line(files):
    res = run("inspect", files["vit"]["torchscript"], "--input-shape", "3x16x16", code=2)
    line = res.output.strip()
    assert "\n" not in line and "Torch IR" not in res.output
    assert "MultiheadAttention blocks.0.self_attn" in line and ".pt2" in line and "ONNX" in line


def test_probes_on_the_original_modules():
    """The same stages on the eager modules (what --arch / pickled teachers give)."""
    vit, cnx = TinyViT().eval(), TinyConvNeXt().eval()
    assert [s.name for s in probe_token_stages(vit, SHAPE)] == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                                  "blocks.1.norm2", "norm"]
    assert [(s.name, s.height) for s in probe_stages(vit, SHAPE)] == [("patch", 4)]
    assert probe_token_stages(cnx, SHAPE) == []
    assert [s.name for s in probe_stages(cnx, SHAPE)] == ["down.0", "stage2.dw"]  # GroupNorm: last NCHW leaf at 8x8
