"""Pick and create the engine for ``--backend`` and ``--device``, failing loudly instead of falling back.

``select_engine`` never silently runs something other than what was asked: ``--device cuda``
without a CUDA GPU and ``--backend tensorrt`` without TensorRT are clear
:class:`~engines.base.EngineError` s unless ``allow_fallback=True``, in which case it takes the
next available choice of :data:`FALLBACK_ORDER` and says so in :attr:`EngineChoice.fallback_reason`.

Model files per backend (``MODEL`` = the path without suffix):

* ``onnxruntime``: ``MODEL.onnx`` (CPU execution provider; ``--device cuda`` needs ONNX Runtime's
  CUDA execution provider, i.e. the ``onnxruntime-gpu`` wheel).
* ``tensorrt``: ``MODEL.engine`` (from ``engines.deploy.build_engine``); given ``MODEL.onnx`` it uses
  ``MODEL.engine`` beside it and (re)builds it from the ONNX when missing or stale.
* ``cuda``: ``MODEL.pt2`` beside the ONNX (a ``torch.export`` program, see :mod:`engines.cuda_backend`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engines.base import Backend, Engine, EngineError

FALLBACK_ORDER: tuple[Backend, ...] = (Backend.TENSORRT, Backend.CUDA, Backend.ONNXRUNTIME)
"""With ``allow_fallback``, an unavailable backend falls back to the next one of these."""


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """What :func:`choose_backend` settled on.

    Attributes:
        backend: the backend to use.
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:N"``).
        model_path: the model file for that backend.
        fallback_reason: why it differs from the request (empty when it does not).
    """

    backend: Backend
    device: str
    model_path: Path
    fallback_reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Backend):
            raise ValueError(f"expected backend as Backend, got {self.backend!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"expected device cpu, cuda or cuda:N, got {self.device!r}")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _why_no_cuda() -> str:
    """Why torch sees no CUDA GPU, for the error message."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed: pip install -e '.[train]' or a CUDA build of torch"
    return f"torch.cuda.is_available() is False; torch {torch.__version__}"


def tensorrt_available() -> bool:
    """Whether the real TensorRT runtime imports (not just ``tensorrt-stubs``)."""
    from engines.trt_runtime import import_tensorrt

    try:
        import_tensorrt()
    except EngineError:
        return False
    return True


def ort_cuda_available() -> bool:
    """Whether ONNX Runtime has the CUDA execution provider (``onnxruntime-gpu``)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _problem(backend: Backend, device: str, model_path: Path) -> str:
    """Why ``backend`` on ``device`` cannot run here ("" if it can)."""
    is_cuda = device != "cpu"
    if is_cuda and not cuda_available():
        return f"--device {device} needs a CUDA GPU ({_why_no_cuda()})"
    if backend is Backend.TENSORRT:
        if not is_cuda:
            return "--backend tensorrt runs on --device cuda only"
        if not tensorrt_available():
            from engines.trt_runtime import TENSORRT_HINT

            return f"--backend tensorrt needs TensorRT ({TENSORRT_HINT})"
    elif backend is Backend.CUDA:
        pt2 = model_path if model_path.suffix == ".pt2" else model_path.with_suffix(".pt2")
        if not pt2.is_file():
            return f"--backend cuda needs {pt2} (python -m training.export CHECKPOINT --out MODEL.onnx --torch-export)"
    elif backend is Backend.ONNXRUNTIME and is_cuda and not ort_cuda_available():
        return (f"--backend onnxruntime --device {device} needs ONNX Runtime's CUDA execution provider "
                "(the onnxruntime-gpu wheel)")
    return ""


def _model_for(backend: Backend, model_path: Path) -> Path:
    if backend is Backend.TENSORRT:
        return model_path if model_path.suffix == ".engine" else model_path.with_suffix(".engine")
    if backend is Backend.CUDA:
        return model_path if model_path.suffix == ".pt2" else model_path.with_suffix(".pt2")
    return model_path if model_path.suffix == ".onnx" else model_path.with_suffix(".onnx")


def choose_backend(
    backend: Backend, device: str, model_path: str | os.PathLike[str], *, allow_fallback: bool = False
) -> EngineChoice:
    """Check that ``backend`` can run on ``device`` here; with ``allow_fallback``, find what can.

    Args:
        backend: the requested :class:`~engines.base.Backend`.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        model_path: the model (``.onnx``; ``.engine`` / ``.pt2`` for their backends).
        allow_fallback: take the next workable entry of :data:`FALLBACK_ORDER` (ending with ONNX
            Runtime on the CPU) instead of raising.

    Returns:
        The :class:`EngineChoice`.

    Raises:
        EngineError: if the request cannot run here and ``allow_fallback`` is False (the message
            says why and what to install), or the device string is malformed.
    """
    if not isinstance(backend, Backend):
        raise EngineError(f"--backend: expected one of {[b.value for b in Backend]}, got {backend!r}")
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise EngineError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    path = Path(model_path)
    problem = _problem(backend, device, path)
    if not problem:
        return EngineChoice(backend, device, _model_for(backend, path))
    if not allow_fallback:
        raise EngineError(problem)
    onnx = path if path.suffix == ".onnx" else path.with_suffix(".onnx")
    start = FALLBACK_ORDER.index(backend) + 1 if backend in FALLBACK_ORDER else 0
    # after the last backend (onnxruntime on a GPU) comes the same backend on the CPU
    for candidate in FALLBACK_ORDER[start:] or FALLBACK_ORDER[-1:]:
        for dev in ((device, "cpu") if device != "cpu" else ("cpu",)):
            if candidate is Backend.TENSORRT and dev == "cpu":
                continue
            if not _problem(candidate, dev, onnx):
                return EngineChoice(candidate, dev, _model_for(candidate, onnx),
                                    fallback_reason=f"{problem}; falling back to --backend {candidate.value} "
                                                    f"--device {dev}")
    raise EngineError(f"{problem}; and no fallback is available")  # pragma: no cover - ORT on CPU always is


def engine_class(backend: Backend) -> type[Engine]:
    """The :class:`~engines.base.Engine` class that runs ``backend`` (its module imported on demand).

    Args:
        backend: the backend.

    Returns:
        Its engine class (not instantiated); check ``issubclass(cls, DeviceEngine)`` to see whether it
        runs device batches.
    """
    if backend is Backend.TENSORRT:
        from engines.tensorrt_backend import TensorRTEngine

        return TensorRTEngine
    if backend is Backend.CUDA:
        from engines.cuda_backend import CudaEngine

        return CudaEngine
    from engines.onnxruntime_backend import OnnxRuntimeEngine

    return OnnxRuntimeEngine


def select_engine(
    backend: Backend,
    device: str,
    model_path: str | os.PathLike[str],
    *,
    allow_fallback: bool = False,
    intra_op_threads: int = 0,
    timing_cache: str | os.PathLike[str] | None = None,
) -> Engine:
    """Create (not start) the engine for ``backend`` on ``device``; see :func:`choose_backend`.

    Args:
        backend: the requested backend.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        model_path: the model (see the module docstring for the file each backend reads).
        allow_fallback: fall back instead of raising (see :func:`choose_backend`).
        intra_op_threads: ONNX Runtime CPU threads per operator (0: one per core).
        timing_cache: TensorRT timing cache for (re)builds.

    Returns:
        The :class:`~engines.base.Engine`; call ``start()`` (or use it as a context manager).

    Raises:
        EngineError: as :func:`choose_backend`.
    """
    choice = choose_backend(backend, device, model_path, allow_fallback=allow_fallback)
    if choice.fallback_reason:
        import sys

        print(f"warning: {choice.fallback_reason}", file=sys.stderr)
    if choice.backend is Backend.TENSORRT:
        from engines.tensorrt_backend import TensorRTEngine

        src = Path(model_path)
        onnx = src if src.suffix == ".onnx" else None
        return TensorRTEngine(model_path=choice.model_path, rebuild_from=onnx, timing_cache=timing_cache,
                              device=choice.device)
    if choice.backend is Backend.CUDA:
        from engines.cuda_backend import CudaEngine

        return CudaEngine(model_path=choice.model_path, device=choice.device)
    from engines.onnxruntime_backend import OnnxRuntimeEngine

    providers = ("CPUExecutionProvider",) if choice.device == "cpu" else ("CUDAExecutionProvider",
                                                                          "CPUExecutionProvider")
    return OnnxRuntimeEngine(model_path=choice.model_path, intra_op_threads=intra_op_threads, providers=providers)
