"""Files written by the *dynamo* ONNX exporter convert to torch with onnxruntime's numbers.

The exporter needs onnxscript (not a dependency) and is slow, so its output is checked in under
tests/data/dynamo/ (regenerate with make_fixtures.py there): TinyViT and TinyConvNeXt of
token_models.py, nn.MultiheadAttention (batch-first and not, key-padding and attention masks),
F.scaled_dot_product_attention (plain, causal, float bias) and GELU (erf and tanh forms), each at the
opsets the exporter produces within 13-21. The end-to-end CLI path over the dynamo ViT and ConvNeXt
is the "dynamo-onnx" format of test_token_models.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from dfcompress.models.onnx_import import onnx_to_torch

from test_onnx_import import assert_parity

pytestmark = pytest.mark.usefixtures("single_thread")
DYNAMO = Path(__file__).parent / "data" / "dynamo"
MANIFEST = json.loads((DYNAMO / "manifest.json").read_text())
FIXTURES = MANIFEST["fixtures"]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_dynamo_export_matches_onnxruntime(name):
    entry = FIXTURES[name]
    model = onnx.load(str(DYNAMO / f"{name}.onnx"))
    gm = onnx_to_torch(model)
    assert gm.meta["onnx"]["opset"] == entry["opset"]
    assert gm.meta["onnx"]["inputs"][0]["shape"][0] is None  # the batch stays dynamic
    assert_parity(gm, model, tuple(entry["shape"]), batches=(1, 3))


def test_fixtures_are_what_the_manifest_says():
    """Every checked-in file is listed, unchanged since generation, and the set spans opsets 18 and 21."""
    assert sorted(p.stem for p in DYNAMO.glob("*.onnx")) == sorted(FIXTURES)
    total = 0
    for name, entry in FIXTURES.items():
        data = (DYNAMO / f"{name}.onnx").read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name}: regenerate the manifest"
        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        assert props["dfcompress.fixture.call"] == entry["call"] and "dynamo=True" in entry["call"]
    for module in {e["module"] for e in FIXTURES.values()}:
        assert {18, 21} <= {e["opset"] for e in FIXTURES.values() if e["module"] == module}, module
    assert total < 1_000_000


def test_dynamo_vit_layers_are_named_after_the_torch_modules():
    """The exporter's module scopes name the converted layers (TorchScript-export-like), not 'node_layer_norm_3';
    a version-converted file without that metadata falls back to the node names."""
    names = {n for n, _ in onnx_to_torch(DYNAMO / "vit_op18.onnx").named_children()}
    assert {"patch_Conv", "blocks_0_norm1_LayerNormalization", "blocks_1_linear2_MatMul", "head_Gemm"} <= names
    assert "node_layer_norm" in {n for n, _ in onnx_to_torch(DYNAMO / "vit_op17.onnx").named_children()}
