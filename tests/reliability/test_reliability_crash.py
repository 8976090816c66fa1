"""Guarantee 3: crash safety. Real ``dfcompress`` processes are killed with SIGKILL at seeded-random
moments, or run out of file space (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG); at every
such point no torn file is visible, and re-running the same command finishes with exactly the bytes of
an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import time
from pathlib import Path

import pytest
import torch

from reliability_helpers import (SYNTH_ARGS, assert_one_line_error, assert_same_set, assert_same_weights,
                                 check_no_torn_files, hidden_files, run_cli, start_cli, visible_files)

SEED = 20261121
NUM_SHARDS = 8


def _done_shards(out: Path) -> int:
    shards = out / "shards"
    return len(visible_files(shards, "shard-*[0-9].json")) if shards.is_dir() else 0


def _wait(proc, condition, timeout: float = 300.0) -> bool:
    """Poll ``condition`` every 10 ms while ``proc`` runs; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    pytest.fail("timed out waiting for the run to make progress")


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.stderr is not None:
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


TEMP_NAME = re.compile(r"^\..+\.tmp-\w+")  # what fileio.atomic_path names its temp files: hidden, never final


def _only_temp_files_hidden(names) -> bool:
    return all(TEMP_NAME.match(n) or n == ".dfcompress-write-test" for n in names)


def _same_files(a: Path, b: Path, skip=("report.json",)) -> None:
    """Every file of ``b`` except ``skip`` exists in ``a`` with the same bytes, and vice versa."""
    rel_a = {str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in skip}
    rel_b = {str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name not in skip}
    assert rel_a == rel_b
    for rel in sorted(rel_a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"


def test_kill_9_during_synthesize_then_resume_is_byte_identical(reference_set: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    report = json.loads((reference_set / "report.json").read_text())
    shard_seconds = report["timings_s"]["synthesize"] / NUM_SHARDS
    args = ["synthesize", "-o", "ref", *SYNTH_ARGS]
    out = tmp_path / "ref"
    # kill after a seeded-random number of finished shards (each run must finish at least one more), then a
    # seeded-random fraction of one shard's time later; the last kill still leaves >= 2 shards to do
    targets = sorted(rng.sample(range(1, NUM_SHARDS - 3), 3))
    kills = []
    for target in targets:
        start_done = _done_shards(out)
        need = max(target, start_done + 1)
        delay = rng.uniform(0.0, 0.6) * shard_seconds
        proc = start_cli(args, cwd=tmp_path)
        alive = _wait(proc, lambda: (out / "run.json").is_file() and _done_shards(out) >= need)
        assert alive, f"the run finished before kill #{len(kills) + 1}: {proc.stderr.read() if proc.stderr else ''}"
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before the kill"
        _kill(proc)
        state = check_no_torn_files(out)  # every visible shard/JSON complete; temp files are hidden dot-files
        assert _only_temp_files_hidden(state["hidden"]), state["hidden"]
        assert not (out / "manifest.json").exists(), "a killed run must not look complete"
        kills.append({"after_shards": need, "delay_s": round(delay, 3), **state})
    assert len(kills) >= 3 and kills[-1]["done"] >= kills[0]["done"]
    assert kills[-1]["done"] < NUM_SHARDS

    final = run_cli(args, cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert f"{kills[-1]['done']} of {NUM_SHARDS} shards already finished" in final.stderr
    assert_same_set(out, reference_set)
    _same_files(out, reference_set)  # preview, losses, sidecars, run.json: all identical too
    assert hidden_files(out) == [], "temp files of killed writes must be cleaned up once the set is complete"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(not Path(s["file"]).name.startswith(".") for s in manifest["shards"])


def test_kill_9_during_distill_then_resume_gives_identical_weights(reference_set: Path, reference_student: Path,
                                                                   kd_profile: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    ref_report = json.loads((reference_student / "report.json").read_text())
    history = ref_report["metrics"]["history"]
    epochs = len(history)
    epoch_seconds = sum(h["seconds"] for h in history) / epochs
    args = ["distill", "--data", reference_set, "-o", "student", "--profile", kd_profile, "--seed", "1"]
    out = tmp_path / "student"
    ckpt = out / "checkpoint" / "kd-checkpoint.pt"

    def stamp() -> tuple[int, int]:  # each atomic replace gives the checkpoint a new inode
        try:
            st = ckpt.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_mtime_ns)

    last_epoch = 0
    kills = []
    for _ in range(3):
        new_checkpoints = rng.choice([1, 2])
        delay = rng.uniform(0.0, 0.6) * epoch_seconds
        seen = [stamp()]
        proc = start_cli(args, cwd=tmp_path)

        def progressed() -> bool:
            s = stamp()
            if s != seen[-1]:
                seen.append(s)
            return len(seen) - 1 >= new_checkpoints

        assert _wait(proc, progressed), "the run finished before the kill"
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before the kill"
        _kill(proc)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # never torn: it loads completely
        assert state["format"] == "dfcompress-kd/1" and last_epoch < state["epoch"] < epochs
        last_epoch = int(state["epoch"])
        assert not (out / "model.safetensors").exists() and not (out / "dfcompress.json").exists()
        assert _only_temp_files_hidden(p.name for p in hidden_files(out))
        kills.append({"epoch": last_epoch, "delay_s": round(delay, 3)})

    final = run_cli(args + ["--max-drop", "100"], cwd=tmp_path)  # the gate is not part of what resumes
    assert final.returncode == 0, final.stderr
    assert f"resuming from epoch {last_epoch}/{epochs}" in final.stderr
    assert "top1" in final.stderr and json.loads(final.stdout)["after"]["top1"] is not None
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["train"]["resumed_from_epoch"] == last_epoch
    assert [h["loss"] for h in report["metrics"]["history"]] == [h["loss"] for h in history]
    # tensors bit for bit (the file bytes also carry safetensors' metadata, whose key order varies per process)
    assert_same_weights(out / "model.safetensors", reference_student / "model.safetensors")
    assert hidden_files(out) == [], "temp files of killed checkpoint writes must be cleaned up after success"


def _limit_file_size(limit: int):
    def apply() -> None:  # runs in the child between fork and exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited by exec: writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _disk_full_plan(ref: Path) -> tuple[int, str]:
    """A per-file size limit under which the run fails part-way: (limit, name of the first file that cannot be written).

    Files are written in a fixed order (run.json, then per shard: shard, loss, sidecar; then the finishing
    files), so the first one larger than every file before it is where a limit just below it strikes.
    """
    order = [ref / "run.json"]
    for k in range(NUM_SHARDS):
        order += [ref / "shards" / f"shard-{k:05d}.safetensors", ref / "shards" / f"shard-{k:05d}.loss.json",
                  ref / "shards" / f"shard-{k:05d}.json"]
    biggest = 0
    for i, f in enumerate(order):
        size = f.stat().st_size
        if size > biggest and i > 3:  # strictly after shard 0 is finished
            return biggest, f.name
        biggest = max(biggest, size)
    return biggest, "a file written after the last shard"


def test_disk_full_is_one_clear_line_and_finished_shards_are_reused(reference_set: Path, tmp_path: Path) -> None:
    limit, victim = _disk_full_plan(reference_set)
    args = ["synthesize", "-o", "ref", *SYNTH_ARGS]
    out = tmp_path / "ref"
    res = run_cli(args, cwd=tmp_path, preexec_fn=_limit_file_size(limit))
    line = assert_one_line_error(args, res, ["no space left", "re-run the same command to resume"])
    if victim.endswith(("json", "safetensors")):
        assert victim in line
    state = check_no_torn_files(out)
    assert state["hidden"] == [], "the failed write's temp file must be removed"
    assert not (out / "manifest.json").exists()
    assert state["done"] >= 1, "shards finished before the disk filled up must be kept"
    kept = {p.name: p.stat().st_mtime_ns for p in visible_files(out / "shards", "shard-*.safetensors")
            if (out / "shards" / (p.name.split(".")[0] + ".json")).is_file()}

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{state['done']} of {NUM_SHARDS} shards already finished" in again.stderr
    for name, mtime in kept.items():  # reused as they were, not recomputed
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    assert_same_set(out, reference_set)


def test_disk_full_before_anything_is_written_leaves_nothing(tmp_path: Path) -> None:
    """So small a limit that not even run.json fits: exit 2, one line, and no output folder at all."""
    args = ["synthesize", "-o", "out", *SYNTH_ARGS]
    res = run_cli(args, cwd=tmp_path, preexec_fn=_limit_file_size(64))
    assert_one_line_error(args, res, ["no space left", "run.json"])
    assert not (tmp_path / "out").exists()
