"""The demo's data-free student against the upper reference: the same KD on real training images.

Distils the demo's student (profile `digits`) from the embedded teacher twice with identical KD
settings — once on the demo's synthetic set, once on the same number of *real* digits training
images — and scores both on the real held-out split. Prints one table and writes
bench/results/demo-vs-real.{json,md}.

    python bench/demo_vs_real.py --synthetic runs/demo-*/synthetic    # reuse a demo's set
    python bench/demo_vs_real.py                                       # synthesize one first
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfcompress.compress.distill import distill  # noqa: E402
from dfcompress.data.synthetic import teacher_logits, write_synthetic_set  # noqa: E402
from dfcompress.device import resolve_runtime  # noqa: E402
from dfcompress.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from dfcompress.models.embedded import digits_split, embedded_teacher  # noqa: E402
from dfcompress.pipeline import real_eval_data, synthetic_set  # noqa: E402
from dfcompress.settings import resolve_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=Path, help="an existing synthetic set of the embedded teacher")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    settings = resolve_settings("digits")
    runtime = resolve_runtime("cpu")
    teacher = embedded_teacher()
    real_test = real_eval_data(teacher, None)
    work = Path(tempfile.mkdtemp(prefix="dfcompress-demo-vs-real-"))
    t0 = time.perf_counter()
    synth = args.synthetic or synthetic_set(teacher, settings, runtime, data=None, out_dir=work / "synthetic")
    synth_s = time.perf_counter() - t0
    n = json.loads((Path(synth) / "manifest.json").read_text())["num_images"]

    split = digits_split()
    x, y = split.x_train[:n], split.y_train[:n]
    real_set = write_synthetic_set(work / "real", x, y, teacher_logits(teacher, x), teacher, method="real-train-images")

    rows = []
    for name, data in (("data-free (NaturalInversion)", synth), ("real train images", real_set)):
        t = time.perf_counter()
        m = distill(teacher, settings.distill.student, data, settings, work / name.split()[0], runtime, real_test)
        rows.append({"arm": name, "images": n, "student": settings.distill.student, "top1": round(m["top1"], 2),
                     "agreement": round(m["agreement"], 2), "teacher_top1": round(m["teacher_top1"], 2),
                     "kd_seconds": round(time.perf_counter() - t, 1)})
    table = ["| arm | images | student | student top-1 % (real test) | agreement % | teacher top-1 % | KD s |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['arm']} | {r['images']} | {r['student']} | {r['top1']} | {r['agreement']} | {r['teacher_top1']} | {r['kd_seconds']} |" for r in rows]
    text = "\n".join(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "demo-vs-real.json", {"rows": rows, "synthesis_seconds": round(synth_s, 1),
                                                       "real_test_images": int(len(real_test.y))})
    atomic_write_text(args.out / "demo-vs-real.md", text + "\n")


if __name__ == "__main__":
    main()
