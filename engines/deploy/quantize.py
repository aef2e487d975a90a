"""INT8 (Q/DQ, calibrated on frames) and FP16 conversion of an FP32 ONNX detector.

**INT8.** Calibration frames (:mod:`engines.deploy.frames`) go through the runtime's own
preprocess into ONNX Runtime static quantization (``quant_pre_process``, then ``quantize_static``
with ``QuantFormat.QDQ``, per-channel int8 weights, symmetric int8 activations, Q/DQ on the
inputs of quantized ops only: the explicit-quantization form TensorRT builds as a strongly typed
network). The head's tail stays FP32: everything between the last head convolutions and the
outputs (the class sigmoid, the DFL softmax and its fixed 1x1 conv, the box decode arithmetic,
the concatenations), found by :func:`engines.deploy.graph.head_fp32_nodes`. Quantizing the head's
sigmoid is a known INT8 failure (ultralytics/yolov5 #2509: mAP 0.362 -> 0.054); ultralytics keeps
it in FP32 (ultralytics #24668). SiLU activations are not quantized either: only the op types of
:data:`INT8_OP_TYPES` get Q/DQ (ONNX Runtime's default list would quantize every ``Sigmoid`` and
``Mul``).

**FP16.** ``onnxconverter_common.float16.convert_float_to_float16`` with ``keep_io_types=True``
(Cast nodes inside, float32 input and output) and the same head tail kept in FP32 (box
coordinates in input pixels up to 640 would have a 0.25-0.5 px float16 step). It needs
``onnxconverter-common`` (``pip install onnxconverter-common``; the ``train`` and ``gpu`` extras
include it).

References: ONNX Runtime quantization docs ("Quantize ONNX models", QDQ format, TensorRT
execution provider requirements: symmetric int8); NVIDIA TensorRT developer guide, "Working with
Quantized Types" (explicit quantization, Q/DQ placement).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.deploy.frames import FrameCalibrationReader, as_ort_reader
from engines.deploy.graph import graph_input_name, head_fp32_nodes, name_unnamed_nodes, restore_float32_outputs
from engines.deploy.options import CalibrationError, CalibrationMethod, Int8Target
from streamdet.card import ModelCard

__all__ = ["FP16_INSTALL_HINT", "INT8_OP_TYPES", "convert_fp16", "quantize_int8"]

FP16_INSTALL_HINT = "pip install onnxconverter-common"
"""How to get the FP16 converter (it is also in the ``train`` and ``gpu`` extras)."""

INT8_OP_TYPES: dict[Int8Target, tuple[str, ...]] = {
    Int8Target.TENSORRT: ("Conv", "ConvTranspose", "MaxPool", "Resize"),
    Int8Target.CPU: ("Conv", "ConvTranspose", "MaxPool", "Resize", "Add", "Concat"),
}
"""Op types that get Q/DQ. ONNX Runtime's default list also quantizes ``Sigmoid`` and ``Mul``, i.e. every
SiLU, a known INT8 accuracy trap (yolov5 #2509); here they stay float."""


def _int8_extra_options(target: Int8Target) -> dict[str, Any]:
    """ONNX Runtime quantizer options per target.

    TensorRT: symmetric int8, and Q/DQ only on the *inputs* of quantized ops (no Q/DQ on
    convolution outputs), NVIDIA's recommended placement: TensorRT then fuses
    ``DQ -> Conv -> SiLU -> Q`` into one int8 convolution, and the head's logits stay float.
    CPU: ONNX Runtime fuses ``DQ -> Conv -> Q`` into ``QLinearConv``, so conv outputs are quantized.
    """
    if target is Int8Target.TENSORRT:
        return {"ActivationSymmetric": True, "WeightSymmetric": True,
                "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose"]}
    return {"ActivationSymmetric": False, "WeightSymmetric": True}


def quantize_int8(
    model_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    frames: Iterator[npt.NDArray[np.uint8]],
    card: ModelCard,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    per_channel: bool = True,
    target: Int8Target = Int8Target.TENSORRT,
) -> dict[str, Any]:
    """Write an INT8 Q/DQ ONNX model calibrated on ``frames`` (see the module docstring).

    Args:
        model_path: the FP32 ONNX model.
        out_path: where to write the INT8 model (written directly: callers pass a temporary name).
        frames: calibration frames, ``(H, W, 3)`` uint8 RGB (consumed once).
        card: the model card (preprocess settings).
        method: activation range estimation.
        per_channel: per-output-channel weight scales (else per tensor).
        target: :class:`Int8Target` (activation type and symmetry).

    Returns:
        Details to record: ``frames`` (count used), ``method``, ``per_channel``, ``target``,
        ``fp32_nodes`` (how many nodes stay FP32), ``activations``/``weights``, ``onnxruntime``.

    Raises:
        CalibrationError: if no frame was read, or the model cannot be quantized.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(model_path)
    ort_method = {CalibrationMethod.MINMAX: OrtMethod.MinMax, CalibrationMethod.ENTROPY: OrtMethod.Entropy,
                  CalibrationMethod.PERCENTILE: OrtMethod.Percentile}[method]
    trt = target is Int8Target.TENSORRT
    first = next(frames, None)
    if first is None:
        raise CalibrationError(f"{src}: no calibration frames")

    def chained() -> Iterator[npt.NDArray[np.uint8]]:
        yield first
        yield from frames

    with tempfile.TemporaryDirectory(prefix="streamdet-calib-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # ONNX shape inference only: ONNX Runtime's symbolic shape inference gives up on the head's
            # data-dependent anchor shapes, and on failure leaves sym_shape_infer_temp.onnx + *.data in the cwd
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # the shape-inference helpers raise assorted error types
            raise CalibrationError(f"{src}: quantization preprocessing failed ({type(e).__name__}: "
                                   f"{str(e)[:160]})") from e
        model = onnx.load(str(pre))
        name_unnamed_nodes(model)
        onnx.save(model, str(pre))
        fp32_nodes = head_fp32_nodes(model)
        reader = FrameCalibrationReader(frames=chained(), card=card, input_name=graph_input_name(model))
        try:
            quantize_static(
                str(pre), str(out_path), as_ort_reader(reader),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=ort_method,
                nodes_to_exclude=fp32_nodes,
                op_types_to_quantize=list(INT8_OP_TYPES[target]),
                extra_options=_int8_extra_options(target),
            )
        except CalibrationError:
            raise
        except Exception as e:  # onnxruntime's quantizer raises assorted error types
            raise CalibrationError(f"{src}: static quantization failed ({type(e).__name__}: {str(e)[:160]})") from e
    if reader.count == 0:  # pragma: no cover - guarded by the first-frame check above
        raise CalibrationError(f"{src}: no calibration frames")
    return {"frames": reader.count, "method": method.value, "per_channel": per_channel, "target": target.value,
            "activations": "int8 symmetric" if trt else "uint8 asymmetric",
            "weights": "int8 symmetric" + (" per-channel" if per_channel else ""),
            "format": "QDQ", "fp32_nodes": len(fp32_nodes), "onnxruntime": onnxruntime.__version__}


def convert_fp16(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write an FP16 copy of a model with float32 inputs/outputs and the head tail in FP32.

    Args:
        model_path: the FP32 ONNX model.
        out_path: where to write it (written directly: callers pass a temporary name).

    Returns:
        Details to record: ``fp32_nodes`` (count kept in FP32), ``io`` (``float32``), ``converter``.

    Raises:
        CalibrationError: if ``onnxconverter-common`` is missing or the conversion fails.
    """
    import onnx

    try:
        import onnxconverter_common
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError as e:
        raise CalibrationError(f"{model_path}: FP16 conversion needs onnxconverter-common "
                               f"({FP16_INSTALL_HINT})") from e
    model = onnx.load(str(model_path))
    name_unnamed_nodes(model)
    fp32_nodes = head_fp32_nodes(model)
    try:
        with warnings.catch_warnings():  # "the float32 number ... will be truncated" for tiny weights
            warnings.simplefilter("ignore", UserWarning)
            converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=fp32_nodes)
        restore_float32_outputs(converted, model)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter and the checker raise assorted error types
        raise CalibrationError(f"{model_path}: FP16 conversion failed ({type(e).__name__}: {str(e)[:160]})") from e
    onnx.save(converted, str(out_path))
    return {"fp32_nodes": len(fp32_nodes), "io": "float32",
            "converter": f"onnxconverter-common {onnxconverter_common.__version__} convert_float_to_float16"}
