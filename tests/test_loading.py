"""load_teacher on every shipped format: round trips against the eager model, real pretrained teachers, errors."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfcompress.errors import UserError
from dfcompress.models.formats.detect import detect_format
from dfcompress.models.loading import IMAGENET_MEAN, IMAGENET_STD, load_teacher
from dfcompress.models.stages import probe_stages
from dfcompress.models.taps import FeatureTaps, batchnorm_layers, stat_layers
from dfcompress.models.zoo import create_model

ATOL = 1e-4


def _eager(name: str, seed: int = 0) -> nn.Module:
    """A zoo model at 32 px in eval mode with non-trivial BN statistics (so folding/BN bugs show)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=3, input_size=32).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def _onnx(model: nn.Module, path: Path, *, fold: bool, shape=(3, 32, 32)) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # EVAL (the default) fuses BN into the convs; PRESERVE + no folding keeps BatchNormalization nodes
        mode = torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE
        torch.onnx.export(model, (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=fold, training=mode,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _write(fmt: str, model: nn.Module, d: Path) -> Path:
    sd = model.state_dict()
    x1 = torch.zeros(1, 3, 32, 32)
    if fmt == "state_dict":
        torch.save(sd, d / "m.pt")
        return d / "m.pt"
    if fmt == "wrapped_prefixed":
        torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "m.pth")
        return d / "m.pth"
    if fmt == "model_key_th":
        torch.save({"model": sd, "best_prec1": 91.0}, d / "m.th")
        return d / "m.th"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "m.safetensors"))
        return d / "m.safetensors"
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, x1, check_trace=False), str(d / "m.torchscript.pt"))
        return d / "m.torchscript.pt"
    if fmt == "pt2":  # exported with the example batch only: the loader must still score any batch size
        torch.export.save(torch.export.export(model, (x1,)), str(d / "m.pt2"))
        return d / "m.pt2"
    if fmt == "onnx_folded":
        return _onnx(model, d / "m.onnx", fold=True)
    if fmt == "onnx_bn":
        return _onnx(model, d / "m_bn.onnx", fold=False)
    raise AssertionError(fmt)


RESNET_FORMATS = ("state_dict", "wrapped_prefixed", "model_key_th", "safetensors", "torchscript", "pt2", "onnx_folded", "onnx_bn")
CASES = [(f, "resnet20") for f in RESNET_FORMATS] + [(f, "mobilenetv2") for f in ("safetensors", "torchscript", "pt2")]
EXPECTED_FORMAT = {"wrapped_prefixed": "state_dict", "model_key_th": "state_dict", "safetensors": "state_dict",
                   "onnx_folded": "onnx", "onnx_bn": "onnx"}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """Each (format, arch) case written once: {arch: (eager model, {format: path})}."""
    out: dict = {}
    for arch in ("resnet20", "mobilenetv2"):
        model = _eager(arch)
        d = tmp_path_factory.mktemp(arch)
        out[arch] = (model, {fmt: _write(fmt, model, d) for fmt, a in CASES if a == arch})
    return out


@pytest.mark.parametrize("fmt,arch", CASES)
def test_round_trip_matches_eager_and_is_hookable(written: dict, fmt: str, arch: str) -> None:
    model, paths = written[arch]
    path = paths[fmt]
    # state dicts carry no input size: say 32 px (mobilenetv2's default is 224, which changes its strides)
    teacher = load_teacher(path, arch=arch, input_shape=(3, 32, 32) if arch == "mobilenetv2" else None)
    assert teacher.format == EXPECTED_FORMAT.get(fmt, fmt)
    assert teacher.input_shape == (3, 32, 32) and teacher.num_classes == 10
    assert teacher.mean == IMAGENET_MEAN and teacher.std == IMAGENET_STD
    assert len(teacher.sha256) == 64 and teacher.source == str(path)
    assert not teacher.module.training
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = model(x), teacher.module(x)
    assert got.shape == (3, 10)
    assert float((got - expected).abs().max()) < ATOL
    want_bn = [m for _, m in batchnorm_layers(model)]
    got_bn = [m for _, m in batchnorm_layers(teacher.module)]
    if fmt == "onnx_folded":
        assert got_bn == []
    else:  # BN survives every other route with its exact running statistics
        assert len(got_bn) == len(want_bn)
        assert all(torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
                   for a, b in zip(got_bn, want_bn))
    layers = stat_layers(teacher.module)
    assert layers
    with FeatureTaps(teacher.module, layers) as taps, torch.no_grad():
        teacher.module(x)
        assert set(taps.features) == {layer.name for layer in layers}
        assert all(taps[layer.name].shape[:2] == (3, layer.channels) for layer in layers)


def test_pt2_keeps_layer_names(written: dict) -> None:
    teacher = load_teacher(written["resnet20"][1]["pt2"])
    names = [n for n, _ in batchnorm_layers(teacher.module)]
    assert names[:2] == ["bn1", "layer1.0.bn1"]


def test_pt2_core_aten_decomposed_program(written: dict, tmp_path: Path) -> None:
    """After run_decompositions() convs/BN are aten.convolution/_native_batch_norm_legit_no_training: still hookable."""
    model = written["resnet20"][0]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-internal pytree deprecation chatter
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    torch.export.save(program, str(tmp_path / "core.pt2"))
    teacher = load_teacher(tmp_path / "core.pt2")
    assert len(batchnorm_layers(teacher.module)) == 19
    with torch.no_grad():
        assert float((teacher.module(x) - model(x)).abs().max()) < ATOL
    assert [s.name for s in probe_stages(teacher.module, (3, 32, 32))] == [s.name for s in probe_stages(model, (3, 32, 32))]


def test_content_not_extension_decides(written: dict, tmp_path: Path) -> None:
    paths = written["resnet20"][1]
    disguised = tmp_path / "weights.bin"
    shutil.copy(paths["onnx_folded"], disguised)
    assert detect_format(disguised) == "onnx"
    as_onnx = tmp_path / "actually_state_dict.onnx"
    shutil.copy(paths["state_dict"], as_onnx)
    assert detect_format(as_onnx) == "checkpoint"
    assert load_teacher(as_onnx, arch="resnet20").format == "state_dict"
    ts_as_pt2 = tmp_path / "script.pt2"
    shutil.copy(paths["torchscript"], ts_as_pt2)
    assert detect_format(ts_as_pt2) == "torchscript"
    assert detect_format(paths["pt2"]) == "pt2" and detect_format(paths["safetensors"]) == "safetensors"


def test_metadata_embedded_in_exports_is_used(tmp_path: Path) -> None:
    """dfcompress.json inside .pt2 extra files, TorchScript extra files and ONNX metadata_props wins over defaults."""
    import onnx

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    meta = {"input_shape": [1, 12, 12], "num_classes": 3, "mean": [0.1], "std": [0.3], "class_names": ["a", "b", "c"]}
    x = torch.zeros(1, 1, 12, 12)
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "m.pt2"), extra_files={"dfcompress.json": json.dumps(meta)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, x), str(tmp_path / "m.ts"), _extra_files={"dfcompress.json": json.dumps(meta)})
    proto = onnx.load(str(_onnx(net, tmp_path / "m.onnx", fold=True, shape=(1, 12, 12))))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "dfcompress.json", json.dumps(meta)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    for name in ("m.pt2", "m.ts", "m.onnx"):
        t = load_teacher(tmp_path / name)
        assert (t.input_shape, t.num_classes, t.mean, t.std, t.class_names) == ((1, 12, 12), 3, (0.1,), (0.3,), ["a", "b", "c"]), name
        assert t.extra["input_shape_from"] == "metadata"
    t = load_teacher(tmp_path / "m.ts", mean=(0.2,), std=(0.4,))
    assert (t.mean, t.std) == ((0.2,), (0.4,))


def test_flags_override_metadata_and_defaults(written: dict) -> None:
    path = written["resnet20"][1]["onnx_folded"]
    t = load_teacher(path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=10)
    assert t.mean == (0.5, 0.5, 0.5) and t.std == (0.25, 0.25, 0.25)
    x01 = torch.rand(2, 3, 32, 32)
    assert torch.allclose(t.denormalize(t.normalize(x01)), x01, atol=1e-6)


def test_model_folder_prefers_state_dict_and_uses_its_metadata(tmp_path: Path) -> None:
    model = _eager("resnet20")
    folder = tmp_path / "student"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    _onnx(model, folder / "model.onnx", fold=True)
    desc = {"kind": "model", "files": {"onnx": "model.onnx", "state_dict": "model.safetensors"}, "arch": "resnet20",
            "input_shape": [3, 32, 32], "num_classes": 10, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261],
            "class_names": [f"c{i}" for i in range(10)], "teacher_sha256": "ab" * 32, "created_by": "distill"}
    (folder / "dfcompress.json").write_text(json.dumps(desc))
    t = load_teacher(folder)
    assert t.format == "folder" and t.extra["inner_format"] == "state_dict" and t.arch == "resnet20"
    assert t.mean == tuple(desc["mean"]) and t.class_names == desc["class_names"]
    assert len(batchnorm_layers(t.module)) == 19
    # without the weights file the ONNX export is used, metadata still applies
    (folder / "model.safetensors").unlink()
    t2 = load_teacher(folder / "dfcompress.json")
    assert t2.extra["inner_format"] == "onnx" and t2.std == tuple(desc["std"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert float((t2.module(x) - model(x)).abs().max()) < ATOL
    (folder / "model.onnx").unlink()
    with pytest.raises(UserError, match="none of the files listed"):
        load_teacher(folder)


def test_embedded_teacher_when_no_path() -> None:
    from dfcompress.models import embedded

    if not embedded.ASSET.is_file():
        pytest.skip("embedded digits teacher weights not built yet")
    t = load_teacher(None)
    assert t.format == "embedded" and t.input_shape == (1, 8, 8) and t.num_classes == 10


# ---------------------------------------------------------------- real pretrained teachers (../shared)

def _cifar846(shared_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(shared_dir / "cifar10" / "cifar10_test_lossless_first846.npz")
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(data["y"]).long()


@torch.no_grad()
def _predict(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([module(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])


@pytest.fixture(scope="module")
def shared_resnet20(shared_dir: Path) -> dict:
    """The three shipped forms of the real resnet20 teacher, loaded once, with their 846-image predictions."""
    x, y = _cifar846(shared_dir)
    teachers = shared_dir / "teachers"
    out: dict = {"y": y, "teacher": {}, "pred": {}}
    for key, path, kw in (("th", teachers / "original" / "resnet20-12fca82f.th", {"arch": "resnet20"}),
                          ("onnx", teachers / "cifar10_resnet20_akamaster.onnx", {}),
                          ("ts", teachers / "cifar10_resnet20_akamaster.torchscript.pt", {})):
        t = load_teacher(path, **kw)
        assert t.input_shape == (3, 32, 32) and t.num_classes == 10
        out["teacher"][key] = t
        out["pred"][key] = _predict(t.module, x)
    return out


def test_shared_resnet20_accuracy_matches_provenance(shared_resnet20: dict) -> None:
    acc = float((shared_resnet20["pred"]["th"] == shared_resnet20["y"]).float().mean()) * 100
    assert abs(acc - 91.73) <= 0.5, acc


def test_shared_onnx_and_torchscript_agree_with_weights(shared_resnet20: dict) -> None:
    y, pred = shared_resnet20["y"], shared_resnet20["pred"]
    accs = {k: float((pred[k] == y).float().mean()) for k in ("th", "onnx", "ts")}
    assert accs["onnx"] == accs["th"] == accs["ts"], accs
    assert torch.equal(pred["ts"], pred["th"])


@pytest.mark.parametrize("depth,sha_prefix", [(20, "12fca82f"), (32, "d509ac18"), (44, "014dd654"), (56, "4bfd9763")])
def test_shared_state_dicts_load_with_arch(shared_dir: Path, depth: int, sha_prefix: str) -> None:
    t = load_teacher(shared_dir / "teachers" / "original" / f"resnet{depth}-{sha_prefix}.th", arch=f"resnet{depth}")
    assert t.sha256.startswith(sha_prefix) and t.format == "state_dict" and t.arch == f"resnet{depth}"
    assert len(batchnorm_layers(t.module)) == 6 * ((depth - 2) // 6) + 1


def test_shared_torchscript_becomes_hookable_with_original_bn_stats(shared_dir: Path, shared_resnet20: dict) -> None:
    t, ref = shared_resnet20["teacher"]["ts"], shared_resnet20["teacher"]["th"]
    assert t.format == "torchscript" and t.input_shape == (3, 32, 32)
    bns = batchnorm_layers(t.module)
    assert len(bns) == 19 and all(isinstance(m, nn.BatchNorm2d) for _, m in bns)
    for (_, a), (_, b) in zip(bns, batchnorm_layers(ref.module)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    layers = stat_layers(t.module)
    assert len(layers) == 19
    with FeatureTaps(t.module, layers) as taps, torch.no_grad():
        got = t.module(x)
        assert len(taps.features) == 19 and taps[layers[0].name].shape == (4, 16, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.load(str(shared_dir / "teachers" / "cifar10_resnet20_akamaster.torchscript.pt"), map_location="cpu").eval()
    with torch.no_grad():
        assert float((script(x) - got).abs().max()) < ATOL


# ---------------------------------------------------------------- errors

def test_state_dict_needs_arch(shared_dir: Path) -> None:
    with pytest.raises(UserError, match=r"is a state_dict.*pass --arch NAME \(see `dfcompress inspect --list-archs`\)"):
        load_teacher(shared_dir / "teachers" / "original" / "resnet20-12fca82f.th")


def test_wrong_arch_lists_mismatches_briefly(shared_dir: Path) -> None:
    with pytest.raises(UserError) as info:
        load_teacher(shared_dir / "teachers" / "original" / "resnet32-d509ac18.th", arch="resnet20")
    msg = str(info.value)
    assert "does not fit architecture 'resnet20'" in msg and "60 unexpected key(s)" in msg
    assert msg.count("layer") <= 6 and "\n" not in msg
    with pytest.raises(UserError, match="shape mismatch"):
        load_teacher(shared_dir / "teachers" / "original" / "resnet20-12fca82f.th", arch="wrn_16_1")


def test_unknown_arch(written: dict) -> None:
    path = written["resnet20"][1]["state_dict"]
    with pytest.raises(UserError, match="unknown architecture"):
        load_teacher(path, arch="resnet21x")


def _truncate(src: Path, dst: Path, frac: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "pt2", "onnx_folded", "safetensors"])
def test_truncated_files_give_one_line(written: dict, tmp_path: Path, fmt: str) -> None:
    good = written["resnet20"][1][fmt]
    bad = _truncate(good, tmp_path / f"cut_{good.name}")
    with pytest.raises(UserError) as info:
        load_teacher(bad, arch="resnet20")
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg
    assert "truncated" in msg


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="folder without dfcompress.json"):
        load_teacher(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        load_teacher(tmp_path / "empty.pt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 250)) * 40)
    with pytest.raises(UserError, match="not a recognised model file"):
        load_teacher(tmp_path / "noise.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(UserError, match="zip archive but not a PyTorch"):
        load_teacher(tmp_path / "other.zip")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "dfcompress.json").write_text('{"kind": "stats"}')
    with pytest.raises(UserError, match="does not describe a model"):
        load_teacher(tmp_path / "folder")


def test_not_a_classifier(tmp_path: Path) -> None:
    path = _onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), tmp_path / "features.onnx", fold=True)
    with pytest.raises(UserError, match=r"is not a classifier: it returns \[2, 4, 30, 30\]"):
        load_teacher(path)


class _NanHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x - 1e6)


def test_non_finite_weights_and_logits_refused(tmp_path: Path) -> None:
    model = _eager("resnet20")
    sd = model.state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"NaN/inf values in its weights \(layer2.0.conv1.weight\)"):
        load_teacher(tmp_path / "nan.pt", arch="resnet20")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), _NanHead()).eval()
    path = _onnx(net, tmp_path / "nanlogits.onnx", fold=True)
    with pytest.raises(UserError, match="NaN/inf logits"):
        load_teacher(path)


def test_shape_and_class_flags_checked(written: dict) -> None:
    path = written["resnet20"][1]["onnx_folded"]
    with pytest.raises(UserError, match=r"--input-shape gives 1 channel\(s\) but the first convolution .* takes 3"):
        load_teacher(path, input_shape=(1, 32, 32))
    with pytest.raises(UserError, match="--num-classes is 100 but .* outputs 10 logits"):
        load_teacher(path, num_classes=100)
    with pytest.raises(UserError, match="one per input channel"):
        load_teacher(path, mean=(0.5,), std=(0.5,))
    with pytest.raises(UserError, match="--input-shape must be three positive integers"):
        load_teacher(path, input_shape=(3, 0, 32))
