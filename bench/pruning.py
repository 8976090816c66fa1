"""Which channel importance to prune by, when the only data is synthetic: L1, L2, Taylor, Hessian.

Torch-Pruning's data-driven importances (``GroupTaylorImportance``, ``GroupHessianImportance``) need
gradients on real batches, which a data-free user does not have; ``prune --importance taylor|hessian``
takes them on the synthetic set instead. This bench prunes the CIFAR-10 ResNet-56 teacher (state_dict,
BN statistics) through ``dfcompress.compress.prune.prune`` - the function ``dfcompress prune`` runs - at
50 % of channels and at ``--ratio 0.9`` with each importance, and scores it on the real test sets right
after pruning (``prune.epochs: 0``) and after the same KD fine-tuning on the same synthetic set.

    taskset -c 1 nice -n 10 .venv/bin/python bench/pruning.py          # ~25 min on 1 core

The synthetic set is a short NaturalInversion run (BN statistics, resumable) under
``runs/bench-pruning/``; ``--synth DIR`` reuses any synthetic set of 32x32 images instead.
Writes ``bench/results/pruning.json`` and ``.md`` after every cell. Not a test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

IMPORTANCES = ("l1", "l2", "taylor", "hessian")


def prune_settings(args, ratio: float, importance: str, epochs: int):
    from dfcompress.settings import resolve_settings

    return resolve_settings("cifar10", {
        "seed": args.seed, "device": "cpu",
        "prune.ratio": ratio, "prune.target": args.target, "prune.importance": importance, "prune.epochs": epochs,
        "prune.recalibrate_bn": args.recalibrate_bn, "prune.lr": args.lr, "prune.batch_size": args.batch, "prune.export": False,
        "distill.holdout": 0.0,  # every cell fine-tunes on the whole set; real test images judge it
    })


def synthetic_set(args, teacher, work: Path, runtime) -> tuple[Path, float]:
    """The synthetic set to rank channels and fine-tune on, and the seconds it took to make (0 when reused)."""
    from dfcompress.inversion.runner import synthesize

    if args.synth:
        return Path(args.synth), 0.0
    out = work / "synth"
    t0 = time.perf_counter()
    synthesize(teacher, common.ni_settings(args.n, 128, args.iterations, args.seed), out, runtime)
    return out, round(time.perf_counter() - t0, 1)


def score(folder: Path, like, evaluator, runtime) -> dict[str, float]:
    """Top-1 of the pruned model folder ``prune`` wrote, loaded back as a user would."""
    from dfcompress.models.loading import load_teacher

    model = load_teacher(str(folder), mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD)
    return evaluator.top1(evaluator.module(model.module, like, runtime))


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = ["# Pruning importance on synthetic data (ResNet-56, CIFAR-10)", "",
             f"Machine: {common.machine_line(result['machine'])}", "",
             f"Teacher top-1 (JPEG / exact 846): {result['teacher_top1']}. Synthetic set: {result['synthetic']}. "
             f"Fine-tuning: KD, {cfg['epochs']} epochs, lr {cfg['lr']}, batch {cfg['batch']}, on the same set. "
             f"Data-driven importances take gradients on {result['importance_images']} synthetic images. "
             f"BatchNorm statistics re-estimated after pruning on: {cfg.get('recalibrate_bn', 0)} synthetic images (0: kept). "
             f"Test sets: {result['eval_sizes']}. Cells: top-1 % JPEG / exact 846.", ""]
    heads = [f"--ratio ({cfg.get('target', 'channels')})", "importance", "params removed", "MACs removed", "right after pruning",
             "after fine-tuning", "rank+prune s", "rank+prune+fine-tune s"]
    rows = [[f"{r['ratio']:.0%}", r["importance"], f"{r['params_removed']:.1%}", f"{r['macs_removed']:.1%}",
             f"{r['before']['jpeg']:.2f} / {r['before']['exact846']:.2f}",
             f"{r['after']['jpeg']:.2f} / {r['after']['exact846']:.2f}" if r.get("after") else "–",
             r["prune_s"], r.get("prune_and_finetune_s", "–")] for r in result["rows"]]
    lines.append(common.md_table(heads, rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="0.5,0.9", help="comma list of --ratio values (fractions removed)")
    ap.add_argument("--target", default="channels", choices=["channels", "params", "macs"], help="what --ratio measures")
    ap.add_argument("--importances", default=",".join(IMPORTANCES))
    ap.add_argument("--n", type=int, default=512, help="synthetic images (NI, BN statistics)")
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--synth", default=None, help="reuse this synthetic set instead of making one")
    ap.add_argument("--epochs", type=int, default=20, help="KD fine-tuning epochs after pruning")
    ap.add_argument("--recalibrate-bn", dest="recalibrate_bn", type=int, default=0,
                    help="re-estimate BatchNorm statistics on N synthetic images right after pruning (prune.recalibrate_bn)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--jpeg-limit", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default="pruning", help="results file stem under bench/results/")
    args = ap.parse_args()
    common.require(common.RESNET56_TH, common.TEST_JPEG, common.TEST_EXACT)
    common.set_threads(args.threads)
    from quality import Evaluator, load_teachers

    from dfcompress.compress.prune import prune
    from dfcompress.device import resolve_runtime

    runtime = resolve_runtime("cpu")
    evaluator = Evaluator(args.jpeg_limit, args.threads)
    teacher, _ = load_teachers()
    work = common.REPO / "runs" / "bench-pruning"
    synth, synth_s = synthetic_set(args, teacher, work, runtime)
    result: dict[str, Any] = {
        "config": vars(args), "machine": common.machine_info(), "eval_sizes": evaluator.sizes(),
        "teacher_top1": evaluator.top1(evaluator.module(teacher.module, teacher, runtime)),
        "synthetic": f"{synth} ({'reused' if args.synth else f'NI, {args.n} images x {args.iterations} iterations, {synth_s} s'})",
        "importance_images": prune_settings(args, 0.5, "taylor", 0).prune.importance_images, "rows": [],
    }
    print(f"teacher {result['teacher_top1']}; synthetic set {result['synthetic']}", flush=True)
    for ratio in (float(r) for r in args.ratios.split(",")):
        for importance in args.importances.split(","):
            cell = work / f"r{ratio}-{importance}"
            t0 = time.perf_counter()
            m = prune(teacher, synth, prune_settings(args, ratio, importance, 0), cell / "pruned", runtime)
            row = {"ratio": ratio, "importance": importance, "params_removed": m["params_removed"],
                   "macs_removed": m["macs_removed"], "prune_s": round(time.perf_counter() - t0, 1),
                   "before": score(cell / "pruned", teacher, evaluator, runtime)}
            if args.epochs > 0:
                t0 = time.perf_counter()
                prune(teacher, synth, prune_settings(args, ratio, importance, args.epochs), cell / "tuned", runtime)
                row["prune_and_finetune_s"] = round(time.perf_counter() - t0, 1)
                row["after"] = score(cell / "tuned", teacher, evaluator, runtime)
            result["rows"].append(row)
            print(f"ratio {ratio} {importance:8s} params -{m['params_removed']:.1%} before {row['before']} "
                  f"after {row.get('after')}", flush=True)
            common.write_results(args.stem, result, markdown(result))
    print(f"wrote bench/results/{args.stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
