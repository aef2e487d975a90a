"""engines.deploy.build_engine: input checks and CLI errors here; the build itself against the ONNX Runtime-backed
stand-in ``tensorrt`` (tests/helpers/fake_tensorrt.py). Nothing here runs TensorRT."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from engines.deploy.build_engine import BuildError, build_engine, main  # noqa: E402
from engines.engine_file import BatchProfile, Precision, RuntimeInfo, read_engine_header  # noqa: E402
from tests.helpers import fake_tensorrt as fake  # noqa: E402

HERE = RuntimeInfo(fake.__version__, "Fake GPU", (8, 9))


@pytest.fixture(autouse=True)
def _reset_fake() -> None:
    fake.reset()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_detector_onnx: Path) -> dict[str, Path]:
    """The tiny detector in each precision: fp32, fp16 (with onnxconverter-common), int8 and int8 for the CPU."""
    d = tmp_path_factory.mktemp("models")
    fp32 = tiny_detector_onnx
    import numpy as np

    from engines.deploy.calibrate import Int8Target, convert_fp16, load_model_card, quantize_int8

    card = load_model_card(fp32)
    frames = iter([np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8) for i in range(4)])
    out = {"fp32": fp32, "fp16": d / "tiny.fp16.onnx", "int8": d / "tiny.int8.onnx", "int8cpu": d / "tiny.cpu.onnx"}
    if importlib.util.find_spec("onnxconverter_common") is not None:  # in the train and gpu extras
        convert_fp16(fp32, out["fp16"])
    quantize_int8(fp32, out["int8"], frames=frames, card=card)
    frames = iter([np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8) for i in range(4)])
    quantize_int8(fp32, out["int8cpu"], frames=frames, card=card, target=Int8Target.CPU)
    return out


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_builds_each_precision_from_its_onnx(models: dict[str, Path], tmp_path: Path, precision: str) -> None:
    if not models[precision].is_file():
        pytest.skip("FP16 conversion needs onnxconverter-common (pip install onnxconverter-common)")
    out = tmp_path / f"m.{precision}.engine"
    header = build_engine(onnx_path=models[precision], out_path=out, precision=Precision(precision),
                          batch=BatchProfile(1, 2, 4), trt_module=fake, runtime_info=HERE)
    assert read_engine_header(out) == header
    assert header.precision is Precision(precision) and header.compute_capability == (8, 9)


@pytest.mark.parametrize("precision, model, match", [
    ("int8", "fp32", r"needs a int8 ONNX, this graph is fp32 .*python -m training\.calibrate"),
    ("fp16", "fp32", "needs a fp16 ONNX, this graph is fp32"),
    ("fp32", "int8", "needs a fp32 ONNX, this graph is int8"),
    ("int8", "int8cpu", "zero point .*--target tensorrt"),
])
def test_precision_must_match_the_graph(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        precision: str, model: str, match: str) -> None:
    out = tmp_path / "m.engine"
    rc, err = run_cli([str(models[model]), "--precision", precision, "--out", str(out)], capsys)
    assert rc == 1 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(match, err), err
    assert not out.exists()


def test_without_tensorrt_one_error_line(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "m.engine"
    rc, err = run_cli([str(models["fp32"]), "--precision", "fp32", "--batch", "1,8,32", "--out", str(out)], capsys)
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: --backend tensorrt needs TensorRT")
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--batch", "8,4,16"], "argument --batch: expected 1 <= min <= opt <= max, got 8,4,16"),
    (["--batch", "x"], "argument --batch: expected MIN,OPT,MAX batch sizes, got 'x'"),
    (["--opt-level", "9"], "argument --opt-level: expected an integer from 0 to 5, got '9'"),
])
def test_bad_options(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                     message: str) -> None:
    """A bad option is a usage error: one line, exit 2, nothing built."""
    with pytest.raises(SystemExit) as e:
        main([str(models["fp32"]), "--precision", "fp32", "--out", str(tmp_path / "m.engine"), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m.engine").exists()


def test_missing_or_broken_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_cli([str(tmp_path / "nope.onnx"), "--precision", "fp32", "--out", str(tmp_path / "m.engine")],
                      capsys)
    assert rc == 1 and "nope.onnx: ONNX model not found" in err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf \xff\xfe")
    rc, err = run_cli([str(junk), "--precision", "fp32", "--out", str(tmp_path / "m.engine")], capsys)
    assert rc == 1 and "junk.onnx: not a loadable ONNX model" in err


def test_parser_error_names_the_node(models: dict[str, Path], tmp_path: Path) -> None:
    fake.FAIL_OP = "Softmax"
    with pytest.raises(BuildError, match=r"cannot parse node \d+ '/dfl/Softmax' \(Softmax\): unsupported operator "
                                         r"Softmax \(\+1 more\)"):
        build_engine(onnx_path=models["fp32"], out_path=tmp_path / "m.engine", precision=Precision.FP32,
                     batch=BatchProfile(1, 1, 1), trt_module=fake, runtime_info=HERE)
    assert not (tmp_path / "m.engine").exists()


def test_failed_build_leaves_no_file(models: dict[str, Path], tmp_path: Path) -> None:
    fake.BUILD_RETURNS_NONE = True
    with pytest.raises(BuildError, match="failed to build"):
        build_engine(onnx_path=models["fp32"], out_path=tmp_path / "m.engine", precision=Precision.FP32,
                     batch=BatchProfile(1, 1, 1), trt_module=fake, runtime_info=HERE)
    assert list(tmp_path.iterdir()) == []


def test_timing_cache_is_loaded_and_saved(models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "trt.cache"
    for expected in (b"+", b"++"):
        build_engine(onnx_path=models["fp32"], out_path=tmp_path / "m.engine", precision=Precision.FP32,
                     batch=BatchProfile(1, 1, 1), timing_cache=cache, trt_module=fake, runtime_info=HERE)
        assert cache.read_bytes() == expected  # the stand-in appends one byte per build to what it was given
