"""Quality of data-free distillation on real CIFAR-10: which synthetic set makes the best ResNet-20 student?

Teacher: the real CIFAR-10 ResNet-56 (akamaster weights, ImageNet mean/std), loaded from its state_dict
(BN statistics available) and from its BN-folded ONNX export (no BN statistics). Student: ResNet-20 (CIFAR),
freshly initialised from the same seed for every arm and trained with identical KD settings.

Arms (same number of images N; the inversion arms also the same teacher-pass budget, iterations × batches):

  a noise       Gaussian noise images (N(0,1) in the teacher's input space, clamped to valid pixels),
                labels from the teacher
  b deepinversion      DeepInversion on the state_dict teacher (BN statistics)
  c naturalinversion   NaturalInversion on the state_dict teacher (BN statistics)
  d ni-onnx-cc  NaturalInversion on the BN-folded ONNX teacher with class-conditional statistics from
                10 real seed images per class (train set; scenario B); KD from the ONNX teacher too
  e cmi         Contrastive Model Inversion on the state_dict teacher
  f real        upper reference: KD on N real CIFAR-10 train images (JPEG tarball, the first N/10 of each class)
  g fast-ni     fast NaturalInversion (meta-learned generator, K = --fast-k inner steps per batch) on the
                state_dict teacher, making as many images as the teacher passes of (c) buy: N x iterations / K
  h fast-ni-onnx-cc   the same on the BN-folded ONNX teacher with the class-conditional seed statistics of (d)
  i real-fast-n       KD on as many real train images as (g) makes (its upper reference)

Teacher passes are counted in image-passes: one image through the teacher forward = 1, forward and
backward to the input = 3 (the backward costs about twice the forward). Per image and iteration: NI and
fast NI 4 (a no-grad feature pass + the loss pass), DeepInversion 3, CMI 6 (two views); plus 1 per
stored image for the teacher's logits. ``--curve`` also distils on prefixes of (g)'s and (h)'s sets (their first
1/12, 1/4, 1/2: the set is made in order, so a prefix is what a smaller run makes) to put student top-1
against teacher passes.

For every arm: student top-1 on the 10k JPEG test set and on the exact 846-image subset, agreement
with the teacher, synthesis seconds and KD seconds; teacher top-1 on both sets is measured too.

    .venv/bin/python bench/quality.py --budget tiny            # smoke, a few minutes
    .venv/bin/python bench/quality.py --budget small           # all arms, about an hour on 2 CPU cores
    .venv/bin/python bench/quality.py --budget paper --device cuda   # the NaturalInversion paper protocol
    .venv/bin/python bench/quality.py --budget small --plan    # time a few steps, print the projected run time

Writes ``bench/results/quality-<budget>.json`` and ``.md``; work files under ``runs/bench-quality-<budget>/``
(``--resume`` keeps finished arms of an interrupted run). Not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

import torch  # noqa: E402
import yaml  # noqa: E402

ARMS = {
    "a": ("noise", "Gaussian noise, teacher labels"),
    "b": ("deepinversion", "DeepInversion (BN stats)"),
    "c": ("naturalinversion", "NaturalInversion (BN stats)"),
    "d": ("ni-onnx-cc", "NaturalInversion, BN-folded ONNX + class-cond. stats (10 seeds/class)"),
    "e": ("cmi", "CMI (BN stats)"),
    "f": ("real", "real CIFAR-10 train images (upper reference)"),
    "g": ("fast-ni", "fast NaturalInversion (BN stats), teacher passes of (c)"),
    "h": ("fast-ni-onnx-cc", "fast NI, BN-folded ONNX + class-cond. stats, teacher passes of (d)"),
    "i": ("real-fast-n", "real CIFAR-10 train images, as many as (g)"),
}
METHOD = {"b": "deepinversion", "c": "naturalinversion", "d": "naturalinversion", "e": "cmi", "g": "fast-ni", "h": "fast-ni"}
# teacher passes per iteration (what "the same teacher-pass budget" buys each method)
PASSES = {"b": "1 fwd/bwd", "c": "1 fwd + 1 fwd/bwd", "d": "1 fwd + 1 fwd/bwd", "e": "2 fwd/bwd", "g": "1 fwd + 1 fwd/bwd",
          "h": "1 fwd + 1 fwd/bwd"}
# the same in image-passes (forward = 1, forward + backward to the input = 3)
IMAGE_PASSES = {"b": 3, "c": 4, "d": 4, "e": 6, "g": 4, "h": 4}
FAST_ARMS = ("g", "h", "i")
SEEDED_STATS_ARMS = ("d", "h")
CURVE_FRACTIONS = (1 / 12, 1 / 4, 1 / 2)

# N, synthesis batch and iterations, KD epochs/batch/lr, evaluation subset; the rest comes from profile cifar10
BUDGETS: dict[str, dict[str, Any]] = {
    # plumbing only: every arm end to end in a few minutes on a busy 2-core CPU (figures mean nothing)
    "tiny": {"n": 64, "batch": 32, "iterations": 8, "kd_epochs": 4, "kd_batch": 32, "kd_lr": 0.05, "eval_limit": 1000,
             "device": "cpu"},
    # all arms in <= 60 min on an idle 2-core CPU (see RESULTS.md for the arithmetic from measured costs)
    "small": {"n": 256, "batch": 128, "iterations": 120, "kd_epochs": 30, "kd_batch": 64, "kd_lr": 0.05, "eval_limit": None,
              "device": "cpu"},
    # NaturalInversion paper, CIFAR-10 (profile cifar10): 50k images, batch 256, 2k iterations; KD 200 epochs (GPU)
    "paper": {"n": 50000, "batch": 256, "iterations": 2000, "kd_epochs": 200, "kd_batch": 128, "kd_lr": 0.05,
              "eval_limit": None, "device": "auto"},
}
SEEDS_PER_CLASS = 10
STUDENT = "resnet20"


# ----------------------------------------------------------------------------------------------
# setup


def parse_arms(text: str) -> list[str]:
    names = {v[0]: k for k, v in ARMS.items()}
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key = part if part in ARMS else names.get(part)
        if key is None:
            raise SystemExit(f"unknown arm {part!r}; use letters a-i or names {', '.join(names)}")
        if key not in out:
            out.append(key)
    return sorted(out)


def budget_config(args) -> dict[str, Any]:
    cfg = dict(BUDGETS[args.budget])
    for key in ("n", "batch", "iterations", "kd_epochs", "kd_batch", "kd_lr", "eval_limit"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.device:
        cfg["device"] = args.device
    cfg["batch"] = min(cfg["batch"], cfg["n"])
    cfg["kd_mix"] = args.kd_mix
    cfg["fast_k"] = args.fast_k
    cfg["fast_overrides"] = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.fast_set)}
    # equal teacher passes: the (c) arm's images x iterations, spent K iterations per image
    cfg["fast_n"] = args.fast_n or max(cfg["batch"], cfg["n"] * cfg["iterations"] // args.fast_k)
    return cfg


def arm_sizes(cfg: dict[str, Any], key: str) -> tuple[int, int]:
    """(images, iterations per batch) of an arm: the fast arms trade iterations for images."""
    if key in FAST_ARMS:
        return cfg["fast_n"], cfg["fast_k"]
    return cfg["n"], cfg["iterations"]


def teacher_passes(key: str, images: int, iterations: int) -> Optional[int]:
    """Image-passes through the teacher to make the set (module docstring); None for noise/real images."""
    if key not in IMAGE_PASSES:
        return None
    return images * iterations * IMAGE_PASSES[key] + images


def make_settings(cfg: dict[str, Any], method: str, seed: int, key: str = "c"):
    """Profile cifar10 with the budget's sizes: the same for every arm except the method (and, for the fast
    arms, images x iterations at the same product)."""
    from dfcompress.settings import resolve_settings

    images, iterations = arm_sizes(cfg, key)
    fast = {f"synthesize.{k}": v for k, v in cfg.get("fast_overrides", {}).items()} if key in FAST_ARMS else {}
    return resolve_settings("cifar10", {
        **fast,
        "seed": seed,
        "synthesize.method": method,
        "synthesize.num_images": images,
        "synthesize.batch_size": cfg["batch"],
        "synthesize.iterations": iterations,
        "distill.student": STUDENT,
        "distill.epochs": cfg["kd_epochs"],
        "distill.batch_size": cfg["kd_batch"],
        "distill.lr": cfg["kd_lr"],
        "distill.mix": cfg.get("kd_mix", "none"),
        "distill.holdout": 0.0,  # every arm trains on all N images; quality is judged on real test images
        "distill.export": True,
    })


def load_teachers():
    from dfcompress.models.loading import load_teacher

    kw = {"mean": common.IMAGENET_MEAN, "std": common.IMAGENET_STD}
    torch_teacher = load_teacher(str(common.shared(common.RESNET56_TH)), arch="resnet56", **kw)
    onnx_teacher = load_teacher(str(common.shared(common.RESNET56_ONNX)), **kw)
    return torch_teacher, onnx_teacher


class Evaluator:
    """Top-1 on the JPEG test set (optionally its first ``limit`` images) and the exact 846 subset."""

    def __init__(self, limit: Optional[int], threads: int):
        self.sets = {"jpeg": common.load_npz_images(common.TEST_JPEG, limit), "exact846": common.load_npz_images(common.TEST_EXACT)}
        self.threads = threads

    def sizes(self) -> dict[str, int]:
        return {k: int(v[1].shape[0]) for k, v in self.sets.items()}

    def onnx(self, path: Path, like, fuse: bool = True) -> dict[str, torch.Tensor]:
        from dfcompress.evaluate import onnx_logits
        from dfcompress.export import onnx_session

        session = onnx_session(path, threads=self.threads, fuse=fuse)
        return {k: onnx_logits(session, x, like) for k, (x, _y) in self.sets.items()}

    def module(self, module, like, runtime) -> dict[str, torch.Tensor]:
        from dfcompress.evaluate import module_logits

        return {k: module_logits(module, x, like, runtime) for k, (x, _y) in self.sets.items()}

    def top1(self, logits: dict[str, torch.Tensor]) -> dict[str, float]:
        from dfcompress.evaluate import top1

        return {k: round(top1(logits[k], self.sets[k][1]), 2) for k in self.sets}


# ----------------------------------------------------------------------------------------------
# arms


def synthetic_summary(synth_dir: Path) -> dict[str, Any]:
    """How well the teacher recognises the stored images as their target labels, and class coverage."""
    from dfcompress.data.synthetic import SyntheticSet

    ds = SyntheticSet(synth_dir)
    labels, preds = [], []
    for k in range(ds.num_shards):
        _x, y, logits = ds.shard(k)
        labels.append(y)
        preds.append(logits.argmax(1))
    y, p = torch.cat(labels), torch.cat(preds)
    counts = torch.bincount(p, minlength=ds.num_classes)
    return {"images": int(len(y)), "teacher_agrees_with_label_pct": round(float((y == p).float().mean() * 100), 2),
            "teacher_argmax_per_class": counts.tolist(),
            "final_loss": ds.manifest.get("loss")}


def make_noise(teacher, cfg: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    from dfcompress.data.synthetic import teacher_logits, to_uint8, write_synthetic_set

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["n"], *teacher.input_shape, generator=g)
    u8 = to_uint8(teacher.denormalize(x))  # DeepInversion's starting point, clamped to valid pixels
    logits = teacher_logits(teacher, u8)
    write_synthetic_set(out, u8, logits.argmax(1), logits, teacher, method="gaussian-noise",
                        settings={"distribution": "N(0,1) in normalised space, clamped to [0,1] pixels"}, seed=seed)
    return {}


def make_real(teacher, n: int, out: Path, seed: int) -> dict[str, Any]:
    from dfcompress.data.synthetic import write_synthetic_set

    real = common.load_train_jpegs(math.ceil(n / 10), offset=0)  # classes interleaved: the first n stay balanced
    x, y, index = real["x"][:n], real["y"][:n], real["index"][:n]
    write_synthetic_set(out, x, y, None, teacher, method="real-cifar10-train",
                        settings={"source": common.TRAIN_TAR, "first_per_class": math.ceil(n / 10)}, seed=seed)
    return {"label_check": real["check"], "official_train_indices_first": index[:10].tolist(),
            "images_per_class": torch.bincount(y, minlength=10).tolist()}


def collect_seed_stats(onnx_teacher, runtime):
    from dfcompress.stats.collect import collect_stats

    seeds = common.load_train_jpegs(SEEDS_PER_CLASS, offset=0)
    stats = collect_stats(onnx_teacher, seeds["x"], labels=seeds["y"], per_class=True, runtime=runtime,
                          source=f"{common.TRAIN_TAR}: first {SEEDS_PER_CLASS} per class")
    return stats, seeds["check"]


def run_arm(key: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from dfcompress.inversion.runner import synthesize

    cfg, work, seed, rt = ctx["cfg"], ctx["work"], ctx["seed"], ctx["runtime"]
    name, label = ARMS[key]
    arm_dir = work / f"{key}-{name}"
    synth_dir, student_dir = arm_dir / "synthetic", arm_dir / "student"
    reuse = ctx.get("resume") and key in METHOD and (synth_dir / "manifest.json").is_file()
    if reuse:  # a finished synthetic set of an interrupted run: the runner verifies every shard and keeps it
        for sub in arm_dir.iterdir():
            if sub != synth_dir:
                shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
    elif arm_dir.exists():
        shutil.rmtree(arm_dir)
    teacher = ctx["onnx_teacher"] if key in SEEDED_STATS_ARMS else ctx["torch_teacher"]
    settings = make_settings(cfg, METHOD.get(key, "naturalinversion"), seed, key)
    images, iterations = arm_sizes(cfg, key)
    res: dict[str, Any] = {"arm": key, "name": name, "label": label, "n": images,
                           "teacher": "resnet56 ONNX (BN folded)" if key in SEEDED_STATS_ARMS else "resnet56 state_dict"}
    t0 = time.perf_counter()
    if key == "a":
        res.update(make_noise(teacher, cfg, synth_dir, seed))
    elif key in ("f", "i"):
        res.update(make_real(teacher, images, synth_dir, seed))
    else:
        stats = None
        if key in SEEDED_STATS_ARMS:
            t_stats = time.perf_counter()
            stats, check = collect_seed_stats(teacher, rt)
            res["stats_seconds"] = round(time.perf_counter() - t_stats, 2)
            res["seed_images"] = {"per_class": SEEDS_PER_CLASS, "check": check}
        synthesize(teacher, settings, synth_dir, rt, stats=stats)
        res.update({"iterations": iterations, "batch": cfg["batch"], "batches": math.ceil(images / cfg["batch"]),
                    "teacher_passes_per_iteration": PASSES[key]})
    res["teacher_passes"] = teacher_passes(key, images, iterations)
    common.sync(rt.device)
    res["synth_seconds"] = round(time.perf_counter() - t0, 2)
    if reuse:
        shards = sorted((synth_dir / "shards").glob("shard-*.safetensors"), key=lambda f: f.stat().st_mtime)
        res["synth_seconds"] = None  # not measured in this run
        res["synthetic_reused"] = f"kept from the interrupted run; its shards were written over {shards[-1].stat().st_mtime - shards[0].stat().st_mtime:.0f} s (first to last)"
    res["synthetic"] = synthetic_summary(synth_dir)
    res.update(distill_and_score(key, teacher, synth_dir, student_dir, settings, ctx))
    if ctx.get("curve") and key in ("g", "h"):
        res["curve"] = prefix_curve(key, teacher, synth_dir, arm_dir, settings, ctx, iterations)
    res["synthesize_settings"] = {k: v for k, v in dataclasses.asdict(settings.synthesize).items()
                                  if k in ("method", "num_images", "batch_size", "iterations", "lr_generator", "lr_pyramid",
                                           "lr_scaling", "lr_pixels", "lr_latent", "latent_dim", "lambda_bn", "lambda_tv",
                                           "lambda_l2", "lambda_cmi", "first_bn_multiplier", "jitter", "flip", "meta_update",
                                           "meta_lr", "meta_shards", "meta_pyramid")} if key in METHOD else None
    return res


def distill_and_score(key: str, teacher, synth_dir: Path, student_dir: Path, settings, ctx: dict[str, Any]) -> dict[str, Any]:
    """KD of a fresh student on ``synth_dir`` (identical recipe in every arm), scored on the real test sets."""
    from dfcompress.compress.distill import distill
    from dfcompress.evaluate import agreement

    res: dict[str, Any] = {}
    t1 = time.perf_counter()
    metrics = distill(teacher, STUDENT, synth_dir, settings, student_dir, ctx["runtime"])
    res["distill_seconds"] = round(time.perf_counter() - t1, 2)  # KD + ONNX export and its parity check
    res["kd_seconds"] = metrics["train"]["seconds"]
    res["kd_final_loss"] = metrics["history"][-1]["loss"] if metrics["history"] else None
    onnx_file = student_dir / metrics["model_dir"]["files"]["onnx"]
    t2 = time.perf_counter()
    logits = ctx["evaluator"].onnx(onnx_file, teacher)
    res["eval_seconds"] = round(time.perf_counter() - t2, 2)
    res["student_top1"] = ctx["evaluator"].top1(logits)
    ref = ctx["teacher_logits"]["onnx" if key in SEEDED_STATS_ARMS else "torch"]
    res["agreement_with_teacher"] = {k: round(agreement(logits[k], ref[k]), 2) for k in logits}
    res["student_params"], res["student_macs"] = metrics["student_params"], metrics["student_macs"]
    return res


def prefix_curve(key: str, teacher, synth_dir: Path, arm_dir: Path, settings, ctx: dict[str, Any],
                 iterations: int) -> list[dict[str, Any]]:
    """Student top-1 after KD on the first 1/12, 1/4, 1/2 of the arm's set (what a smaller run would have made)."""
    from dfcompress.data.synthetic import SyntheticSet, write_synthetic_set

    ds = SyntheticSet(synth_dir)
    x, y, logits = ds.tensors()
    points = []
    for frac in CURVE_FRACTIONS:
        m = max(settings.synthesize.batch_size, int(round(len(y) * frac / settings.synthesize.batch_size)) * settings.synthesize.batch_size)
        sub = arm_dir / f"prefix-{m}"
        write_synthetic_set(sub / "synthetic", x[:m], y[:m], logits[:m], teacher, method=f"{ds.manifest['method']} (first {m})",
                            settings={"prefix_of": str(synth_dir)}, seed=ctx["seed"])
        scored = distill_and_score(key, teacher, sub / "synthetic", sub / "student", settings, ctx)
        points.append({"images": m, "teacher_passes": teacher_passes(key, m, iterations), **scored})
        print(f"    prefix {m}: student top-1 {scored['student_top1']}", file=sys.stderr, flush=True)
    return points


# ----------------------------------------------------------------------------------------------
# projected run time


def plan(ctx: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    """Time a few steps of every stage at the budget's sizes and project the whole run."""
    from dfcompress.compress.distill import build_student
    from dfcompress.compress.kd import make_optimizer, KDConfig
    from dfcompress.distillation import kd_loss
    from dfcompress.evaluate import module_logits
    from dfcompress.inversion.synthesizers import build_synthesizer

    cfg, rt = ctx["cfg"], ctx["runtime"]
    teacher = ctx["torch_teacher"]
    out: dict[str, Any] = {}
    batches = math.ceil(cfg["n"] / cfg["batch"])
    stats = None
    for key in arms:
        if key not in METHOD:
            continue
        if key == "d" and stats is None:
            stats, _ = collect_seed_stats(ctx["onnx_teacher"], rt)
        t = ctx["onnx_teacher"] if key == "d" else teacher
        s = make_settings(dict(cfg, iterations=4), METHOD[key], 0).synthesize
        synth = build_synthesizer(t, s, rt, stats if key == "d" else None)
        stamps: list[float] = []
        synth.synthesize_batch(torch.arange(cfg["batch"]) % 10, 1, lambda it, c: stamps.append(time.perf_counter()))
        per_it = common.median([b - a for a, b in zip(stamps[1:], stamps[2:])])
        out[f"{key}-{ARMS[key][0]} synthesis"] = round(per_it * cfg["iterations"] * batches, 1)
    # KD: teacher no-grad pass + student step on one batch, a few times
    _name, student = build_student(STUDENT, teacher, 0)
    student = rt.prepare(student).train()
    kcfg = KDConfig(batch_size=cfg["kd_batch"], lr=cfg["kd_lr"], temperature=4.0)
    opt = make_optimizer(student, kcfg)
    x = rt.tensor(torch.randn(cfg["kd_batch"], 3, 32, 32))
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        with torch.no_grad(), rt.autocast():
            tl = teacher.module(x)
        with rt.autocast():
            sl = student(x)
        loss = kd_loss(sl, tl, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        common.sync(rt.device)
        if i:
            times.append(time.perf_counter() - t0)
    steps = cfg["n"] // cfg["kd_batch"] if cfg["n"] > cfg["kd_batch"] else 1
    kd = common.median(times) * steps * cfg["kd_epochs"]
    for key in arms:
        out[f"{key}-{ARMS[key][0]} KD"] = round(kd * (1.1 if key == "d" else 1.0), 1)
    # evaluation: teacher forward on 256 images, extrapolated to the test sets (students are ~3x cheaper)
    n_eval = sum(ctx["evaluator"].sizes().values())
    probe = ctx["evaluator"].sets["exact846"][0][:256]
    t0 = time.perf_counter()
    module_logits(teacher.module, probe, teacher, rt)
    per_img = (time.perf_counter() - t0) / len(probe)
    out["evaluation (teachers + students)"] = round(per_img * n_eval * (2 + len(arms) / 3), 1)
    out["total"] = round(sum(out.values()), 1)
    return out


# ----------------------------------------------------------------------------------------------
# report


def markdown(data: dict[str, Any]) -> str:
    cfg, info = data["config"], data["machine"]
    ev = data["eval_sets"]
    head = [f"# Data-free KD quality on real CIFAR-10 — budget `{data['budget']}`", ""]
    if data["budget"] == "tiny":
        head += ["**Tiny-budget smoke figures**: they prove the script runs end to end; the accuracies mean nothing "
                 "(a handful of images, a few iterations and KD epochs).", ""]
    head += [f"Machine: {common.machine_line(info)}", "", f"Command: `{data['command']}`", "",
             f"Teacher: CIFAR-10 ResNet-56 (akamaster), state_dict and BN-folded ONNX; student: {STUDENT}. "
             f"N = {cfg['n']} images per arm; inversion: batch {cfg['batch']}, {cfg['iterations']} iterations per batch "
             f"(profile cifar10 otherwise); KD: {cfg['kd_epochs']} epochs, batch {cfg['kd_batch']}, lr {cfg['kd_lr']}, T 4, "
             f"crop+flip. Test sets: JPEG test ({ev['jpeg']} images{' — first ' + str(ev['jpeg']) + ' only' if ev['jpeg'] < 10000 else ''}) "
             f"and the exact 846-image subset.", ""]
    note = common.load_note(info)
    if note:
        head += [f"**Note:** {note}.", ""]
    t = data["teachers"]
    head += [common.md_table(["teacher", "top-1 JPEG test", "top-1 exact 846", "eval seconds"], [
        ["resnet56 state_dict (torch)", t["torch"]["top1"]["jpeg"], t["torch"]["top1"]["exact846"], t["torch"]["seconds"]],
        ["resnet56 BN-folded ONNX (onnxruntime)", t["onnx"]["top1"]["jpeg"], t["onnx"]["top1"]["exact846"], t["onnx"]["seconds"]],
    ]), ""]
    rows = []
    for r in data["arms"]:
        if "error" in r:
            rows.append([f"{r['arm']} {r['name']}", "error: " + r["error"][:100]] + [None] * 9)
            continue
        rows.append([f"({r['arm']}) {r['label']}", r["n"], r.get("iterations"), r["student_top1"]["jpeg"], r["student_top1"]["exact846"],
                     r["agreement_with_teacher"]["jpeg"], r["synthetic"]["teacher_agrees_with_label_pct"],
                     r["synth_seconds"], r["kd_seconds"], r.get("teacher_passes")])
    head += [common.md_table(["arm", "images", "iterations / batch", "student top-1 JPEG", "student top-1 exact 846",
                              "agreement w/ teacher (JPEG)", "teacher agrees with target label on synthetic set %",
                              "synthesis s", "KD s", "teacher image-passes"], rows), ""]
    curve = [(r["arm"], p) for r in data["arms"] if "curve" in r for p in r["curve"]]
    if curve:
        head += ["Prefixes of the fast set (KD on the first m images; the set is made in order, so a prefix is what a "
                 "smaller run makes):", "",
                 common.md_table(["arm", "images", "teacher image-passes", "student top-1 JPEG", "student top-1 exact 846"],
                                 [[a, p["images"], p["teacher_passes"], p["student_top1"]["jpeg"], p["student_top1"]["exact846"]]
                                  for a, p in curve]), ""]
    head += ["Synthesis seconds include statistics collection for (d)/(h) and decoding/labelling for (a)/(f)/(i); KD "
             "seconds are the training loop only (ONNX export and evaluation excluded). Teacher image-passes: one image "
             "forward = 1, forward + backward to the input = 3; NI and fast NI 4 per image-iteration, DI 3, CMI 6, plus 1 "
             "per stored image for its logits.", ""]
    return "\n".join(head)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=list(BUDGETS), default="tiny")
    ap.add_argument("--arms", default="a,b,c,d,e,f", help="letters a-i or names (noise, deepinversion, naturalinversion, "
                                                        "ni-onnx-cc, cmi, real, fast-ni, fast-ni-onnx-cc, real-fast-n)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None, help="default: cpu (tiny/small), auto (paper)")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="CUDA: fp32 instead of AMP (channels_last stays)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=None, help="override the budget's N")
    ap.add_argument("--batch", type=int, default=None, help="override the inversion batch size")
    ap.add_argument("--iterations", type=int, default=None, help="override inversion iterations per batch")
    ap.add_argument("--kd-epochs", dest="kd_epochs", type=int, default=None)
    ap.add_argument("--kd-batch", dest="kd_batch", type=int, default=None)
    ap.add_argument("--kd-lr", dest="kd_lr", type=float, default=None)
    ap.add_argument("--eval-limit", dest="eval_limit", type=int, default=None, help="first K JPEG test images only")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default runs/bench-quality-<budget>)")
    ap.add_argument("--resume", action="store_true", help="keep arms already finished in the work folder")
    ap.add_argument("--plan", action="store_true", help="only time a few steps and print the projected run time")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--fast-k", dest="fast_k", type=int, default=10, help="fast-ni inner steps per batch (arms g, h)")
    ap.add_argument("--fast-n", dest="fast_n", type=int, default=None,
                    help="images of arms g, h, i (default: equal teacher passes to (c), N x iterations / K)")
    ap.add_argument("--fast-set", dest="fast_set", action="append", default=[], metavar="KEY=VALUE",
                    help="synthesize setting for the fast arms only (e.g. lambda_bn=2); repeatable")
    ap.add_argument("--kd-mix", dest="kd_mix", choices=["none", "mixup", "cutmix"], default="none",
                    help="KD augmentation in every arm (distill.mix); with --resume, re-distils kept synthetic sets")
    ap.add_argument("--curve", action="store_true", help="also distil on prefixes of the fast arms' sets (student top-1 vs teacher passes)")
    args = ap.parse_args(argv)

    common.require(common.RESNET56_TH, common.RESNET56_ONNX, common.TEST_JPEG, common.TEST_EXACT, common.TRAIN_TAR, common.LABELS)
    from dfcompress.device import resolve_runtime

    arms = parse_arms(args.arms)
    cfg = budget_config(args)
    threads = common.set_threads(args.threads)
    rt = resolve_runtime(cfg["device"], amp=args.amp)
    if rt.is_cuda:
        torch.backends.cudnn.benchmark = True
    info = common.machine_info(rt.device)
    print(f"machine: {common.machine_line(info)}", file=sys.stderr)
    print(f"budget {args.budget}: {json.dumps(cfg)}; arms {','.join(arms)}; runtime {rt}", file=sys.stderr, flush=True)
    work = args.work or (common.REPO / "runs" / f"bench-quality-{args.budget}")
    torch_teacher, onnx_teacher = load_teachers()
    ctx: dict[str, Any] = {"cfg": cfg, "work": work, "seed": args.seed, "runtime": rt, "torch_teacher": torch_teacher, "curve": args.curve,
                           "resume": args.resume,
                           "onnx_teacher": onnx_teacher, "evaluator": Evaluator(cfg["eval_limit"], threads)}
    if args.plan:
        projected = plan(ctx, arms)
        print(common.md_table(["stage", "projected seconds"], list(projected.items())))
        return 0

    marker = work / "bench-quality.json"
    if work.exists() and not args.resume:
        if not marker.is_file() and any(work.iterdir()):
            raise SystemExit(f"{work} exists and is not a bench/quality.py work folder; pass --work elsewhere")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    from dfcompress.fileio import atomic_write_json

    atomic_write_json(marker, {"budget": args.budget, "config": cfg, "seed": args.seed})

    t_all = time.perf_counter()
    # teachers on the real test sets (also the reference logits for agreement)
    ev = ctx["evaluator"]
    t0 = time.perf_counter()
    torch_logits = ev.module(torch_teacher.module, torch_teacher, rt)
    t_torch = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    onnx_logits = ev.onnx(common.shared(common.RESNET56_ONNX), onnx_teacher)
    t_onnx = round(time.perf_counter() - t0, 2)
    from dfcompress.evaluate import agreement

    ctx["teacher_logits"] = {"torch": torch_logits, "onnx": onnx_logits}
    teachers = {"torch": {"top1": ev.top1(torch_logits), "seconds": t_torch},
                "onnx": {"top1": ev.top1(onnx_logits), "seconds": t_onnx,
                         "agreement_with_torch": {k: round(agreement(onnx_logits[k], torch_logits[k]), 2) for k in onnx_logits}}}
    print(f"teacher top-1: torch {teachers['torch']['top1']} ({t_torch} s), ONNX {teachers['onnx']['top1']} ({t_onnx} s)",
          file=sys.stderr, flush=True)

    results = []
    for key in arms:
        mixed = "" if args.kd_mix == "none" else f"-{args.kd_mix}"  # another KD recipe: the kept set is re-distilled
        cached = work / f"{key}-{ARMS[key][0]}{mixed}.result.json"
        if args.resume and cached.is_file():
            results.append(json.loads(cached.read_text()))
            print(f"({key}) {ARMS[key][0]}: kept from the earlier run", file=sys.stderr)
            continue
        print(f"({key}) {ARMS[key][1]} …", file=sys.stderr, flush=True)
        try:
            res = run_arm(key, ctx)
        except Exception as exc:  # noqa: BLE001 - one broken arm must not hide the others' figures
            import traceback

            traceback.print_exc()
            res = {"arm": key, "name": ARMS[key][0], "label": ARMS[key][1], "error": f"{type(exc).__name__}: {exc}"}
        else:
            atomic_write_json(cached, res)
            print(f"    student top-1 {res['student_top1']} | synthesis {res['synth_seconds']} s | KD {res['kd_seconds']} s",
                  file=sys.stderr, flush=True)
        results.append(res)

    data = {"budget": args.budget, "command": " ".join(["bench/quality.py"] + argv), "config": cfg, "seed": args.seed,
            "student": STUDENT, "machine": info, "runtime": {"device": str(rt.device), "amp_dtype": str(rt.amp_dtype),
                                                              "channels_last": rt.channels_last},
            "eval_sets": ev.sizes(), "teachers": teachers, "arms": results,
            "total_seconds": round(time.perf_counter() - t_all, 1), "peak_rss_mib": common.peak_rss_mib()}
    data["machine"]["load_avg_at_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    md = markdown(data) + f"\nTotal wall time {data['total_seconds']} s; peak RSS {data['peak_rss_mib']} MiB.\n"
    stem = f"quality-{args.budget}" + (f"-seed{args.seed}" if args.seed else "")  # other seeds do not overwrite seed 0
    jpath, mpath = common.write_results(stem, data, md, args.out)
    print(md)
    print(f"wrote {jpath} and {mpath}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
