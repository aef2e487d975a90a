"""Reduced-precision variants of an ONNX model: INT8 (Q/DQ, calibrated on the user's frames) and FP16.

CLI::

    python -m training.calibrate MODEL.onnx --source VIDEO_OR_DIR [--source ...] [--frames 64]
        [--out-int8 MODEL.int8.onnx] [--out-fp16 MODEL.fp16.onnx] [--method minmax|entropy|percentile]

Without ``--out-int8`` / ``--out-fp16`` both variants are written beside the model
(``MODEL.int8.onnx``, ``MODEL.fp16.onnx``), each with a model card copy (``MODEL.int8.json``, ...)
whose ``provenance.precision`` names the precision; inputs and outputs stay float32.

**INT8.** ``--frames`` frames, evenly spaced over all sources (videos decoded with PyAV, or image
directories), go through the runtime's own preprocess (:func:`streamdet.preprocess_ops.preprocess_batch`)
into ONNX Runtime static quantization (``quant_pre_process``, then ``quantize_static`` with
``QuantFormat.QDQ``, per-channel int8 weights, symmetric int8 activations, Q/DQ on the inputs of
quantized ops only: the explicit-quantization form TensorRT builds as a strongly typed network).
The head's tail stays FP32: everything between the last head convolutions and the outputs (the
class sigmoid, the DFL softmax and its fixed 1x1 conv, the box decode arithmetic, the
concatenations), found by :func:`head_fp32_nodes`. Quantizing the head's
sigmoid is a known INT8 failure (ultralytics/yolov5 #2509: mAP 0.362 -> 0.054); ultralytics keeps
it in FP32 (ultralytics #24668). SiLU activations are not quantized either: only the op types of
:data:`INT8_OP_TYPES` get Q/DQ (ONNX Runtime's default list would quantize every ``Sigmoid`` and
``Mul``).

**FP16.** ``onnxconverter_common.float16.convert_float_to_float16`` with ``keep_io_types=True``
(Cast nodes inside, float32 input and output) and the same head tail kept in FP32 (box
coordinates in input pixels up to 640 would have a 0.25-0.5 px float16 step).

Bad input (a source with no frames: an empty directory, a file that is not a video; a model
without a card) prints one ``error: <path>: <problem>`` line and exits 1, leaving no output file.

References: ONNX Runtime quantization docs ("Quantize ONNX models", QDQ format, TensorRT
execution provider requirements: symmetric int8); NVIDIA TensorRT developer guide, "Working with
Quantized Types" (explicit quantization, Q/DQ placement).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.card import ModelCard, ModelCardError, card_from_ultralytics_metadata, card_path_for, load_card
from streamdet.preprocess_ops import preprocess_batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
"""Files of an image-directory source (case-insensitive)."""

DEFAULT_FRAMES = 64
"""Default number of calibration frames (ONNX Runtime's and TensorRT's docs suggest a few hundred
for final models; 64 keeps a CPU calibration of the bundled detector under a minute)."""

_HEAD_PASS_THROUGH = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")


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


# ---------------------------------------------------------------------------------------------
# Calibration frames


@dataclass(frozen=True, slots=True)
class FrameSource:
    """One calibration source and how many frames it has.

    Attributes:
        path: a video file or a directory of images.
        is_video: whether ``path`` is decoded as a video.
        num_frames: frames in the source (> 0).
        image_files: the image files of a directory source, sorted (empty for videos).
    """

    path: Path
    is_video: bool
    num_frames: int
    image_files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.num_frames <= 0:
            raise ValueError(f"expected num_frames > 0, got {self.num_frames}")


def _image_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and (directory / "images").is_dir():  # a dataset directory (training.dataset layout)
        files = sorted(p for p in (directory / "images").iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files


def _count_video_frames(path: Path) -> int:
    """Frames of the first video stream (the container's count, else the demuxed packets)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CalibrationError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if stream.frames and stream.frames > 0:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except CalibrationError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable video ({type(e).__name__}: {str(e)[:120]})") from e


def probe_source(path: str | os.PathLike[str]) -> FrameSource:
    """Tell what a calibration source is and how many frames it holds.

    Args:
        path: a video file (anything FFmpeg decodes) or a directory of images (``.png``, ``.jpg``, ...;
            a dataset directory with an ``images/`` subdirectory works too).

    Returns:
        The :class:`FrameSource`.

    Raises:
        CalibrationError: if the path is missing, an empty directory, or not a readable video.
    """
    p = Path(path)
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise CalibrationError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the directory")
        return FrameSource(p, False, len(files), tuple(files))
    if not p.is_file():
        raise CalibrationError(f"{p}: calibration source not found")
    n = _count_video_frames(p)
    if n <= 0:
        raise CalibrationError(f"{p}: the video has no frames")
    return FrameSource(p, True, n)


def evenly_spaced(total: int, count: int) -> npt.NDArray[np.int64]:
    """``min(count, total)`` distinct indices in ``[0, total)``, evenly spaced, first and last included.

    Args:
        total: number of items (> 0).
        count: wanted indices (> 0).

    Returns:
        Ascending int64 indices.

    Raises:
        ValueError: on non-positive arguments.
    """
    if total <= 0 or count <= 0:
        raise ValueError(f"expected positive total and count, got {total} and {count}")
    if count >= total:
        return np.arange(total, dtype=np.int64)
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    return np.unique(np.rint(np.linspace(0, total - 1, count)).astype(np.int64))


def _read_image_rgb(path: Path) -> npt.NDArray[np.uint8]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise CalibrationError(f"{path}: not a readable image")
    return np.ascontiguousarray(img[:, :, ::-1])


def _video_frames_at(path: Path, indices: Sequence[int]) -> Iterator[npt.NDArray[np.uint8]]:
    """Decode a video sequentially and yield the RGB frames at ``indices`` (ascending)."""
    import av

    wanted = deque(int(i) for i in indices)
    if not wanted:
        return
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i == wanted[0]:
                    yield np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
                    wanted.popleft()
                    if not wanted:
                        return
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise CalibrationError(f"{path}: decoding failed ({type(e).__name__}: {str(e)[:120]})") from e


def calibration_frames(sources: Sequence[FrameSource], num_frames: int) -> Iterator[npt.NDArray[np.uint8]]:
    """Yield ``num_frames`` RGB frames evenly spaced over the concatenation of ``sources``.

    Frames are decoded lazily (only one is held at a time). A video that turns out shorter than
    its declared frame count yields fewer frames.

    Args:
        sources: probed sources (:func:`probe_source`).
        num_frames: frames wanted (all frames if the sources have fewer).

    Yields:
        ``(H, W, 3)`` uint8 RGB frames.

    Raises:
        CalibrationError: if a frame cannot be read.
    """
    total = sum(s.num_frames for s in sources)
    picks = evenly_spaced(total, num_frames)
    start = 0
    for s in sources:
        local = picks[(picks >= start) & (picks < start + s.num_frames)] - start
        start += s.num_frames
        if s.is_video:
            yield from _video_frames_at(s.path, local.tolist())
        else:
            for i in local.tolist():
                yield _read_image_rgb(s.image_files[i])


class FrameCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over frames preprocessed by the runtime's preprocess.

    One frame per batch (batch size 1: ``quant_pre_process`` keeps the dynamic batch axis).
    Frames are pulled from the iterator lazily, so memory holds one frame at a time.

    Args:
        frames: RGB ``(H, W, 3)`` uint8 frames.
        card: the model card (input size, normalization, pad value).
        input_name: the model's input tensor name.
    """

    def __init__(self, *, frames: Iterator[npt.NDArray[np.uint8]], card: ModelCard, input_name: str) -> None:
        self._frames = frames
        self._card = card
        self._input_name = input_name
        self.count = 0

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        """The next input feed ``{input_name: (1, 3, H, W) float32}``, or ``None`` at the end."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        batch, _ = preprocess_batch([frame], self._card)
        self.count += 1
        return {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def __iter__(self) -> Iterator[dict[str, npt.NDArray[Any]]]:
        while (feed := self.get_next()) is not None:
            yield feed


def _as_ort_reader(reader: FrameCalibrationReader) -> Any:
    """Wrap the reader in a subclass of ONNX Runtime's abstract ``CalibrationDataReader``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
            return reader.get_next()

    return _Reader()


# ---------------------------------------------------------------------------------------------
# Graph analysis


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output if out}


def _is_dfl_conv(node: Any, producers: dict[str, Any]) -> bool:
    """A Conv fed (through reshapes/transposes only) by a Softmax: the DFL expectation conv."""
    if node.op_type != "Conv":
        return False
    src = producers.get(node.input[0])
    while src is not None and src.op_type in _HEAD_PASS_THROUGH:
        src = producers.get(src.input[0]) if src.input else None
    return src is not None and src.op_type == "Softmax"


def head_fp32_nodes(model: Any) -> list[str]:
    """Names of the nodes between the last head convolutions and the graph outputs.

    Walks back from every graph output through all producers and stops at convolutions: the
    nodes found are the head's tail (class sigmoid, DFL softmax, box decode ``Sub``/``Add``/``Mul``
    /``Div``, ``Concat``, reshapes, anchor arithmetic). The DFL's fixed 1x1 convolution (a ``Conv``
    fed by a ``Softmax``) belongs to the tail and the walk continues through it. For an
    instance-segmentation model the prototype output's final activation is included too.

    Args:
        model: an ``onnx.ModelProto`` whose nodes all have names (see :func:`name_unnamed_nodes`).

    Returns:
        Node names, in graph order.

    Raises:
        CalibrationError: if the walk finds no convolution at all (not a convolutional detector head).
    """
    producers = _producers(model)
    seen: set[int] = set()
    stack = [producers[o.name] for o in model.graph.output if o.name in producers]
    stopped_at_conv = False
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        if node.op_type in ("Conv", "ConvTranspose") and not _is_dfl_conv(node, producers):
            stopped_at_conv = True
            continue
        seen.add(id(node))
        for name in node.input:
            src = producers.get(name)
            if src is not None and id(src) not in seen:
                stack.append(src)
    if not stopped_at_conv:
        raise CalibrationError("model: no convolution found walking back from the outputs "
                               "(not a convolutional detector head)")
    return [n.name for n in model.graph.node if id(n) in seen]


def name_unnamed_nodes(model: Any) -> int:
    """Give every unnamed node a unique name ``<op_type>_<index>`` (in place); returns how many."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            count += 1
    return count


def onnx_precision(model: Any) -> str:
    """Tell a model's compute precision from its graph: ``int8``, ``fp16`` or ``fp32``.

    ``int8``: it has ``QuantizeLinear``/``DequantizeLinear`` nodes; ``fp16``: float16 initializers or
    ``Cast`` to float16; else ``fp32``.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        One of ``"int8"``, ``"fp16"``, ``"fp32"``.
    """
    import onnx

    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    for n in model.graph.node:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute):
            return "fp16"
    return "fp32"


# ---------------------------------------------------------------------------------------------
# Model cards


def load_model_card(model_path: str | os.PathLike[str]) -> ModelCard:
    """The card beside an ONNX model, else one built from its ultralytics metadata.

    Raises:
        CalibrationError: if the model is unreadable or has neither a card nor ultralytics metadata.
    """
    from engines.base import EngineError
    from engines.onnxruntime_backend import OnnxRuntimeEngine

    p = Path(model_path)
    beside = card_path_for(p)
    try:
        if beside.is_file():
            return load_card(beside)
        engine = OnnxRuntimeEngine(model_path=p, intra_op_threads=1)
        engine.start()
        try:
            return card_from_ultralytics_metadata(engine.metadata, engine.input_name, engine.input_shape,
                                                  list(engine.output_names), engine.output_shapes, name=p.stem)
        finally:
            engine.stop()
    except EngineError as e:
        raise CalibrationError(str(e)) from e
    except ModelCardError as e:
        raise CalibrationError(f"{p}: no model card at {beside} and {e}") from e


def variant_card(card: ModelCard, *, precision: OutputPrecision, source_model: Path, details: dict[str, Any],
                 command: str) -> ModelCard:
    """A copy of ``card`` for a converted model: same task, head and input; precision in the provenance.

    The source card's metrics were measured on the FP32 model, so they move to
    ``provenance.fp32_metrics`` and ``metrics`` starts empty. The input dtype stays ``float32``
    (the converted models cast inside).

    Args:
        card: the FP32 model's card.
        precision: the new model's precision.
        source_model: the FP32 ONNX file.
        details: conversion settings to record (calibration frames, method, FP32 node list size, ...).
        command: the command line that made it.

    Returns:
        The new :class:`ModelCard`.
    """
    provenance = {
        "precision": precision.value,
        "converted_from": str(source_model),
        "conversion": details,
        "conversion_command": command,
        "fp32_provenance": dict(card.provenance),
        "fp32_metrics": dict(card.metrics),
    }
    return card.model_copy(update={"name": f"{card.name}-{precision.value}", "metrics": {},
                                   "provenance": provenance})


# ---------------------------------------------------------------------------------------------
# Conversions


def _input_name(model: Any) -> str:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CalibrationError(f"model: expected 1 input, got {len(inputs)}")
    return inputs[0]


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
        reader = FrameCalibrationReader(frames=chained(), card=card, input_name=_input_name(model))
        try:
            quantize_static(
                str(pre), str(out_path), _as_ort_reader(reader),
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
                               "(pip install 'streamdet[quant]')") from e
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


def restore_float32_outputs(converted: Any, original: Any) -> int:
    """Make graph outputs that were float32 in ``original`` float32 again in ``converted`` (in place).

    ``convert_float_to_float16(keep_io_types=True)`` leaves a graph output float16 (behind a
    ``Cast`` to float16) when the node producing it is in ``node_block_list`` (seen with
    onnxconverter-common 1.16). Such a trailing ``Cast`` is removed (its input, already float32,
    becomes the output); any other float16 output gets a ``Cast`` to float32 appended.

    Args:
        converted: the converted ``onnx.ModelProto``.
        original: the model before conversion.

    Returns:
        The number of outputs fixed.
    """
    import onnx

    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    fixed = 0
    for out in converted.graph.output:
        tt = out.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT16 or want.get(out.name) != onnx.TensorProto.FLOAT:
            continue
        producers = _producers(converted)
        node = producers.get(out.name)
        to_half = node is not None and node.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)
        inner = node.input[0] if node is not None and to_half else ""
        src = producers.get(inner)
        shared = any(inner in n.input for n in converted.graph.node if n is not node) or inner in {
            o.name for o in converted.graph.output}
        if node is not None and src is not None and not shared:
            # a Cast to float16 reads a float32 tensor: let that tensor be the output
            src.output[list(src.output).index(inner)] = out.name
            converted.graph.node.remove(node)
        else:
            half = f"{out.name}_fp16"
            for n in converted.graph.node:
                for i, name in enumerate(n.output):
                    if name == out.name:
                        n.output[i] = half
                for i, name in enumerate(n.input):
                    if name == out.name:
                        n.input[i] = half
            converted.graph.node.append(onnx.helper.make_node("Cast", [half], [out.name], to=onnx.TensorProto.FLOAT,
                                                              name=f"{out.name}_to_float32"))
        tt.elem_type = onnx.TensorProto.FLOAT
        fixed += 1
    return fixed


# ---------------------------------------------------------------------------------------------
# CLI


def _default_out(model: Path, precision: OutputPrecision) -> Path:
    return model.with_name(f"{model.stem}.{precision.value}.onnx")


def _write_variant(out: Path, card: ModelCard, make: Any, *, precision: OutputPrecision, model: Path,
                   command: str) -> dict[str, Any]:
    """Write ``out`` and its card through temporary names; nothing is left behind on failure."""
    tmp_model = out.with_name(f".{out.name}.tmp")
    out_card = card_path_for(out)
    tmp_card = out_card.with_name(f".{out_card.name}.tmp")
    try:
        details = make(tmp_model)
        new_card = variant_card(card, precision=precision, source_model=model, details=details, command=command)
        tmp_card.write_text(new_card.to_json() + "\n")
        os.replace(tmp_model, out)
        os.replace(tmp_card, out_card)
        return details
    finally:
        for t in (tmp_model, tmp_card):
            if t.exists():
                t.unlink()


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="FP32 MODEL.onnx (its card MODEL.json beside it, or ultralytics metadata)")
    p.add_argument("--source", action="append", default=[],
                   help="calibration video or image directory (repeatable); needed for INT8")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="calibration frames, evenly spaced")
    p.add_argument("--out-int8", default=None, help="INT8 Q/DQ output (default MODEL.int8.onnx)")
    p.add_argument("--out-fp16", default=None, help="FP16 output (default MODEL.fp16.onnx)")
    p.add_argument("--method", type=CalibrationMethod, choices=list(CalibrationMethod),
                   default=CalibrationMethod.MINMAX, help="activation range estimation")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)")
    p.add_argument("--target", type=Int8Target, choices=list(Int8Target), default=Int8Target.TENSORRT,
                   help="INT8 layout: tensorrt (symmetric int8, default) or cpu (ONNX Runtime U8S8)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI (see the module docstring).

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 on bad input (one ``error:`` line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m training.calibrate " + shlex.join(argv)
    try:
        run(args, command)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.model}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, command: str) -> None:
    """Do the work of :func:`main`.

    Raises:
        CalibrationError: on bad input or a failed conversion.
        OSError: if an output cannot be written.
    """
    model = Path(args.model)
    if not model.is_file():
        raise CalibrationError(f"{model}: model file not found")
    if args.frames < 1:
        raise CalibrationError(f"--frames: expected a positive count, got {args.frames}")
    explicit = args.out_int8 is not None or args.out_fp16 is not None
    out_int8 = Path(args.out_int8) if args.out_int8 else None
    out_fp16 = Path(args.out_fp16) if args.out_fp16 else None
    if not explicit:
        out_int8 = _default_out(model, OutputPrecision.INT8)
        out_fp16 = _default_out(model, OutputPrecision.FP16)
    for out in (out_int8, out_fp16):
        if out is not None:
            if out.suffix != ".onnx":
                raise CalibrationError(f"{out}: expected an output path ending in .onnx")
            if out.resolve() == model.resolve():
                raise CalibrationError(f"{out}: output would overwrite the input model")
            if not out.parent.is_dir():
                raise CalibrationError(f"{out}: output directory {out.parent} does not exist")
    if out_int8 is not None and not args.source:
        raise CalibrationError(f"{model}: INT8 calibration needs --source (a video or an image directory)")
    card = load_model_card(model)
    sources = [probe_source(s) for s in args.source]  # every source is checked before anything is written
    if out_int8 is not None:
        frames = calibration_frames(sources, args.frames)
        details = _write_variant(
            out_int8, card,
            lambda tmp: quantize_int8(model, tmp, frames=frames, card=card, method=args.method,
                                      per_channel=not args.per_tensor, target=args.target),
            precision=OutputPrecision.INT8, model=model, command=command)
        print(f"wrote {out_int8} (int8 Q/DQ for {args.target.value}, {details['frames']} calibration frames, "
              f"{details['fp32_nodes']} head nodes in fp32)")
    if out_fp16 is not None:
        details = _write_variant(out_fp16, card, lambda tmp: convert_fp16(model, tmp),
                                 precision=OutputPrecision.FP16, model=model, command=command)
        print(f"wrote {out_fp16} (fp16, float32 I/O, {details['fp32_nodes']} head nodes in fp32)")


if __name__ == "__main__":
    raise SystemExit(main())
