"""The ``streamdet`` command (pipeline.cli) and ``run_pipeline.py`` run the same code."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import run_pipeline
from pipeline import cli
from tests.helpers.standin import bikes_path

TIMING = ("capture_time", "latency_ms", "timing_ms", "time")


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        out.append({k: v for k, v in obj.items() if k not in TIMING})
    return out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.main.commands:
        assert f"\n  {command.name}" in out
    assert "streamdet-train" in out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--source", "x.mp4"]])
def test_missing_or_unknown_command_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if argv:
        assert err.startswith("error: streamdet: unknown command") and err.count("\n") == 1


def test_run_help_names_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: streamdet run ")


def test_bad_run_flag_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--max-frames", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --max-frames") and err.count("\n") == 1


def test_streamdet_run_equals_run_pipeline(standin_model: Path, tmp_path: Path) -> None:
    common = ["--source", str(bikes_path()), "--model", str(standin_model), "--max-frames", "4",
              "--publish", "none", "--quiet"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run_pipeline.main([*common, "--jsonl", str(a)]) == 0
    assert cli.main(["run", *common, "--jsonl", str(b)]) == 0
    lines = _lines(a)
    assert len(lines) == 5 and lines == _lines(b)


@pytest.mark.parametrize("command", ["subscribe", "ctl", "calibrate", "build-engine"])
def test_tool_subcommands_print_their_own_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: streamdet {command} ")  # the name typed, not python -m


def test_console_script_is_installed() -> None:
    exe = shutil.which("streamdet")
    if exe is None:
        pytest.skip("the streamdet console script is not on PATH (pip install -e . installs it)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "commands:" in proc.stdout
