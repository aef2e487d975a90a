"""The build CLIs' options: Enum options print and accept their values; the FP16 install hint; engines.deploy
imports neither PyTorch nor the layers above it. Nothing here needs PyTorch or a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engines.deploy import build_engine, calibrate
from engines.deploy.calibrate import CalibrationError, CalibrationMethod, Int8Target, convert_fp16
from engines.engine_file import Precision

ROOT = Path(__file__).resolve().parents[3]


def test_calibrate_help_shows_the_enum_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        calibrate.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "{minmax,entropy,percentile}" in out and "{tensorrt,cpu}" in out
    assert "percentile" in out and "minmax" in out and "tensorrt" in out
    assert "CalibrationMethod." not in out and "Int8Target." not in out


def test_calibrate_accepts_method_and_target_values() -> None:
    args = calibrate.build_parser().parse_args(["m.onnx", "--method", "percentile", "--target", "cpu"])
    assert args.method is CalibrationMethod.PERCENTILE and args.target is Int8Target.CPU
    defaults = calibrate.build_parser().parse_args(["m.onnx"])
    assert defaults.method is CalibrationMethod.MINMAX and defaults.target is Int8Target.TENSORRT


def test_calibrate_bad_method_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        calibrate.main(["m.onnx", "--method", "median"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'median'" in err and "'percentile'" in err


def test_build_engine_help_shows_the_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_engine.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "{fp32,fp16,int8}" in out and "Precision." not in out
    args = build_engine.build_parser().parse_args(["m.onnx", "--precision", "int8", "--out", "m.engine"])
    assert args.precision is Precision.INT8


def test_calibrate_missing_model_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert calibrate.main([str(tmp_path / "nope.onnx"), "--out-fp16", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope.onnx'}: model file not found"


def test_fp16_without_the_converter_names_a_working_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # import fails
    with pytest.raises(CalibrationError, match=r"m\.onnx: FP16 conversion needs onnxconverter-common "
                                               r"\(pip install onnxconverter-common\)") as exc:
        convert_fp16(tmp_path / "m.onnx", tmp_path / "m.fp16.onnx")
    assert "[quant]" not in str(exc.value)
    assert not (tmp_path / "m.fp16.onnx").exists()


def test_engines_deploy_imports_no_torch() -> None:
    code = ("import sys, engines.deploy.calibrate, engines.deploy.build_engine, engines.tensorrt_backend; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'pipeline')); "
            "print(bad); raise SystemExit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
