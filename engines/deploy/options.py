"""The calibration error type and the option Enums every calibration module shares."""

from __future__ import annotations

from enum import Enum

__all__ = ["CalibrationError", "CalibrationMethod", "Int8Target", "OutputPrecision"]


class CalibrationError(ValueError):
    """Bad calibration input or a failed conversion; the message is ``<path>: <problem>``."""


class CalibrationMethod(str, Enum):
    """How activation ranges are estimated (ONNX Runtime ``CalibrationMethod``)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class Int8Target(str, Enum):
    """Which runtime an INT8 model is laid out for.

    ``tensorrt``: int8 activations and weights, symmetric (zero point 0), which TensorRT requires
    for explicit (Q/DQ) quantization. ``cpu``: ONNX Runtime's fast x86 CPU form, uint8 asymmetric
    activations with int8 weights (U8S8); TensorRT rejects it (non-zero zero points).
    """

    TENSORRT = "tensorrt"
    CPU = "cpu"


class OutputPrecision(str, Enum):
    """Precision of a converted model (recorded in its card's ``provenance.precision``)."""

    INT8 = "int8"
    FP16 = "fp16"
