"""What calibration data buys in post-training INT8 quantization: random vs synthetic vs real.

When no data is given, the usual PTQ tools calibrate on random inputs (NVIDIA ModelOpt's ONNX PTQ falls
back to random data; Olive's and Intel Neural Compressor's dummy readers are random too). This bench
quantizes the CIFAR-10 ResNet-20 and ResNet-56 ONNX teachers (ORT static QDQ, INT8 weights and
activations) calibrated on the same number N of images from each source:

  a gaussian   N(0,1) tensors fed directly as the (normalised) model input - what random readers do
  b uniform    uniform random pixels 0..255, normalised like real images
  c ni         NaturalInversion on the state_dict teacher (BN statistics), a short run
  d ni-cc      NaturalInversion on the BN-folded ONNX teacher with class-conditional statistics from
               10 real seed images per class (train images 0..9 of each class)
  e real       real CIFAR-10 train images (per-class ranks 10.., disjoint from the seeds)

under per-channel and per-tensor weights and ORT's MinMax, Entropy and Percentile calibrators, then
reports top-1 on the real test sets and the drop against fp32. ``--act-bits 16/4`` repeats the grid
with other activation widths (where INT8 does not separate the sources).

    taskset -c 0 nice -n 10 .venv/bin/python bench/calibration.py --jpeg-limit 2000   # ~25 min on 1 core

Writes ``bench/results/calibration.json`` and ``.md`` (after each model, so a partial run keeps its rows);
work files under ``runs/bench-calibration/``. Not a test.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = {"resnet20": ("teachers/original/resnet20-12fca82f.th", "teachers/cifar10_resnet20_akamaster.onnx"),
          "resnet56": (common.RESNET56_TH, common.RESNET56_ONNX)}
SOURCES = {"a": "gaussian", "b": "uniform", "c": "ni", "d": "ni-cc", "e": "real"}
METHODS = ("minmax", "entropy", "percentile")
SEEDS_PER_CLASS = 10


class ArrayReader:
    """Calibration reader over a fixed float32 array of model inputs, in batches of 16."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 16):
        self.name, self.x, self.batch, self.pos = name, x, batch, 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.pos >= len(self.x):
            return None
        out = {self.name: self.x[self.pos:self.pos + self.batch]}
        self.pos += self.batch
        return out

    def rewind(self) -> None:
        self.pos = 0


def synthesize_set(teacher, settings, out: Path, stats=None) -> torch.Tensor:
    """uint8 images of a (resumed) NI run in ``out``."""
    from dfcompress.data.synthetic import SyntheticSet
    from dfcompress.device import resolve_runtime
    from dfcompress.inversion.runner import synthesize

    synthesize(teacher, settings, out, resolve_runtime("cpu"), stats=stats)
    return SyntheticSet(out).tensors()[0]


def calibration_inputs(name: str, args, work: Path, timings: dict) -> dict[str, np.ndarray]:
    """Model inputs (normalised float32 NCHW) for each source, N images each."""
    from dfcompress.evaluate import to_input
    from dfcompress.models.loading import load_teacher
    from dfcompress.stats.collect import collect_stats

    th, onnx_file = MODELS[name]
    kw = {"mean": common.IMAGENET_MEAN, "std": common.IMAGENET_STD}
    torch_teacher = load_teacher(str(common.shared(th)), arch=name, **kw)
    onnx_teacher = load_teacher(str(common.shared(onnx_file)), **kw)
    n, g = args.n, torch.Generator().manual_seed(args.seed)
    shape = (n, *torch_teacher.input_shape)
    pixels: dict[str, torch.Tensor] = {"b": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)}
    settings = common.ni_settings(n, args.batch, args.iterations, args.seed)
    t0 = time.perf_counter()
    pixels["c"] = synthesize_set(torch_teacher, settings, work / name / "ni")
    timings["c"] = round(time.perf_counter() - t0, 1)
    seeds = common.load_train_jpegs(SEEDS_PER_CLASS, offset=0)
    stats = collect_stats(onnx_teacher, seeds["x"], labels=seeds["y"], per_class=True)
    t0 = time.perf_counter()
    pixels["d"] = synthesize_set(onnx_teacher, settings, work / name / "ni-cc", stats=stats)
    timings["d"] = round(time.perf_counter() - t0, 1)
    real = common.load_train_jpegs(-(-n // 10), offset=SEEDS_PER_CLASS)
    pixels["e"] = real["x"][:n]
    inputs = {k: to_input(v, onnx_teacher).numpy().astype(np.float32) for k, v in pixels.items()}
    inputs["a"] = torch.randn(shape, generator=g).numpy()
    return {k: inputs[k] for k in SOURCES}


def run_model(name: str, args, evaluator, work: Path) -> dict[str, Any]:
    from dfcompress.compress.quantize import Preprocessing, _preprocess, static_qdq

    _, onnx_file = MODELS[name]
    fp32 = common.shared(onnx_file)
    like = Preprocessing((3, 32, 32), 10, common.IMAGENET_MEAN, common.IMAGENET_STD)
    timings: dict[str, float] = {}
    inputs = calibration_inputs(name, args, work, timings)
    fp32_top1 = evaluator.top1(evaluator.onnx(fp32, like))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-calib-") as tmp:
        pre = _preprocess(fp32, Path(tmp) / "pre.onnx")
        for bits in args.act_bits:
            for per_channel in (True, False):
                for method in METHODS:
                    for key, src in SOURCES.items():
                        target = Path(tmp) / f"{key}.onnx"
                        t0 = time.perf_counter()
                        static_qdq(pre, target, ArrayReader("input", inputs[key]), per_channel=per_channel,
                                   calibrate_method=method, activation_bits=bits)
                        cal_s = time.perf_counter() - t0
                        top = evaluator.top1(evaluator.onnx(target, like, fuse=bits == 8))
                        row = {"model": name, "act_bits": bits, "weights": "per-channel" if per_channel else "per-tensor",
                               "method": method, "source": src, **{f"top1_{k}": v for k, v in top.items()},
                               **{f"drop_{k}": round(fp32_top1[k] - v, 2) for k, v in top.items()},
                               "calibrate_s": round(cal_s, 1)}
                        rows.append(row)
                        print(f"{name} a{bits} {row['weights']:11s} {method:10s} {src:8s} " +
                              " ".join(f"{k} {v:.2f} ({v - fp32_top1[k]:+.2f})" for k, v in top.items()), flush=True)
    return {"fp32_top1": fp32_top1, "rows": rows, "synthesis_s": timings}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = ["# Calibration sources for ORT static QDQ (INT8 weights)", "",
             f"Machine: {common.machine_line(result['machine'])}", "",
             f"N = {cfg['n']} calibration images per source; NI arms: batch {cfg['batch']}, {cfg['iterations']} iterations "
             f"(a short run); d uses {SEEDS_PER_CLASS} real seeds/class. Test sets: {result['eval_sizes']}. "
             "Cells: top-1 % (change vs fp32, pt) on the JPEG test images / exact 846. INT8 runs with ORT's fused integer "
             "kernels; 4/16-bit activations run the QDQ graph unfused (simulated quantization: ORT has no fused "
             "kernels for them).", ""]
    for name, res in result["models"].items():
        lines.append(f"## {name}: fp32 top-1 {res['fp32_top1']}")
        lines.append("")
        heads = ["act bits", "weights", "calibrator"] + list(SOURCES.values())
        table: dict[tuple, dict[str, str]] = {}
        for r in res["rows"]:
            cell = f"{r['top1_jpeg']:.2f} ({0.0 - r['drop_jpeg']:+.2f}) / {r['top1_exact846']:.2f}"
            table.setdefault((r["act_bits"], r["weights"], r["method"]), {})[r["source"]] = cell
        lines.append(common.md_table(heads, [[*k, *(v.get(s, "–") for s in SOURCES.values())] for k, v in table.items()]))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--jpeg-limit", type=int, default=None, help="evaluate on the first N JPEG test images (default all 10k)")
    ap.add_argument("--act-bits", default="8", help="comma list of activation widths: 8, 16, 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default="calibration", help="results file stem under bench/results/")
    args = ap.parse_args()
    args.act_bits = [int(b) for b in args.act_bits.split(",")]
    common.require(common.TEST_JPEG, common.TEST_EXACT, common.TRAIN_TAR)
    common.set_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import Evaluator

    evaluator = Evaluator(args.jpeg_limit, args.threads)
    work = common.REPO / "runs" / "bench-calibration"
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}, "machine": common.machine_info(),
                              "eval_sizes": evaluator.sizes(), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = run_model(name, args, evaluator, work)
        paths = common.write_results(args.stem, result, markdown(result))
        print(f"wrote {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
