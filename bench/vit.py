"""Data-free distillation from a vision transformer (no BatchNorm): seed statistics vs noise vs real images.

Teacher: a small ViT (patch 4, class token, ``nn.TransformerEncoderLayer`` pre-norm GELU blocks, LayerNorm
head) trained here on the shared CIFAR-10 train JPEGs for ``--train-minutes`` on one thread (AdamW,
warm-up + cosine on elapsed time, random crop + flip), exported with ``torch.onnx.export`` (opset 17,
dynamic batch) and loaded back through ``load_teacher`` on the ``.onnx`` file — the path a user takes.
The trained weights are cached in ``runs/bench-vit/`` (one file per architecture/minutes/seed; an
existing file skips training).

Train images are addressed by per-class rank (``train/<class>/NNNN.jpg``), disjoint by construction:

  ranks 0..9                      the 10 seed images per class of arm (a)
  ranks 10 .. 10+N/10-1           the N real images of arm (c)
  ranks --teacher-offset .. 4999  the teacher's training set (default 100: disjoint from both while N <= 900;
                                  the JSON says so when it is not)

Arms (same number N of images, same KD recipe: ResNet-20 student, profile cifar10 with the sizes below):

  a seed-stats  class-conditional statistics from 10 real seed images per class (``collect_stats``
                per_class, on the token stages dfcompress finds), then NaturalInversion with them -> KD
  b noise       uniform random pixels 0..255, teacher labels -> KD
  c real        N real train images -> KD (upper reference)
  d seed-stats-nopyramid   (a) without the Feature Transfer Pyramid (not run by default: ``--arms a,b,c,d``);
                the pyramid's only spatial input on a ViT is the patch embedding

Teacher image-passes (as in bench/quality.py: forward = 1, forward + backward to the input = 3): (a) 3 per
image-iteration (the pyramid's feature pass stops after the patch embedding, the ViT's last spatial stage, and is
not counted; (d) has no feature pass) + 1 per stored image + 1 per seed image; (b) 1 per image (its labels); (c) 0 before KD.
KD itself runs the teacher forward on every batch in every arm alike and is not counted.

    taskset -c 1 .venv/bin/python bench/vit.py                          # full size (see RESULTS.md)
    taskset -c 1 .venv/bin/python bench/vit.py --train-minutes 0.3 --n 64 --iterations 3 --kd-epochs 1 \\
        --jpeg-limit 200 --out-stem vit-smoke --work runs/bench-vit-smoke   # smoke, ~2 min

Writes ``bench/results/vit.json`` and ``.md`` (``vit-seed<S>`` for ``--seed S``, which reruns the arms on the same
cached teacher; ``--out-stem`` / ``--out-dir`` elsewhere). Not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
import quality  # noqa: E402  (bench/quality.py: KD recipe, Evaluator, scoring)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ARMS = {"a": ("seed-stats", "NaturalInversion + class-cond. seed statistics (10/class)"),
        "b": ("noise", "uniform random pixels, teacher labels"),
        "c": ("real", "real CIFAR-10 train images (upper reference)"),
        "d": ("seed-stats-nopyramid", "as (a) without the Feature Transfer Pyramid (ablation)")}
SEEDS_PER_CLASS = 10
PER_CLASS_TRAIN = 5000  # CIFAR-10 train images per class
MEAN, STD = common.IMAGENET_MEAN, common.IMAGENET_STD
NI_IMAGE_PASSES = quality.IMAGE_PASSES["c"]  # NaturalInversion: a no-grad feature pass + the loss pass


class ViT(nn.Module):
    """Patch conv, class token, learnt positions, pre-norm GELU encoder blocks, LayerNorm head (like
    tests/token_models.TinyViT, at CIFAR-10 size)."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, patch: int = 4, classes: int = 10):
        super().__init__()
        tokens = (32 // patch) ** 2 + 1
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# ----------------------------------------------------------------------------------------------
# data


def split_ranks(n: int, teacher_offset: int) -> dict[str, Any]:
    """Per-class rank ranges of the seeds, the real arm and the teacher's training set, and their overlap."""
    real_per_class = math.ceil(n / 10)
    real = (SEEDS_PER_CLASS, SEEDS_PER_CLASS + real_per_class)
    train = (teacher_offset, PER_CLASS_TRAIN)
    overlap = max(0, min(real[1], train[1]) - max(real[0], train[0]))
    if teacher_offset < SEEDS_PER_CLASS:
        raise SystemExit(f"--teacher-offset {teacher_offset} would train the teacher on the seed images (ranks 0..9); use >= 10")
    return {"seeds": (0, SEEDS_PER_CLASS), "real": real, "teacher_train": train, "real_overlap_per_class": overlap}


def take_ranks(data: dict[str, Any], start: int, stop: int, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of ranks start..stop-1 from a ``load_train_jpegs`` result that begins at rank ``first``
    (classes interleaved: image j has rank first + j // 10)."""
    a, b = (start - first) * 10, (stop - first) * 10
    return data["x"][a:b], data["y"][a:b], data["index"][a:b]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (n,), generator=g).tolist(), torch.randint(0, 9, (n,), generator=g).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


# ----------------------------------------------------------------------------------------------
# teacher


def arch_config(args) -> dict[str, Any]:
    return {"dim": args.dim, "depth": args.depth, "heads": args.heads, "mlp_ratio": args.mlp_ratio, "patch": 4}


def teacher_key(args) -> str:
    """File stem of the cached teacher: everything that changes its weights."""
    cfg = {**arch_config(args), "minutes": args.train_minutes, "seed": args.teacher_seed, "offset": args.teacher_offset,
           "batch": args.train_batch, "lr": args.train_lr}
    return "vit-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def train_teacher(args, x_u8: torch.Tensor, y: torch.Tensor) -> tuple[ViT, dict[str, Any]]:
    """AdamW for ``--train-minutes`` of wall time; the lr follows warm-up (5 %) + cosine on elapsed time."""
    torch.manual_seed(args.teacher_seed)
    model = ViT(**arch_config(args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.train_lr, weight_decay=0.05)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(args.teacher_seed)
    budget = args.train_minutes * 60.0
    n, steps, seen, correct_window, seen_window, loss_ema = len(y), 0, 0, 0, 0, None
    model.train()
    t0 = time.perf_counter()
    last_print = t0
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - args.train_batch + 1, args.train_batch):
            frac = (time.perf_counter() - t0) / budget
            if frac >= 1.0:
                break
            lr = args.train_lr * (frac / 0.05 if frac < 0.05 else 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[start:start + args.train_batch]
            xb = (augment(x_u8[idx], g).float() / 255.0 - mean) / std
            logits = model(xb)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            seen += len(idx)
            loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
            correct_window += int((logits.argmax(1) == y[idx]).sum())
            seen_window += len(idx)
            if time.perf_counter() - last_print > 30:
                print(f"    teacher training {time.perf_counter() - t0:.0f}/{budget:.0f} s: epoch {seen / n:.2f}, loss {loss_ema:.3f}, "
                      f"train top-1 (augmented, last 30 s) {100 * correct_window / seen_window:.1f} %", file=sys.stderr, flush=True)
                last_print, correct_window, seen_window = time.perf_counter(), 0, 0
        else:
            continue
        break
    model.eval()
    return model, {"steps": steps, "images_seen": seen, "epochs": round(seen / n, 2), "final_loss_ema": round(loss_ema or 0.0, 4),
                   "seconds": round(time.perf_counter() - t0, 1), "train_images": n}


def export_onnx(model: nn.Module, path: Path) -> None:
    """TorchScript-based ``torch.onnx.export``, opset 17, dynamic batch (what a user's export script does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(2, 3, 32, 32), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def get_teacher(args, work: Path) -> tuple[ViT, Path, dict[str, Any]]:
    """The cached (or freshly trained) ViT, its ONNX export and how it was trained."""
    key = teacher_key(args)
    pt, meta_path, onnx_path = work / f"{key}.pt", work / f"{key}.json", work / f"{key}.onnx"
    model = ViT(**arch_config(args))
    if pt.is_file() and meta_path.is_file():
        model.load_state_dict(torch.load(pt, weights_only=True))
        meta = json.loads(meta_path.read_text())
        meta["cached"] = str(pt)
        print(f"teacher: kept {pt} (trained {meta['training']['seconds']} s, {meta['training']['epochs']} epochs)", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        data = common.load_train_jpegs(PER_CLASS_TRAIN - args.teacher_offset, offset=args.teacher_offset)
        decode_s = round(time.perf_counter() - t0, 1)
        print(f"teacher: training on {len(data['y'])} train images (per-class ranks {args.teacher_offset}..{PER_CLASS_TRAIN - 1}, "
              f"decoded in {decode_s} s) for {args.train_minutes} min", file=sys.stderr, flush=True)
        model, training = train_teacher(args, data["x"], data["y"])
        training["decode_seconds"] = decode_s
        meta = {"arch": arch_config(args), "params": sum(p.numel() for p in model.parameters()), "training": training,
                "train_ranks": [args.teacher_offset, PER_CLASS_TRAIN - 1], "label_check": data["check"],
                "optimizer": f"AdamW lr {args.train_lr} wd 0.05, batch {args.train_batch}, warm-up 5 % + cosine on elapsed time, "
                             "label smoothing 0.1, grad clip 1, crop(pad 4)+flip"}
        del data
        from dfcompress.fileio import atomic_write_json

        tmp = pt.with_suffix(".pt.tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(pt)
        atomic_write_json(meta_path, meta)
    if not onnx_path.is_file():
        export_onnx(model, onnx_path)
    return model, onnx_path, meta


# ----------------------------------------------------------------------------------------------
# arms


def make_uniform_noise(teacher, n: int, out: Path, seed: int) -> None:
    from dfcompress.data.synthetic import teacher_logits, write_synthetic_set

    u8 = torch.randint(0, 256, (n, *teacher.input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    logits = teacher_logits(teacher, u8)
    write_synthetic_set(out, u8, logits.argmax(1), logits, teacher, method="uniform-noise",
                        settings={"distribution": "uniform pixels 0..255"}, seed=seed)


def run_arm(key: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from dfcompress.data.synthetic import write_synthetic_set
    from dfcompress.inversion.runner import synthesize
    from dfcompress.stats.collect import collect_stats

    cfg, teacher, rt, seed = ctx["cfg"], ctx["teacher"], ctx["runtime"], ctx["seed"]
    name, label = ARMS[key]
    arm_dir = ctx["work"] / f"{key}-{name}-n{cfg['n']}-s{seed}"
    if arm_dir.exists():
        shutil.rmtree(arm_dir)
    synth_dir, student_dir = arm_dir / "synthetic", arm_dir / "student"
    settings = quality.make_settings(cfg, "naturalinversion", seed)
    if key == "d":  # the pyramid reads the patch embedding, the ViT's only spatial map: does that help?
        settings = dataclasses.replace(settings, synthesize=dataclasses.replace(settings.synthesize, use_pyramid=False))
    res: dict[str, Any] = {"arm": key, "name": name, "label": label, "n": cfg["n"]}
    t0 = time.perf_counter()
    if key in ("a", "d"):
        x, y, _ = ctx["seeds"]
        stats = collect_stats(teacher, x, labels=y, per_class=True, runtime=rt,
                              source=f"{common.TRAIN_TAR}: per-class ranks 0..{SEEDS_PER_CLASS - 1}")
        res["stats_seconds"] = round(time.perf_counter() - t0, 2)
        res["stats_layers"] = stats.layer_names
        print(f"    statistics from {len(y)} seed images on {len(stats.layers)} layers: {', '.join(stats.layer_names)}",
              file=sys.stderr, flush=True)
        synthesize(teacher, settings, synth_dir, rt, stats=stats)
        passes = NI_IMAGE_PASSES - 1  # the feature pass ends at the patch embedding (StageTaps): not a teacher pass
        res.update({"iterations": cfg["iterations"], "batch": cfg["batch"], "batches": math.ceil(cfg["n"] / cfg["batch"]),
                    "teacher_passes": cfg["n"] * cfg["iterations"] * passes + cfg["n"] + len(y)})
    elif key == "b":
        make_uniform_noise(teacher, cfg["n"], synth_dir, seed)
        res["teacher_passes"] = cfg["n"]
    else:
        x, y, index = ctx["real"]
        write_synthetic_set(synth_dir, x, y, None, teacher, method="real-cifar10-train",
                            settings={"source": common.TRAIN_TAR, "per_class_ranks": list(ctx["ranks"]["real"])}, seed=seed)
        res.update({"teacher_passes": 0, "images_per_class": torch.bincount(y, minlength=10).tolist(),
                    "official_train_indices_first": index[:10].tolist()})
    res["synth_seconds"] = round(time.perf_counter() - t0, 2)
    res["synthetic"] = quality.synthetic_summary(synth_dir)
    res.update(quality.distill_and_score(key, teacher, synth_dir, student_dir, settings, ctx))
    res["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return res


# ----------------------------------------------------------------------------------------------
# report


def markdown(data: dict[str, Any]) -> str:
    cfg, t, ev, r = data["config"], data["teacher"], data["eval_sets"], data["ranks"]
    smoke = cfg["n"] < 256 or cfg["kd_epochs"] < 10 or cfg["iterations"] < 20
    lines = [f"# Data-free KD from a ViT teacher (no BatchNorm) on real CIFAR-10", ""]
    if smoke:
        lines += ["**Smoke-size figures**: they prove the script runs end to end; the accuracies mean nothing.", ""]
    lines += [f"Machine: {common.machine_line(data['machine'])}", "", f"Command: `{data['command']}`", ""]
    note = common.load_note(data["machine"])
    if note:
        lines += [f"**Note:** {note}.", ""]
    a, tr = t["arch"], t["training"]
    lines += [f"Teacher: ViT, patch {a['patch']}, dim {a['dim']}, {a['depth']} pre-norm GELU encoder blocks ({a['heads']} heads, "
              f"MLP {a['mlp_ratio']}×), class token, LayerNorm head; {t['params']:,} parameters. Trained {tr['seconds']} s on "
              f"{data['machine']['torch_threads']} thread(s): {tr['epochs']} epochs over {tr['train_images']} train images "
              f"(per-class ranks {t['train_ranks'][0]}..{t['train_ranks'][1]}), {t['optimizer']}. Exported with "
              f"`torch.onnx.export` (opset 17, dynamic batch) and loaded back with `load_teacher` on the .onnx file "
              f"(format `{t['inspect']['format']}`).", "",
              f"Seeds: per-class ranks {r['seeds'][0]}..{r['seeds'][1] - 1}; real arm: ranks {r['real'][0]}..{r['real'][1] - 1}; "
              + ("disjoint from the teacher's training set." if not r["real_overlap_per_class"] else
                 f"**{r['real_overlap_per_class']} per class of the real arm's images are also in the teacher's training set.**"), ""]
    ins = t["inspect"]
    lines += [f"`inspect`: {len(ins['stages'])} spatial stage(s) ({', '.join(s['name'] for s in ins['stages']) or 'none'}), "
              f"{len(ins['token_stages'])} token stage(s) ({', '.join(s['name'] for s in ins['token_stages']) or 'none'}), "
              f"{ins['stat_layers']} statistics layers, pyramid {'on' if ins['pyramid'] else 'off'}, BatchNorm layers "
              f"{ins['batchnorm_layers']}, {ins['macs']:,} ops per image.", ""]
    lines += [common.md_table(["teacher", f"top-1 JPEG test ({ev['jpeg']})", "top-1 exact 846"], [
        ["ViT, torch (trained here)", t["top1_torch"]["jpeg"], t["top1_torch"]["exact846"]],
        ["ViT, ONNX loaded by dfcompress (torch)", t["top1"]["jpeg"], t["top1"]["exact846"]],
        ["ViT, ONNX in onnxruntime", t["top1_ort"]["jpeg"], t["top1_ort"]["exact846"]],
    ]), "", f"Agreement of the converted teacher with the torch original: {t['agreement_converted_vs_torch']} %.", ""]
    rows = []
    for res in data["arms"]:
        if "error" in res:
            rows.append([f"({res['arm']}) {res['label']}", "error: " + res["error"][:100]] + [None] * 7)
            continue
        rows.append([f"({res['arm']}) {res['label']}", res["n"], res["student_top1"]["jpeg"], res["student_top1"]["exact846"],
                     res["agreement_with_teacher"]["jpeg"], res["synthetic"]["teacher_agrees_with_label_pct"],
                     res["synth_seconds"], res["kd_seconds"], res["teacher_passes"]])
    lines += [f"Student {quality.STUDENT}; KD {cfg['kd_epochs']} epochs, batch {cfg['kd_batch']}, lr {cfg['kd_lr']}, T 4, crop+flip "
              f"(profile cifar10 otherwise); NaturalInversion batch {cfg['batch']}, {cfg['iterations']} iterations per batch.", "",
              common.md_table(["arm", "images", "student top-1 JPEG", "student top-1 exact 846", "agreement w/ teacher (JPEG)",
                               "teacher agrees with target label %", "set-making s", "KD s", "teacher image-passes"], rows), "",
              "Set-making seconds include statistics collection for (a) and the teacher's labelling pass for (b). Teacher "
              "image-passes before KD: forward = 1, forward + backward to the input = 3 (NaturalInversion 3 per "
              "image-iteration: its pyramid's feature pass stops at the patch embedding; + 1 per stored image, + the seed images' pass).", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="a,b,c", help="letters a-d or names seed-stats, noise, real, seed-stats-nopyramid")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arms (synthesis, noise, KD); the teacher keeps its own")
    ap.add_argument("--teacher-seed", dest="teacher_seed", type=int, default=0, help="seed of the teacher's training")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--train-minutes", dest="train_minutes", type=float, default=8.0)
    ap.add_argument("--train-batch", dest="train_batch", type=int, default=128)
    ap.add_argument("--train-lr", dest="train_lr", type=float, default=2e-3)
    ap.add_argument("--teacher-offset", dest="teacher_offset", type=int, default=100,
                    help="first per-class rank of the teacher's training images")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", dest="mlp_ratio", type=int, default=2)
    ap.add_argument("--n", type=int, default=512, help="images per arm")
    ap.add_argument("--batch", type=int, default=128, help="NaturalInversion batch")
    ap.add_argument("--iterations", type=int, default=100, help="NaturalInversion iterations per batch")
    ap.add_argument("--kd-epochs", dest="kd_epochs", type=int, default=30)
    ap.add_argument("--kd-batch", dest="kd_batch", type=int, default=64)
    ap.add_argument("--kd-lr", dest="kd_lr", type=float, default=0.05)
    ap.add_argument("--jpeg-limit", dest="jpeg_limit", type=int, default=2000, help="first K JPEG test images (0: all 10k)")
    ap.add_argument("--work", type=Path, default=common.REPO / "runs" / "bench-vit", help="work folder (teacher cache, arms)")
    ap.add_argument("--out-dir", dest="out_dir", type=Path, default=common.RESULTS)
    ap.add_argument("--out-stem", dest="out_stem", default=None,
                    help="results file stem (default vit, vit-seed<S> for --seed S; smoke runs: use another)")
    args = ap.parse_args(argv)

    common.require(common.TEST_JPEG, common.TEST_EXACT, common.TRAIN_TAR, common.LABELS)
    names = {v[0]: k for k, v in ARMS.items()}
    arms = []
    for part in (p.strip() for p in args.arms.split(",") if p.strip()):
        key = part if part in ARMS else names.get(part)
        if key is None:
            raise SystemExit(f"unknown arm {part!r}; use a-d or {', '.join(names)}")
        arms.append(key)
    ranks = split_ranks(args.n, args.teacher_offset)
    from dfcompress.device import resolve_runtime
    from dfcompress.evaluate import agreement
    from dfcompress.models.introspect import inspect_teacher
    from dfcompress.models.loading import load_teacher

    threads = common.set_threads(args.threads)
    rt = resolve_runtime("cpu")
    info = common.machine_info(rt.device)
    print(f"machine: {common.machine_line(info)}", file=sys.stderr, flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    vit, onnx_path, meta = get_teacher(args, args.work)
    teacher = load_teacher(str(onnx_path), mean=MEAN, std=STD)
    ins = inspect_teacher(teacher)
    print(f"inspect: format {ins['format']}, stages {[s['name'] for s in ins['stages']]}, token stages "
          f"{[s['name'] for s in ins['token_stages']]}, {ins['stat_layers']} statistics layers, pyramid {ins['pyramid']}",
          file=sys.stderr, flush=True)

    ev = quality.Evaluator(args.jpeg_limit or None, threads)
    torch_logits = ev.module(vit, teacher, rt)
    converted = ev.module(teacher.module, teacher, rt)
    ort_logits = ev.onnx(onnx_path, teacher)
    t_info = {**meta, "onnx": str(onnx_path), "inspect": ins, "top1_torch": ev.top1(torch_logits), "top1": ev.top1(converted),
              "top1_ort": ev.top1(ort_logits),
              "agreement_converted_vs_torch": round(min(agreement(converted[k], torch_logits[k]) for k in converted), 2)}
    print(f"teacher top-1: torch {t_info['top1_torch']}, dfcompress-loaded ONNX {t_info['top1']}, onnxruntime {t_info['top1_ort']}",
          file=sys.stderr, flush=True)

    # seeds and the real arm's images in one decode (ranks 0 .. end of the real range)
    data = common.load_train_jpegs(ranks["real"][1], offset=0)
    cfg = {"n": args.n, "batch": min(args.batch, args.n), "iterations": args.iterations, "kd_epochs": args.kd_epochs,
           "kd_batch": args.kd_batch, "kd_lr": args.kd_lr}
    x, y, idx = take_ranks(data, *ranks["real"], first=0)
    ctx: dict[str, Any] = {"cfg": cfg, "teacher": teacher, "runtime": rt, "seed": args.seed, "work": args.work, "ranks": ranks,
                           "evaluator": ev, "teacher_logits": {"torch": converted, "onnx": converted},
                           "seeds": take_ranks(data, *ranks["seeds"], first=0), "real": (x[:args.n], y[:args.n], idx[:args.n])}
    results = []
    for key in arms:
        print(f"({key}) {ARMS[key][1]} …", file=sys.stderr, flush=True)
        try:
            res = run_arm(key, ctx)
        except Exception as exc:  # noqa: BLE001 - one broken arm must not hide the others' figures
            import traceback

            traceback.print_exc()
            res = {"arm": key, "name": ARMS[key][0], "label": ARMS[key][1], "error": f"{type(exc).__name__}: {exc}"}
        else:
            print(f"    student top-1 {res['student_top1']} | set {res['synth_seconds']} s | KD {res['kd_seconds']} s | "
                  f"teacher image-passes {res['teacher_passes']}", file=sys.stderr, flush=True)
        results.append(res)

    out = {"command": " ".join(["bench/vit.py"] + argv), "config": cfg, "seed": args.seed, "teacher_seed": args.teacher_seed,
           "student": quality.STUDENT,
           "machine": info, "ranks": ranks, "eval_sets": ev.sizes(), "teacher": t_info, "arms": results,
           "total_seconds": round(time.perf_counter() - t_all, 1), "peak_rss_mib": common.peak_rss_mib()}
    md = markdown(out) + f"\nTotal wall time {out['total_seconds']} s; peak RSS {out['peak_rss_mib']} MiB.\n"
    stem = args.out_stem or ("vit" + (f"-seed{args.seed}" if args.seed else ""))  # other seeds do not overwrite seed 0
    jpath, mpath = common.write_results(stem, out, md, args.out_dir)
    print(md)
    print(f"wrote {jpath} and {mpath}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
