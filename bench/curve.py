"""Student top-1 against teacher passes, from the JSON files bench/quality.py writes.

Each inversion arm (and each prefix of a ``--curve`` run) is one point: x = teacher image-passes spent on
synthesis (log scale), y = top-1 of the ResNet-20 student distilled on that set, on the JPEG 10k test set
and on the exact 846. Arms of the same method are joined in order of cost. Writes a PNG and prints the
points as a table.

    .venv/bin/python bench/curve.py bench/results/quality-small*.json -o bench/results/quality-curve.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def points(files: list[Path]) -> dict[str, list[tuple[int, float, float]]]:
    """method label -> [(teacher passes, top-1 JPEG, top-1 exact 846)], sorted by passes."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for f in files:
        data = json.loads(f.read_text())
        for arm in data.get("arms", []):
            if "error" in arm or not arm.get("teacher_passes"):
                continue
            overrides = data.get("config", {}).get("fast_overrides") if arm["arm"] in "ghi" else None
            label = f"{arm['name']}, {arm.get('iterations')} it/batch" + (
                f" ({', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))})" if overrides else "")
            top = arm["student_top1"]
            series.setdefault(label, []).append((arm["teacher_passes"], top["jpeg"], top["exact846"]))
            for p in arm.get("curve", []):
                series[label].append((p["teacher_passes"], p["student_top1"]["jpeg"], p["student_top1"]["exact846"]))
    return {k: sorted(set(v)) for k, v in series.items()}


def plot(series: dict[str, list[tuple[int, float, float]]], path: Path, title: str) -> Path:
    """A log-x line plot (PIL only): solid = JPEG 10k, dotted markers = exact 846."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 940, 500, 70, 330, 44, 48
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    xs = [math.log10(p[0]) for pts in series.values() for p in pts]
    ys = [v for pts in series.values() for p in pts for v in p[1:]]
    if not xs:
        raise SystemExit("no inversion arms with teacher passes in the given files")
    x0, x1 = math.floor(min(xs) * 2) / 2, math.ceil(max(xs) * 2) / 2
    y0, y1 = 0.0, max(10.0, math.ceil(max(ys) / 10) * 10)
    if x1 - x0 < 0.5:
        x0, x1 = x0 - 0.5, x1 + 0.5

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(int(y1 // 10) + 1):
        _, yy = px(x0, i * 10)
        draw.line([left, yy, width - right, yy], fill=(225, 225, 225))
        draw.text((left - 28, yy - 6), f"{i * 10}", fill="black", font=font)
    e = x0
    while e <= x1 + 1e-9:
        xx, _ = px(e, y0)
        draw.line([xx, top, xx, height - bottom], fill=(225, 225, 225))
        draw.text((xx - 14, height - bottom + 6), f"1e{e:g}", fill="black", font=font)
        e += 0.5
    draw.text((left + 150, height - 20), "teacher image-passes spent on synthesis (log)", fill="black", font=font)
    draw.text((8, top - 14), "student top-1 %", fill="black", font=font)
    for i, (label, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        for col, dotted in ((1, False), (2, True)):
            coords = [px(math.log10(p[0]), p[col]) for p in pts]
            if len(coords) > 1 and not dotted:
                draw.line(coords, fill=colour, width=2)
            for cx, cy in coords:
                r = 2 if dotted else 4
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour if not dotted else "white", outline=colour)
        ly = top + 8 + 18 * i
        draw.line([width - right + 12, ly + 6, width - right + 32, ly + 6], fill=colour, width=2)
        draw.text((width - right + 38, ly), label[:52], fill="black", font=font)
    draw.text((width - right + 12, top + 8 + 18 * len(series) + 6), "filled: JPEG 10k; open: exact 846", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="quality-*.json files of bench/quality.py")
    ap.add_argument("-o", "--out", type=Path, default=common.RESULTS / "quality-curve.png")
    args = ap.parse_args()
    series = points(args.results)
    rows: list[list[Any]] = [[label, p[0], p[1], p[2]] for label, pts in sorted(series.items()) for p in pts]
    print(common.md_table(["method", "teacher image-passes", "student top-1 JPEG", "student top-1 exact 846"], rows))
    print(f"wrote {plot(series, args.out, 'ResNet-56 -> ResNet-20, CIFAR-10: student top-1 vs teacher passes')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
