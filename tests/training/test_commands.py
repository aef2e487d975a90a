"""The ``streamdet-train`` command hands each subcommand its own arguments."""

from __future__ import annotations

import pytest

from training import commands


def test_help_lists_every_tool(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert [c.name for c in commands.main.commands] == [
        "train", "evaluate", "export", "export-semantic", "dataset", "render-video", "calibrate", "build-engine"]
    for c in commands.main.commands:
        assert f"\n  {c.name}" in out


@pytest.mark.parametrize("name", [c.name for c in commands.main.commands])
def test_each_tool_parses_its_own_arguments(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        commands.main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_unknown_tool_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["fit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: streamdet-train: unknown command 'fit'") and err.count("\n") == 1
