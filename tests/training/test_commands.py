"""The ``streamdet-train`` command hands each subcommand its own arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from training import commands
from training.tools import TOOLS


def test_help_lists_every_tool(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert [c.name for c in TOOLS.commands] == [
        "train", "evaluate", "export", "export-semantic", "dataset", "render-video", "calibrate", "build-engine"]
    for c in TOOLS.commands:
        assert f"\n  {c.name}" in out


@pytest.mark.parametrize("name", [c.name for c in TOOLS.commands])
def test_each_tool_parses_its_own_arguments(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        commands.main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_unknown_tool_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["fit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: streamdet-train: unknown command 'fit'") and err.count("\n") == 1


def test_missing_training_dependency_is_one_error_line() -> None:
    # A fresh interpreter in which ``import torch`` fails, as without the train extra.
    code = ("import sys; sys.modules['torch'] = None; from training.commands import main; "
            "raise SystemExit(main(['--help']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: streamdet-train needs torch, from the train extra: pip install 'streamdet[train]'\n"
