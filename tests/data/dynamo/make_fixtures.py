"""Regenerate the ONNX fixtures of this folder with the real *dynamo* ONNX exporter.

Why checked-in files: ``torch.onnx.export(..., dynamo=True)`` needs ``onnxscript`` (not a dfcompress
dependency, absent in CI) and is slow (seconds per tiny module, much more for the first export of a
process or a bigger model), so the tests read what it wrote here.

Run (needs ``pip install onnxscript``; about two minutes on one core)::

    PYTHONPATH=. python tests/data/dynamo/make_fixtures.py [NAME ...]

Deterministic: every module is built after ``torch.manual_seed(SEED)`` and exported with a fixed
example input. Each file is written atomically (temp file + ``os.replace``); its ``metadata_props``
and ``manifest.json`` record the torch/onnxscript versions, the requested and the actual opset and
the generating call; only the per-node Python stack traces are dropped (size, local paths).

The exporter implements opset 18 and later; below that it exports at 18 and down-converts with the
onnx C API, which fails for some graphs (it then keeps 18: such a file is not written, and the
manifest lists it under "refused"). Observed with torch 2.13 / onnxscript 0.7.2, lowest opset
reached: ViT 17 (no LayerNormalization before 17), ConvNeXt 18 (ReduceMean axes adapter fails),
MultiheadAttention 16, scaled_dot_product_attention 15, GELU erf 14, GELU tanh 15; 13 for none.
Each module is exported at that lowest opset, at 18 and 21 (and 20, the exporter's default, for the
ViT/ConvNeXt/GELU), and once at the highest refused opset so the manifest records the refusal.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: token_models
from token_models import SHAPE, TinyConvNeXt, TinyViT  # noqa: E402

SEED = 0
TOKENS, DIM, HEADS = 5, 8, 2
SEQ = (TOKENS, DIM)
MANIFEST = HERE / "manifest.json"


class MHA(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` on ``[N, T, D]`` input, optionally masked.

    The masks are computed from constants or the input inside the graph, so the model keeps one
    (batch-dynamic) input; the first key is never padded, so no row is fully masked (NaN).
    """

    def __init__(self, batch_first: bool = True, key_padding: bool = False, attn_mask: bool = False):
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first)
        self.batch_first, self.key_padding = batch_first, key_padding
        band = torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(2) | torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril(-2)
        self.register_buffer("mask", band if attn_mask else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kpm = None
        if self.key_padding:
            kpm = x[..., 0] > 0.5
            kpm = torch.cat([torch.zeros_like(kpm[:, :1]), kpm[:, 1:]], dim=1)
        q = x if self.batch_first else x.transpose(0, 1)
        y = self.mha(q, q, q, key_padding_mask=kpm, attn_mask=self.mask, need_weights=False)[0]
        return y if self.batch_first else y.transpose(0, 1)


class SDPA(nn.Module):
    """Multi-head ``F.scaled_dot_product_attention`` on ``[N, T, D]``, causal or with a float bias mask."""

    def __init__(self, causal: bool = False, bias: bool = False):
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.causal = causal
        self.register_buffer("bias", torch.randn(TOKENS, TOKENS) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class GeluMLP(nn.Module):
    """Linear -> GELU (exact erf or tanh approximation) -> Linear."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM), approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


@dataclass(frozen=True)
class Spec:
    """One module to export: how to build it, its per-sample input shape, the opsets asked for."""

    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    opsets: tuple[int, ...] = (18, 21)
    source: str = ""


SPECS: dict[str, Spec] = {
    "vit": Spec(TinyViT, SHAPE, (16, 17, 18, 20, 21), "token_models.TinyViT()"),
    "cnx": Spec(TinyConvNeXt, SHAPE, (17, 18, 20, 21), "token_models.TinyConvNeXt()"),
    "mha_bf": Spec(lambda: MHA(batch_first=True), SEQ, (15, 16, 18, 21), source="MHA(batch_first=True)"),
    "mha_sf": Spec(lambda: MHA(batch_first=False), SEQ, (15, 16, 18, 21), source="MHA(batch_first=False)"),
    "mha_kpm": Spec(lambda: MHA(key_padding=True), SEQ, (15, 16, 18, 21), source="MHA(key_padding=True)"),
    "mha_mask": Spec(lambda: MHA(batch_first=False, attn_mask=True), SEQ, (15, 16, 18, 21),
                     source="MHA(batch_first=False, attn_mask=True)"),
    "sdpa": Spec(SDPA, SEQ, (14, 15, 18, 21), source="SDPA()"),
    "sdpa_causal": Spec(lambda: SDPA(causal=True), SEQ, (14, 15, 18, 21), source="SDPA(causal=True)"),
    "sdpa_bias": Spec(lambda: SDPA(bias=True), SEQ, (14, 15, 18, 21), source="SDPA(bias=True)"),
    "gelu_erf": Spec(GeluMLP, SEQ, (13, 14, 18, 20, 21), "GeluMLP('none')"),
    "gelu_tanh": Spec(lambda: GeluMLP("tanh"), SEQ, (14, 15, 18, 20, 21), "GeluMLP('tanh')"),
}


def export(spec: Spec, opset: int):
    """The dynamo exporter's ModelProto for ``spec`` at ``opset`` (batch dimension dynamic), and the largest
    difference between onnxruntime and the eager module on a batch of 3: the file really is the module."""
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(SEED)
    model = spec.make().eval()
    x = torch.randn(2, *spec.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["x"],
                                    output_names=["y"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    check = torch.randn(3, *spec.shape)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diff = float(np.abs(sess.run(None, {"x": check.numpy()})[0] - model(check).numpy()).max())
    if not diff < 1e-4:
        raise SystemExit(f"onnxruntime disagrees with the eager module at opset {opset}: max |diff| {diff}")
    return proto, diff


def strip_stack_traces(proto) -> None:
    """Drop the per-node Python stack traces: a third of the bytes, and they hold this machine's paths."""
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def main(names: list[str]) -> None:
    import onnx
    import onnxscript

    old = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    entries, refused = old.get("fixtures", {}), old.get("refused", {})
    versions = {"torch": torch.__version__, "onnxscript": onnxscript.__version__, "onnx": onnx.__version__}
    for name in names or list(SPECS):
        spec = SPECS[name]
        for requested in spec.opsets:
            start = time.perf_counter()
            proto, diff = export(spec, requested)
            opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
            stem = f"{name}_op{requested}"
            call = (f"torch.manual_seed({SEED}); torch.onnx.export({spec.source or spec.make.__name__}.eval(), "
                    f"(torch.randn(2, *{spec.shape}),), dynamo=True, opset_version={requested}, input_names=['x'], "
                    "output_names=['y'], dynamic_shapes={'x': {0: Dim('batch')}})")
            if opset != requested:
                print(f"skip {stem}: asked for opset {requested}, the exporter kept {opset}")
                entries.pop(stem, None)
                refused[stem] = f"asked for opset {requested}, the dynamo exporter's down-conversion failed; kept {opset}"
                continue
            strip_stack_traces(proto)
            meta = {"dfcompress.fixture.call": call, **{f"dfcompress.fixture.{k}": v for k, v in versions.items()}}
            onnx.helper.set_model_props(proto, meta)
            data = proto.SerializeToString()
            write_atomic(HERE / f"{stem}.onnx", data)
            refused.pop(stem, None)
            entries[stem] = {"module": name, "shape": list(spec.shape), "requested_opset": requested, "opset": opset,
                             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "ort_vs_eager_max_abs": diff,
                             "call": call, **versions}
            print(f"wrote {stem}.onnx  opset {opset}  {len(data)} bytes  "
                  f"{len(proto.graph.node)} nodes  {time.perf_counter() - start:.1f}s", flush=True)
    manifest = {"generator": "tests/data/dynamo/make_fixtures.py", "refused": dict(sorted(refused.items())),
                "fixtures": dict(sorted(entries.items()))}
    write_atomic(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    print(f"wrote {MANIFEST.name}: {len(entries)} fixtures, {sum(e['bytes'] for e in entries.values())} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
