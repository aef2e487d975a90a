"""TensorRT backend. Here (no GPU, no TensorRT) the binding logic runs against a stand-in ``tensorrt`` module
backed by ONNX Runtime (tests/helpers/fake_tensorrt.py) on CPU tensors; the gpu-marked tests run the
real thing and skip without it."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.base import EngineError  # noqa: E402
from engines.deploy.build_engine import build_engine  # noqa: E402
from engines.engine_file import BatchProfile, Precision, RuntimeInfo, read_engine_header  # noqa: E402
from engines.onnxruntime_backend import OnnxRuntimeEngine  # noqa: E402
from engines.tensorrt_backend import TensorRTEngine, import_tensorrt  # noqa: E402
from tests.helpers import fake_tensorrt as fake  # noqa: E402
from tests.helpers.tiny_detector import TINY_INPUT_WH, tiny_detector  # noqa: E402

torch.set_num_threads(1)
HERE = RuntimeInfo(fake.__version__, "Fake GPU", (9, 0))


@pytest.fixture(autouse=True)
def _reset_fake() -> None:
    fake.reset()


def build(onnx_path: Path, out: Path, batch: BatchProfile | None = None, runtime: RuntimeInfo = HERE) -> None:
    batch = batch or BatchProfile(1, 2, 4)
    build_engine(onnx_path=onnx_path, out_path=out, precision=Precision.FP32, batch=batch, trt_module=fake,
                 runtime_info=runtime)


def engine(path: Path, **kw: object) -> TensorRTEngine:
    return TensorRTEngine(model_path=path, device="cpu", trt_module=fake, runtime_info=kw.pop("runtime", HERE),
                          **kw)  # type: ignore[arg-type]


def reference(onnx_path: Path, x: np.ndarray) -> list[np.ndarray]:
    with OnnxRuntimeEngine(model_path=onnx_path, intra_op_threads=1) as e:
        return e.infer(x)  # type: ignore[attr-defined]


@pytest.mark.parametrize("batch", [1, 3, 4, 6, 9])  # 6 and 9 exceed the profile's max 4: run in chunks
def test_outputs_match_onnxruntime(tiny_detector_onnx: Path, tmp_path: Path, batch: int) -> None:
    out = tmp_path / "m.engine"
    build(tiny_detector_onnx, out)
    x = np.random.default_rng(batch).random((batch, 3, TINY_INPUT_WH[1], TINY_INPUT_WH[0]), dtype=np.float32)
    with engine(out) as e:
        assert isinstance(e, TensorRTEngine)
        assert e.input_name == "images" and e.output_names == ("output0",) and e.max_batch == 4
        got = e.infer(x)
    want = reference(tiny_detector_onnx, x)
    assert got[0].shape == want[0].shape and got[0].dtype == np.float32
    # chunks run at other batch sizes, where ONNX Runtime's kernels round differently in the last bit
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)


def test_min_batch_is_padded(tiny_detector_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.engine"
    build(tiny_detector_onnx, out, BatchProfile(2, 2, 4))
    x = np.random.default_rng(0).random((1, 3, TINY_INPUT_WH[1], TINY_INPUT_WH[0]), dtype=np.float32)
    with engine(out) as e:
        got = e.infer(x)
    np.testing.assert_array_equal(got[0], reference(tiny_detector_onnx, x)[0])


def test_infer_device_returns_views_and_checks_inputs(tiny_detector_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.engine"
    build(tiny_detector_onnx, out)
    w, h = TINY_INPUT_WH
    with engine(out) as e:
        assert isinstance(e, TensorRTEngine)
        x = torch.rand(2, 3, h, w)
        outs = e.infer_device(x)
        assert outs[0].shape[0] == 2 and outs[0].device.type == "cpu"
        np.testing.assert_array_equal(outs[0].numpy(), reference(tiny_detector_onnx, x.numpy())[0])
        for bad, match in [(torch.rand(5, 3, h, w), "expected input"), (torch.rand(2, 3, h, w + 32), "expected input"),
                           (torch.rand(2, 3, h, w, dtype=torch.float64), "expected a torch.float32")]:
            with pytest.raises(EngineError, match=match):
                e.infer_device(bad)
    with pytest.raises(EngineError, match="not started"):
        e.infer(x.numpy())


def test_header_records_the_build(tiny_detector_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.engine"
    build(tiny_detector_onnx, out, BatchProfile(1, 4, 8))
    h = read_engine_header(out)
    assert (h.tensorrt_version, h.gpu_name, h.compute_capability) == (fake.__version__, "Fake GPU", (9, 0))
    assert h.precision is Precision.FP32 and h.batch == BatchProfile(1, 4, 8) and h.input_chw == (3, 96, 128)
    assert h.extra["strongly_typed"] is True


@pytest.mark.parametrize("runtime, match", [
    (RuntimeInfo("11.0.0.1", "Fake GPU", (9, 0)), r"TensorRT 10\.99\.0\.fake \(engine\) vs 11\.0\.0\.1 \(here\)"),
    (RuntimeInfo(fake.__version__, "Fake GPU", (8, 6)), r"compute capability 9\.0 \(engine\) vs 8\.6 \(here\)"),
    (RuntimeInfo(fake.__version__, "Other GPU", (9, 0)), "GPU 'Fake GPU'"),
])
def test_refuses_foreign_engine_unless_rebuild(tiny_detector_onnx: Path, tmp_path: Path, runtime: RuntimeInfo,
                                               match: str) -> None:
    out = tmp_path / "m.engine"
    build(tiny_detector_onnx, out)
    with pytest.raises(EngineError, match=match):
        engine(out, runtime=runtime).start()
    fake.calls.clear()
    e = engine(out, runtime=runtime, rebuild_from=tiny_detector_onnx)
    e.start()
    assert e.rebuilt and "build" in fake.calls
    assert read_engine_header(out).runtime == runtime
    e.stop()


def test_rebuilds_when_the_onnx_changed_or_the_engine_is_missing(tiny_detector_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.engine"
    with pytest.raises(EngineError, match="engine file not found"):
        engine(out).start()
    e = engine(out, rebuild_from=tiny_detector_onnx, rebuild_batch=BatchProfile(1, 1, 2))
    e.start()
    assert e.rebuilt and e.max_batch == 2
    e2 = engine(out, rebuild_from=tiny_detector_onnx)  # same ONNX, same runtime: no rebuild
    e2.start()
    assert not e2.rebuilt
    other, _ = tiny_detector(tmp_path, seed=5, name="other")
    e3 = engine(out, rebuild_from=other)  # a different ONNX than the one it was built from
    e3.start()
    assert e3.rebuilt and read_engine_header(out).onnx_name == "other.onnx"


def test_onnx_path_means_the_engine_beside_it(tiny_detector_onnx: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "m.onnx"
    shutil.copy(tiny_detector_onnx, src)
    e = engine(src)  # as pipeline.stages.engine.make_engine calls it: TensorRTEngine(model_path=MODEL.onnx)
    e.start()
    assert e.model_path == tmp_path / "m.engine" and e.rebuilt and (tmp_path / "m.engine").is_file()
    e.stop()


def test_not_an_engine_file(tmp_path: Path, tiny_detector_onnx: Path) -> None:
    bad = tmp_path / "m.engine"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(EngineError, match="not a streamdet engine file"):
        engine(bad).start()


def test_import_tensorrt_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(EngineError, match="--backend tensorrt needs TensorRT"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # tensorrt-stubs: no Builder
    with pytest.raises(EngineError, match="--backend tensorrt needs TensorRT .*stubs"):
        import_tensorrt()


def _real_tensorrt() -> bool:
    try:
        import_tensorrt()
    except EngineError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_real_tensorrt_matches_onnxruntime(tmp_path: Path, precision: Precision) -> None:
    onnx_path, _ = tiny_detector(tmp_path)
    src = onnx_path
    if precision is Precision.FP16:
        from engines.deploy.calibrate import convert_fp16

        src = tmp_path / "tiny.fp16.onnx"
        convert_fp16(onnx_path, src)
    out = tmp_path / "m.engine"
    build_engine(onnx_path=src, out_path=out, precision=precision, batch=BatchProfile(1, 2, 4))
    x = np.random.default_rng(0).random((3, 3, TINY_INPUT_WH[1], TINY_INPUT_WH[0]), dtype=np.float32)
    with TensorRTEngine(model_path=out) as e:
        got = e.infer(x)
    want = reference(onnx_path, x)
    tol = 1e-2 if precision is Precision.FP32 else 0.5  # TF32 convolutions; FP16 boxes in input pixels
    np.testing.assert_allclose(got[0], want[0], atol=tol)
