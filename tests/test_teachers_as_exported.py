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
    res = invoke("inspect", groupnorm_pt2)
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
