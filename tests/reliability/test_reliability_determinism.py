"""Guarantee 5: the same command with the same seed on CPU gives the same synthetic set (bytes) and the
same student weights, whether it runs in a fresh process or inside another one."""
from __future__ import annotations

import json
from pathlib import Path

from reliability_helpers import (SYNTH_ARGS, TINY_SYNTH, assert_same_set, assert_same_weights, invoke, shard_bytes)


def _files(folder: Path, skip=("report.json",)) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def test_synthesize_twice_same_seed_same_bytes(reference_set: Path, in_tmp: Path) -> None:
    """The reference ran as its own process; this run shares a process with the whole test session."""
    res = invoke(["synthesize", "-o", "again", *SYNTH_ARGS])
    assert res.exit_code == 0, res.stderr
    assert_same_set(in_tmp / "again", reference_set)
    assert _files(in_tmp / "again") == _files(reference_set)  # manifest, preview, losses too


def test_a_different_seed_gives_a_different_set(in_tmp: Path) -> None:
    """Control: the comparison above can fail: the seed really changes the images."""
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert invoke(["synthesize", "-o", name, *TINY_SYNTH, "--seed", seed]).exit_code == 0
    a, b, c = (shard_bytes(in_tmp / n) for n in "abc")
    assert a == b
    assert all(a[k] != c[k] for k in a)


def test_distill_twice_same_seed_same_weights(reference_set: Path, reference_student: Path, kd_profile: Path,
                                              in_tmp: Path) -> None:
    res = invoke(["distill", "--data", reference_set, "-o", "A", "--profile", kd_profile, "--seed", "1"])
    assert res.exit_code == 0, res.stderr
    assert_same_weights(in_tmp / "A" / "model.safetensors", reference_student / "model.safetensors")
    ours = json.loads((in_tmp / "A" / "report.json").read_text())["metrics"]
    ref = json.loads((reference_student / "report.json").read_text())["metrics"]
    assert [h["loss"] for h in ours["history"]] == [h["loss"] for h in ref["history"]]
    assert ours["top1"] == ref["top1"] and ours["holdout_agreement"] == ref["holdout_agreement"]
    desc = json.loads((in_tmp / "A" / "dfcompress.json").read_text())
    assert desc == json.loads((reference_student / "dfcompress.json").read_text())


def test_quality_gate_reads_the_distill_metrics(reference_student: Path) -> None:
    """--max-drop gates on real top-1 (teacher vs student) measured by distill; a drop beyond it is exit 3."""
    import pytest

    from dfcompress.compress.gate import gate
    from dfcompress.compress.stage import Figures, quality_drop
    from dfcompress.compress.stages import DISTILL
    from dfcompress.errors import GateFailed

    metrics = json.loads((reference_student / "report.json").read_text())["metrics"]
    before, after = DISTILL.figures(metrics)
    assert before.top1 == metrics["teacher_top1"] and after.top1 == metrics["top1"]
    assert (Figures.of(metrics["before"]), Figures.of(metrics["after"])) == (before, after)  # the fixed report section
    what, b, a = quality_drop(before, after)
    assert what == "accuracy" and b - a > 0
    gate(b - a + 0.01, before, after)
    with pytest.raises(GateFailed) as info:
        gate(max(0.0, b - a - 0.5), before, after)
    assert info.value.exit_code == 3
