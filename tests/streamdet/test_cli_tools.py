"""What the tools share (streamdet.cli): range-checked option types, one line and exit status 2 for bad
arguments (also for options that parse but do not go together), and the program name the user typed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.cli import main as streamdet
from streamdet.cli import (
    Command,
    OneLineErrorParser,
    Subcommand,
    UsageError,
    bounded_int,
    finite_float,
    invoked_as,
    non_negative_int,
    positive_int,
    program_name,
    run_tool,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("convert, text, want", [
    (finite_float(), "1e-3", 1e-3),
    (finite_float(), "-2.5", -2.5),
    (finite_float(gt=0, le=1), "1", 1.0),
    (finite_float(ge=0, le=1), "0", 0.0),
    (finite_float(ge=0, le=1), "-0", 0.0),
    (finite_float(ge=0), "1e300", 1e300),
    (bounded_int(ge=0, le=5), "5", 5),
    (bounded_int(ge=0, le=5), "0", 0),
    (positive_int, "1", 1),
    (positive_int, " 7 ", 7),
    (non_negative_int, "0", 0),
    (bounded_int(), "-12", -12),
])
def test_accepted(convert: Callable[[str], float], text: str, want: float) -> None:
    assert convert(text) == want


@pytest.mark.parametrize("convert, text, message", [
    (finite_float(), "nan", "expected a finite number, got 'nan'"),
    (finite_float(), "-inf", "expected a finite number, got '-inf'"),
    (finite_float(), "1e400", "expected a finite number, got '1e400'"),
    (finite_float(), "", "expected a finite number, got ''"),
    (finite_float(gt=0), "0", "expected a finite number > 0, got '0'"),
    (finite_float(gt=0, le=1), "nan", "expected a finite number > 0 and <= 1, got 'nan'"),
    (finite_float(gt=0, le=1), "1.0000001", "expected a finite number > 0 and <= 1, got '1.0000001'"),
    (finite_float(ge=0, le=1), "-0.5", "expected a finite number from 0 to 1, got '-0.5'"),
    (finite_float(ge=0, le=0.5), "0.6", "expected a finite number from 0 to 0.5, got '0.6'"),
    (finite_float(le=1024), "2e3", "expected a finite number <= 1024, got '2e3'"),
    (bounded_int(ge=0, le=5), "9", "expected an integer from 0 to 5, got '9'"),
    (bounded_int(ge=0, le=5), "-1", "expected an integer from 0 to 5, got '-1'"),
    (bounded_int(ge=0, le=5), "2.0", "expected an integer from 0 to 5, got '2.0'"),
    (positive_int, "0", "expected an integer >= 1, got '0'"),
    (positive_int, "nan", "expected an integer >= 1, got 'nan'"),
    (positive_int, "1e3", "expected an integer >= 1, got '1e3'"),
    (non_negative_int, "-1", "expected an integer >= 0, got '-1'"),
    (bounded_int(le=3), "4", "expected an integer <= 3, got '4'"),
])
def test_refused(convert: Callable[[str], float], text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as e:
        convert(text)
    assert str(e.value) == message


def _tool(work: Callable[[argparse.Namespace], None]) -> Callable[[list[str]], int]:
    def main(argv: list[str]) -> int:
        p = OneLineErrorParser(prog="python -m demo")
        p.add_argument("--lr", type=finite_float(gt=0), default=1.0)
        return run_tool(p, work, argv)

    return main


def _fail(error: BaseException) -> Callable[[argparse.Namespace], None]:
    def work(args: argparse.Namespace) -> None:
        raise error

    return work


def _status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        assert isinstance(e.code, int)
        return e.code


@pytest.mark.parametrize("argv, work, status, lines", [
    (["--lr", "nan"], _fail(AssertionError("not run")), 2,
     ["error: argument --lr: expected a finite number > 0, got 'nan' (see --help)"]),
    (["--lr"], _fail(AssertionError("not run")), 2, ["error: argument --lr: expected one argument (see --help)"]),
    ([], _fail(UsageError("--a: expected at least --b (4), got 2")), 2,
     ["error: --a: expected at least --b (4), got 2"]),
    ([], _fail(ValueError("m.onnx: model file not found")), 1, ["error: m.onnx: model file not found"]),
    ([], _fail(PermissionError(13, "Permission denied", "/x/out")), 1, ["error: /x/out: Permission denied"]),
    ([], _fail(OSError(28, "No space left on device")), 1, ["error: python -m demo: No space left on device"]),
    ([], lambda args: None, 0, []),
])
def test_run_tool_exit_status(argv: list[str], work: Callable[[argparse.Namespace], None], status: int,
                              lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _status(_tool(work), argv) == status
    assert capsys.readouterr().err.splitlines() == lines


def test_a_subcommand_is_named_as_typed_and_only_while_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []

    def record(argv: list[str]) -> int:
        seen.append(invoked_as("python -m demo"))
        return _tool(_fail(OSError(28, "No space left on device")))(argv)

    cmd = Command("demo-cli", "A command.", (Subcommand("fit", "fit", record),))
    assert cmd(["fit"]) == 1
    assert seen == ["demo-cli fit"]
    assert capsys.readouterr().err.splitlines() == ["error: demo-cli fit: No space left on device"]
    assert invoked_as("python -m demo") == "python -m demo"
    with program_name("outer"):
        assert invoked_as("x") == "outer"
    assert invoked_as("x") == "x"


@pytest.mark.parametrize("argv, prog", [
    (["calibrate", "--help"], "streamdet calibrate"),
    (["build-engine", "--help"], "streamdet build-engine"),
])
def test_streamdet_deployment_tools_name_themselves(argv: list[str], prog: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _status(streamdet, argv) == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


@pytest.mark.parametrize("argv, message", [
    (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp64"],
     "error: argument --precision: invalid choice: 'fp64' (choose from 'fp32', 'fp16', 'int8') (see --help)"),
    (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--batch", "0,0,0"],
     "error: argument --batch: expected 1 <= min <= opt <= max, got 0,0,0 (see --help)"),
    (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--opt-level", "9"],
     "error: argument --opt-level: expected an integer from 0 to 5, got '9' (see --help)"),
    (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--workspace-gib", "-1"],
     "error: argument --workspace-gib: expected a finite number > 0 and <= 1024, got '-1' (see --help)"),
    (["build-engine", "m.onnx", "--precision", "fp32"],
     "error: the following arguments are required: --out (see --help)"),
    (["calibrate", "m.onnx", "--method", "foo"],
     "error: argument --method: invalid choice: 'foo' (choose from 'minmax', 'entropy', 'percentile') (see --help)"),
    (["calibrate", "m.onnx", "--frames", "0"],
     "error: argument --frames: expected an integer >= 1, got '0' (see --help)"),
    (["calibrate", "m.onnx", "--frames", "inf"],
     "error: argument --frames: expected an integer >= 1, got 'inf' (see --help)"),
])
def test_streamdet_deployment_tools_bad_arguments(argv: list[str], message: str) -> None:
    """Through the installed command, as users run it: one line on stderr, nothing on stdout, status 2."""
    done = subprocess.run([sys.executable, "-c", "import sys; from pipeline.cli import main; "
                           "raise SystemExit(main(sys.argv[1:]))", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", message + "\n")

