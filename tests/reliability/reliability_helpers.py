"""Shared helpers of the reliability suite: running the CLI (in-process and as a real process), building
real bad input files, malicious pickles, and integrity checks of output folders."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from dfcompress.cli import app

REPO = Path(__file__).resolve().parents[2]

# tiny, fast settings (ci-smoke profile + flags); the embedded digits teacher when MODEL is omitted
TINY_SYNTH = ["--profile", "ci-smoke", "--iterations", "2", "-n", "16", "--batch-size", "8"]
# the reference synthesize run: 8 shards of 8 images, long enough per shard to be killed inside one
SYNTH_ARGS = ["--profile", "ci-smoke", "-n", "64", "--batch-size", "8", "--iterations", "20", "--seed", "5"]
KD_PROFILE = """description: reliability suite - a small KD run with several epochs to kill
distill:
  student: wrn_16_1
  epochs: 8
  batch_size: 8
  export: false
"""


# ------------------------------------------------------------------------------------------------
# running the CLI


def invoke(args: Sequence[str]):
    """In-process run of ``dfcompress ARGS`` (typer's CliRunner on the real app; stdout/stderr kept apart)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_executable() -> list[str]:
    exe = Path(sys.executable).parent / "dfcompress"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dfcompress"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the same intra-op thread count as this process: CPU results are bit-identical only at equal thread counts,
    # and the determinism tests compare child runs with in-process ones
    import torch

    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    env.pop("DFCOMPRESS_DEBUG", None)
    env["PYTHONWARNINGS"] = "ignore"  # library deprecation chatter is not what these tests judge
    return env


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 300, preexec_fn=None) -> subprocess.CompletedProcess:
    """A real ``dfcompress`` process (exit code and stderr exactly as a shell sees them)."""
    return subprocess.run(cli_executable() + [str(a) for a in args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def start_cli(args: Sequence[str], cwd: Path, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen(cli_executable() + [str(a) for a in args], cwd=cwd, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def describe(args: Sequence[str], result) -> str:
    out = getattr(result, "stdout", "") or ""
    err = getattr(result, "stderr", "") or ""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    return f"dfcompress {shlex.join(str(a) for a in args)}\n-> exit {code}\nstderr: {err!r}\nstdout: {out[:500]!r}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(args: Sequence[str], result, needles: Iterable[str] = (), code: int = 2) -> str:
    """Exit ``code``, exactly one non-empty stderr line 'error: ...' containing every needle, no traceback."""
    what = describe(args, result)
    got = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert got == code, what
    err = result.stderr or ""
    assert "Traceback" not in err and "Traceback" not in (result.stdout or ""), what
    lines = error_lines(err)
    assert len(lines) == 1, f"expected ONE stderr line\n{what}"
    line = lines[0]
    assert line.startswith("error: "), what
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} missing from the message\n{what}"
    return line


# ------------------------------------------------------------------------------------------------
# folder snapshots: "nothing half-written left behind"


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file and folder under ``roots`` (folders get size -1)."""
    state: dict[str, tuple[int, int]] = {}
    for root in roots:
        for base, dirs, files in os.walk(root):
            for name in dirs:
                p = Path(base) / name
                state[str(p)] = (-1, 0)
            for name in files:
                p = Path(base) / name
                st = p.stat()
                state[str(p)] = (st.st_size, st.st_mtime_ns)
    return state


def diff_snapshots(before: dict, after: dict) -> list[str]:
    changes = [f"new: {p}" for p in sorted(set(after) - set(before))]
    changes += [f"gone: {p}" for p in sorted(set(before) - set(after))]
    changes += [f"changed: {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return changes


# ------------------------------------------------------------------------------------------------
# models and malicious payloads (Touch, ExecWrite: tests/pickle_payloads.py, shared with test_pickle_safety.py)


def tiny_classifier(in_ch: int = 1, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_ch, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)).eval()


# ------------------------------------------------------------------------------------------------
# integrity checks of a synthetic-set folder at any moment


def visible_files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


def hidden_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*") if p.is_file())


def check_no_torn_files(out: Path) -> dict:
    """Every visible shard, sidecar and manifest is complete and self-consistent; returns a summary."""
    from safetensors import safe_open

    from dfcompress.fileio import sha256_file

    shards_dir = out / "shards"
    summary = {"shards": 0, "done": 0, "hidden": [p.name for p in hidden_files(out)] if out.is_dir() else []}
    if not shards_dir.is_dir():
        return summary
    for f in visible_files(shards_dir, "*.safetensors"):
        with safe_open(str(f), framework="pt", device="cpu") as h:  # a torn file fails to open or to read
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        if f.name.startswith("shard-"):
            n = tensors["images"].shape[0]
            assert tensors["images"].dtype == torch.uint8 and tensors["labels"].shape == (n,), f
            assert tensors["logits"].shape[0] == n and torch.isfinite(tensors["logits"]).all(), f
            summary["shards"] += 1
            side = out / "shards" / (f.name.split(".")[0] + ".json")
            if side.is_file():
                meta = json.loads(side.read_text())
                assert meta["sha256"] == sha256_file(f), f"sidecar of {f} names other bytes"
                summary["done"] += 1
    for f in visible_files(shards_dir, "*.json") + visible_files(out, "*.json"):
        json.loads(f.read_text())  # atomic JSON: never half-written
    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        for entry in m["shards"]:
            assert not Path(entry["file"]).name.startswith("."), "the manifest references a temp file"
            assert sha256_file(out / entry["file"]) == entry["sha256"]
    return summary


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in visible_files(out / "shards", "shard-*.safetensors")}


def assert_same_set(a: Path, b: Path) -> None:
    """Byte-identical shards and identical shard checksums in both manifests."""
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma["shards"] == mb["shards"], "manifest shard entries differ"
    assert ma["num_images"] == mb["num_images"] and ma["run_key"] == mb["run_key"]
    sa, sb = shard_bytes(a), shard_bytes(b)
    assert sorted(sa) == sorted(sb) and len(sa) == len(ma["shards"])
    for name in sa:
        assert sa[name] == sb[name], f"{name} differs"


def save_npz(path: Path, x: np.ndarray, y: Optional[np.ndarray] = None, **extra) -> Path:
    arrays = {"x": x, **extra}
    if y is not None:
        arrays["y"] = y
    np.savez(path, **arrays)
    return path


def raw_pickle(obj, path: Path, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors (bit for bit) and the same metadata."""
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb), f"{key} differs"
