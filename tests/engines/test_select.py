"""engines.select: clear errors instead of silent fallbacks, and fallbacks only when asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import engines.select as sel
from engines.base import Backend, EngineError
from engines.onnxruntime_backend import OnnxRuntimeEngine


@pytest.fixture
def empty_onnx_file(tmp_path: Path) -> Path:
    """An empty ``m.onnx``: backend choice looks at paths only, never at the model."""
    p = tmp_path / "m.onnx"
    p.write_bytes(b"")
    return p


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sel, "cuda_available", lambda: False)
    monkeypatch.setattr(sel, "tensorrt_available", lambda: False)
    monkeypatch.setattr(sel, "ort_cuda_available", lambda: False)


@pytest.mark.parametrize("backend, device, match", [
    (Backend.TENSORRT, "cuda", "--device cuda needs a CUDA GPU"),
    (Backend.CUDA, "cuda:1", "--device cuda:1 needs a CUDA GPU"),
    (Backend.ONNXRUNTIME, "cuda", "--device cuda needs a CUDA GPU"),
    (Backend.TENSORRT, "cpu", "--backend tensorrt runs on --device cuda only"),
    (Backend.CUDA, "cpu", "--backend cuda needs .*m.pt2"),
])
def test_errors_without_gpu(no_gpu: None, empty_onnx_file: Path, backend: Backend, device: str, match: str) -> None:
    with pytest.raises(EngineError, match=match):
        sel.select_engine(backend, device, empty_onnx_file)


def test_device_cuda_without_torch_says_so(monkeypatch: pytest.MonkeyPatch, empty_onnx_file: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # the runtime install has no torch
    with pytest.raises(EngineError, match=r"--device cuda needs a CUDA GPU \(PyTorch is not installed"):
        sel.choose_backend(Backend.ONNXRUNTIME, "cuda", empty_onnx_file)


def test_tensorrt_missing_with_gpu(monkeypatch: pytest.MonkeyPatch, empty_onnx_file: Path) -> None:
    monkeypatch.setattr(sel, "cuda_available", lambda: True)
    monkeypatch.setattr(sel, "tensorrt_available", lambda: False)
    with pytest.raises(EngineError, match="--backend tensorrt needs TensorRT"):
        sel.select_engine(Backend.TENSORRT, "cuda", empty_onnx_file)


def test_fallback_only_when_allowed(no_gpu: None, empty_onnx_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    choice = sel.choose_backend(Backend.TENSORRT, "cuda", empty_onnx_file, allow_fallback=True)
    assert (choice.backend, choice.device) == (Backend.ONNXRUNTIME, "cpu")
    assert "falling back to --backend onnxruntime --device cpu" in choice.fallback_reason
    engine = sel.select_engine(Backend.TENSORRT, "cuda", empty_onnx_file, allow_fallback=True)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.providers == ("CPUExecutionProvider",)
    assert "warning: --device cuda needs a CUDA GPU" in capsys.readouterr().err


def test_onnxruntime_on_gpu_falls_back_to_the_cpu_only_when_allowed(no_gpu: None, empty_onnx_file: Path) -> None:
    with pytest.raises(EngineError, match="--device cuda needs a CUDA GPU"):
        sel.choose_backend(Backend.ONNXRUNTIME, "cuda", empty_onnx_file)
    choice = sel.choose_backend(Backend.ONNXRUNTIME, "cuda", empty_onnx_file, allow_fallback=True)
    assert (choice.backend, choice.device) == (Backend.ONNXRUNTIME, "cpu")
    assert "falling back to --backend onnxruntime --device cpu" in choice.fallback_reason


def test_fallback_prefers_cuda_backend_with_a_program(monkeypatch: pytest.MonkeyPatch, empty_onnx_file: Path) -> None:
    monkeypatch.setattr(sel, "cuda_available", lambda: True)
    monkeypatch.setattr(sel, "tensorrt_available", lambda: False)
    empty_onnx_file.with_suffix(".pt2").write_bytes(b"")
    choice = sel.choose_backend(Backend.TENSORRT, "cuda:0", empty_onnx_file, allow_fallback=True)
    assert (choice.backend, choice.device, choice.model_path.suffix) == (Backend.CUDA, "cuda:0", ".pt2")


@pytest.mark.parametrize("backend, path, expected", [
    (Backend.TENSORRT, "m.onnx", "m.engine"), (Backend.TENSORRT, "m.engine", "m.engine"),
    (Backend.CUDA, "m.onnx", "m.pt2"), (Backend.ONNXRUNTIME, "m.onnx", "m.onnx"),
])
def test_model_file_per_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: Backend, path: str,
                                expected: str) -> None:
    monkeypatch.setattr(sel, "cuda_available", lambda: True)
    monkeypatch.setattr(sel, "tensorrt_available", lambda: True)
    monkeypatch.setattr(sel, "ort_cuda_available", lambda: True)
    (tmp_path / "m.pt2").write_bytes(b"")
    assert sel.choose_backend(backend, "cuda", tmp_path / path).model_path == tmp_path / expected


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", ""])
def test_bad_device(device: str, empty_onnx_file: Path) -> None:
    with pytest.raises(EngineError, match="--device: expected cpu, cuda or cuda:N"):
        sel.choose_backend(Backend.ONNXRUNTIME, device, empty_onnx_file)


def test_onnxruntime_cpu_always_works(empty_onnx_file: Path) -> None:
    assert sel.choose_backend(Backend.ONNXRUNTIME, "cpu", empty_onnx_file).backend is Backend.ONNXRUNTIME
