"""Output for people and machines: a summary on a terminal, JSON with --json or when stdout is piped;
and a model folder as a complete MODEL for `eval` (input shape, mean/std from its dfcompress.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import dfcompress.cli_common as cli_common
from dfcompress.cli import app

runner = CliRunner()


def invoke(*args: str, terminal: bool, monkeypatch) -> object:
    monkeypatch.setattr(cli_common, "stdout_is_terminal", lambda: terminal)
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("command", [("profiles",), ("inspect",)])
def test_summary_on_a_terminal_json_when_piped(command, monkeypatch):
    on_terminal = invoke(*command, terminal=True, monkeypatch=monkeypatch)
    assert on_terminal.exit_code == 0 and not is_json(on_terminal.stdout) and on_terminal.stdout.strip()
    piped = invoke(*command, terminal=False, monkeypatch=monkeypatch)
    assert piped.exit_code == 0 and is_json(piped.stdout)
    assert is_json(invoke(*command, "--json", terminal=True, monkeypatch=monkeypatch).stdout)
    assert not is_json(invoke(*command, "--text", terminal=False, monkeypatch=monkeypatch).stdout)


def test_eval_takes_a_quantized_model_folder_alone(tmp_path, monkeypatch):
    """`eval int8/ --data test.npz`: no teacher needed; --mean/--std are honoured; --against only adds agreement."""
    from dfcompress.models.embedded import digits_split

    int8 = tmp_path / "int8"
    res = invoke("quantize", "--profile", "ci-smoke", "-o", int8, "--json", terminal=False, monkeypatch=monkeypatch)
    assert res.exit_code == 0, res.output
    split = digits_split()
    npz = tmp_path / "test.npz"
    np.savez(npz, x=np.asarray(split.x_test[:200]), y=np.asarray(split.y_test[:200]))

    def top1(*extra: str) -> dict:
        r = invoke("eval", int8, "--data", npz, "--no-latency", *extra, terminal=False, monkeypatch=monkeypatch)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    plain = top1()
    assert plain["top1"] > 50.0 and plain["agreement"] is None
    assert top1("--mean", "0.9", "--std", "0.05")["top1"] < plain["top1"] - 10  # the given mean/std are used
    assert top1("--against", "embedded")["agreement"] > 50.0
