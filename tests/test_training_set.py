"""`--data` with real and mixed sources (synthetic set, image folder, .npz without labels), through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from compress_helpers import digits_as_synthetic_set, digits_teacher
from dfcompress.cli import app
from dfcompress.data.training_set import DataSource, build_training_set, parse_source, shares
from dfcompress.errors import UserError
from dfcompress.models.embedded import digits_split

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _digits_npz(path, start: int, n: int, labels: bool = False):
    split = digits_split()
    x = split.x_train[start:start + n].permute(0, 2, 3, 1).numpy()  # NHWC uint8
    arrays = {"x": x}
    if labels:
        arrays["y"] = split.y_train[start:start + n].numpy()
    np.savez(path, **arrays)
    return path


def _digits_folder(root, start: int, n: int):
    split = digits_split()
    for i in range(start, start + n):
        d = root / str(int(split.y_train[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.x_train[i, 0].numpy()).save(d / f"{i}.png")
    return root


def test_parse_source_weight_only_when_float():
    assert parse_source("seeds.npz:0.2") == DataSource("seeds.npz", 0.2)
    assert parse_source("digits:test") == DataSource("digits:test")
    assert parse_source("/data/run:3/imgs") == DataSource("/data/run:3/imgs")
    assert parse_source("/data/a:b:2") == DataSource("/data/a:b", 2.0)
    with pytest.raises(UserError, match="positive"):
        parse_source("x.npz:-1")
    srcs = [DataSource("a"), DataSource("b", 0.2)]
    assert shares(srcs, [300, 100]) == pytest.approx([0.8, 0.2])
    assert shares([DataSource("a", 2), DataSource("b", 1)], [5, 5]) == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(UserError, match="add up to"):
        shares([DataSource("a"), DataSource("b", 1.0)], [1, 1])


def test_quantize_mixes_synthetic_and_unlabelled_npz(tmp_path):
    teacher = digits_teacher()
    synth = digits_as_synthetic_set(tmp_path / "synth", teacher, n=96, shard_size=48)
    seeds = _digits_npz(tmp_path / "seeds.npz", 500, 20)  # no y: labelled by the teacher
    out = tmp_path / "q"
    res = invoke("quantize", "--data", str(synth), "--data", f"{seeds}:0.25", "--calibration-images", "32",
                 "-o", str(out), "--device", "cpu")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    sources = report["metrics"]["data_sources"]
    assert [s["kind"] for s in sources] == ["synthetic", "npz"]
    assert [s["images"] for s in sources] == [87, 29]  # 116 images: 75 % / 25 %, the 20 seeds reused
    assert sources[1]["labels"] == "teacher" and sources[0]["logits"] == "stored"
    assert sum(s["share"] for s in sources) == pytest.approx(1.0)


def test_prune_on_image_folder_and_cached_logits(tmp_path, monkeypatch):
    folder = _digits_folder(tmp_path / "imgs", 0, 40)
    out = tmp_path / "p"
    args = ("prune", "--profile", "ci-smoke", "--data", str(folder), "--epochs", "1", "--ratio", "0.5", "-o", str(out),
            "--device", "cpu")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    (src,) = report["metrics"]["data_sources"]
    assert src["kind"] == "images" and src["labels"] == "given" and src["images"] == 40 and src["logits"] == "teacher"
    manifest = json.loads((out / "training-set" / "manifest.json").read_text())
    assert manifest["teacher"]["sha256"] and manifest["num_images"] == 40

    # same sources + teacher + seed: the set (and its teacher logits) is reused, never recomputed
    import dfcompress.data.synthetic as synthetic

    def boom(*a, **k):
        raise AssertionError("teacher logits recomputed")

    monkeypatch.setattr(synthetic, "teacher_logits", boom)
    again = build_training_set(digits_teacher(), [DataSource(str(folder))], out / "training-set", 0)
    assert again == out / "training-set"


def test_mixed_set_is_deterministic(tmp_path):
    teacher = digits_teacher()
    npz = _digits_npz(tmp_path / "a.npz", 0, 30, labels=True)
    folder = _digits_folder(tmp_path / "imgs", 100, 10)
    srcs = [DataSource(str(npz)), DataSource(str(folder), 0.5)]
    a = build_training_set(teacher, srcs, tmp_path / "s1", 3)
    b = build_training_set(teacher, srcs, tmp_path / "s2", 3)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert [s["images"] for s in ma["sources"]] == [20, 20]


@pytest.mark.parametrize("make, needle", [
    (lambda d: np.savez(d / "rgb.npz", x=np.zeros((4, 8, 8, 3), np.uint8)), "takes 1-channel input but"),
    (lambda d: np.savez(d / "bad.npz", x=np.zeros((4, 8), np.uint8)), "must be NHWC or NHW"),
    (lambda d: np.savez(d / "f.npz", x=np.zeros((4, 8, 8, 1), np.float32)), "must be uint8"),
    (lambda d: (d / "empty").mkdir(), "holds no images"),
    (lambda d: ((d / "broken").mkdir(), (d / "broken" / "a.png").write_bytes(b"not a png")), "cannot read image"),
    (lambda d: None, "not found"),
])
def test_bad_data_exits_2_with_one_line(tmp_path, make, needle):
    make(tmp_path)
    target = next((p for p in tmp_path.iterdir()), tmp_path / "missing.npz")
    res = invoke("quantize", "--data", str(target), "--data", f"{target}:0.5", "-o", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.startswith("error")]) <= 1
