"""The public Python API: the README's example runs as written (with tiny settings), and the names exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dfcompress
import dfcompress.api

REPO = Path(__file__).resolve().parents[1]
TINY = {"synthesize.num_images": 32, "synthesize.batch_size": 16, "synthesize.iterations": 2, "distill.epochs": 1,
        "distill.batch_size": 16, "quantize.calibration_images": 16, "export.parity_images": 4}


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    real = dfcompress.api.make_settings

    def tiny(profile=None, overrides=None):  # the README's settings, shrunk so the test takes seconds
        return real(profile, {**(overrides or {}), **TINY})

    monkeypatch.setattr(dfcompress.api, "make_settings", tiny)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "top-1" in printed and "'top1'" in printed
    assert (tmp_path / "runs/api/student/dfcompress.json").is_file()
    assert (tmp_path / "runs/api/int8/model.onnx").is_file()


def test_public_names_are_documented():
    for name in ("load_teacher", "collect_stats", "recover_stats", "synthesize", "SyntheticSet", "distill", "prune",
                 "quantize", "export", "evaluate"):
        obj = getattr(dfcompress, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
    from dfcompress.data import SyntheticSet

    assert SyntheticSet is dfcompress.SyntheticSet
    with pytest.raises(AttributeError):
        dfcompress.no_such_function  # noqa: B018
