"""Guarantee 4: numerical faults. A synthetic batch whose loss turns NaN/inf is retried with a new seed,
reported, and never written; a teacher that yields NaN/inf is refused before any work starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reliability_helpers import TINY_SYNTH, assert_one_line_error, error_lines, invoke, visible_files


def _profile(folder: Path, name: str, synthesize: dict | None = None, distill: dict | None = None) -> Path:
    import yaml

    data = {"description": "reliability: numerical faults"}
    if synthesize:
        data["synthesize"] = synthesize
    if distill:
        data["distill"] = distill
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_absurd_learning_rate_retries_then_stops_without_writing(in_tmp: Path) -> None:
    """lr_generator 1e30 (a real, if absurd, setting): every attempt diverges; each is logged, none is written."""
    prof = _profile(in_tmp, "absurd", {"lr_generator": 1.0e30, "max_retries": 2})
    args = ["synthesize", "-o", "out", "--profile", prof, "-n", "16", "--batch-size", "8", "--iterations", "3"]
    res = invoke(args)
    assert res.exit_code == 1, res.stderr  # NumericalError: the documented exit code of an unrecoverable NaN
    lines = error_lines(res.stderr)
    assert "Traceback" not in res.stderr
    retries = [line for line in lines if "retrying with a new seed" in line]
    assert [("attempt %d of 3" % i) in r for i, r in zip((1, 2, 3), retries)] == [True, True, True]
    assert lines[-1].startswith("error: ") and "NaN/inf in all 3 attempts" in lines[-1]
    assert "lower the learning rates" in lines[-1]
    written = visible_files(in_tmp / "out" / "shards", "*.safetensors") if (in_tmp / "out" / "shards").is_dir() else []
    assert written == [], "a diverged batch must never be written"
    assert not (in_tmp / "out" / "manifest.json").exists()


def _run_with_lr(folder: Path, tag: str, lr: float):
    prof = _profile(folder, tag, {"lr_generator": lr, "max_retries": 6})
    args = ["synthesize", "-o", tag, "--profile", prof, "-n", "16", "--batch-size", "8", "--iterations", "3", "--seed", "0"]
    res = invoke(args)
    retries = json.loads(res.stdout)["retries"] if res.exit_code == 0 else None
    return prof, folder / tag, res, retries


def test_nan_batch_is_retried_with_a_new_seed_reported_and_never_written(in_tmp: Path) -> None:
    """Find, by bisection on log10(lr_generator), a learning rate at NaturalInversion's divergence threshold: there
    some batch seeds diverge and their retries (new seeds) do not. 1e3 never diverges, 1e30 always does."""
    from dfcompress.device import resolve_runtime
    from dfcompress.errors import NumericalError
    from dfcompress.inversion.runner import shard_labels, shard_ranges
    from dfcompress.seeds import synthesis_seed
    from dfcompress.inversion.synthesizers import build_synthesizer
    from dfcompress.models.embedded import embedded_teacher
    from dfcompress.settings import resolve_settings

    lo, hi = 3.0, 30.0  # log10 of a calm and of a diverging learning rate
    found, tried = None, []
    for step in range(16):
        exponent = (lo + hi) / 2
        prof, out, res, retries = _run_with_lr(in_tmp, f"lr{step}", 10.0 ** exponent)
        tried.append((round(exponent, 3), retries))
        if retries is None:
            assert res.exit_code == 1 and "NaN/inf in all 7 attempts" in res.stderr, res.stderr
            hi = exponent
        elif retries == 0:
            lo = exponent
        else:
            found = (prof, out, res)
            break
    if found is None:
        pytest.fail(f"no lr_generator between 1e3 and 1e30 gave a retried-then-successful batch; tried {tried}")
    prof, out, res = found
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    total = sum(s["retries"] for s in manifest["shards"])
    assert total > 0 and manifest["retries"] == total and report["metrics"]["retries"] == total
    assert json.loads(res.stdout)["retries"] == total
    assert sum("retrying with a new seed" in line for line in res.stderr.splitlines()) == total

    # what was written is exactly the retry's result, and the first seed really diverges
    settings = resolve_settings(str(prof), {"synthesize.num_images": 16, "synthesize.batch_size": 8,
                                            "synthesize.iterations": 3, "seed": 0, "device": "cpu"})
    teacher = embedded_teacher()
    runtime = resolve_runtime("cpu")
    synth = build_synthesizer(teacher, settings.synthesize, runtime, None)
    checked = 0
    for k, (start, stop) in enumerate(shard_ranges(16, 8)):
        side = json.loads((out / "shards" / f"shard-{k:05d}.json").read_text())
        for batch in side["loss"]["batches"]:
            r = batch["retries"]
            assert batch["seed"] == synthesis_seed(0, k, batch["batch"], r)
            assert all(v is None or v == v for v in batch["final"].values())
            if r == 0:
                continue
            labels = shard_labels(0, k, start, stop, teacher.num_classes)
            with pytest.raises(NumericalError):
                synth.synthesize_batch(labels, synthesis_seed(0, k, batch["batch"], 0))
            result = synth.synthesize_batch(labels, batch["seed"])
            from safetensors.torch import load_file

            from dfcompress.data.synthetic import to_uint8

            stored = load_file(str(out / "shards" / f"shard-{k:05d}.safetensors"))
            assert torch.equal(stored["images"], to_uint8(result.images01))
            assert torch.isfinite(stored["logits"]).all()
            checked += 1
    assert checked > 0
    assert "nan" not in (out / "loss.csv").read_text().lower()


@pytest.mark.parametrize("case", ["nan-weights-state-dict", "nan-initializer-onnx", "inf-logits-finite-weights"])
def test_nan_teacher_is_refused_before_any_work(case: str, materials: Path, tiny_set: Path, in_tmp: Path) -> None:
    model = {"nan-weights-state-dict": [materials / "nan_weights.pt", "--arch", "digits_cnn"],
             "nan-initializer-onnx": [materials / "nan_weight.onnx"],
             "inf-logits-finite-weights": [materials / "inf_logits.pt", "--arch", "digits_cnn"]}[case]
    for args in (["synthesize", *model, "-o", "synth", *TINY_SYNTH],
                 ["distill", *model, "--data", tiny_set, "-o", "student", "--profile", "ci-smoke"],
                 ["stats", *model, "-o", "stats.safetensors"]):
        res = invoke(args)
        assert_one_line_error(args, res, ["NaN/inf", "cannot be used as a teacher"])
        assert sorted(p.name for p in in_tmp.iterdir()) == [], f"{args[0]} wrote something for a NaN teacher"


def test_diverging_distillation_stops_without_writing_a_model(tiny_set: Path, in_tmp: Path) -> None:
    """KD with lr 1e30: the loss becomes NaN/inf; training stops with one actionable line, no model is written."""
    prof = _profile(in_tmp, "kd", distill={"lr": 1.0e30, "epochs": 2, "batch_size": 4, "student": "wrn_16_1", "export": False})
    args = ["distill", "--data", tiny_set, "-o", "student", "--profile", prof]
    res = invoke(args)
    line = assert_one_line_error(args, res, ["KD loss became", "lower the learning rate"], code=1)
    assert "epoch 1" in line
    assert not (in_tmp / "student" / "model.safetensors").exists() and not (in_tmp / "student" / "dfcompress.json").exists()
