"""Finding TensorRT and describing the runtime a plan is built for (TensorRT version, GPU, compute capability).

Both the TensorRT backend (:mod:`engines.tensorrt_backend`) and the engine builder
(:mod:`engines.deploy.build_engine`) use it, so neither imports the other to get TensorRT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engines.base import EngineError
from engines.engine_file import RuntimeInfo

if TYPE_CHECKING:
    import torch

__all__ = ["TENSORRT_HINT", "cuda_runtime_info", "import_tensorrt"]

TENSORRT_HINT = ("install TensorRT 10 or newer for your CUDA version (pip install tensorrt) on a machine with "
                 "an NVIDIA GPU, or use --backend onnxruntime")


def import_tensorrt() -> Any:
    """Import the TensorRT Python API.

    Returns:
        The ``tensorrt`` module.

    Raises:
        EngineError: ``--backend tensorrt needs TensorRT ...`` when it is missing, cannot load its
            libraries, or is only the ``tensorrt-stubs`` typing package.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer / CUDA is not
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise EngineError(f"--backend tensorrt needs TensorRT ({reason}); {TENSORRT_HINT}") from e
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise EngineError("--backend tensorrt needs TensorRT (the installed 'tensorrt' has no Builder/Runtime: only "
                          f"type stubs or a placeholder package); {TENSORRT_HINT}")
    return trt


def cuda_runtime_info(trt: Any, device: torch.device) -> RuntimeInfo:
    """TensorRT version, GPU name and compute capability of ``device``.

    Args:
        trt: the ``tensorrt`` module (or a stand-in with a ``__version__``).
        device: the CUDA device the plan runs on.

    Returns:
        The :class:`~engines.engine_file.RuntimeInfo` to write into, or check against, an engine header.

    Raises:
        EngineError: if ``device`` is not an available CUDA device.
    """
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineError(f"--backend tensorrt needs a CUDA GPU (device {device}; torch.cuda.is_available() is "
                          f"{torch.cuda.is_available()})")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx >= torch.cuda.device_count():
        raise EngineError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    major, minor = torch.cuda.get_device_capability(idx)
    return RuntimeInfo(str(trt.__version__), torch.cuda.get_device_name(idx), (int(major), int(minor)))
