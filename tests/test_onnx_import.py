"""ONNX → torch converter: numeric parity with onnxruntime, gradients, hooks and clear errors."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from dfcompress.errors import UserError
from dfcompress.models.onnx_import import SUPPORTED_OPS, onnx_to_torch
from dfcompress.models.stages import probe_stages
from dfcompress.models.taps import FeatureTaps, batchnorm_layers, stat_layers

AKAMASTER = ["resnet20", "resnet32", "resnet44", "resnet56"]


# ---------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only spin


def _session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def assert_parity(gm: nn.Module, model: onnx.ModelProto | bytes, shape: tuple[int, ...], batches=(1, 5), seed: int = 0) -> None:
    """Converter output equals onnxruntime's (relative to the logit scale) at several batch sizes."""
    sess = _session(model)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    for n in batches:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        refs = sess.run(None, {name: x})
        with torch.no_grad():
            outs = gm(torch.from_numpy(x))
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert len(outs) == len(refs)
        for out, ref in zip(outs, refs):
            out = out.numpy()
            assert out.shape == ref.shape, (out.shape, ref.shape)
            err = np.abs(out - ref).max()
            assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), f"batch {n}: max |diff| {err}"


def assert_grad_flows(gm: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(2, *shape, requires_grad=True)
    out = gm(x)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


_EXPORTS: dict = {}


def export(model: nn.Module, shape: tuple[int, ...], opset: int, preserve_bn: bool = False, **kw) -> bytes:
    """Cached per (model, opset, options): exporting is the slowest step of these tests."""
    key = (id(model), shape, opset, preserve_bn, tuple(sorted(kw.items())))
    if key not in _EXPORTS:
        _EXPORTS[key] = (model, _export(model, shape, opset, preserve_bn, **kw))  # keep model alive: id stays unique
    return _EXPORTS[key][1]


def _export(model: nn.Module, shape: tuple[int, ...], opset: int, preserve_bn: bool = False, **kw) -> bytes:
    """Legacy (TorchScript) exporter with a dynamic batch; BN folded unless ``preserve_bn``."""
    if preserve_bn:
        kw.update(do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(2, *shape), f, opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, **kw)
    return f.getvalue()


def op_types(data: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(data).graph.node]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so folding/preserving them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model


# ---------------------------------------------------------------- own small PyTorch models

class SE(nn.Module):
    def __init__(self, c: int, gate: nn.Module):
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1), gate

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)  # ReduceMean
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class TinyNet(nn.Module):
    """Conv/BN/ReLU, residual, option-A shortcut, depthwise, hardswish, SE (sigmoid and hardsigmoid), pools, view."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.se1, self.se2 = SE(16, nn.Sigmoid()), SE(16, nn.Hardsigmoid())
        self.act = nn.LeakyReLU(0.2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.res(x) + x)
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))  # option-A shortcut
        x = F.relu6(self.down(x) + short)
        x = self.se2(self.se1(self.dw(x)))
        x = self.avg(self.pool(self.act(F.pad(x, (0, 1, 0, 1)))))
        x = torch.cat([x, x * 0.5], dim=1)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


SMALL = (3, 16, 16)


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(1)
    return randomize_bn(TinyNet()).eval()


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_pytorch_export_bn_folded(tiny, opset):
    data = export(tiny, SMALL, opset)
    assert "BatchNormalization" not in op_types(data)
    gm = onnx_to_torch(onnx.load_from_string(data))
    assert isinstance(gm, fx.GraphModule) and not gm.training
    assert_parity(gm, data, SMALL)
    assert_grad_flows(gm, SMALL)
    with torch.no_grad():
        x = torch.randn(3, *SMALL)
        assert torch.allclose(gm(x), tiny(x), atol=1e-4)
    kinds = {type(m) for m in gm.modules()}
    assert {nn.Conv2d, nn.ReLU, nn.Sigmoid, nn.Hardsigmoid, nn.LeakyReLU, nn.ReLU6,
            nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear} <= kinds
    assert (nn.Hardswish in kinds) == (opset >= 14)  # before opset 14 it is exported as x * HardSigmoid(x)
    assert not batchnorm_layers(gm)


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_pytorch_export_bn_preserved(tiny, opset):
    data = export(tiny, SMALL, opset, preserve_bn=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    assert op_types(data).count("BatchNormalization") == n_bn
    gm = onnx_to_torch(data if opset == 13 else onnx.load_from_string(data))
    assert_parity(gm, data, SMALL)
    assert_grad_flows(gm, SMALL)
    ours = [m for _, m in batchnorm_layers(gm)]
    theirs = [m for m in tiny.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(ours) == n_bn
    for a, b in zip(ours, theirs):
        assert isinstance(a, nn.BatchNorm2d) and not a.training
        for attr in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
        assert a.eps == pytest.approx(b.eps) and a.momentum == pytest.approx(b.momentum)
    # BN inputs can be tapped: they are the stat layers and hooks fire during a forward pass
    layers = stat_layers(gm)
    assert [s.side for s in layers] == ["input"] * n_bn
    with FeatureTaps(gm, layers) as taps:
        gm(torch.randn(2, *SMALL))
    assert len(taps.features) == n_bn


def test_initializers_listed_as_inputs(tiny):
    data = export(tiny, SMALL, 13, preserve_bn=True, keep_initializers_as_inputs=True)
    proto = onnx.load_from_string(data)
    assert len(proto.graph.input) > 1
    gm = onnx_to_torch(proto)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input"]
    assert_parity(gm, data, SMALL, batches=(2,))


def test_submodule_names_follow_onnx_nodes(tiny):
    gm = onnx_to_torch(export(tiny, SMALL, 17))
    names = dict(gm.named_modules())
    assert "stem_stem_0_Conv" in names and isinstance(names["stem_stem_0_Conv"], nn.Conv2d)
    assert all(name.isidentifier() for name in names if name)


# ---------------------------------------------------------------- shared akamaster teachers

@pytest.mark.parametrize("arch", AKAMASTER)
def test_akamaster_teachers(shared_dir, arch):
    path = shared_dir / "teachers" / f"cifar10_{arch}_akamaster.onnx"
    gm = onnx_to_torch(path)
    assert_parity(gm, path.read_bytes(), (3, 32, 32), batches=(1, 5))
    assert_grad_flows(gm, (3, 32, 32))
    stages = probe_stages(gm, (3, 32, 32))
    assert [(s.channels, s.height, s.width) for s in stages] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    n_conv = sum(isinstance(m, nn.Conv2d) for m in gm.modules())
    assert n_conv == int(arch[6:]) - 1  # 6n+2 layers = 6n+1 convs + 1 linear
    assert isinstance(gm.linear_Gemm, nn.Linear)
    assert gm.meta["onnx"]["inputs"] == [{"name": "input", "shape": [None, 3, 32, 32]}]
    assert gm.meta["onnx"]["outputs"] == [{"name": "logits", "shape": [None, 10]}]


# ---------------------------------------------------------------- every zoo architecture

def _zoo_names() -> list:
    from dfcompress.models.zoo import list_models
    return list_models()


# the deepest ones run at 16 px so that every architecture stays a few seconds on 2 shared cores
SMALL_INPUT = {"resnet34": 16, "resnet34_cifar": 16, "resnet50_cifar": 16}


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_parity(name):
    from dfcompress.models.zoo import create_model, model_defaults
    d = model_defaults(name)
    size, c = min(int(d["input_size"]), SMALL_INPUT.get(name, 32)), int(d["in_channels"])
    torch.manual_seed(0)
    model = randomize_bn(create_model(name, num_classes=10, in_channels=c, input_size=size)).eval()
    data = export(model, (c, size, size), 17)
    gm = onnx_to_torch(data)
    assert_parity(gm, data, (c, size, size), batches=(3,))
    assert_grad_flows(gm, (c, size, size))


# ---------------------------------------------------------------- hand-built graphs (opset 12–21 constructs)

def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _graph_model(nodes, inits, opset: int, in_shape, outs: dict) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shp) for o, shp in outs.items()], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(model)
    return model


def _axes(opset: int, since: int, name: str, values: list[int], inits: list) -> tuple[list[str], dict]:
    """Axes as an input (opset >= since) or attribute (before)."""
    if opset >= since:
        inits.append(_init(name, np.array(values, dtype=np.int64)))
        return [name], {}
    return [], {"axes": values}


def conv_graph(opset: int) -> onnx.ModelProto:
    """Asymmetric/SAME pads, BN, LRN, HardSigmoid(ONNX alpha), SE via ReduceMean, reflect Pad, pools, Split, Clip, Gemm."""
    rng = np.random.default_rng(opset)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    inits = [_init("w1", f32(8, 3, 2, 2)), _init("b1", f32(8)),
             _init("bn_s", f32(8) + 1), _init("bn_b", f32(8)), _init("bn_m", f32(8)), _init("bn_v", np.abs(f32(8)) + 0.5),
             _init("w2", f32(8, 8, 3, 3)), _init("lo", np.array(-0.4, np.float32)), _init("hi", np.array(0.5, np.float32)),
             _init("pads", np.array([1, 2, 1, 0], np.int64)), _init("wg", f32(16, 5)), _init("cg", f32(5))]
    rm_in, rm_attr = _axes(opset, 18, "rm_axes", [2, 3], inits)
    split_kw = {"num_outputs": 2} if opset >= 18 else {"split": [4, 4]} if opset < 13 else {}
    split_in = [] if opset >= 18 or opset < 13 else ["split_sizes"]
    if split_in:
        inits.append(_init("split_sizes", np.array([4, 4], np.int64)))
    pad_in = ["pads", "", "pad_axes"] if opset >= 18 else ["pads_full"]
    inits.append(_init("pad_axes", np.array([2, 3], np.int64)) if opset >= 18 else
                 _init("pads_full", np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64)))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/stem/conv/Conv", pads=[0, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="/stem/bn/BN", epsilon=1e-3, momentum=0.8),
        helper.make_node("LRN", ["bn"], ["lrn"], size=3, alpha=1e-2, beta=0.75, bias=2.0),
        helper.make_node("HardSigmoid", ["lrn"], ["hs"], name="hsig"),
        helper.make_node("Mul", ["lrn", "hs"], ["a1"]),
        helper.make_node("ReduceMean", ["a1", *rm_in], ["se"], name="se_mean", keepdims=1, **rm_attr),
        helper.make_node("Sigmoid", ["se"], ["se_g"]),
        helper.make_node("Mul", ["a1", "se_g"], ["a2"]),
        helper.make_node("Pad", ["a2", *pad_in], ["p"], mode="reflect"),
        helper.make_node("MaxPool", ["p"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["mp", "w2"], ["c2"], name="same_conv", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Clip", ["c2", "lo", "hi"] if opset >= 11 else ["c2"], ["cl"]),
        helper.make_node("Split", ["cl", *split_in], ["s1", "s2"], axis=1, **split_kw),
        helper.make_node("Concat", ["s2", "s1"], ["cat"], axis=1),
        helper.make_node("AveragePool", ["cat"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=0),
        helper.make_node("Flatten", ["ap"], ["fl"], axis=1),
        helper.make_node("Gemm", ["fl", "wg", "cg"], ["gm"], name="fc", alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["gm"], ["y"], axis=-1),
    ]
    return _graph_model(nodes, inits, opset, ["N", 3, 7, 7], {"y": ["N", 5]})


@pytest.mark.parametrize("opset", [12, 13, 17, 18, 19, 20, 21])
def test_hand_built_conv_graph(opset):
    model = conv_graph(opset)
    gm = onnx_to_torch(model)
    assert_parity(gm, model, (3, 7, 7), batches=(1, 4))
    assert_grad_flows(gm, (3, 7, 7))
    mods = dict(gm.named_modules())
    assert isinstance(mods["stem_conv_Conv"], nn.Conv2d) and isinstance(mods["stem_bn_BN"], nn.BatchNorm2d)
    bn = mods["stem_bn_BN"]
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.2) and not bn.training
    assert torch.equal(bn.running_var, torch.tensor(numpy_helper.to_array(model.graph.initializer[5])))
    assert mods["hsig"].alpha == pytest.approx(0.2)  # ONNX default, not torch's 1/6
    assert isinstance(mods["fc"], nn.Linear)
    assert isinstance(mods["Clip_11"], nn.Hardtanh)  # unnamed node: <OpType>_<index>
    assert isinstance(mods["LRN_2"], nn.LocalResponseNorm)


def shape_graph(opset: int) -> onnx.ModelProto:
    """Dynamic-shape plumbing: Shape/Gather/Unsqueeze/Concat/ConstantOfShape/Expand/Range/Where/Slice(-1)/Squeeze/MatMul."""
    rng = np.random.default_rng(1)
    inits = [_init("zero", np.array(0, np.int64)), _init("four", np.array(4, np.int64)), _init("one", np.array(1, np.int64)),
             _init("tail", np.array([4, 1, 1], np.int64)), _init("ch", rng.standard_normal((1, 4, 1, 1)).astype(np.float32)),
             _init("tenth", np.array(0.1, np.float32)), _init("st", np.array([-1], np.int64)),
             _init("en", np.array([-(2 ** 62)], np.int64)), _init("ax3", np.array([3], np.int64)),
             _init("wm", rng.standard_normal((4, 6)).astype(np.float32)), _init("bm", rng.standard_normal(6).astype(np.float32)),
             _init("minus1", np.array([-1], np.int64))]
    u0_in, u0_attr = _axes(opset, 13, "ax0", [0], inits)
    u1_in, u1_attr = _axes(opset, 13, "ax023", [0, 2, 3], inits)
    sq_in, sq_attr = _axes(opset, 13, "ax23", [2, 3], inits)
    rm_in, rm_attr = _axes(opset, 18, "rm23", [2, 3], inits)
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", *u0_in], ["n1"], **u0_attr),
        helper.make_node("Concat", ["n1", "tail"], ["full"], axis=0),
        helper.make_node("ConstantOfShape", ["full"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])),
        helper.make_node("Expand", ["ch", "shp"], ["chx"]),
        helper.make_node("Range", ["zero", "four", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["rf", *u1_in], ["rc"], **u1_attr),
        helper.make_node("Mul", ["x", "rc"], ["xr"]),
        helper.make_node("Add", ["xr", "chx"], ["t1"]),
        helper.make_node("Mul", ["t1", "ones"], ["t2"]),
        helper.make_node("Slice", ["t2", "st", "en", "ax3", "minus1"], ["flip"]),
        helper.make_node("Add", ["t2", "flip"], ["t3"]),
        helper.make_node("Greater", ["t3", "zero_f"], ["pos"]),
        helper.make_node("Mul", ["t3", "tenth"], ["neg"]),
        helper.make_node("Where", ["pos", "t3", "neg"], ["t4"]),
        helper.make_node("ReduceMean", ["t4", *rm_in], ["m"], keepdims=1, **rm_attr),
        helper.make_node("Squeeze", ["m", *sq_in], ["sq"], **sq_attr),
        helper.make_node("MatMul", ["sq", "wm"], ["mm"], name="/head/MatMul"),
        helper.make_node("Add", ["mm", "bm"], ["y"]),
        helper.make_node("Transpose", ["t4"], ["y2"], perm=[0, 2, 3, 1]),
    ]
    inits.append(_init("zero_f", np.array(0.0, np.float32)))
    return _graph_model(nodes, inits, opset, ["N", 4, 5, 6], {"y": ["N", 6], "y2": ["N", 5, 6, 4]})


@pytest.mark.parametrize("opset", [12, 13, 18, 21])
def test_hand_built_shape_graph(opset):
    model = shape_graph(opset)
    gm = onnx_to_torch(model)
    assert_parity(gm, model, (4, 5, 6), batches=(1, 3))
    assert_grad_flows(gm, (4, 5, 6))
    assert isinstance(dict(gm.named_modules())["head_MatMul"], nn.Linear)
    assert "shape" in gm.code  # the batch size is read at run time, not baked in


# ---------------------------------------------------------------- errors

def test_unsupported_ops_are_all_named():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("NonMaxSuppression", ["r", "r"], ["nms"], name="foo"),
             helper.make_node("FusedConv", ["r"], ["fc"], name="bar", domain="com.microsoft"),
             helper.make_node("Add", ["nms", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UserError) as info:
        onnx_to_torch(model)
    msg = str(info.value)
    assert "'NonMaxSuppression' (node 'foo')" in msg and "'com.microsoft.FusedConv' (node 'bar')" in msg
    assert "supported ops: " in msg and "Conv" in msg and "\n" not in msg


def test_supported_ops_list():
    assert SUPPORTED_OPS == sorted(SUPPORTED_OPS)
    for op in ("Conv", "BatchNormalization", "Gemm", "MatMul", "Pad", "Slice", "ReduceMean", "HardSigmoid", "Clip",
               "ConstantOfShape", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Transpose", "Softmax", "Dropout"):
        assert op in SUPPORTED_OPS


def test_bad_files_raise_user_error(tmp_path, tiny):
    data = export(tiny, SMALL, 17)
    for i, blob in enumerate([data[: len(data) // 2], data[:100], b"", b"not an onnx file at all \x00\xff" * 10]):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(blob)
        with pytest.raises(UserError):
            onnx_to_torch(path)
    with pytest.raises(UserError, match="not found"):
        onnx_to_torch(tmp_path / "missing.onnx")
    with pytest.raises(UserError):
        onnx_to_torch(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- static batch, serialisation, re-export

def test_static_batch_export_runs_any_batch(tiny):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny, torch.randn(1, *SMALL), f, opset_version=17, dynamo=False, input_names=["input"])
    data = f.getvalue()
    gm = onnx_to_torch(data)
    assert_parity(gm, data, SMALL, batches=(1,))
    x = torch.randn(5, *SMALL)
    with torch.no_grad():
        assert torch.allclose(gm(x), tiny(x), atol=1e-4)


def test_round_trips(tiny, tmp_path):
    """deepcopy, torch.save/load (re-traces the code) and legacy ONNX re-export all keep the function."""
    import copy
    gm = onnx_to_torch(export(tiny, SMALL, 17))
    x = torch.randn(3, *SMALL)
    with torch.no_grad():
        ref = gm(x)
        assert torch.equal(copy.deepcopy(gm)(x), ref)
        torch.save(gm, tmp_path / "gm.pt")
        assert torch.equal(torch.load(tmp_path / "gm.pt", weights_only=False)(x), ref)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, (x,), f, opset_version=17, dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}})
    assert_parity(gm, f.getvalue(), SMALL, batches=(2, 4))
    # torch.export (the .pt2 path) keeps the batch dimension symbolic through the shape helpers
    ep = torch.export.export(gm, (x,), dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=256)}})
    x5 = torch.randn(5, *SMALL)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x5), gm(x5), atol=1e-5)


def test_batch_one_baked_into_reshape_is_relaxed():
    w = np.random.default_rng(0).standard_normal((120, 3)).astype(np.float32)

    def model(batch, target):
        nodes = [helper.make_node("Reshape", ["x", "shp"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
        return _graph_model(nodes, [_init("shp", np.array(target, np.int64)), _init("w", w)], 17, [batch, 4, 5, 6], {"y": [batch, 3]})

    static, dynamic = model(1, [1, -1]), model("N", [0, -1])
    gm = onnx_to_torch(static)
    assert_parity(gm, static, (4, 5, 6), batches=(1,))
    assert_parity(gm, dynamic, (4, 5, 6), batches=(3,))


# ---------------------------------------------------------------- op table: one small graph per op variant

def _f(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _i64(*v):
    return np.array(v, np.int64)


# (id, opset, nodes from x to y, initializers)
OP_CASES = [
    ("softmax_coerced", 12, [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}),
    ("logsoftmax_coerced", 12, [helper.make_node("LogSoftmax", ["x"], ["y"], axis=2)], {}),
    ("softmax_axis", 13, [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}),
    ("prelu_channel", 17, [helper.make_node("PRelu", ["x", "s"], ["y"])], {"s": _f(4, 1, 1)}),
    ("prelu_lastdim", 17, [helper.make_node("PRelu", ["x", "s"], ["y"])], {"s": _f(6)}),
    ("elu_selu_celu", 17, [helper.make_node("Elu", ["x"], ["a"], alpha=0.5), helper.make_node("Selu", ["a"], ["b"]),
                          helper.make_node("Celu", ["b"], ["y"], alpha=0.7)], {}),
    ("selu_custom", 17, [helper.make_node("Selu", ["x"], ["y"], alpha=1.2, gamma=0.9)], {}),
    ("gelu_tanh", 20, [helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")], {}),
    ("mish_softplus_tanh", 18, [helper.make_node("Mish", ["x"], ["a"]), helper.make_node("Softplus", ["a"], ["b"]),
                                helper.make_node("Tanh", ["b"], ["y"])], {}),
    ("tile", 17, [helper.make_node("Tile", ["x", "r"], ["y"])], {"r": _i64(1, 2, 1, 1)}),
    ("reducesum_input", 13, [helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=0)], {"ax": _i64(1)}),
    ("reducemax_attr", 17, [helper.make_node("ReduceMax", ["x"], ["y"], axes=[2, 3])], {}),
    ("reducel2_input", 18, [helper.make_node("ReduceL2", ["x", "ax"], ["y"], keepdims=1)], {"ax": _i64(-1)}),
    ("reducemean_all", 18, [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)], {}),
    ("flatten_axis2", 17, [helper.make_node("Flatten", ["x"], ["y"], axis=2)], {}),
    ("flatten_axis0", 17, [helper.make_node("Flatten", ["x"], ["y"], axis=0)], {}),
    ("transpose_default", 17, [helper.make_node("Transpose", ["x"], ["y"])], {}),
    ("global_max_pool", 17, [helper.make_node("GlobalMaxPool", ["x"], ["y"])], {}),
    ("instance_norm", 17, [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)],
     {"s": _f(4, seed=1), "b": _f(4, seed=2)}),
    ("layer_norm", 17, [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"])], {"s": _f(6, seed=1), "b": _f(6, seed=2)}),
    ("group_norm_18_per_group", 18, [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, epsilon=1e-3)],
     {"s": _f(2, seed=1), "b": _f(2, seed=2)}),
    ("group_norm_21", 21, [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)],
     {"s": _f(4, seed=1), "b": _f(4, seed=2)}),
    ("pad_edge", 13, [helper.make_node("Pad", ["x", "p"], ["y"], mode="edge")], {"p": _i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    ("pad_const_value", 13, [helper.make_node("Pad", ["x", "p", "v"], ["y"])], {"p": _i64(0, 1, 0, 1, 0, 2, 1, 0),
                                                                               "v": np.array(1.5, np.float32)}),
    ("pad_negative", 13, [helper.make_node("Pad", ["x", "p"], ["y"])], {"p": _i64(0, 0, -1, 1, 0, 0, 1, -2)}),
    ("slice_steps", 13, [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
     {"s": _i64(1, 0), "e": _i64(5, 5), "a": _i64(1, 3), "st": _i64(2, 2)}),
    ("clip_max_only", 12, [helper.make_node("Clip", ["x", "", "hi"], ["y"])], {"hi": np.array(0.3, np.float32)}),
    ("clip_min_only", 13, [helper.make_node("Clip", ["x", "lo"], ["y"])], {"lo": np.array(-0.2, np.float32)}),
    ("relu6_clip", 13, [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}),
    ("variadic", 17, [helper.make_node("Max", ["x", "c"], ["a"]), helper.make_node("Min", ["a", "x", "c"], ["b"]),
                      helper.make_node("Sum", ["a", "b", "x"], ["d"]), helper.make_node("Mean", ["d", "c"], ["y"])], {"c": _f(6)}),
    ("unary_chain", 17, [helper.make_node(op, ins, [out]) for op, ins, out in [
        ("Abs", ["x"], "a"), ("Neg", ["a"], "b"), ("Exp", ["b"], "c"), ("Erf", ["c"], "d"), ("Sin", ["d"], "e"),
        ("Floor", ["x"], "f"), ("Add", ["e", "f"], "g"), ("Sqrt", ["c"], "h"), ("Mul", ["g", "h"], "y")]], {}),
    ("pow_div_sub", 17, [helper.make_node("Pow", ["x", "two"], ["a"]), helper.make_node("Div", ["a", "c"], ["b"]),
                         helper.make_node("Sub", ["c", "b"], ["y"])], {"two": np.array(2.0, np.float32), "c": _f(6) + 3}),
    ("maxpool_ceil_dilation", 17, [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                                                    dilations=[2, 1], ceil_mode=1)], {}),
    ("avgpool_include_pad", 17, [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 0],
                                                  count_include_pad=1)], {}),
    ("avgpool_exclude_pad", 17, [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], {}),
    ("matmul_dynamic", 17, [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["x", "t"], ["y"])], {}),
    ("where_less", 17, [helper.make_node("Less", ["x", "c"], ["m"]), helper.make_node("Where", ["m", "x", "c"], ["y"])], {"c": _f(6)}),
    ("expand", 17, [helper.make_node("Slice", ["x", "s", "e", "a"], ["t"]), helper.make_node("Expand", ["t", "sh"], ["y"])],
     {"s": _i64(0), "e": _i64(1), "a": _i64(1), "sh": _i64(1, 4, 1, 1)}),
    ("conv_grouped_asym", 17, [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, dilations=[2, 1], pads=[1, 0, 1, 2])],
     {"w": _f(6, 2, 2, 3), "b": _f(6)}),
    ("conv_same_lower", 17, [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])], {"w": _f(3, 4, 2, 2)}),
    ("conv_valid", 17, [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="VALID", strides=[1, 2])], {"w": _f(3, 4, 3, 3)}),
    ("split_uneven_concat", 13, [helper.make_node("Split", ["x", "sz"], ["a", "b"], axis=1), helper.make_node("Concat", ["b", "a"], ["y"], axis=1)],
     {"sz": _i64(1, 3)}),
    ("cast_roundtrip", 17, [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32), helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)], {}),
    ("gemm_trans_a", 18, [helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=0), helper.make_node("Transpose", ["m"], ["mt"]),
                          helper.make_node("Gemm", ["mt", "w", "c"], ["y"], transA=1, alpha=0.3, beta=0.7)],
     {"ax": _i64(2, 3), "w": _f(4, 3), "c": _f(3)}),
    ("gemm_no_bias_beta0", 18, [helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=0),
                                helper.make_node("Gemm", ["m", "w", "c"], ["y"], transB=1, beta=0.0)],
     {"ax": _i64(2, 3), "w": _f(3, 4), "c": _f(3)}),
    ("size_shape_slice", 17, [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("ReduceProd", ["s"], ["p"], keepdims=1),
                              helper.make_node("Size", ["x"], ["n"]), helper.make_node("Div", ["n", "p"], ["b"]),
                              helper.make_node("Concat", ["b", "m1"], ["shp"], axis=0), helper.make_node("Reshape", ["x", "shp"], ["y"])],
     {"m1": _i64(-1)}),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_table(case):
    _, opset, nodes, inits = case
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[_init(k, v) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    gm = onnx_to_torch(model)
    assert_parity(gm, model, (4, 5, 6), batches=(2, 3))


def test_torch_pruning_sees_the_layers():
    """Real Conv/BN/Linear submodules let torch-pruning shrink a converted BN-preserved residual net."""
    import torch_pruning as tp

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

        def forward(self, x):
            x = self.stem(x)
            return self.head(F.relu(self.body(x) + x))

    gm = onnx_to_torch(export(randomize_bn(Res()), SMALL, 17, preserve_bn=True))
    fc = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MagnitudePruner(gm, torch.randn(1, *SMALL), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=fc)
    pruner.step()
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 8]
    assert all(bn.num_features == 8 for _, bn in batchnorm_layers(gm))
    assert gm(torch.randn(2, *SMALL)).shape == (2, 5)


def test_unproduced_optional_output_is_a_clear_error():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"), helper.make_node("Cast", ["mask"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(UserError, match="'mask' of ONNX node 'drop' \\(Dropout\\)"):
        onnx_to_torch(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_qdq_int8_model_from_onnxruntime_quantization_matches_onnxruntime(tmp_path):
    """INT8 QDQ files (what `dfcompress quantize` writes) convert too, simulating the integer maths."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 8, 8), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    gm = onnx_to_torch(int8)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    ours = gm(torch.from_numpy(x)).detach().numpy()
    ref = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(ours - ref).max() < 1e-4


# ---------------------------------------------------------------- attention / token models (issue 15)

from token_models import SHAPE as TOKEN_SHAPE, TinyViT, onnx_bytes  # noqa: E402


class _MHA(nn.Module):
    """nn.MultiheadAttention on patch tokens: exportable at opset 13 (no SDPA), emits Mod for the head split."""

    def __init__(self):
        super().__init__()
        self.patch, self.attn, self.head = nn.Conv2d(3, 16, 4, 4), nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(t, t, t)[0].mean(1))


class _SDPA(nn.Module):
    """F.scaled_dot_product_attention with a causal mask and tanh-GELU."""

    def __init__(self):
        super().__init__()
        self.patch, self.qkv, self.head = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 48), nn.Linear(16, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c)
        return self.head(F.gelu(y, approximate="tanh").mean(1))


_TOKEN_NETS = {"vit_prenorm_gelu": lambda: TinyViT(), "vit_postnorm_relu": lambda: TinyViT(norm_first=False, activation="relu"),
               "mha": _MHA, "sdpa": _SDPA}
_TOKEN_CACHE: dict = {}


def _token_net(name: str) -> nn.Module:
    if name not in _TOKEN_CACHE:
        torch.manual_seed(3)
        _TOKEN_CACHE[name] = _TOKEN_NETS[name]().eval()
    return _TOKEN_CACHE[name]


# TransformerEncoderLayer and SDPA need opset 14 (aten::scaled_dot_product_attention); 17 adds LayerNormalization,
# 20 the Gelu op (Erf / tanh forms before)
@pytest.mark.parametrize("name,opset", [("vit_prenorm_gelu", o) for o in (14, 17, 18, 20, 21)]
                         + [("vit_postnorm_relu", 17), ("mha", 13), ("mha", 18), ("sdpa", 14), ("sdpa", 20)])
def test_attention_exports_match_onnxruntime(name, opset):
    data = onnx_bytes(_token_net(name), opset)
    ops = set(op_types(data))
    assert "Mod" in ops or name == "sdpa"  # the op that used to be refused
    gm = onnx_to_torch(data)
    assert_parity(gm, data, TOKEN_SHAPE, batches=(1, 3))
    assert_grad_flows(gm, TOKEN_SHAPE)
    if name.startswith("vit") and opset >= 17:
        assert sum(isinstance(m, nn.LayerNorm) for m in gm.modules()) == 5


def token_ops_graph(opset: int) -> onnx.ModelProto:
    """Mod (integer, both signs; fmod on floats), Trilu (both triangles, k), LessOrEqual/GreaterOrEqual, Where."""
    inits = [_init("three", np.array(3, np.int64)), _init("neg3", np.array(-3, np.int64)), _init("one", np.array(1, np.int64)),
             _init("d", np.array(0.7, np.float32)), _init("k1", np.array(1, np.int64)), _init("km1", np.array(-1, np.int64)),
             _init("lim", np.array(0.2, np.float32))]
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "one"], ["rows"], axis=0),     # 5
        helper.make_node("Neg", ["rows"], ["neg_rows"]),
        helper.make_node("Mod", ["neg_rows", "three"], ["m1"]),           # -5 mod 3 = 1 (sign of the divisor)
        helper.make_node("Mod", ["rows", "neg3"], ["m2"]),                # 5 mod -3 = -1
        helper.make_node("Add", ["m1", "m2"], ["m12"]),
        helper.make_node("Cast", ["m12"], ["m12f"], to=TensorProto.FLOAT),
        helper.make_node("Mod", ["x", "d"], ["fm"], fmod=1),             # C fmod: sign of the dividend
        helper.make_node("Trilu", ["fm", "k1"], ["up"], upper=1),
        helper.make_node("Trilu", ["x", "km1"], ["low"], upper=0),
        helper.make_node("LessOrEqual", ["x", "lim"], ["le"]),
        helper.make_node("GreaterOrEqual", ["x", "lim"], ["ge"]),
        helper.make_node("Where", ["le", "up", "low"], ["w1"]),
        helper.make_node("Cast", ["ge"], ["gef"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["w1", "gef"], ["w2"]),
        helper.make_node("Add", ["w2", "m12f"], ["y"]),
    ]
    return _graph_model(nodes, inits, opset, ["N", 5, 6], {"y": ["N", 5, 6]})


@pytest.mark.parametrize("opset", [14, 21])
def test_hand_built_token_ops_graph(opset):
    model = token_ops_graph(opset)
    gm = onnx_to_torch(model)
    assert_parity(gm, model, (5, 6), batches=(1, 4))
