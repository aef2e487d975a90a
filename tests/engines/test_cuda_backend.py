"""CUDA backend (torch.export program): the same code on the CPU here, compared with ONNX Runtime; CUDA graphs
and FP16 autocast only in the gpu-marked test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.base import EngineError  # noqa: E402
from engines.cuda_backend import CudaEngine, resolve_program_path  # noqa: E402
from engines.onnxruntime_backend import OnnxRuntimeEngine  # noqa: E402
from tests.helpers.tiny_detector import TINY_INPUT_WH  # noqa: E402

torch.set_num_threads(1)


def batch(n: int, seed: int = 0) -> np.ndarray:
    w, h = TINY_INPUT_WH
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


@pytest.fixture(scope="module")
def cpu_engine(tiny_detector_pt2: Path) -> Iterator[CudaEngine]:
    """One started engine for the parity cases: loading a ``.pt2`` takes about 2.8 s (torch's deserializer)."""
    with CudaEngine(model_path=tiny_detector_pt2, device="cpu") as e:  # given the .onnx, it loads the .pt2 beside it
        yield e


@pytest.mark.parametrize("n", [1, 3, 8])
def test_cpu_matches_onnxruntime(tiny_detector_pt2: Path, cpu_engine: CudaEngine, n: int) -> None:
    x = batch(n, n)
    with OnnxRuntimeEngine(model_path=tiny_detector_pt2, intra_op_threads=1) as ort_engine:
        want = ort_engine.infer(x)  # type: ignore[attr-defined]
    assert cpu_engine.output_names == ("output0",)
    got = cpu_engine.infer(x)
    assert got[0].shape == want[0].shape and got[0].dtype == np.float32
    w, h = TINY_INPUT_WH
    scale = np.array([w, h, w, h], np.float32).reshape(1, 4, 1)
    # boxes are in input pixels: compare them normalised by the input size (as training.export's parity check)
    assert np.abs(got[0][:, :4] - want[0][:, :4]).max() <= 1e-3  # pixels
    assert (np.abs(got[0][:, :4] - want[0][:, :4]) / scale).max() <= 1e-4
    assert np.abs(got[0][:, 4:] - want[0][:, 4:]).max() <= 1e-4


def test_program_has_no_device_baked_in(tiny_detector_pt2: Path) -> None:
    """The anchor grids are created in forward(); after the device pass nothing stays on the CPU (meta stands in
    for CUDA here)."""
    from torch.export.passes import move_to_device_pass

    program = move_to_device_pass(torch.export.load(str(tiny_detector_pt2.with_suffix(".pt2"))), torch.device("meta"))
    module = program.module()
    assert "'cpu'" not in module.code and "type='cpu'" not in module.code
    w, h = TINY_INPUT_WH
    out = module(torch.zeros(2, 3, h, w, device="meta"))
    assert out.device.type == "meta" and out.shape[0] == 2


def test_errors(tiny_detector_pt2: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no torch.export program .*--torch-export"):
        resolve_program_path(tmp_path / "other.onnx")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EngineError, match="not a loadable torch.export program"):
        CudaEngine(model_path=bad, device="cpu").start()
    e = CudaEngine(model_path=tiny_detector_pt2, device="cpu")
    with pytest.raises(EngineError, match="not started"):
        e.infer(batch(1))
    e.start()
    with pytest.raises(EngineError, match="expected input width x height"):
        e.infer_device(torch.zeros(1, 3, 64, 64))
    e.stop()
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="needs a CUDA GPU"):
            CudaEngine(model_path=tiny_detector_pt2, device="cuda").start()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_fp16_match_onnxruntime(tiny_detector_pt2: Path) -> None:
    with OnnxRuntimeEngine(model_path=tiny_detector_pt2, intra_op_threads=1) as ort_engine:
        want = ort_engine.infer(batch(3))  # type: ignore[attr-defined]
    with CudaEngine(model_path=tiny_detector_pt2, device="cuda", graph_batches=(1, 4)) as e:
        assert isinstance(e, CudaEngine) and e.graphs == (1, 4)
        got = e.infer(batch(3))  # replays the batch-4 graph
        again = e.infer(batch(3))
    np.testing.assert_array_equal(got[0], again[0])
    np.testing.assert_allclose(got[0][:, 4:], want[0][:, 4:], atol=2e-2)  # FP16 autocast
