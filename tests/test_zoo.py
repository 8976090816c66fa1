"""Model zoo: registry behaviour, torchvision/akamaster compatibility, and shapes for every model."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from dfcompress.errors import UserError
from dfcompress.models.stages import probe_stages
from dfcompress.models.zoo import (
    create_model, customized_pruners, list_models, model_defaults, register_model, resolve_model_name,
)
from dfcompress.models.zoo.resnet_cifar import PadShortcut

ALL = list_models()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only spin


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_has_the_documented_architectures() -> None:
    expected = {
        "resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet34_cifar",
        "resnet20", "resnet32", "resnet44", "resnet56", "vgg11_bn", "vgg16_bn", "mobilenetv2",
        "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "digits_cnn", "digits_cnn_small",
    }
    assert expected <= set(ALL)
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_classes,in_channels,size", [(10, 3, 32), (7, 1, 16)])
def test_forward_backward_shapes(name: str, num_classes: int, in_channels: int, size: int) -> None:
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, input_size=size)
    x = torch.randn(2, in_channels, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, num_classes)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, num_classes) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_traceable_picklable_no_inplace(name: str) -> None:
    size = min(16, model_defaults(name)["input_size"])
    model = create_model(name, num_classes=5, input_size=size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))
    clone = pickle.loads(pickle.dumps(model))  # fails on lambda modules
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
    for mod_name, m in model.named_modules():
        assert type(m).__name__ != "LambdaLayer", mod_name
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            assert not m.inplace, f"{name}.{mod_name} is an in-place activation"


@pytest.mark.parametrize("name,count", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
    ("vgg11_bn", 132_868_840), ("vgg16_bn", 138_365_992), ("mobilenetv2", 3_504_872),
])
def test_torchvision_param_counts(name: str, count: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, num_classes=1000, input_size=224)
    assert n_params(model) == count


@pytest.mark.parametrize("name,count", [
    ("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018),
    # Zagoruyko & Komodakis WRNs at 10 classes, as reported by the CRD/RepDistiller code base
    ("wrn_16_1", 175_066), ("wrn_16_2", 691_674), ("wrn_40_1", 563_930), ("wrn_40_2", 2_243_546),
])
def test_cifar_param_counts(name: str, count: int) -> None:
    assert n_params(create_model(name, num_classes=10, input_size=32)) == count


def test_torchvision_key_names() -> None:
    with torch.device("meta"):
        r18 = create_model("resnet18").state_dict()
        r50 = create_model("resnet50").state_dict()
        vgg = create_model("vgg16_bn").state_dict()
        mbv2 = create_model("mobilenetv2").state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.num_batches_tracked",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias",
                "fc.weight", "fc.bias"):
        assert key in r18, key
    assert "layer1.0.downsample.0.weight" not in r18
    for key in ("layer1.0.conv3.weight", "layer1.0.bn3.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var"):
        assert key in r50, key
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    for key in ("features.0.weight", "features.0.bias", "features.1.running_var", "features.40.weight",
                "features.41.running_mean", "classifier.0.weight", "classifier.3.weight", "classifier.6.bias"):
        assert key in vgg, key
    assert vgg["classifier.0.weight"].shape == (4096, 25088)
    for key in ("features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.1.conv.2.running_var", "features.2.conv.0.0.weight",
                "features.2.conv.1.1.weight", "features.2.conv.2.weight", "features.2.conv.3.bias",
                "features.18.0.weight", "features.18.1.running_var", "classifier.1.weight", "classifier.1.bias"):
        assert key in mbv2, key


def test_small_input_variants_keep_keys() -> None:
    big = create_model("resnet18", input_size=224)
    small = create_model("resnet18", input_size=32)
    assert big.conv1.weight.shape == (64, 3, 7, 7) and small.conv1.weight.shape == (64, 3, 3, 3)
    assert isinstance(small.maxpool, nn.Identity) and isinstance(big.maxpool, nn.MaxPool2d)
    assert big.state_dict().keys() == small.state_dict().keys()
    forced = create_model("resnet18_cifar", input_size=224)
    assert forced.conv1.weight.shape == (64, 3, 3, 3)

    with torch.device("meta"):
        v_big, v_small = create_model("vgg16_bn", input_size=224), create_model("vgg16_bn", num_classes=10, input_size=32)
        m_big, m_small = create_model("mobilenetv2", input_size=224), create_model("mobilenetv2", input_size=32)
    feats = lambda sd: {k: v.shape for k, v in sd.items() if k.startswith("features.")}  # noqa: E731
    assert feats(v_big.state_dict()) == feats(v_small.state_dict())
    assert v_small.classifier.weight.shape == (10, 512)
    assert m_big.state_dict().keys() == m_small.state_dict().keys()
    assert m_small.features[0][0].stride == (1, 1) and m_big.features[0][0].stride == (2, 2)
    # CIFAR MobileNetV2 reaches 4x4 at the last stage, not 1x1
    assert [s.height for s in probe_stages(create_model("mobilenetv2", input_size=32), (3, 32, 32))][-1] == 4


def test_stages_of_cifar_models() -> None:
    stages = probe_stages(create_model("resnet20"), (3, 32, 32))
    assert [(s.name, s.channels, s.height) for s in stages] == [
        ("layer1.2.relu2", 16, 32), ("layer2.2.relu2", 32, 16), ("layer3.2.relu2", 64, 8)]
    digits = probe_stages(create_model("digits_cnn", in_channels=1, input_size=8), (1, 8, 8))
    assert [(s.channels, s.height) for s in digits] == [(32, 8), (64, 4), (128, 2)]


def test_wrn_and_cifar_resnet_key_names() -> None:
    wrn = create_model("wrn_40_2").state_dict()
    for key in ("conv1.weight", "block1.layer.0.bn1.running_mean", "block1.layer.0.conv1.weight",
                "block1.layer.0.convShortcut.weight", "block2.layer.5.conv2.weight", "block3.layer.0.convShortcut.weight",
                "bn1.weight", "fc.weight"):
        assert key in wrn, key
    assert "block1.layer.0.convShortcut.weight" not in create_model("wrn_16_1").state_dict()
    r20 = create_model("resnet20").state_dict()
    assert {"conv1.weight", "bn1.weight", "layer3.2.bn2.running_var", "linear.weight", "linear.bias"} <= set(r20)
    assert not any("shortcut" in k for k in r20)


def test_digits_cnn_layout() -> None:
    d = model_defaults("digits_cnn")
    assert (d["input_size"], d["num_classes"], d["default_in_channels"]) == (8, 10, 1)
    m = create_model("digits_cnn", num_classes=10, in_channels=1, input_size=8)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 5
    assert m.fc.in_features == 128
    small = create_model("digits_cnn_small", num_classes=10, in_channels=1, input_size=8)
    assert [c.out_channels for c in small.modules() if isinstance(c, nn.Conv2d)] == [16, 16, 32, 32, 64]
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_resolve_names_and_aliases() -> None:
    assert resolve_model_name("wrn-16-1") == "wrn_16_1"
    assert resolve_model_name("WRN_40_2") == "wrn_40_2"
    assert resolve_model_name("resnet20_cifar") == "resnet20"
    assert resolve_model_name("mobilenet_v2") == "mobilenetv2"
    assert resolve_model_name("ResNet18") == "resnet18"
    assert resolve_model_name("resnet18_cifar") == "resnet18_cifar"
    assert model_defaults("resnet18_cifar")["input_size"] == 32
    assert model_defaults("resnet50") == {"input_size": 224, "num_classes": 1000, "family": "resnet",
                                          "default_in_channels": 3, "in_channels": 3}
    assert model_defaults("wrn-40-2")["num_classes"] == 10
    with pytest.raises(UserError, match=r"unknown architecture 'resnt18'; did you mean 'resnet18'\?.*--list-archs"):
        resolve_model_name("resnt18")
    with pytest.raises(UserError, match="did you mean 'vgg16_bn'"):
        create_model("vgg16")
    with pytest.raises(UserError) as info:
        resolve_model_name("transformer")
    assert "did you mean" not in str(info.value) and "\n" not in str(info.value)


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="num_classes"):
        create_model("resnet20", num_classes=0)
    with pytest.raises(UserError, match="in_channels"):
        create_model("resnet20", in_channels=0)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("ResNet18", family="resnet")(lambda **kw: nn.Identity())
    assert "resnet18" in list_models()


def test_pad_shortcut_pruning_semantics() -> None:
    """Pruned like a 1x1 conv: dropped outputs vanish, dropped inputs stop being copied."""
    pruner = customized_pruners()[PadShortcut]
    x = torch.randn(2, 8, 6, 6)
    ref = PadShortcut(8, 16)
    full = ref(x)
    assert full.shape == (2, 16, 3, 3) and torch.equal(full[:, 4:12], x[:, :, ::2, ::2])
    assert full[:, :4].abs().sum() == 0 and full[:, 12:].abs().sum() == 0
    sc = PadShortcut(8, 16)
    sc.index = sc.default_index()
    assert torch.equal(sc(x), full)  # the gather path reproduces the pad path

    pruner.prune_out_channels(sc, [0, 5, 15])
    keep_out = [i for i in range(16) if i not in (0, 5, 15)]
    assert pruner.get_out_channels(sc) == 13 and torch.equal(sc(x), full[:, keep_out])
    pruner.prune_in_channels(sc, [1, 2])
    keep_in = [i for i in range(8) if i not in (1, 2)]
    x_zeroed = x.clone()
    x_zeroed[:, [1, 2]] = 0
    assert pruner.get_in_channels(sc) == 6
    assert torch.equal(sc(x[:, keep_in]), PadShortcut(8, 16)(x_zeroed)[:, keep_out])
    assert "index" in sc.state_dict() and "index" not in ref.state_dict()


def test_pruning_a_dead_residual_channel_changes_nothing() -> None:
    """Through the option-A shortcut, torch-pruning must couple the right channels.

    Silence residual-stream channel 3 of stage 1 and channel 2 of stage 2 (a zero-padded one) at
    every BN that writes into the stream, so they are identically zero; removing them must leave
    the logits unchanged. Wrong coupling (e.g. treating the pad as elementwise) would not.
    """
    import torch_pruning as tp

    model = create_model("resnet20", num_classes=10, input_size=32).eval()
    with torch.no_grad():
        for bn, ch in [(model.bn1, 3)] + [(b.bn2, 3) for b in model.layer1] + [(b.bn2, 2) for b in model.layer2]:
            bn.weight[ch] = 0.0
            bn.bias[ch] = 0.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, customized_pruners=customized_pruners())
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[3]).prune()
    graph.get_pruning_group(model.layer2[0].conv2, tp.prune_conv_out_channels, idxs=[2]).prune()
    assert model.layer1[0].conv1.in_channels == 15 and model.layer2[0].shortcut.in_channels == 15
    assert model.layer2[1].conv1.in_channels == 31 and model.layer3[0].shortcut.in_channels == 31
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "mobilenetv2", "digits_cnn"])
def test_torch_pruning_prunes_zoo_models(name: str) -> None:
    import torch_pruning as tp

    channels, size = (1, 8) if name == "digits_cnn" else (3, 32)
    model = create_model(name, num_classes=10, in_channels=channels, input_size=size).eval()
    x = torch.randn(2, channels, size, size)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
        ignored_layers=[head], customized_pruners=customized_pruners(),
    )
    before = n_params(model)
    pruner.step()
    assert n_params(model) < 0.5 * before
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10)
        torch.testing.assert_close(torch.jit.trace(model, x, check_trace=False)(x), out)


def _akamaster_state_dict(path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_akamaster_checkpoints_load_strictly(shared_dir, depth: int) -> None:
    path = next((shared_dir / "teachers" / "original").glob(f"resnet{depth}-*.th"))
    model = create_model(f"resnet{depth}", num_classes=10, input_size=32)
    sd = _akamaster_state_dict(path)
    model.load_state_dict(sd, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


# resnet32/44 only load above: scoring them too costs ~10 s of a shared 2-core CPU for little extra evidence
@pytest.mark.parametrize("depth,expected", [(20, 91.73), (56, 93.26)])
def test_akamaster_checkpoints_score_as_published(shared_dir, depth: int, expected: float) -> None:
    """PROVENANCE.md's exact-subset figures: the architecture computes what upstream computed."""
    path = next((shared_dir / "teachers" / "original").glob(f"resnet{depth}-*.th"))
    model = create_model(f"resnet{depth}", num_classes=10, input_size=32)
    model.load_state_dict(_akamaster_state_dict(path), strict=True)
    model.eval()
    data = np.load(shared_dir / "cifar10" / "cifar10_test_lossless_first846.npz")
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    acc = 100.0 * (pred.numpy() == data["y"]).mean()
    assert abs(acc - expected) < 0.5, f"resnet{depth}: {acc:.2f} vs {expected}"
