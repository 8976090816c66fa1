"""NaN and infinity pass every ``min``/``max`` comparison, so each float option -- every float flag of every
command and every float setting a profile can hold -- is checked to refuse them with one line and exit 2."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import typer

from dfcompress.cli import app
from dfcompress.settings import SECTIONS
from reliability_helpers import assert_one_line_error, invoke

BAD = ("nan", "inf", "-inf")


def _float_flags() -> list[tuple[str, str]]:
    """(command, --flag) for every float option the CLI has, found from the app itself (new ones are covered too)."""
    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for p in cmd.params:
            if getattr(getattr(p, "type_descriptor", None), "annotation", None) is float:
                out.append((name, max(p.opts, key=len)))
    return out


def _float_settings() -> list[str]:
    """``section.key`` of every float field of every settings section (Optional[float] included)."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if float in (hints[f.name], *typing.get_args(hints[f.name])):
                out.append(f"{section}.{f.name}")
    return out


def test_the_lists_are_not_empty():
    assert ("prune", "--ratio") in _float_flags() and ("distill", "--max-drop") in _float_flags()
    assert "prune.ratio" in _float_settings() and "synthesize.alpha_mean" in _float_settings()


@pytest.mark.parametrize("command,flag", _float_flags())
@pytest.mark.parametrize("value", BAD)
def test_float_flags_refuse_non_finite(command: str, flag: str, value: str):
    args = [command, f"{flag}={value}", "--dry-run"]
    assert_one_line_error(args, invoke(args), needles=(flag, "finite"))


@pytest.mark.parametrize("key", _float_settings())
@pytest.mark.parametrize("value", (".nan", ".inf", "-.inf"))
def test_profile_floats_refuse_non_finite(tmp_path, key: str, value: str):
    section, name = key.split(".")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"{section}:\n  {name}: {value}\n")
    args = ["synthesize", "--profile", str(profile), "--dry-run"]
    assert_one_line_error(args, invoke(args), needles=(name, "finite"))
