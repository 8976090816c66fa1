"""`prune --importance l1|l2|taylor|hessian`: each runs through the CLI; the data-driven ones use the data."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compress_helpers import digits_as_synthetic_set, digits_teacher
from dfcompress.cli import app
from dfcompress.compress.importance import importance_batches
from dfcompress.compress.prune import prune_module
from dfcompress.models.embedded import digits_split


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return digits_as_synthetic_set(tmp_path_factory.mktemp("imp") / "synth", digits_teacher(), n=64, shard_size=64)


@pytest.mark.parametrize("name", ["l1", "l2", "taylor", "hessian"])
def test_each_importance_through_cli(tmp_path, synth, name):
    out = tmp_path / name
    res = CliRunner().invoke(app, ["prune", "--profile", "ci-smoke", "--data", str(synth), "--importance", name,
                                   "--ratio", "0.5", "--epochs", "0", "-o", str(out), "--device", "cpu"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    assert metrics["importance"] == name and metrics["params_after"] < metrics["params_before"]


def _kept(importance: str, images: torch.Tensor) -> list[torch.Tensor]:
    teacher = digits_teacher()
    labels = teacher.module(teacher.normalize(images.float() / 255)).argmax(1)
    batches = importance_batches(images.float() / 255, labels, teacher, batch_size=16)
    example = teacher.normalize(images[:2].float() / 255)
    pruned, _ = prune_module(teacher.module, example, 0.5, importance=importance, batches=batches, verbose=False)
    return [m.weight.detach().clone() for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("name, uses_data", [("l1", False), ("taylor", True), ("hessian", True)])
def test_data_driven_importances_depend_on_the_data(name, uses_data):
    x = digits_split().x_train
    first = _kept(name, x[:32])
    other = _kept(name, torch.flip(x[300:332], dims=[3]))  # other images (mirrored)
    same = all(torch.equal(a, b) for a, b in zip(first, other))
    assert same != uses_data


def test_unknown_importance_exits_2(synth, tmp_path):
    res = CliRunner().invoke(app, ["prune", "--data", str(synth), "--importance", "fisher", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "Traceback" not in res.output
