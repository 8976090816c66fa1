"""Feature statistics: BN recovery, float64 streaming collection (incl. a real BN-fused ONNX teacher), storage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dfcompress.errors import UserError
from dfcompress.fileio import sha256_file
from dfcompress.models.taps import FeatureTaps, stat_layers
from dfcompress.models.teacher import Teacher
from dfcompress.stats.collect import collect_stats
from dfcompress.stats.recover import recover_bn_stats
from dfcompress.stats.store import FeatureStats

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ONNX = "teachers/cifar10_resnet20_akamaster.onnx"


def zoo_teacher() -> Teacher:
    from dfcompress.models.zoo import create_model

    torch.manual_seed(0)
    m = create_model("resnet20", num_classes=10, in_channels=3, input_size=32).eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):  # non-trivial running buffers, as after training
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return Teacher(m, (3, 32, 32), 10, *IMAGENET, "state_dict", "zoo:resnet20", "1" * 64, arch="resnet20")


@pytest.fixture(scope="module")
def onnx_teacher(shared_dir) -> Teacher:
    """The real BN-fused akamaster ResNet-20 (converted once per module: conversion takes seconds)."""
    from dfcompress.models.onnx_import import onnx_to_torch

    path = shared_dir / ONNX
    return Teacher(onnx_to_torch(path).eval(), (3, 32, 32), 10, *IMAGENET, "onnx", str(path), sha256_file(path))


def seed_images(shared_dir, per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(shared_dir / "cifar10" / "cifar10_test_lossless_first846.npz")
    x, y = data["x"], data["y"]
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    return torch.from_numpy(x[keep]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y[keep]).long()


# -- recover -------------------------------------------------------------------------------------

def test_recover_equals_running_buffers():
    t = zoo_teacher()
    stats = recover_bn_stats(t)
    bns = {n: m for n, m in t.module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert stats.kind == "bn-running" and not stats.per_class
    assert stats.layer_names == list(bns) and all(l.side == "input" for l in stats.layers)
    for name, bn in bns.items():
        assert stats.mean[name].dtype == torch.float64
        assert torch.equal(stats.mean[name], bn.running_mean.double())
        assert torch.equal(stats.var[name], bn.running_var.double())
    stats.check_matches(t)


def test_recover_refuses_bn_free_teacher():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    m(torch.zeros(1, 1, 8, 8))
    t = Teacher(m.eval(), (1, 8, 8), 3, (0.5,), (0.5,), "onnx", "fused.onnx", "2" * 64)
    with pytest.raises(UserError, match=r"no BatchNorm layers \(folded.*--seeds DIR"):
        recover_bn_stats(t)


# -- collect -------------------------------------------------------------------------------------

def _naive(teacher, x, y, batch_size):
    """Same features (same batching), statistics computed in one shot in float64."""
    layers = stat_layers(teacher.module)
    feats = {l.name: [] for l in layers}
    with torch.no_grad(), FeatureTaps(teacher.module, layers, detach=True) as taps:
        for s in range(0, len(x), batch_size):
            teacher.module(teacher.normalize(x[s:s + batch_size].float() / 255))
            for l in layers:
                feats[l.name].append(taps[l.name].double())
    out = {}
    for l in layers:
        f = torch.cat(feats[l.name])
        rows_m, rows_v = [], []
        for c in range(teacher.num_classes):
            fc = f[y == c].transpose(0, 1).reshape(f.shape[1], -1)
            rows_m.append(fc.mean(1))
            rows_v.append(fc.var(1, unbiased=False))
        out[l.name] = (torch.stack(rows_m), torch.stack(rows_v))
    return out


def test_collect_on_bn_fused_onnx_teacher_is_float64_exact(shared_dir, onnx_teacher):
    t = onnx_teacher
    x, y = seed_images(shared_dir, per_class=2)
    stats = collect_stats(t, x, y, per_class=True, batch_size=7, source="cifar10 seeds")
    layers = stat_layers(t.module)
    assert stats.layers == layers and all(l.side == "output" for l in layers)  # conv outputs: BN is folded
    assert stats.counts.tolist() == [2] * 10 and stats.kind == "collected"
    naive = _naive(t, x, y, batch_size=7)
    for l in layers:
        m, v = stats.mean[l.name], stats.var[l.name]
        assert m.dtype == torch.float64 and m.shape == (10, l.channels)
        torch.testing.assert_close(m, naive[l.name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v, naive[l.name][1], rtol=1e-10, atol=1e-12)
    stats.check_matches(t)


def test_collect_seed_images_per_class_and_teacher_labels(shared_dir, onnx_teacher):
    t = onnx_teacher
    x, y = seed_images(shared_dir, per_class=10)
    stats = collect_stats(t, x, y)
    first = stats.layers[0].name
    assert stats.mean[first].shape == (10, 16) and stats.counts.tolist() == [10] * 10
    assert all(torch.isfinite(stats.var[l.name]).all() for l in stats.layers)
    auto = collect_stats(t, x[:30], None, per_class=False)
    assert auto.extra["labels_from_teacher"] is True and auto.mean[first].shape == (16,)
    assert auto.counts.tolist() == [30]


def test_empty_class_falls_back_to_global():
    t = zoo_teacher()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2] * 4)
    stats = collect_stats(t, x, y, batch_size=5)
    glob = collect_stats(t, x, y, per_class=False, batch_size=5)
    assert stats.counts.tolist() == [4, 4, 4] + [0] * 7 and stats.extra["empty_classes"] == list(range(3, 10))
    for l in stats.layers:
        assert torch.isfinite(stats.mean[l.name]).all() and torch.isfinite(stats.var[l.name]).all()
        torch.testing.assert_close(stats.mean[l.name][5], glob.mean[l.name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.var[l.name][9], glob.var[l.name], rtol=1e-10, atol=1e-12)
        gm, gv = stats.global_stats(l.name)  # pooling per-class rows reproduces the global stats
        torch.testing.assert_close(gm, glob.mean[l.name], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gv, glob.var[l.name], rtol=1e-9, atol=1e-10)


def test_collect_input_errors():
    t = zoo_teacher()
    with pytest.raises(UserError, match="do not match the teacher's input"):
        collect_stats(t, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"labels must lie in \[0, 10\)"):
        collect_stats(t, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 10]))


# -- store ---------------------------------------------------------------------------------------

def test_save_load_roundtrip_and_checks(tmp_path):
    t = zoo_teacher()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    stats = collect_stats(t, x, torch.tensor([0, 1, 2, 3, 4, 5]), source="unit")
    path = stats.save(tmp_path / "s.safetensors")
    back = FeatureStats.load(path)
    assert back.layers == stats.layers and back.per_class and back.kind == "collected" and back.source == "unit"
    assert back.teacher_sha256 == t.sha256 and back.mean_pre == tuple(t.mean) and back.std_pre == tuple(t.std)
    assert torch.equal(back.counts, stats.counts) and back.extra["empty_classes"] == [6, 7, 8, 9]
    for l in stats.layers:
        assert torch.equal(back.mean[l.name], stats.mean[l.name]) and torch.equal(back.var[l.name], stats.var[l.name])
    mean, var = back.lookup(stats.layers[0].name, torch.tensor([1, 1, 4]))
    assert mean.shape == (3, stats.layers[0].channels) and torch.equal(mean[0], back.mean[stats.layers[0].name][1])
    back.check_matches(t)
    other = zoo_teacher()
    other.sha256 = "f" * 64
    with pytest.raises(UserError, match="another teacher.*dfcompress stats"):
        back.check_matches(other)
    small = Teacher(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 32, 32), 10, *IMAGENET, "onnx", "x", t.sha256)
    with pytest.raises(UserError, match="different layers"):
        back.check_matches(small)


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 100)
    for p in (tmp_path / "w.safetensors", tmp_path / "junk.bin"):
        with pytest.raises(UserError, match="not a dfcompress statistics file"):
            FeatureStats.load(p)
    with pytest.raises(UserError, match="not found"):
        FeatureStats.load(tmp_path / "missing.safetensors")


def test_load_rejects_a_damaged_statistics_file(tmp_path):
    """Right format tag, but a tensor is gone or a header field has the wrong type: the one-line refusal, no traceback."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    t = zoo_teacher()
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = collect_stats(t, x, torch.tensor([0, 1]), source="unit").save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad_meta = json.loads(meta["dfcompress"])
    bad_meta["layers"][0]["channels"] = None  # a hand-edited header: wrong type
    for body, header in ((dict(list(tensors.items())[1:]), meta), (tensors, {"dfcompress": json.dumps(bad_meta)})):
        save_file(body, str(path), metadata=header)
        with pytest.raises(UserError, match="not a dfcompress statistics file"):
            FeatureStats.load(path)


def test_collected_stats_refuse_a_teacher_with_other_preprocessing():
    """Collected statistics depend on the normalisation the images went through: another mean/std is refused."""
    import copy

    t = zoo_teacher()
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    stats = collect_stats(t, x, torch.tensor([0, 1]), source="unit")
    near = copy.copy(t)
    near.mean = tuple(m + 1e-9 for m in t.mean)  # float noise from a config file is not a mismatch
    stats.check_matches(near)
    for field, value in (("mean", (0.5, 0.5, 0.5)), ("std", (0.229, 0.224, 0.5))):
        other = copy.copy(t)
        setattr(other, field, value)
        with pytest.raises(UserError, match="collected with preprocessing.*--mean/--std"):
            stats.check_matches(other)
