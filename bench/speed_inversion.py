"""Speed of the inversion loops against the bare cost of the teacher passes they need.

For a CIFAR ResNet-56 teacher (akamaster's real weights when ../shared is present, else random) at
batch 64 and 256 this measures:

* NaturalInversion ms/iteration, and the bare teacher cost of its two passes in the same process
  (one no-grad forward + one forward/backward to the input on the same batch), and their ratio;
* DeepInversion ms/iteration against one bare forward/backward, and their ratio;
* peak RSS (and peak CUDA memory on a GPU);
* one torch.profiler run of NaturalInversion, broken down by its named ranges (``ni/...``) plus the
  top operators, to see where the time goes.

Timings are the best of the timed iterations; on CPU they are process CPU time, so a busy shared
machine does not inflate them (run with OMP_NUM_THREADS=1 there: spinning intra-op threads on
oversubscribed cores cost up to 10x). Prints a table and writes
``bench/results/speed_inversion-<device>.json``.

Findings (CPU, ResNet-56, batch 64): per iteration the generator's forward costs about one teacher
forward and its backward about as much as the teacher's backward-to-input, so NaturalInversion is ~2x
the bare teacher passes it needs; the statistics term is ~2% after its fused moments/backward
(it was ~15% with autograd's ``var_mean``), the pyramid ~1%, and fused Adam keeps the generator's 8M
weight update small.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speed_inversion.py --threads 1 [--device cpu] [--batches 64 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dfcompress.device import Runtime, resolve_runtime  # noqa: E402
from dfcompress.fileio import atomic_write_json  # noqa: E402
from dfcompress.inversion.synthesizers import build_synthesizer  # noqa: E402
from dfcompress.models.teacher import Teacher  # noqa: E402
from dfcompress.models.zoo import create_model  # noqa: E402
from dfcompress.settings import SynthesizeSettings  # noqa: E402

SHARED = Path(os.environ.get("DFCOMPRESS_SHARED", REPO.parent / "shared")) / "data"
WEIGHTS = SHARED / "teachers" / "original" / "resnet56-4bfd9763.th"
RESULTS = REPO / "bench" / "results"


def load_teacher() -> tuple[Teacher, str]:
    """ResNet-56 with the real CIFAR-10 weights if available (the timing does not depend on them)."""
    model = create_model("resnet56", num_classes=10, in_channels=3, input_size=32)
    origin = "random init"
    if WEIGHTS.is_file():
        state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        origin = str(WEIGHTS)
    teacher = Teacher(model.eval(), (3, 32, 32), 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                      "state_dict", origin, "bench", arch="resnet56")
    return teacher, origin


def _sync(rt: Runtime) -> None:
    if rt.is_cuda:
        torch.cuda.synchronize(rt.device)


def _clock(rt: Runtime):
    """Wall time on a GPU; on CPU the process's CPU time, which a busy shared machine cannot inflate by
    descheduling us (with several intra-op threads it sums their work)."""
    return time.perf_counter if rt.is_cuda else time.process_time


def _summary(times_ms: list[float]) -> dict[str, float]:
    return {"min": min(times_ms), "median": statistics.median(times_ms)}


def bare_teacher_ms(teacher: Teacher, rt: Runtime, batch: int, warmup: int, iters: int) -> dict[str, dict[str, float]]:
    """ms (min and median) of one no-grad forward and of one forward/backward to the input (weights frozen, as in synthesis)."""
    model = rt.prepare(teacher.module).eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x = rt.tensor(torch.randn(batch, *teacher.input_shape, generator=torch.Generator().manual_seed(0)))
    y = torch.arange(batch, device=rt.device) % teacher.num_classes

    def fwd() -> None:
        with torch.no_grad(), rt.autocast():
            model(x)

    def fwd_bwd() -> None:
        xi = x.detach().requires_grad_(True)
        with rt.autocast():
            out = model(xi)
        torch.nn.functional.cross_entropy(out.float(), y).backward()

    out = {}
    try:
        for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
            for _ in range(warmup):
                fn()
            times, clock = [], _clock(rt)
            for _ in range(iters):
                _sync(rt)
                t0 = clock()
                fn()
                _sync(rt)
                times.append((clock() - t0) * 1e3)
            out[name] = _summary(times)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return out


def method_ms(teacher: Teacher, rt: Runtime, method: str, batch: int, warmup: int, iters: int) -> dict[str, float]:
    """ms per iteration (min and median) after ``warmup`` iterations, from the synthesizer's per-step callback.

    Not means: on a shared machine one disturbed iteration would dominate a mean.
    """
    settings = SynthesizeSettings(method=method, batch_size=batch, iterations=warmup + iters + 1)
    synth = build_synthesizer(teacher, settings, rt)
    stamps: list[float] = []
    clock = _clock(rt)
    synth.synthesize_batch(torch.arange(batch) % teacher.num_classes, seed=0, on_step=lambda it, comp: stamps.append(clock()))
    # the callback runs once per iteration after a host sync, so consecutive stamps are one iteration apart
    timed = stamps[warmup:warmup + iters + 1]
    return _summary([(b - a) * 1e3 for a, b in zip(timed, timed[1:])])


def profile_naturalinversion(teacher: Teacher, rt: Runtime, batch: int, iterations: int) -> dict:
    """Per-range and top-operator breakdown of NaturalInversion iterations (after one untimed batch)."""
    from torch.profiler import ProfilerActivity, profile

    settings = SynthesizeSettings(batch_size=batch, iterations=iterations)
    synth = build_synthesizer(teacher, settings, rt)
    labels = torch.arange(batch) % teacher.num_classes
    synth.synthesize_batch(labels, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.is_cuda else [])
    with profile(activities=activities) as prof:
        synth.synthesize_batch(labels, seed=0)
    events = prof.key_averages()
    use_cuda = rt.is_cuda

    def total_ms(e) -> float:
        t = getattr(e, "device_time_total", 0.0) if use_cuda else e.cpu_time_total
        return t / 1e3 / iterations

    def self_ms(e) -> float:
        t = getattr(e, "self_device_time_total", 0.0) if use_cuda else e.self_cpu_time_total
        return t / 1e3 / iterations

    ranges = {e.key: round(total_ms(e), 2) for e in events if e.key.startswith("ni/")}
    ops = sorted((e for e in events if not e.key.startswith("ni/") and not e.key.startswith("ProfilerStep")),
                 key=self_ms, reverse=True)[:12]
    return {"batch": batch, "iterations": iterations, "clock": "cuda" if use_cuda else "cpu",
            "ranges_ms_per_iteration": ranges,
            "top_ops_self_ms_per_iteration": {e.key: round(self_ms(e), 2) for e in ops}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5 on GPU, 2 on CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 on GPU, 4 on CPU)")
    ap.add_argument("--profile-batch", type=int, default=64)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (use 1 on a busy shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = resolve_runtime(args.device)
    warmup = args.warmup if args.warmup is not None else (5 if rt.is_cuda else 2)
    iters = args.iters if args.iters is not None else (10 if rt.is_cuda else 4)
    teacher, origin = load_teacher()
    rows = []
    for batch in args.batches:
        bare = bare_teacher_ms(teacher, rt, batch, warmup, iters)
        ni = method_ms(teacher, rt, "naturalinversion", batch, warmup, iters)
        di = method_ms(teacher, rt, "deepinversion", batch, warmup, iters)
        ni_bare = bare["forward"]["min"] + bare["forward_backward"]["min"]
        rows.append({
            "batch": batch,
            "teacher_forward_ms": round(bare["forward"]["min"], 2),
            "teacher_forward_backward_ms": round(bare["forward_backward"]["min"], 2),
            "naturalinversion_ms_per_iter": round(ni["min"], 2),
            "naturalinversion_bare_ms": round(ni_bare, 2),
            "naturalinversion_ratio": round(ni["min"] / ni_bare, 3),
            "deepinversion_ms_per_iter": round(di["min"], 2),
            "deepinversion_bare_ms": round(bare["forward_backward"]["min"], 2),
            "deepinversion_ratio": round(di["min"] / bare["forward_backward"]["min"], 3),
            "medians": {"teacher_forward_ms": round(bare["forward"]["median"], 2),
                        "teacher_forward_backward_ms": round(bare["forward_backward"]["median"], 2),
                        "naturalinversion_ms_per_iter": round(ni["median"], 2),
                        "deepinversion_ms_per_iter": round(di["median"], 2)},
        })
    prof = None if args.no_profile else profile_naturalinversion(teacher, rt, args.profile_batch, 3)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "teacher": "resnet56", "weights": origin, "device": str(rt.device), "amp_dtype": str(rt.amp_dtype),
        "channels_last": rt.channels_last, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "host": platform.node(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "clock": "wall" if rt.is_cuda else "process CPU time", "statistic": "min over timed iterations (medians in rows[].medians)",
        "warmup": warmup, "timed_iterations": iters, "rows": rows, "peak_rss_mib": round(peak_rss_mib, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if rt.is_cuda else None,
        "profile": prof,
    }
    header = f"{'batch':>5} {'T fwd':>8} {'T f+b':>8} {'NI ms/it':>9} {'NI bare':>8} {'NI x':>6} {'DI ms/it':>9} {'DI x':>6}"
    print(f"resnet56 ({origin}) on {rt.device}, amp={rt.amp_dtype}, {torch.get_num_threads()} threads, "
          f"{warmup} warm + {iters} timed iterations, best of {iters} in {'wall' if rt.is_cuda else 'CPU'} time")
    print(header)
    for r in rows:
        print(f"{r['batch']:>5} {r['teacher_forward_ms']:>8.1f} {r['teacher_forward_backward_ms']:>8.1f} "
              f"{r['naturalinversion_ms_per_iter']:>9.1f} {r['naturalinversion_bare_ms']:>8.1f} {r['naturalinversion_ratio']:>6.2f} "
              f"{r['deepinversion_ms_per_iter']:>9.1f} {r['deepinversion_ratio']:>6.2f}")
    print(f"peak RSS {peak_rss_mib:.0f} MiB" + (f", peak CUDA {result['peak_cuda_mib']:.0f} MiB" if rt.is_cuda else ""))
    if prof:
        print(f"NaturalInversion profile (batch {prof['batch']}, ms per iteration, {prof['clock']} time):")
        for k, v in sorted(prof["ranges_ms_per_iteration"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:<20} {v:>9.1f}")
        print("  top operators (self time):")
        for k, v in prof["top_ops_self_ms_per_iteration"].items():
            print(f"    {k:<45} {v:>9.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"speed_inversion-{rt.device.type}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
