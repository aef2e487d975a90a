"""The device-tensor path (``--device cuda``: GPU preprocess into a shared device tensor pool, ``infer_device``,
device NMS) through the full multi-process pipeline, compared with the host path on a few frames of bikes.mp4.

Without a GPU the same wiring runs with torch tensors on the CPU (``Pipeline(tensor_device="cpu")``, the CUDA
backend's ``torch.export`` program run eagerly on the CPU); the ``gpu``-marked test runs it on CUDA.

The tiny detector's input (320x160) is bikes.mp4's 640x272 frame halved (12 px pad top and bottom): an exact 2x
downscale, where OpenCV's bilinear resize and the GPU letterbox give the same pixel levels, so the two paths get
the same input tensors and must publish the same detections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from pipeline.runner import EXIT_OK, Pipeline  # noqa: E402
from pipeline.settings import Settings, load_settings  # noqa: E402
from tests.helpers.standin import bikes_path  # noqa: E402
from tests.helpers.tiny_detector import tiny_detector  # noqa: E402

FRAMES = 8
INPUT_WH = (320, 160)


@pytest.fixture(scope="module")
def tiny_detector_320x160(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny detector (``.onnx`` + ``.pt2``) with a 320x160 input: bikes.mp4 halved exactly."""
    torch.set_num_threads(1)
    path, _ = tiny_detector(tmp_path_factory.mktemp("m"), pt2=True, input_wh=INPUT_WH)
    return path


def settings(model: Path, jsonl: Path, *, backend: str = "cuda", device: str = "cpu") -> Settings:
    return load_settings(overrides={
        "sources": [str(bikes_path())], "model": str(model), "quiet": True, "max_frames": FRAMES,
        "engine": {"backend": backend, "device": device, "intra_op_threads": 1},
        "preprocess": {"max_batch": 4, "max_wait_ms": 30_000.0},  # full batches only: the same batches each run
        "sinks": {"publish": None, "jsonl": str(jsonl)},
    })


def run(s: Settings, **kw: Any) -> list[dict[str, Any]]:
    summary = Pipeline(settings=s, progress=False, **kw).run(handle_signals=False)
    assert summary.exit_code == EXIT_OK, summary.errors
    assert summary.frames == FRAMES
    assert s.sinks.jsonl is not None
    lines = [json.loads(line) for line in Path(s.sinks.jsonl).read_text().splitlines()]
    return [m for m in lines if m.get("schema") == "streamdet.detections/2"]


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]], *, box_px: float, score: float) -> None:
    assert [m["frame_index"] for m in got] == [m["frame_index"] for m in want] == list(range(FRAMES))
    total = 0
    for g, w in zip(got, want, strict=True):
        gb = np.array([d["box_xyxy"] for d in g["detections"]], np.float64).reshape(-1, 4)
        wb = np.array([d["box_xyxy"] for d in w["detections"]], np.float64).reshape(-1, 4)
        assert [d["class_id"] for d in g["detections"]] == [d["class_id"] for d in w["detections"]]
        np.testing.assert_allclose(gb, wb, atol=box_px, rtol=0)
        np.testing.assert_allclose([d["score"] for d in g["detections"]], [d["score"] for d in w["detections"]],
                                   atol=score, rtol=0)
        total += len(g["detections"])
    assert total > 0  # the comparison compared something


@pytest.fixture(scope="module")
def host_run(tiny_detector_320x160: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The default host path with the same engine (CUDA backend on the CPU): CPU letterbox, CPU NMS."""
    return run(settings(tiny_detector_320x160, tmp_path_factory.mktemp("host") / "o.jsonl"))


def test_device_path_on_cpu_tensors_equals_host_path(tiny_detector_320x160: Path, host_run: list[dict[str, Any]],
                                                     tmp_path: Path) -> None:
    got = run(settings(tiny_detector_320x160, tmp_path / "o.jsonl"), tensor_device="cpu")
    # JSON rounds boxes to 0.01 px and scores to 1e-4: equal within that rounding, i.e. within 1e-3 px of it
    assert_same(got, host_run, box_px=1e-3, score=1e-6)


def test_host_path_with_cuda_backend_on_cpu_matches_onnxruntime(tiny_detector_320x160: Path,
                                                                host_run: list[dict[str, Any]],
                                                                tmp_path: Path) -> None:
    """The reference above is the default CPU path up to the two runtimes' float rounding."""
    got = run(settings(tiny_detector_320x160, tmp_path / "o.jsonl", backend="onnxruntime"))
    assert_same(got, host_run, box_px=0.011, score=2e-4)


def test_device_path_needs_an_engine_with_infer_device(tiny_detector_320x160: Path, tmp_path: Path) -> None:
    s = settings(tiny_detector_320x160, tmp_path / "o.jsonl", backend="onnxruntime")
    summary = Pipeline(settings=s, progress=False, tensor_device="cpu").run(handle_signals=False)
    assert summary.exit_code != EXIT_OK
    assert any("no infer_device" in e for e in summary.errors), summary.errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_path_on_cuda_equals_host_path(tiny_detector_320x160: Path, tmp_path: Path) -> None:
    """``--device cuda`` (device path by default) against ``--device cuda`` with ``preprocess.on_device`` off.

    FP16 autocast on the GPU makes both differ from the CPU; both run the same engine, so only the preprocess
    (exact for this 2x downscale) and the NMS (the same semantics) differ between them.
    """
    on = settings(tiny_detector_320x160, tmp_path / "on.jsonl", device="cuda")
    off = on.model_copy(update={"preprocess": on.preprocess.model_copy(update={"on_device": False}),
                                "sinks": on.sinks.model_copy(update={"jsonl": tmp_path / "off.jsonl"})})
    assert_same(run(on), run(off), box_px=1e-3, score=1e-6)
