"""Inversion methods end to end on small real teachers (CPU, seconds each).

The main teacher is a tiny BN CNN trained here on scikit-learn's real 8x8 digits (~98% held-out
accuracy), so "the teacher recognises the synthetic images" is a meaningful check: chance is 10%, and
Gaussian-noise images score about that.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dfcompress.device import resolve_runtime
from dfcompress.errors import NumericalError, UserError
from dfcompress.inversion.generator import ConditionalGenerator, plan_upsampling
from dfcompress.inversion.pyramid import FeatureTransferPyramid, StageTaps
from dfcompress.inversion.synthesizers import build_synthesizer
from dfcompress.models.stages import probe_stages
from dfcompress.models.taps import FeatureTaps, stat_layers
from dfcompress.models.teacher import Teacher
from dfcompress.models.zoo import create_model, list_models
from dfcompress.settings import SynthesizeSettings

CPU = resolve_runtime("cpu")
LABELS = torch.arange(20) % 10
# jitter 0 / no flip: a 1-pixel roll of an 8x8 digit is a large change and digits are not mirror-symmetric
SMALL = dict(latent_dim=64, jitter=0, flip=False, cmi_bank_size=64, batch_size=20)


def _tiny_bn_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only spin


@pytest.fixture(scope="module")
def digits():
    """(teacher, x01 [N,1,8,8], y, held-out accuracy) — trained in a few seconds on real digits."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    mean, std = float(x.mean()), float(x.std())
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _tiny_bn_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xn = (x - mean) / std
    for _ in range(12):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(xn[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = (model(xn[test]).argmax(1) == y[test]).float().mean().item()
    teacher = Teacher(model, (1, 8, 8), 10, (mean,), (std,), "state_dict", "test:digits-cnn", "0" * 64)
    return teacher, x, y, acc


def _accuracy(teacher: Teacher, images01: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (teacher.module(teacher.normalize(images01)).argmax(1) == labels).float().mean().item()


def _noise_accuracy(teacher: Teacher, labels: torch.Tensor) -> float:
    """Teacher accuracy on Gaussian-noise images (N(0, 1) in its input space, as pixels in [0, 1])."""
    noise = torch.randn(labels.shape[0], *teacher.input_shape, generator=torch.Generator().manual_seed(1))
    return _accuracy(teacher, teacher.denormalize(noise).clamp(0, 1), labels)


def _mean(history, key, sl):
    rows = history[sl]
    return sum(r[key] for r in rows) / len(rows)


def test_digits_teacher_is_meaningful(digits):
    teacher, _, _, acc = digits
    assert acc > 0.9
    assert _noise_accuracy(teacher, LABELS) <= 0.3


@pytest.mark.parametrize("method,iterations", [("naturalinversion", 120), ("deepinversion", 150), ("adi", 150), ("cmi", 120)])
def test_method_inverts_the_teacher(digits, method, iterations):
    teacher, *_ = digits
    steps = []
    synth = build_synthesizer(teacher, SynthesizeSettings(method=method, iterations=iterations, **SMALL), CPU)
    res = synth.synthesize_batch(LABELS, seed=3, on_step=lambda it, comp: steps.append((it, comp)))
    assert res.images01.shape == (20, 1, 8, 8) and res.images01.dtype == torch.float32
    assert res.images01.min() >= 0 and res.images01.max() <= 1
    assert [it for it, _ in steps] == list(range(iterations)) and len(res.history) == iterations
    assert {"total", "ce", "bn", "tv", "l2"} <= set(res.history[0])
    assert _mean(res.history, "total", slice(-10, None)) < 0.5 * _mean(res.history, "total", slice(0, 10))
    assert res.best_loss <= min(r["total"] for r in res.history) + 1e-3
    acc, noise = _accuracy(teacher, res.images01, LABELS), _noise_accuracy(teacher, LABELS)
    assert acc >= 0.8, f"{method}: teacher accuracy on synthetic images {acc:.2f}"
    assert acc >= noise + 0.5


@pytest.mark.parametrize("switches", [dict(use_pyramid=False), dict(use_scaling=False), dict(pixel_clamp=True)])
def test_naturalinversion_ablation_switches(digits, switches):
    teacher, *_ = digits
    synth = build_synthesizer(teacher, SynthesizeSettings(iterations=30, **SMALL, **switches), CPU)
    assert (synth.stages == []) == (switches.get("use_pyramid") is False)
    res = synth.synthesize_batch(LABELS, seed=3)
    assert _mean(res.history, "total", slice(-5, None)) < _mean(res.history, "total", slice(0, 5))


def test_same_seed_same_images_and_teacher_untouched(digits):
    teacher, *_ = digits
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    for method in ("naturalinversion", "deepinversion"):
        synth = build_synthesizer(teacher, SynthesizeSettings(method=method, iterations=4, **SMALL), CPU)
        a = synth.synthesize_batch(LABELS, seed=11)
        b = synth.synthesize_batch(LABELS, seed=11)
        c = synth.synthesize_batch(LABELS, seed=12)
        assert torch.equal(a.images01, b.images01) and a.history == b.history
        assert not torch.equal(a.images01, c.images01)
    module = teacher.module
    assert not module.training and all(not m.training for m in module.modules())
    assert all(p.requires_grad and p.grad is None for p in module.parameters())
    assert all(not m._forward_hooks for m in module.modules())
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics untouched


def test_global_rng_does_not_matter(digits):
    teacher, *_ = digits
    synth = build_synthesizer(teacher, SynthesizeSettings(iterations=3, **SMALL), CPU)
    torch.manual_seed(1)
    a = synth.synthesize_batch(LABELS, seed=5)
    torch.manual_seed(2)
    b = synth.synthesize_batch(LABELS, seed=5)
    assert torch.equal(a.images01, b.images01)


def test_cmi_memory_bank_grows_bounded_and_round_trips(digits):
    teacher, *_ = digits
    synth = build_synthesizer(teacher, SynthesizeSettings(method="cmi", iterations=3, **dict(SMALL, cmi_bank_size=30)), CPU)
    first = synth.synthesize_batch(LABELS, seed=1)
    assert synth.bank is None and first.history[0]["cmi"] > 0  # negatives from the batch itself only
    synth.after_batch(first.images01, torch.zeros(20, 10))
    assert synth.bank is not None and synth.bank.shape[0] == 20
    state = copy.deepcopy(synth.state())
    second = synth.synthesize_batch(LABELS, seed=2)
    synth.after_batch(second.images01, torch.zeros(20, 10))
    assert synth.bank.shape[0] == 30  # bounded by cmi_bank_size, newest first
    other = build_synthesizer(teacher, SynthesizeSettings(method="cmi", iterations=3, **dict(SMALL, cmi_bank_size=30)), CPU)
    other.load_state(state)
    assert torch.equal(other.synthesize_batch(LABELS, seed=2).images01, second.images01)  # the state is all it carries


def test_adi_student_learns_and_round_trips(digits):
    teacher, x, _, _ = digits
    synth = build_synthesizer(teacher, SynthesizeSettings(method="adi", iterations=3, **SMALL), CPU)
    assert synth.student is not None and "adi" in synth.synthesize_batch(LABELS, seed=0).history[0]
    images = x[:40]
    with torch.no_grad():
        logits = teacher.module(teacher.normalize(images))
    first = synth.learn(images, logits)
    for _ in range(4):
        last = synth.learn(images, logits)
    assert last < first
    state = copy.deepcopy(synth.student_state())
    other = build_synthesizer(teacher, SynthesizeSettings(method="adi", iterations=3, **SMALL), CPU)
    other.load_student_state(state)
    probe = teacher.normalize(images[:4])
    with torch.no_grad():
        assert torch.equal(other.student(probe), synth.student(probe))
    plain = build_synthesizer(teacher, SynthesizeSettings(method="deepinversion", iterations=1, **SMALL), CPU)
    assert plain.student is None and plain.learn(images, logits) is None


@pytest.mark.parametrize("method", ["naturalinversion", "deepinversion", "adi", "cmi"])
def test_nan_raises_numerical_error(digits, method):
    teacher, *_ = digits
    broken = copy.deepcopy(teacher)
    broken.module[1].running_mean[0] = float("nan")
    synth = build_synthesizer(broken, SynthesizeSettings(method=method, iterations=3, **SMALL), CPU)
    with pytest.raises(NumericalError, match="iteration 0"):
        synth.synthesize_batch(LABELS, seed=0)
    assert all(not m._forward_hooks for m in broken.module.modules())  # hooks removed on the error path too


# ------------------------------------------------------------------ BN-fused teachers


def _fuse(model: nn.Sequential) -> nn.Sequential:
    layers = list(model)
    out = []
    i = 0
    while i < len(layers):
        if isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
            i += 2
        else:
            out.append(layers[i])
            i += 1
    return nn.Sequential(*out).eval()


def _class_stats(teacher: Teacher, x01: torch.Tensor, y: torch.Tensor):
    """Per-class conv-output statistics measured with FeatureTaps on real images (what `dfcompress stats` stores)."""
    from dfcompress.stats.store import FeatureStats

    layers = stat_layers(teacher.module)
    mean, var = {}, {}
    with torch.no_grad(), FeatureTaps(teacher.module, layers, detach=True) as taps:
        teacher.module(teacher.normalize(x01))
        for layer in layers:
            f = taps[layer.name].double()
            mean[layer.name] = torch.stack([f[y == k].mean((0, 2, 3)) for k in range(10)])
            var[layer.name] = torch.stack([f[y == k].var((0, 2, 3), unbiased=False) for k in range(10)])
    counts = torch.bincount(y, minlength=10)
    return FeatureStats(layers=layers, mean=mean, var=var, counts=counts, per_class=True, kind="collected",
                        teacher_sha256=teacher.sha256, mean_pre=teacher.mean, std_pre=teacher.std, source="test")


@pytest.fixture(scope="module")
def fused(digits):
    teacher, x, y, _ = digits
    fused_teacher = Teacher(_fuse(copy.deepcopy(teacher.module)), teacher.input_shape, 10, teacher.mean, teacher.std,
                            "onnx", "test:fused", "1" * 64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused_teacher.module.modules())
    seeds = torch.cat([torch.nonzero(y == k)[:20, 0] for k in range(10)])  # 20 seed images per class
    return fused_teacher, _class_stats(fused_teacher, x[seeds], y[seeds])


def test_bn_free_teacher_without_stats_is_a_user_error(fused):
    teacher, _ = fused
    with pytest.raises(UserError, match="dfcompress stats"):
        build_synthesizer(teacher, SynthesizeSettings(**SMALL), CPU)


def test_class_conditional_stats_drive_synthesis_on_fused_teacher(fused):
    teacher, stats = fused
    synth = build_synthesizer(teacher, SynthesizeSettings(iterations=120, **SMALL), CPU, stats)
    res = synth.synthesize_batch(LABELS, seed=4)
    assert _mean(res.history, "bn", slice(-10, None)) < 0.5 * _mean(res.history, "bn", slice(0, 10))
    acc = _accuracy(teacher, res.images01, LABELS)
    assert acc >= 0.8 and acc >= _noise_accuracy(teacher, LABELS) + 0.5


def test_stats_for_another_model_are_a_user_error(digits):
    teacher, *_ = digits
    bad = types.SimpleNamespace(layers=[types.SimpleNamespace(name="nope", side="output", channels=3)],
                                mean={"nope": torch.zeros(10, 3)}, var={"nope": torch.ones(10, 3)},
                                per_class=True, counts=torch.ones(10))
    with pytest.raises(UserError, match="does not exist"):
        build_synthesizer(teacher, SynthesizeSettings(**SMALL), CPU, bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter folds BN, as deployed ONNX files do
def test_converted_onnx_digits_teacher_inverts_with_class_stats(digits, tmp_path):
    """Export -> ONNX (BN folded by the exporter) -> onnx_to_torch -> FTP + class-conditional synthesis."""
    from dfcompress.models.onnx_import import onnx_to_torch

    teacher, x, y, _ = digits
    path = tmp_path / "digits.onnx"
    torch.onnx.export(copy.deepcopy(teacher.module), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}})
    module = onnx_to_torch(path).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    onnx_teacher = Teacher(module, (1, 8, 8), 10, teacher.mean, teacher.std, "onnx", str(path), "6" * 64)
    seeds = torch.cat([torch.nonzero(y == k)[:20, 0] for k in range(10)])
    stats = _class_stats(onnx_teacher, x[seeds], y[seeds])
    synth = build_synthesizer(onnx_teacher, SynthesizeSettings(iterations=100, **SMALL), CPU, stats)
    assert [st.height for st in synth.stages] == [8, 4, 2]
    res = synth.synthesize_batch(LABELS, seed=4)
    assert _accuracy(onnx_teacher, res.images01, LABELS) >= 0.8


# ------------------------------------------------------------------ architectures and sizes


@pytest.mark.parametrize("size,expected", [((8, 8), (2, 2, 2)), ((28, 28), (2, 7, 7)), ((32, 32), (2, 8, 8)),
                                           ((30, 30), (2, 8, 8)), ((224, 224), (5, 7, 7)), ((16, 24), (2, 4, 6))])
def test_generator_is_sized_from_the_input(size, expected):
    assert plan_upsampling(*size) == expected
    gen = ConditionalGenerator(16, 5, 3, *size)
    zy = gen.latent(torch.randn(2, 16), torch.tensor([0, 4]))
    assert gen(zy).shape == (2, 3, *size)


def test_generator_matches_table_6_at_32px():
    gen = ConditionalGenerator(1024, 10, 3, 32, 32)
    assert gen.fc.in_features == 1034 and gen.fc.out_features == 128 * 8 * 8
    convs = [m for m in gen.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 128), (128, 64), (64, 3)]
    out = gen(gen.latent(torch.randn(2, 1024), torch.tensor([0, 1])))
    assert out.shape == (2, 3, 32, 32)


def test_generator_computes_table_6_literally():
    """Fused resize-convs and the channels_last interior compute the same function as table 6 written out."""
    import torch.nn.functional as F

    from dfcompress.inversion.generator import UpsampleConv3x3

    torch.manual_seed(0)
    gen = ConditionalGenerator(64, 10, 3, 32, 32).train()
    zy = gen.latent(torch.randn(4, 64), torch.tensor([0, 3, 5, 9]))
    out = gen(zy)
    x = gen.fc(zy).view(4, gen.base, gen.init_h, gen.init_w)
    for layer in gen.blocks:
        x = layer.conv(F.interpolate(x, scale_factor=2, mode="nearest")) if isinstance(layer, UpsampleConv3x3) else layer(x)
    assert torch.allclose(out, x, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous()  # plain NCHW for the teacher, whatever the layout inside


@pytest.mark.parametrize("name", list_models())
def test_pyramid_builds_on_every_zoo_architecture(name):
    shape = (1, 8, 8) if name.startswith("digits_cnn") else (3, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1]).eval()
    stages = probe_stages(model, shape)
    assert stages, name
    ftp = FeatureTransferPyramid(stages, shape)
    g = torch.randn(2, *shape)
    with StageTaps(model, stages) as taps:
        feats = taps.capture(model, g)
    out = ftp(g, feats)
    assert out.shape == (2, *shape) and out.abs().max() <= 1  # tanh output
    out.sum().backward()
    assert all(p.grad is not None for p in ftp.parameters())


@pytest.mark.parametrize("name", ["resnet20", "resnet18_cifar", "vgg11_bn", "mobilenetv2"])
def test_naturalinversion_runs_on_cifar_architectures(name):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=3, input_size=32).eval()
    teacher = Teacher(model, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, "state_dict", name, "2" * 64, arch=name)
    res = build_synthesizer(teacher, SynthesizeSettings(iterations=2, latent_dim=32), CPU).synthesize_batch(torch.arange(4), seed=0)
    assert res.images01.shape == (4, 3, 32, 32) and torch.isfinite(res.images01).all()


def test_naturalinversion_at_imagenet_size():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=1000, in_channels=3, input_size=224).eval()
    teacher = Teacher(model, (3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "state_dict", "r18", "3" * 64)
    synth = build_synthesizer(teacher, SynthesizeSettings(iterations=2, latent_dim=32), CPU)
    assert [s.height for s in synth.stages] == [112, 56, 28, 14, 7]  # stride-2 stem: f_1 is below input size
    res = synth.synthesize_batch(torch.tensor([1, 999]), seed=0)
    assert res.images01.shape == (2, 3, 224, 224) and len(res.history) == 2


# ------------------------------------------------------------------ real CIFAR-10 teachers (../shared)


def _akamaster(shared_dir) -> Teacher:
    path = shared_dir / "teachers" / "original" / "resnet20-12fca82f.th"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return Teacher(model.eval(), (3, 32, 32), 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "state_dict", str(path), "4" * 64)


def test_akamaster_resnet20_deepinversion_lowers_its_loss(shared_dir):
    teacher = _akamaster(shared_dir)
    labels = torch.arange(10)
    res = build_synthesizer(teacher, SynthesizeSettings(method="deepinversion", iterations=25, lr_pixels=0.1), CPU).synthesize_batch(labels, seed=0)
    assert res.history[-1]["total"] < 0.5 * res.history[0]["total"]
    assert res.history[-1]["ce"] < res.history[0]["ce"]
    res = build_synthesizer(teacher, SynthesizeSettings(iterations=2, latent_dim=64), CPU).synthesize_batch(labels[:4], seed=0)
    assert torch.isfinite(res.images01).all()


def test_converted_onnx_teacher_with_class_conditional_stats(shared_dir):
    import numpy as np

    from dfcompress.models.onnx_import import onnx_to_torch

    module = onnx_to_torch(shared_dir / "teachers" / "cifar10_resnet20_akamaster.onnx").eval()
    teacher = Teacher(module, (3, 32, 32), 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "onnx", "aka.onnx", "5" * 64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())  # BN folded by the exporter
    data = np.load(shared_dir / "cifar10" / "cifar10_test_lossless_first846.npz")
    x = torch.from_numpy(data["x"][:200]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y"][:200]).long()
    stats = _class_stats(teacher, x, y)
    stages = probe_stages(module, (3, 32, 32))
    assert [s.height for s in stages] == [32, 16, 8]
    synth = build_synthesizer(teacher, SynthesizeSettings(iterations=2, latent_dim=64), CPU, stats)
    res = synth.synthesize_batch(torch.arange(4), seed=0)
    assert res.images01.shape == (4, 3, 32, 32) and res.history[0]["bn"] > 0


def test_upsample_conv_equals_nearest_upsample_then_conv():
    """The generator's fused resize-conv is the same function as table 6's Upsample x2 + Conv 3x3."""
    import torch.nn.functional as F
    from torch import nn

    from dfcompress.inversion.generator import upsample2_conv3x3

    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, 1, 1)
    x = torch.randn(2, 5, 4, 6, generator=g, requires_grad=True)
    ref = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    out = upsample2_conv3x3(x, conv)
    assert out.shape == ref.shape == (2, 7, 8, 12)
    assert torch.allclose(out, ref, atol=1e-5)
    # the generator learns through it: input, weight and bias gradients must match too
    params = (x, conv.weight, conv.bias)
    grads_ref = torch.autograd.grad(ref.square().sum(), params)
    grads = torch.autograd.grad(out.square().sum(), params)
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    # odd sizes and channels_last input give the same function
    x2 = torch.randn(3, 5, 7, 5, generator=g).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(upsample2_conv3x3(x2, conv), conv(F.interpolate(x2, scale_factor=2, mode="nearest")), atol=1e-5)


# ------------------------------------------------------------------ fast NaturalInversion (meta-learned generator)


def _fast_ni_probe_loss(teacher, meta_learn: bool, meta_update: str = "reptile") -> float:
    """Final loss of a new batch after K steps from the meta-initialisation, after 6 batches with or without meta-learning."""
    s = SynthesizeSettings(method="fast-ni", iterations=4, meta_update=meta_update, **SMALL)
    synth = build_synthesizer(teacher, s, CPU)
    for b in range(6):
        res = synth.synthesize_batch(LABELS, seed=b)
        if meta_learn:
            synth.after_batch(res.images01, torch.zeros(20, 10))
    probe = synth.synthesize_batch(LABELS, seed=100)
    return sum(row["total"] for row in probe.history[-2:]) / 2


@pytest.mark.parametrize("meta_update", ["reptile", "fomaml"])
def test_fast_ni_meta_initialisation_reaches_a_lower_loss_in_k_steps(digits, meta_update):
    teacher, *_ = digits
    fresh = _fast_ni_probe_loss(teacher, meta_learn=False, meta_update=meta_update)  # the untrained initialisation
    learnt = _fast_ni_probe_loss(teacher, meta_learn=True, meta_update=meta_update)
    assert learnt < 0.8 * fresh


def test_fast_ni_state_round_trips_and_is_all_it_carries(digits):
    teacher, *_ = digits
    s = SynthesizeSettings(method="fast-ni", iterations=3, **SMALL)
    synth = build_synthesizer(teacher, s, CPU)
    synth.after_batch(synth.synthesize_batch(LABELS, seed=0).images01, torch.zeros(20, 10))
    state = copy.deepcopy(synth.state())
    assert set(state) == {"meta", "optimizer"} and any(k.startswith("pyramid.") for k in state["meta"])
    expected = synth.synthesize_batch(LABELS, seed=1).images01
    other = build_synthesizer(teacher, s, CPU)
    other.load_state(state)
    assert torch.equal(other.synthesize_batch(LABELS, seed=1).images01, expected)


@pytest.mark.parametrize("method", ["naturalinversion", "fast-ni"])
def test_teacher_without_spatial_stages_runs_naturalinversion_without_the_pyramid(method):
    """Only a 1x1 map (a kernel as large as the image): no stage to feed the pyramid, so none is built."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 8), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 10)).eval()
    model[1].running_mean.normal_()
    teacher = Teacher(model, (1, 8, 8), 10, (0.5,), (0.25,), "state_dict", "test:stageless", "1" * 64)
    made = {}
    for pyramid in (True, False):
        synth = build_synthesizer(teacher, SynthesizeSettings(method=method, iterations=2, use_pyramid=pyramid, **SMALL), CPU)
        assert synth.stages == []
        made[pyramid] = synth.synthesize_batch(LABELS, seed=3).images01
    assert torch.equal(made[True], made[False])


def test_lambda_adi_zero_switches_the_competition_off(digits):
    """0 means off (it used to mean "pick 1.0"): ADI then makes exactly DeepInversion's images."""
    teacher, *_ = digits
    made = {}
    for method in ("adi", "deepinversion"):
        synth = build_synthesizer(teacher, SynthesizeSettings(method=method, iterations=3, lambda_adi=0.0, **SMALL), CPU)
        made[method] = synth.synthesize_batch(LABELS, seed=4).images01
    assert torch.equal(made["adi"], made["deepinversion"])
    default = build_synthesizer(teacher, SynthesizeSettings(method="adi", iterations=3, **SMALL), CPU)
    assert default.lambda_adi == 1.0 and not torch.equal(default.synthesize_batch(LABELS, seed=4).images01, made["adi"])


def test_pyramid_feature_pass_stops_after_the_last_stage():
    """The no-grad pass that feeds the pyramid runs the teacher only up to its last stage: a ViT's transformer
    blocks (after the patch embedding, its only spatial stage) never run in it, and the features equal those of
    a full forward."""
    from dfcompress.models.taps import FeatureTaps
    from token_models import TinyViT

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyViT().eval()
    stages = probe_stages(model, (3, 16, 16))
    assert [s.name for s in stages] == ["patch"]
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    g = torch.randn(2, 3, 16, 16)
    with StageTaps(model, stages) as taps:
        feats = taps.capture(model, g)
    assert calls == []
    with FeatureTaps(model, [("patch", "output")]) as full:
        model(g)
        assert torch.equal(feats[0], full["patch"])
    assert calls == [1]
