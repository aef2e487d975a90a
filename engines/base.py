"""The engine interface every backend implements.

An engine runs one model on a batch of preprocessed inputs. Inputs are ``(B, 3, H, W)`` arrays
in the model card's dtype and normalization; outputs are the model's raw outputs, in the order of
the card's ``head.outputs``. Backends are picked by :class:`Backend`; the pipeline wires them in
plain Python.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch


class Backend(str, Enum):
    """Inference backends."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    CUDA = "cuda"


class EngineError(RuntimeError):
    """A model cannot be loaded or run; the message names the model file and the problem."""


class Engine(ABC):
    """Runs a model on batches; lifecycle ``start()`` -> ``infer()``... -> ``stop()``.

    Attributes:
        input_name: the model's input tensor name.
        output_names: the model's output tensor names, in order.
    """

    input_name: str
    output_names: tuple[str, ...]

    @abstractmethod
    def start(self) -> None:
        """Load the model (and allocate buffers).

        Raises:
            EngineError: if the model cannot be loaded.
        """

    @abstractmethod
    def infer(self, batch: npt.NDArray[Any]) -> list[npt.NDArray[np.float32]]:
        """Run one batch.

        Args:
            batch: ``(B, 3, H, W)`` array, dtype per the model card.

        Returns:
            The raw outputs, one array per output name, each with leading batch dimension ``B``.
        """

    @abstractmethod
    def stop(self) -> None:
        """Release the model and its buffers."""

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@runtime_checkable
class DeviceEngine(Protocol):
    """An engine that also runs batches that already live on its device (the GPU pipeline).

    Backends whose engines keep inputs and outputs on the GPU (CUDA, TensorRT) implement it; the
    runner checks it (``issubclass(engine_class, DeviceEngine)``) instead of a list of backends,
    and the engine stage checks it (``isinstance``) before it accepts device batches.
    """

    def infer_device(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Run one batch on the device.

        Args:
            batch: ``(B, 3, H, W)`` CUDA (or, in tests, CPU) tensor in the card's dtype and
                normalization.

        Returns:
            The raw outputs as tensors on the same device, one per output name, each with leading
            batch dimension ``B``.
        """
        ...
