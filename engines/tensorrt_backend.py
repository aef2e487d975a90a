"""TensorRT backend: runs a streamdet engine file (header + serialized plan) on an NVIDIA GPU.

Build the engine file with ``python -m training.build_engine`` (see ``docs/gpu.md``). The engine
reads the header (:mod:`engines.engine_file`) first and refuses a plan built for another
TensorRT version, GPU or compute capability with a clear :class:`~engines.base.EngineError`;
given ``rebuild_from=MODEL.onnx`` it rebuilds the plan instead (also when that ONNX changed since
the build). Inputs and outputs are torch CUDA tensors bound by name (TensorRT 10 named-tensor
API: ``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); output buffers are preallocated for the largest
batch of the optimization profile. :meth:`TensorRTEngine.infer` takes and returns host numpy
arrays (the :class:`~engines.base.Engine` contract); :meth:`TensorRTEngine.infer_device` keeps
everything on the GPU for the GPU pipeline (``pipeline.gpu``).

TensorRT is imported lazily: without it, :func:`engines.trt_runtime.import_tensorrt` raises one clear error. Note
that the ``tensorrt-stubs`` typing package installs a bare ``tensorrt`` directory, so a plain
``import tensorrt`` can succeed without TensorRT; ``import_tensorrt`` checks for the real API.

Reference: NVIDIA TensorRT Python API docs (``ICudaEngine``, ``IExecutionContext``), TensorRT 10
migration guide (named I/O tensors replace bindings; ``execute_async_v3``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from engines.base import Engine, EngineError
from engines.engine_file import (
    BatchProfile,
    EngineFileError,
    EngineHeader,
    RuntimeInfo,
    file_sha256,
    read_engine_file,
    read_engine_header,
    runtime_mismatches,
)
from engines.trt_runtime import TENSORRT_HINT, cuda_runtime_info, import_tensorrt

__all__ = ["TENSORRT_HINT", "TensorRTEngine", "cuda_runtime_info", "import_tensorrt", "torch_dtype"]

if TYPE_CHECKING:
    import tensorrt
    import torch


def torch_dtype(trt: Any, dtype: tensorrt.DataType) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``.

    Args:
        trt: the ``tensorrt`` module (or a stand-in with the same ``DataType``).
        dtype: a tensor's ``DataType``.

    Raises:
        EngineError: for TensorRT types torch has no match for (FP8, INT4, FP4, ...).
    """
    import torch

    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
        "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
    }
    for name, tdt in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return tdt
    raise EngineError(f"TensorRT tensor type {dtype} has no torch equivalent")


class TensorRTEngine(Engine):
    """Runs a streamdet engine file with TensorRT.

    Args:
        model_path: the engine file (``MODEL.engine``, from ``engines.deploy.build_engine``); given
            ``MODEL.onnx``, the engine is ``MODEL.engine`` beside it with ``rebuild_from=MODEL.onnx``.
        rebuild_from: the ONNX model to (re)build the engine from when the file is missing, was built
            for another TensorRT/GPU, or was built from a different ONNX file; ``None``: such an
            engine is an error.
        rebuild_batch: batch profile for a rebuild (default: the old header's, else ``1,8,32``).
        timing_cache: TensorRT timing cache file for rebuilds (read and updated).
        device: the CUDA device (``"cuda"`` or ``"cuda:N"``).
        trt_module: the ``tensorrt`` module to use (tests pass a stand-in; default
            :func:`import_tensorrt`).
        runtime_info: the runtime to check plans against (tests; default :func:`cuda_runtime_info`).

    Attributes:
        header: the engine file's :class:`~engines.engine_file.EngineHeader` (after :meth:`start`).
        max_batch: the largest batch the plan accepts (after :meth:`start`).
        rebuilt: whether :meth:`start` rebuilt the plan.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        rebuild_from: str | os.PathLike[str] | None = None,
        rebuild_batch: BatchProfile | None = None,
        timing_cache: str | os.PathLike[str] | None = None,
        device: str = "cuda",
        trt_module: Any = None,
        runtime_info: RuntimeInfo | None = None,
    ) -> None:
        path = Path(model_path)
        if path.suffix == ".onnx":  # MODEL.onnx: run MODEL.engine beside it, (re)built from the ONNX as needed
            rebuild_from = path if rebuild_from is None else rebuild_from
            path = path.with_suffix(".engine")
        self.model_path = path
        self.rebuild_from = Path(rebuild_from) if rebuild_from is not None else None
        self.rebuild_batch = rebuild_batch
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self.device_name = device
        self._trt_module = trt_module
        self._runtime_info = runtime_info
        self.input_name = ""
        self.output_names = ()
        self.header: EngineHeader | None = None
        self.max_batch = 0
        self.min_batch = 1
        self.rebuilt = False
        self._trt: Any = None  # the tensorrt module, or the tests' stand-in for it
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        self._device: Any = None
        self._input_dtype: Any = None
        self._input_buf: Any = None
        self._outputs: list[Any] = []
        self._stream: Any = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the header (rebuilding if allowed), deserialize the plan, allocate the buffers.

        Raises:
            EngineError: TensorRT or CUDA missing, a missing/damaged file, a plan built for another
                TensorRT/GPU (without ``rebuild_from``), or a plan TensorRT cannot load.
        """
        import torch

        trt = self._trt_module if self._trt_module is not None else import_tensorrt()
        try:
            device = torch.device(self.device_name)
        except RuntimeError as e:
            raise EngineError(f"--device {self.device_name}: not a torch device ({e})") from e
        runtime = self._runtime_info if self._runtime_info is not None else cuda_runtime_info(trt, device)
        self._ensure_plan(trt, runtime)
        try:
            header, plan = read_engine_file(self.model_path)
        except EngineFileError as e:
            raise EngineError(str(e)) from e
        logger: tensorrt.Logger = trt.Logger(trt.Logger.WARNING)
        rt: tensorrt.Runtime = trt.Runtime(logger)
        engine: tensorrt.ICudaEngine | None = rt.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(f"{self.model_path}: TensorRT could not deserialize the plan (see the TensorRT log)")
        context: tensorrt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise EngineError(f"{self.model_path}: TensorRT could not create an execution context (GPU memory?)")
        inputs: list[str] = []
        outputs: list[str] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if inputs != [header.input_name]:
            raise EngineError(f"{self.model_path}: expected the one input {header.input_name!r}, "
                              f"the plan has {inputs}")
        if sorted(outputs) != sorted(header.output_names):
            raise EngineError(f"{self.model_path}: expected outputs {list(header.output_names)}, "
                              f"the plan has {outputs}")
        c, h, w = header.input_chw
        bmax = header.batch.max
        if not context.set_input_shape(header.input_name, (bmax, c, h, w)):
            raise EngineError(f"{self.model_path}: the plan rejects input shape {(bmax, c, h, w)}")
        with torch.device(device):
            self._input_dtype = torch_dtype(trt, engine.get_tensor_dtype(header.input_name))
            self._input_buf = torch.empty((bmax, c, h, w), dtype=self._input_dtype)
            bufs = []
            for name in header.output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                if not shape or min(shape) < 0:
                    raise EngineError(f"{self.model_path}: output {name!r} has no concrete shape {shape} "
                                      f"at batch {bmax}")
                bufs.append(torch.empty(shape, dtype=torch_dtype(trt, engine.get_tensor_dtype(name))))
        self._trt, self._runtime, self._engine, self._context = trt, rt, engine, context
        self._device = device
        self._outputs = bufs
        self.header = header
        self.input_name = header.input_name
        self.output_names = tuple(header.output_names)
        self.min_batch, self.max_batch = header.batch.min, bmax

    def _ensure_plan(self, trt: Any, runtime: RuntimeInfo) -> None:
        """Rebuild the engine file when it is missing, stale or foreign and ``rebuild_from`` allows it."""
        reasons: list[str] = []
        old: EngineHeader | None = None
        if not self.model_path.is_file():
            if self.rebuild_from is None:
                raise EngineError(f"{self.model_path}: engine file not found (build it with python -m "
                                  f"engines.deploy.build_engine MODEL.onnx --out {self.model_path})")
            reasons.append("no engine file")
        else:
            try:
                old = read_engine_header(self.model_path)
            except EngineFileError as e:
                if self.rebuild_from is None:
                    raise EngineError(str(e)) from e
                reasons.append(str(e))
            if old is not None:
                reasons.extend(runtime_mismatches(old, runtime))
                if reasons and self.rebuild_from is None:
                    raise EngineError(f"{self.model_path}: engine built for another setup: {'; '.join(reasons)}; "
                                      "rebuild it (python -m training.build_engine) or pass rebuild_from=MODEL.onnx")
                if self.rebuild_from is not None and self.rebuild_from.is_file() and \
                        file_sha256(self.rebuild_from) != old.onnx_sha256:
                    reasons.append(f"{self.rebuild_from} changed since the build")
        if not reasons:
            return
        assert self.rebuild_from is not None
        from engines.deploy.build_engine import BuildError, build_engine
        from engines.engine_file import Precision

        batch = self.rebuild_batch or (old.batch if old is not None else BatchProfile(1, 8, 32))
        try:
            import onnx

            from engines.deploy.graph import onnx_precision

            precision = Precision(onnx_precision(onnx.load(str(self.rebuild_from), load_external_data=False)))
            build_engine(onnx_path=self.rebuild_from, out_path=self.model_path, precision=precision, batch=batch,
                         timing_cache=self.timing_cache, trt_module=trt, runtime_info=runtime)
        except BuildError as e:
            raise EngineError(f"{self.model_path}: rebuild from {self.rebuild_from} failed: {e}") from e
        except (OSError, ValueError) as e:
            raise EngineError(f"{self.model_path}: rebuild from {self.rebuild_from} failed ({e})") from e
        self.rebuilt = True

    def stop(self) -> None:
        """Release the context, engine and buffers."""
        self._context = None
        self._engine = None
        self._runtime = None
        self._input_buf = None
        self._outputs = []
        self._stream = None

    # -- inference -------------------------------------------------------------------------------

    def _execute(self, batch: torch.Tensor) -> bool:
        """Enqueue the plan on the engine's own CUDA stream, ordered after and before the caller's stream.

        TensorRT synchronizes internally when given the legacy default stream, so the engine has its
        own stream; events order it after the work that produced ``batch`` and before what reads
        the outputs, without blocking the host.
        """
        import torch

        ctx = self._context
        assert ctx is not None
        if self._device is None or self._device.type != "cuda":
            return bool(ctx.execute_async_v3(0))
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        caller = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(caller)
        batch.record_stream(self._stream)  # keep the allocator from reusing it before the plan has read it
        ok = bool(ctx.execute_async_v3(int(self._stream.cuda_stream)))
        caller.wait_stream(self._stream)
        return ok

    def infer_device(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Run one batch that is already on the engine's device.

        Asynchronous (no host synchronisation): ordered after the work queued on the caller's
        current CUDA stream (e.g. the GPU preprocess), and work queued there afterwards sees the
        outputs. The returned tensors are views of preallocated buffers: they are overwritten by
        the next call, so consume (or clone) them first.

        Args:
            batch: ``(B, C, H, W)`` contiguous tensor on the engine's device, of the engine's input
                dtype, ``min_batch <= B <= max_batch``.

        Returns:
            The outputs in ``output_names`` order, each ``(B, ...)`` on the device.

        Raises:
            EngineError: if the engine is not started, the batch does not fit, or execution fails.
        """
        ctx = self._context
        header = self.header
        if ctx is None or header is None:
            raise EngineError(f"{self.model_path}: engine not started")
        c, h, w = header.input_chw
        b = int(batch.shape[0]) if batch.ndim == 4 else -1
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (c, h, w) or not self.min_batch <= b <= self.max_batch:
            raise EngineError(f"{self.model_path}: expected input ({self.min_batch}..{self.max_batch}, {c}, {h}, {w}), "
                              f"got {tuple(batch.shape)}")
        if batch.dtype != self._input_dtype or batch.device != self._device:
            raise EngineError(f"{self.model_path}: expected a {self._input_dtype} tensor on {self._device}, got "
                              f"{batch.dtype} on {batch.device}")
        if not batch.is_contiguous():
            batch = batch.contiguous()
        if not ctx.set_input_shape(self.input_name, tuple(int(d) for d in batch.shape)):
            raise EngineError(f"{self.model_path}: the plan rejects input shape {tuple(batch.shape)}")
        ctx.set_tensor_address(self.input_name, int(batch.data_ptr()))
        views = [buf[:b] for buf in self._outputs]
        for name, view in zip(self.output_names, views, strict=True):
            ctx.set_tensor_address(name, int(view.data_ptr()))  # a leading-dim prefix: same start address
        if not self._execute(batch):
            raise EngineError(f"{self.model_path}: TensorRT execution failed (see the TensorRT log)")
        return views

    def infer(self, batch: npt.NDArray[Any]) -> list[npt.NDArray[np.float32]]:
        """Run a host batch ``(B, C, H, W)``: copy in, run, copy out (synchronous).

        Batches larger than ``max_batch`` run in chunks; smaller than ``min_batch`` are zero-padded.

        Returns:
            The raw outputs as float32 numpy arrays in ``output_names`` order, leading dimension ``B``.

        Raises:
            EngineError: if the engine is not started or the batch has the wrong shape.
        """
        import torch

        if self._input_buf is None or self.header is None:
            raise EngineError(f"{self.model_path}: engine not started")
        x = np.asarray(batch)
        c, h, w = self.header.input_chw
        if x.ndim != 4 or x.shape[1:] != (c, h, w) or x.shape[0] < 1:
            raise EngineError(f"{self.model_path}: expected input (B, {c}, {h}, {w}), got {x.shape}")
        chunks: list[list[npt.NDArray[np.float32]]] = []
        for start in range(0, x.shape[0], self.max_batch):
            part = x[start : start + self.max_batch]
            n = part.shape[0]
            run = max(n, self.min_batch)
            dst = self._input_buf[:run]
            dst[:n].copy_(torch.from_numpy(np.ascontiguousarray(part)))
            if run > n:
                dst[n:].zero_()
            outs = self.infer_device(dst)
            chunks.append([o[:n].float().cpu().numpy() for o in outs])
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
