"""Every numeric option of the training and deployment tools: a bad value is one ``error:`` line naming the
option and exit status 2, checked while parsing (nothing trained, rendered or written); a run directory that
is a file is one line and exit status 1. The tools run as ``streamdet-train COMMAND`` (:data:`training.tools.TOOLS`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.deploy import build_engine, calibrate
from training import dataset, evaluate, export, render_video, train, train_semantic
from training.tools import TOOLS

# The probe's base command: a run of seconds, were it to start.
TRAIN = ["--images", "8", "--val-images", "4", "--epochs", "1", "--batch", "4", "--max-iters", "1", "--input",
         "64x64", "--width-mult", "0.25", "--cache-dir", "", "--threads", "1", "--no-progress"]
SEMANTIC = ["--task", "semantic", "--images", "4", "--val-images", "2", "--epochs", "1", "--batch", "2",
            "--max-iters", "1", "--input", "64x64", "--crop", "64x64", "--threads", "1"]


def _usage(option: str, problem: str) -> str:
    return f"error: argument {option}: {problem} (see --help)"


def _status(argv: list[str]) -> int:
    """``streamdet-train ARGV``'s exit status (argparse's usage errors raise SystemExit)."""
    try:
        return TOOLS(argv)
    except SystemExit as e:
        assert isinstance(e.code, int)
        return e.code


FINITE_LR = "expected a finite number > 0 and <= 1"
FRACTION = "expected a finite number from 0 to 1"
MULT = "expected a finite number > 0 and <= 16"
SEED = "expected an integer from 0 to 4294967295"
COUNT = "expected an integer >= 1"

CASES: dict[str, tuple[list[str], str]] = {
    # train (detect): the probe's cases, then every other number
    "train lr nan": (["train", *TRAIN, "--lr", "nan"], _usage("--lr", f"{FINITE_LR}, got 'nan'")),
    "train lr inf": (["train", *TRAIN, "--lr", "inf"], _usage("--lr", f"{FINITE_LR}, got 'inf'")),
    "train lr 0": (["train", *TRAIN, "--lr", "0"], _usage("--lr", f"{FINITE_LR}, got '0'")),
    "train lr 2": (["train", *TRAIN, "--lr", "2"], _usage("--lr", f"{FINITE_LR}, got '2'")),
    "train lr text": (["train", *TRAIN, "--lr", "fast"], _usage("--lr", f"{FINITE_LR}, got 'fast'")),
    "train h264 2": (["train", *TRAIN, "--h264-fraction", "2"], _usage("--h264-fraction", f"{FRACTION}, got '2'")),
    "train h264 -0.5": (["train", *TRAIN, "--h264-fraction=-0.5"],
                        _usage("--h264-fraction", f"{FRACTION}, got '-0.5'")),
    "train h264 nan": (["train", *TRAIN, "--h264-fraction", "nan"],
                       _usage("--h264-fraction", f"{FRACTION}, got 'nan'")),
    "train warmup nan": (["train", *TRAIN, "--warmup-epochs", "nan"],
                         _usage("--warmup-epochs", "expected a finite number from 0 to 1000, got 'nan'")),
    "train warmup -1": (["train", *TRAIN, "--warmup-epochs", "-1"],
                        _usage("--warmup-epochs", "expected a finite number from 0 to 1000, got '-1'")),
    "train width nan": (["train", *TRAIN, "--width-mult", "nan"], _usage("--width-mult", f"{MULT}, got 'nan'")),
    "train width 0": (["train", *TRAIN, "--width-mult", "0"], _usage("--width-mult", f"{MULT}, got '0'")),
    "train width 1e300": (["train", *TRAIN, "--width-mult", "1e300"], _usage("--width-mult", f"{MULT}, got '1e300'")),
    "train depth -1": (["train", *TRAIN, "--depth-mult", "-1"], _usage("--depth-mult", f"{MULT}, got '-1'")),
    "train decay -0.1": (["train", *TRAIN, "--weight-decay", "-0.1"],
                         _usage("--weight-decay", f"{FRACTION}, got '-0.1'")),
    "train decay inf": (["train", *TRAIN, "--weight-decay", "inf"], _usage("--weight-decay", f"{FRACTION}, got 'inf'")),
    "train images 0": (["train", *TRAIN, "--images", "0"], _usage("--images", f"{COUNT}, got '0'")),
    "train images 1.5": (["train", *TRAIN, "--images", "1.5"], _usage("--images", f"{COUNT}, got '1.5'")),
    "train val-images 0": (["train", *TRAIN, "--val-images", "0"], _usage("--val-images", f"{COUNT}, got '0'")),
    "train epochs 0": (["train", *TRAIN, "--epochs", "0"], _usage("--epochs", f"{COUNT}, got '0'")),
    "train batch 0": (["train", *TRAIN, "--batch", "0"], _usage("--batch", f"{COUNT}, got '0'")),
    "train seed -1": (["train", *TRAIN, "--seed", "-1"], _usage("--seed", f"{SEED}, got '-1'")),
    "train seed 2^32": (["train", *TRAIN, "--seed", "4294967296"], _usage("--seed", f"{SEED}, got '4294967296'")),
    "train data-seed -1": (["train", *TRAIN, "--data-seed", "-1"], _usage("--data-seed", f"{SEED}, got '-1'")),
    "train max-iters -1": (["train", *TRAIN, "--max-iters", "-1"],
                           _usage("--max-iters", "expected an integer >= 0, got '-1'")),
    "train val-batches -1": (["train", *TRAIN, "--val-batches", "-1"],
                             _usage("--val-batches", "expected an integer >= 0, got '-1'")),
    "train threads 0": (["train", *TRAIN, "--threads", "0"],
                        _usage("--threads", "expected an integer from 1 to 1024, got '0'")),
    "train workers 0": (["train", *TRAIN, "--workers", "0"],
                        _usage("--workers", "expected an integer from 1 to 256, got '0'")),
    "train workers 1000": (["train", *TRAIN, "--workers", "1000"],
                           _usage("--workers", "expected an integer from 1 to 256, got '1000'")),
    "train images < batch": (["train", *TRAIN, "--images", "2"],
                             "error: --images: expected at least --batch (4) images, got 2"),
    "train task without value": (["train", "--task"], _usage("--task", "expected one argument")),
    # train --task semantic
    "semantic lr nan": (["train", *SEMANTIC, "--lr", "nan"], _usage("--lr", f"{FINITE_LR}, got 'nan'")),
    "semantic dice inf": (["train", *SEMANTIC, "--dice", "inf"],
                          _usage("--dice", "expected a finite number from 0 to 100, got 'inf'")),
    "semantic h264 2": (["train", *SEMANTIC, "--h264-fraction", "2"],
                        _usage("--h264-fraction", f"{FRACTION}, got '2'")),
    "semantic decay nan": (["train", *SEMANTIC, "--weight-decay", "nan"],
                           _usage("--weight-decay", f"{FRACTION}, got 'nan'")),
    "semantic seed -1": (["train", *SEMANTIC, "--seed", "-1"], _usage("--seed", f"{SEED}, got '-1'")),
    "semantic val-images 0": (["train", *SEMANTIC, "--val-images", "0"], _usage("--val-images", f"{COUNT}, got '0'")),
    "semantic widths one stage": (["train", *SEMANTIC, "--widths", "8"], _usage(
        "--widths", "expected 2 to 8 comma-separated integers from 1 to 1024, got '8'")),
    "semantic widths 0": (["train", *SEMANTIC, "--widths", "8,0"], _usage(
        "--widths", "expected 2 to 8 comma-separated integers from 1 to 1024, got '8,0'")),
    "semantic images < batch": (["train", *SEMANTIC, "--images", "1"],
                                "error: --images: expected at least --batch (2) images, got 1"),
    "semantic crop off the stride": (["train", *SEMANTIC, "--input", "96x96", "--crop", "80x64"],
                                     "error: --crop: expected multiples of 32 (the deepest stride of 5 --widths "
                                     "stages), got 80x64"),
    "semantic input off the stride": (["train", *SEMANTIC, "--arch", "pan_fcn", "--input", "100x96", "--crop",
                                       "64x64"], "error: --input: expected multiples of 32 (the deepest stride of "
                                                 "--arch pan_fcn), got 100x96"),
    # dataset, render-video
    "dataset seed -1": (["dataset", "--out", "OUT", "--images", "1", "--seed", "-1"],
                        _usage("--seed", f"{SEED}, got '-1'")),
    "dataset images 0": (["dataset", "--out", "OUT", "--images", "0"], _usage("--images", f"{COUNT}, got '0'")),
    "render seconds nan": (["render-video", "--out", "OUT.mp4", "--seconds", "nan"],
                           _usage("--seconds", "expected a finite number > 0 and <= 3600, got 'nan'")),
    "render seconds 0": (["render-video", "--out", "OUT.mp4", "--seconds", "0"],
                         _usage("--seconds", "expected a finite number > 0 and <= 3600, got '0'")),
    "render no frame": (["render-video", "--out", "OUT.mp4", "--seconds", "0.01"],
                        "error: --seconds: expected at least one frame (0.04 s at --fps 25), got 0.01"),
    "render fps 0": (["render-video", "--out", "OUT.mp4", "--fps", "0"],
                     _usage("--fps", "expected an integer from 1 to 240, got '0'")),
    "render crf 52": (["render-video", "--out", "OUT.mp4", "--crf", "52"],
                      _usage("--crf", "expected an integer from 0 to 51, got '52'")),
    "render seed -1": (["render-video", "--out", "OUT.mp4", "--seed", "-1"], _usage("--seed", f"{SEED}, got '-1'")),
    # evaluate, export
    "evaluate batch 0": (["evaluate", "--model", "m.onnx", "--data", "d", "--batch", "0"],
                         _usage("--batch", f"{COUNT}, got '0'")),
    "evaluate max-images 0": (["evaluate", "--model", "m.onnx", "--data", "d", "--max-images", "0"],
                              _usage("--max-images", f"{COUNT}, got '0'")),
    "evaluate conf nan": (["evaluate", "--model", "m.onnx", "--data", "d", "--conf", "nan"],
                          _usage("--conf", f"{FRACTION}, got 'nan'")),
    "evaluate iou 1.5": (["evaluate", "--model", "m.onnx", "--data", "d", "--iou", "1.5"],
                         _usage("--iou", f"{FRACTION}, got '1.5'")),
    "evaluate min-score -1": (["evaluate", "--model", "m.onnx", "--data", "d", "--min-score", "-1"],
                              _usage("--min-score", f"{FRACTION}, got '-1'")),
    "evaluate threads -1": (["evaluate", "--model", "m.onnx", "--data", "d", "--threads", "-1"],
                            _usage("--threads", "expected an integer >= 0, got '-1'")),
    "export opset 16": (["export", "x.pt", "--out", "m.onnx", "--opset", "16"],
                        _usage("--opset", "expected an integer from 17 to 20, got '16'")),
    "export opset 99": (["export", "x.pt", "--out", "m.onnx", "--opset", "99"],
                        _usage("--opset", "expected an integer from 17 to 20, got '99'")),
    "export val-images -1": (["export", "x.pt", "--out", "m.onnx", "--val-images", "-1"],
                             _usage("--val-images", "expected an integer >= 0, got '-1'")),
    "export data-seed -1": (["export", "x.pt", "--out", "m.onnx", "--data-seed", "-1"],
                            _usage("--data-seed", f"{SEED}, got '-1'")),
    # calibrate, build-engine (the deployment tools, here as streamdet-train subcommands)
    "calibrate method foo": (["calibrate", "m.onnx", "--method", "foo"], _usage(
        "--method", "invalid choice: 'foo' (choose from 'minmax', 'entropy', 'percentile')")),
    "calibrate frames 0": (["calibrate", "m.onnx", "--frames", "0"], _usage("--frames", f"{COUNT}, got '0'")),
    "build precision fp64": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp64"], _usage(
        "--precision", "invalid choice: 'fp64' (choose from 'fp32', 'fp16', 'int8')")),
    "build batch 0,0,0": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--batch", "0,0,0"],
                          _usage("--batch", "expected 1 <= min <= opt <= max, got 0,0,0")),
    "build batch 8,4,16": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--batch",
                            "8,4,16"], _usage("--batch", "expected 1 <= min <= opt <= max, got 8,4,16")),
    "build batch x": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--batch", "x"],
                      _usage("--batch", "expected MIN,OPT,MAX batch sizes, got 'x'")),
    "build opt-level 9": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--opt-level", "9"],
                          _usage("--opt-level", "expected an integer from 0 to 5, got '9'")),
    "build workspace -1": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--workspace-gib",
                            "-1"], _usage("--workspace-gib", "expected a finite number > 0 and <= 1024, got '-1'")),
    "build workspace nan": (["build-engine", "m.onnx", "--out", "m.engine", "--precision", "fp32", "--workspace-gib",
                             "nan"], _usage("--workspace-gib", "expected a finite number > 0 and <= 1024, got 'nan'")),
}


@pytest.mark.parametrize("argv, message", CASES.values(), ids=CASES.keys())
def test_a_bad_argument_is_one_line_and_status_2(argv: list[str], message: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "run")] if argv[0] == "train" else []
    assert _status([*argv, *out]) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert list(tmp_path.iterdir()) == []  # nothing trained, rendered or written


@pytest.mark.parametrize("task", [[], ["--task", "semantic"]])
@pytest.mark.parametrize("parents", [False, True])
def test_a_run_directory_that_is_a_file_is_named_once(task: list[str], parents: bool, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``error: FILE: File exists`` (``mkdir`` of the detector's run directory)."""
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0\n")
    out = file / "run" if parents else file
    assert TOOLS(["train", *task, "--out", str(out), "--images", "4", "--batch", "2"]) == 1
    why = f"{file} is not a directory" if parents else "not a directory"
    assert capsys.readouterr().err.splitlines() == [f"error: {out}: {why}"]
    assert file.read_text() == "root:x:0:0\n"


@pytest.mark.parametrize("parser, argv, want", [
    (train.build_parser(), ["--out", "r", "--lr", "1", "--h264-fraction", "0", "--warmup-epochs", "0",
                            "--width-mult", "16", "--seed", "4294967295", "--weight-decay", "1"],
     {"lr": 1.0, "h264_fraction": 0.0, "warmup_epochs": 0.0, "width_mult": 16.0, "seed": 2**32 - 1,
      "weight_decay": 1.0}),
    (train.build_parser(), ["--out", "r", "--h264-fraction", "1", "--threads", "1024", "--max-iters", "0"],
     {"h264_fraction": 1.0, "threads": 1024, "max_iters": 0}),
    (train_semantic.build_parser(), ["--out", "r", "--dice", "0", "--widths", "8,16"],
     {"dice": 0.0, "widths": (8, 16)}),
    (export.build_parser(), ["c.pt", "--out", "m.onnx", "--opset", "20", "--data-seed", "0"],
     {"opset": 20, "data_seed": 0}),
    (calibrate.build_parser(), ["m.onnx", "--frames", "1"], {"frames": 1}),
    (build_engine.build_parser(), ["m.onnx", "--precision", "fp32", "--out", "e", "--batch", "4", "--opt-level", "0",
                                   "--workspace-gib", "1024"],
     {"batch": build_engine.BatchProfile(4, 4, 4), "opt_level": 0, "workspace_gib": 1024.0}),
])
def test_values_at_the_bounds_are_accepted(parser: object, argv: list[str], want: dict[str, object]) -> None:
    args = parser.parse_args(argv)  # type: ignore[attr-defined]
    assert {k: getattr(args, k) for k in want} == want


@pytest.mark.parametrize("module, prog", [
    (train, "python -m training.train"), (dataset, "python -m training.dataset"),
    (render_video, "python -m training.render_video"), (evaluate, "python -m training.evaluate"),
    (calibrate, "python -m training.calibrate"), (build_engine, "python -m training.build_engine"),
])
def test_run_as_a_module_the_usage_names_the_module(module: object, prog: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])  # type: ignore[attr-defined]
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


@pytest.mark.parametrize("argv, prog", [
    (["train", "--help"], "streamdet-train train"),
    (["train", "--task", "semantic", "--help"], "streamdet-train train"),
    (["render-video", "--help"], "streamdet-train render-video"),
    (["calibrate", "--help"], "streamdet-train calibrate"),
    (["build-engine", "--help"], "streamdet-train build-engine"),
])
def test_as_a_subcommand_the_usage_names_the_command_typed(argv: list[str], prog: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert _status(argv) == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")
