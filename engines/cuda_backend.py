"""CUDA backend without TensorRT: the model as a ``torch.export`` program, FP16 autocast, CUDA graphs.

ONNX Runtime's CUDA execution provider is not part of the CPU ``onnxruntime`` wheel and ONNX
cannot be loaded back into PyTorch without an extra converter, so this backend runs the
training export's twin: ``MODEL.pt2``, a ``torch.export`` ``ExportedProgram`` saved with
``torch.export.save`` (:func:`save_exported_program`; written beside ``MODEL.onnx`` by
``training.export --torch-export``). It has the same input and outputs as the ONNX model (the
detector's eval-mode forward), a dynamic batch axis, and the card ``MODEL.json`` beside it.

On a CUDA device the engine runs under ``torch.autocast(float16)`` (outputs are returned as
float32) and captures one CUDA graph per batch size in ``graph_batches`` after a warm-up: a batch
of ``B`` frames replays the smallest captured graph of at least ``B`` (its input copied into the
graph's static input), so a step costs one graph launch instead of hundreds of kernel launches.
Larger batches run eagerly. On ``device="cpu"`` (tests, and a reference run anywhere) it runs the
program eagerly in float32: the same code path minus autocast and graphs.

References: PyTorch docs, ``torch.export`` (``export``, ``save``, ``load``, ``Dim``) and
"CUDA Graphs" (``torch.cuda.graph`` capture and replay, static input/output tensors).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from engines.base import Engine, EngineError

if TYPE_CHECKING:
    import torch

DEFAULT_GRAPH_BATCHES = (1, 8, 32)
"""Batch sizes captured as CUDA graphs by default."""

MAX_EXPORT_BATCH = 256
"""Upper bound of the exported program's dynamic batch axis."""


def save_exported_program(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    input_wh: tuple[int, int],
    max_batch: int = MAX_EXPORT_BATCH,
) -> None:
    """Export an eval-mode model with ``torch.export`` (dynamic batch) and save it as ``.pt2``.

    Args:
        model: the model; its forward takes ``images`` ``(B, 3, H, W)`` float32 and returns a
            tensor or a tuple of tensors. It is put in eval mode.
        path: destination (``MODEL.pt2``), written to a temporary name and renamed.
        input_wh: input ``(width, height)`` in pixels.
        max_batch: the largest batch the program accepts.

    Raises:
        ValueError: on a bad size.
        RuntimeError: if ``torch.export`` cannot trace the model.
    """
    import torch

    w, h = input_wh
    if w <= 0 or h <= 0 or max_batch < 2:
        raise ValueError(f"expected positive input_wh and max_batch >= 2, got {input_wh} and {max_batch}")
    model.eval()
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp.pt2")  # torch.export wants the .pt2 suffix
    try:
        torch.export.save(program, str(tmp))
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_program_path(model_path: str | os.PathLike[str]) -> Path:
    """The ``.pt2`` file for a model path (``MODEL.onnx`` -> ``MODEL.pt2`` beside it).

    Raises:
        EngineError: if there is no such file.
    """
    p = Path(model_path)
    pt2 = p if p.suffix == ".pt2" else p.with_suffix(".pt2")
    if not pt2.is_file():
        raise EngineError(f"{pt2}: no torch.export program for --backend cuda (export one with python -m "
                          "training.export CHECKPOINT --out MODEL.onnx --torch-export)")
    return pt2


def _outputs_as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


class CudaEngine(Engine):
    """Runs a ``torch.export`` program on a CUDA GPU (or eagerly on the CPU).

    Args:
        model_path: ``MODEL.pt2``, or ``MODEL.onnx`` with ``MODEL.pt2`` beside it.
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        half: FP16 autocast on CUDA (ignored on the CPU).
        graph_batches: batch sizes to capture as CUDA graphs (ignored on the CPU; empty: none).
        warmup_iters: warm-up runs per captured batch size before capture.
        output_names: output names (default: the card's ``head.outputs`` beside the model, else
            ``output0``, ``output1``, ...).

    Attributes:
        input_wh: model input ``(width, height)`` (from the card; else learned from the first batch).
        graphs: the captured batch sizes, ascending.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        device: str = "cuda",
        half: bool = True,
        graph_batches: Sequence[int] = DEFAULT_GRAPH_BATCHES,
        warmup_iters: int = 3,
        output_names: Sequence[str] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.device_name = device
        self.half = half
        self.graph_batches = tuple(sorted({int(b) for b in graph_batches}))
        if any(b < 1 for b in self.graph_batches):
            raise ValueError(f"expected positive graph batch sizes, got {tuple(graph_batches)}")
        self.warmup_iters = warmup_iters
        self.input_name = "images"
        self.output_names = tuple(output_names) if output_names else ()
        self.input_wh: tuple[int, int] | None = None
        self.graphs: tuple[int, ...] = ()
        self._module: Any = None
        self._device: Any = None
        self._graph: dict[int, tuple[Any, Any, list[Any]]] = {}

    def start(self) -> None:
        """Load the program onto the device; on CUDA, warm up and capture the CUDA graphs.

        Raises:
            EngineError: no CUDA device for ``device="cuda"``, a missing or unloadable ``.pt2``.
        """
        import torch
        from torch.export.passes import move_to_device_pass

        from streamdet.card import ModelCardError, card_path_for, load_card

        try:
            device = torch.device(self.device_name)
        except RuntimeError as e:
            raise EngineError(f"--device {self.device_name}: not a torch device ({e})") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"{self.model_path}: --backend cuda needs a CUDA GPU "
                              "(torch.cuda.is_available() is False)")
        pt2 = resolve_program_path(self.model_path)
        try:
            program = torch.export.load(str(pt2))
            # tensors the forward creates (anchor grids) were traced with the export device baked in
            program = move_to_device_pass(program, device)
            module = program.module()
        except Exception as e:  # torch.export.load raises assorted error types on bad files
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise EngineError(f"{pt2}: not a loadable torch.export program ({msg})") from e
        card_path = card_path_for(pt2)
        if card_path.is_file():
            try:
                card = load_card(card_path)
            except ModelCardError as e:
                raise EngineError(str(e)) from e
            self.input_wh = card.input_wh
            self.input_name = card.input.name
            if not self.output_names:
                self.output_names = tuple(card.head.outputs)
        self._module = module
        self._device = device
        self._graph = {}
        if device.type == "cuda" and self.graph_batches:
            if self.input_wh is None:
                raise EngineError(f"{pt2}: CUDA graphs need the input size: no model card at {card_path}")
            for b in self.graph_batches:
                self._capture(b)
        self.graphs = tuple(sorted(self._graph))

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        import torch

        with torch.inference_mode():
            if self._device is not None and self._device.type == "cuda" and self.half:
                with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):  # no cache in graphs
                    outs = _outputs_as_list(self._module(x))
            else:
                outs = _outputs_as_list(self._module(x))
            return [o.float() for o in outs]

    def _capture(self, batch: int) -> None:
        """Warm up on a side stream, then capture one forward pass at ``batch`` as a CUDA graph."""
        import torch

        assert self.input_wh is not None
        w, h = self.input_wh
        static_in = torch.zeros((batch, 3, h, w), device=self._device)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup_iters)):
                self._forward(static_in)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        self._graph[batch] = (graph, static_in, static_out)
        if not self.output_names:
            self.output_names = tuple(f"output{i}" for i in range(len(static_out)))

    def infer_device(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Run a batch that is already on the engine's device (no host synchronisation on CUDA).

        Uses the smallest captured CUDA graph of at least ``B`` frames (copying the batch into its
        static input); otherwise runs eagerly. Graph outputs are views of the graph's static
        outputs: they are overwritten by the next call, so consume (or clone) them first.

        Args:
            batch: ``(B, 3, H, W)`` float32 (or float16) tensor on the engine's device.

        Returns:
            The outputs, float32, each ``(B, ...)``, in ``output_names`` order.

        Raises:
            EngineError: if the engine is not started or the batch has the wrong shape or device.
        """
        if self._module is None:
            raise EngineError(f"{self.model_path}: engine not started")
        if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[0] < 1:
            raise EngineError(f"{self.model_path}: expected input (B, 3, H, W), got {tuple(batch.shape)}")
        if self.input_wh is not None and (batch.shape[3], batch.shape[2]) != self.input_wh:
            raise EngineError(f"{self.model_path}: expected input width x height {self.input_wh}, got "
                              f"{(batch.shape[3], batch.shape[2])}")
        if batch.device != self._device:
            raise EngineError(f"{self.model_path}: expected a tensor on {self._device}, got {batch.device}")
        b = int(batch.shape[0])
        fit = [g for g in self.graphs if g >= b]
        if fit:
            graph, static_in, static_out = self._graph[fit[0]]
            static_in[:b].copy_(batch)
            graph.replay()
            outs = [o[:b] for o in static_out]
        else:
            outs = self._forward(batch.float())
        if not self.output_names:
            self.output_names = tuple(f"output{i}" for i in range(len(outs)))
        return outs

    def infer(self, batch: npt.NDArray[Any]) -> list[npt.NDArray[np.float32]]:
        """Run a host batch ``(B, 3, H, W)`` float32; returns float32 numpy outputs.

        Raises:
            EngineError: if the engine is not started or the batch has the wrong shape.
        """
        import torch

        if self._module is None:
            raise EngineError(f"{self.model_path}: engine not started")
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device)
        return [o.detach().cpu().numpy().astype(np.float32, copy=False) for o in self.infer_device(x)]

    def stop(self) -> None:
        """Drop the program and the graphs."""
        self._graph = {}
        self.graphs = ()
        self._module = None
