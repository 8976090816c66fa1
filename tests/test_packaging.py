"""The layout the project promises: top-level profiles/ holds the YAML profiles (one copy), the wheel
ships them, and ``dfcompress profiles`` lists them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_cli import invoke

ROOT = Path(__file__).resolve().parents[1]
TOP = sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))


def test_profiles_are_real_files_at_the_top_level_and_listed():
    assert TOP and not (ROOT / "profiles").is_symlink()
    assert all(not (ROOT / "profiles" / n).is_symlink() for n in TOP)
    rows = json.loads(invoke("profiles", "--json").stdout)
    assert sorted(f"{r['name']}.yaml" for r in rows) == TOP
    assert {Path(r["path"]).parent for r in rows} == {ROOT / "profiles"}  # the copy users read, not a second one


def test_built_wheel_ships_the_profiles(tmp_path):
    pytest.importorskip("setuptools")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from the tracked files)")
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (t.decode() for t in tracked)):
        target, origin = src / rel, ROOT / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            target.symlink_to(origin.readlink())
        elif origin.is_file():
            shutil.copy2(origin, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "whl").glob("dfcompress-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        shipped = {n.removeprefix("dfcompress/profiles/"): z.read(n) for n in z.namelist() if n.startswith("dfcompress/profiles/")}
    assert sorted(shipped) == TOP
    assert all(shipped[n] == (ROOT / "profiles" / n).read_bytes() for n in TOP)
