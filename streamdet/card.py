"""Model cards: what a model expects and produces, stored beside its ONNX file as ``MODEL.json``.

A card is written by ``training.export`` and read by the pipeline and the evaluator. For a user's
ultralytics ONNX export with no card, :func:`card_from_ultralytics_metadata` builds one from the
metadata ultralytics writes into the ONNX file (``names``, ``imgsz``, ``stride``, ``task``).
"""

from __future__ import annotations

import ast
import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streamdet.cli import relative_path_note
from streamdet.constants import PAD_VALUE
from streamdet.letterbox import ResizeMode

CARD_SCHEMA = "streamdet.modelcard/1"


class Task(str, Enum):
    """What a model does; picks the postprocess."""

    DETECT = "detect"
    SEGMENT = "segment"  # instance segmentation: boxes + mask coefficients + prototypes
    SEMANTIC = "semantic"


class HeadLayout(str, Enum):
    """Layout of a model's raw outputs.

    ``ultralytics_detect``: one output ``(B, 4 + C, N)``: boxes cxcywh in input pixels, class
    scores after sigmoid, no NMS. ``ultralytics_segment``: that with ``32`` mask coefficients after
    the class scores, ``(B, 4 + C + 32, N)``, plus prototypes ``(B, 32, H/4, W/4)``.
    ``end2end``: NMS inside the model, one output ``(B, K, 6)`` rows ``x1, y1, x2, y2, score,
    class`` in input pixels (ultralytics end2end), or three outputs boxes ``(B, K, 4)`` xyxy,
    scores ``(B, K)``, labels ``(B, K)``. ``semantic_logits``: ``(B, C, H, W)`` logits.
    Set-prediction (DETR-family) heads, decoded without NMS: ``detr``: class logits ``(B, Q, C + 1)``
    with the no-object class last (softmax) and boxes ``(B, Q, 4)`` cxcywh normalised to the input
    (Carion et al. 2020, facebookresearch/detr ``PostProcess``); ``rtdetr``: one output
    ``(B, Q, 4 + C)``, boxes cxcywh normalised to the input then class scores after sigmoid (RT-DETR as
    ultralytics exports it, ``RTDETRDecoder``).
    """

    ULTRALYTICS_DETECT = "ultralytics_detect"
    ULTRALYTICS_SEGMENT = "ultralytics_segment"
    END2END = "end2end"
    SEMANTIC_LOGITS = "semantic_logits"
    DETR = "detr"
    RTDETR = "rtdetr"


SET_PREDICTION_LAYOUTS = frozenset({HeadLayout.DETR, HeadLayout.RTDETR})
"""Head layouts whose queries are already one box per object: no NMS."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


INPUT_DTYPES = ("float32", "float16")
"""The input dtypes a card may declare: what the preprocess writes and the engines feed the model."""

_INPUT_CHOICES: dict[str, tuple[str, ...]] = {
    "layout": ("NCHW",),
    "channel_order": ("RGB", "BGR"),
    "dtype": INPUT_DTYPES,
}
"""The values each :class:`InputSpec` text field accepts."""


class InputSpec(_Frozen):
    """The model's image input.

    Attributes:
        name: ONNX input tensor name.
        layout: ``NCHW`` (only layout supported).
        dtype: ``float32`` or ``float16``.
        channel_order: ``RGB`` or ``BGR``.
        width: input width in pixels.
        height: input height in pixels.
        dynamic_batch: whether the batch dimension is dynamic.
        resize: how the model expects frames resized into the input (:class:`~streamdet.letterbox.ResizeMode`:
            ``letterbox``, the default, or ``stretch``); postprocess undoes exactly that resize.
    """

    name: str = "images"
    layout: str = "NCHW"
    dtype: str = "float32"
    channel_order: str = "RGB"
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    dynamic_batch: bool = True
    resize: ResizeMode = ResizeMode.LETTERBOX

    @field_validator("layout", "channel_order", "dtype")
    @classmethod
    def _one_of(cls, v: str, info: ValidationInfo) -> str:
        allowed = _INPUT_CHOICES[info.field_name or ""]
        if v not in allowed:
            raise ValueError(f"expected {info.field_name} {' or '.join(allowed)}, got {v}")
        return v


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""The preprocess normalises in float32: the largest value, and the smallest whose reciprocal is finite."""


def _listed(values: tuple[float, ...]) -> str:
    """``[0, 0, 0]``, ``[nan, 1, 2.5]``: values as a short list for messages."""
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


class Normalization(_Frozen):
    """``x = (pixel - mean) / std`` per channel, pixels in ``[0, 255]``, in the input's channel order.

    Both are checked when the card is read: finite float32 values, ``std`` positive (a zero, NaN or
    infinite value would make every input NaN or infinite, hence no detections or a failed stage).

    Attributes:
        mean: per-channel mean in pixel units.
        std: per-channel standard deviation in pixel units.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, v: tuple[float, float, float], info: ValidationInfo) -> tuple[float, float, float]:
        std = info.field_name == "std"
        if not all(math.isfinite(x) and (x > 0 or not std) for x in v):
            raise ValueError(f"expected finite {'positive ' if std else ''}values, got {_listed(v)}")
        low = _FLOAT32_TINY if std else 0.0
        if not all(low <= abs(x) <= _FLOAT32_MAX for x in v):
            span = f"{low:g} to {_FLOAT32_MAX:g}" if std else f"magnitude at most {_FLOAT32_MAX:g}"
            raise ValueError(f"expected float32 values ({span}), got {_listed(v)}")
        return v


class HeadSpec(_Frozen):
    """The model's output head.

    Attributes:
        layout: see :class:`HeadLayout`.
        num_classes: number of classes ``C`` (for semantic models, including background).
        strides: feature strides of the anchor-free head, e.g. ``(8, 16, 32)``.
        num_mask_coeffs: mask coefficients per box (instance segmentation), else 0.
        outputs: ONNX output names, in the order of the layout.
        mask_hw: prototype map size ``(H, W)`` for instance segmentation.
        num_queries: query count ``Q`` of a set-prediction head (``detr``, ``rtdetr``), checked against
            the model's outputs at start-up; None: not checked.
    """

    layout: HeadLayout
    num_classes: int = Field(gt=0)
    strides: tuple[int, ...] = (8, 16, 32)
    num_mask_coeffs: int = 0
    outputs: tuple[str, ...] = ("output0",)
    mask_hw: tuple[int, int] | None = None
    num_queries: int | None = Field(default=None, gt=0)

    @field_validator("strides")
    @classmethod
    def _positive_strides(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not all(s > 0 for s in v):  # a zero stride divides by zero, a negative one counts negative anchors
            raise ValueError(f"expected positive integers, got {list(v)}")
        return v


class ModelCard(_Frozen):
    """Everything the pipeline needs to run a model, plus how it was made and how well it does.

    Attributes:
        schema_version: always :data:`CARD_SCHEMA`.
        name: short model name.
        task: :class:`Task`.
        head: :class:`HeadSpec`.
        input: :class:`InputSpec`.
        normalization: :class:`Normalization`.
        pad_value: letterbox pad value in pixel units (0..255).
        class_names: one name per class id.
        metrics: validation metrics (e.g. ``mAP50-95``), with the data they were measured on.
        provenance: the command, seed and time that produced the model.
        params: parameter count.
        gflops: GFLOPs per image at the input size.
        speed: measured speed (e.g. ``engine_only_fps``), with the machine and command.
    """

    schema_version: str = Field(default=CARD_SCHEMA, alias="schema")
    name: str
    task: Task
    head: HeadSpec
    input: InputSpec
    normalization: Normalization = Normalization()
    pad_value: int = Field(default=PAD_VALUE, ge=0, le=255)
    class_names: tuple[str, ...]
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    params: int | None = None
    gflops: float | None = None
    speed: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def input_wh(self) -> tuple[int, int]:
        """Model input size ``(width, height)`` in pixels."""
        return (self.input.width, self.input.height)

    def batch_nbytes(self, batch: int) -> int:
        """Bytes of an input batch of ``batch`` images: ``(batch, 3, height, width)`` of the input dtype."""
        itemsize = 2 if self.input.dtype == "float16" else 4
        return batch * 3 * self.input.height * self.input.width * itemsize

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.schema_version != CARD_SCHEMA:
            raise ValueError(f"expected schema {CARD_SCHEMA}, got {self.schema_version}")
        if len(self.class_names) != self.head.num_classes:
            raise ValueError(
                f"expected {self.head.num_classes} class names (head.num_classes), got {len(self.class_names)}"
            )
        want = {
            Task.DETECT: {HeadLayout.ULTRALYTICS_DETECT, HeadLayout.END2END, HeadLayout.DETR, HeadLayout.RTDETR},
            Task.SEGMENT: {HeadLayout.ULTRALYTICS_SEGMENT},
            Task.SEMANTIC: {HeadLayout.SEMANTIC_LOGITS},
        }[self.task]
        if self.head.layout not in want:
            raise ValueError(f"expected head layout in {sorted(w.value for w in want)} for task {self.task.value}, "
                             f"got {self.head.layout.value}")
        return self

    def to_json(self) -> str:
        """Serialise to indented JSON (with the ``schema`` key)."""
        return self.model_dump_json(by_alias=True, indent=2)


class ModelCardError(ValueError):
    """A model card is missing, unreadable or contradicts its model."""


def card_path_for(model_path: str | os.PathLike[str]) -> Path:
    """The card path beside a model: ``MODEL.onnx`` -> ``MODEL.json``."""
    return Path(model_path).with_suffix(".json")


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate a model card.

    Args:
        path: the card's JSON file.

    Returns:
        The validated :class:`ModelCard`.

    Raises:
        ModelCardError: if the file is missing, not JSON, or not a valid card (the message names the file).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise ModelCardError(f"{p}: model card not found{relative_path_note(p)}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelCardError(f"{p}: not a readable JSON model card ({e})") from e
    try:
        return ModelCard.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "card"
        raise ModelCardError(f"{p}: invalid model card: {loc}: {first['msg']}") from e


def save_card(card: ModelCard, path: str | os.PathLike[str]) -> None:
    """Write a card atomically (temporary file, then rename).

    Args:
        card: the card.
        path: destination JSON path.

    Raises:
        OSError: if the path cannot be written.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(card.to_json() + "\n")
    os.replace(tmp, p)


def card_from_ultralytics_metadata(
    metadata: dict[str, str],
    input_name: str,
    input_shape: list[int | str | None],
    output_names: list[str],
    output_shapes: list[list[int | str | None]],
    name: str = "ultralytics",
    input_dtype: str = "float32",
) -> ModelCard:
    """Build a card for a user's ultralytics ONNX export from its embedded metadata.

    Ultralytics writes ``names`` (a Python dict literal ``{0: 'person', ...}``), ``imgsz``
    (``[h, w]``), ``stride``, ``task`` and ``description`` into the ONNX ``metadata_props``. Its
    models take RGB in ``[0, 1]`` (pixels / 255), float32 unless exported with ``half=True``, letterboxed
    with pad value 114; RT-DETR
    exports (``description`` naming ``rtdetr``, or one output ``(B, Q, 4 + C)``) get the ``rtdetr``
    head and the ``stretch`` resize its predictor uses.

    Args:
        metadata: the ONNX metadata_props as a dict.
        input_name: the ONNX input name.
        input_shape: the ONNX input shape (dims may be symbolic).
        output_names: the ONNX output names.
        output_shapes: their shapes.
        name: model name for the card.
        input_dtype: the ONNX input's dtype, one of :data:`INPUT_DTYPES` (``float16`` for a ``half=True`` export).

    Returns:
        A :class:`ModelCard`.

    Raises:
        ModelCardError: in one line, if the metadata lacks class names, has a ``names``, ``imgsz`` or
            ``stride`` it cannot read (class ids not ``0`` to ``N-1``, sizes and strides not positive
            integers), gives no input size, or the head cannot be recognised, or ``input_dtype`` is not
            one of :data:`INPUT_DTYPES`.
    """
    if "names" not in metadata:
        raise ModelCardError("ONNX metadata has no 'names' (not an ultralytics export) and no model card was given")
    class_names = _metadata_class_names(metadata["names"])
    h = input_shape[2] if len(input_shape) == 4 else None
    w = input_shape[3] if len(input_shape) == 4 else None
    if "imgsz" in metadata:
        h, w = _metadata_imgsz(metadata["imgsz"])
    if not isinstance(h, int) or not isinstance(w, int):
        raise ModelCardError(f"cannot tell the input size: input shape {input_shape} and no 'imgsz' metadata")
    task = metadata.get("task", "detect")
    stride = _metadata_stride(metadata.get("stride", "32"))
    try:
        return _ultralytics_card(metadata, task, stride, class_names, (w, h), input_name, input_shape,
                                 output_names, output_shapes, name, input_dtype)
    except ValidationError as e:  # e.g. a size the card refuses: one line, like a card file's errors
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "card"
        raise ModelCardError(f"ONNX metadata gives an invalid model card: {loc}: {first['msg']}") from e


def _ultralytics_card(metadata: dict[str, str], task: str, stride: int, class_names: tuple[str, ...],
                      input_wh: tuple[int, int], input_name: str, input_shape: list[int | str | None],
                      output_names: list[str], output_shapes: list[list[int | str | None]], name: str,
                      input_dtype: str) -> ModelCard:
    """The card of :func:`card_from_ultralytics_metadata` from its parsed metadata (raises ``ValidationError``)."""
    w, h = input_wh
    strides = tuple(s for s in (8, 16, 32, 64) if s <= stride) or (stride,)
    nc = len(class_names)
    out0 = list(output_shapes[0]) if output_shapes else []
    resize = ResizeMode.LETTERBOX
    if task == "detect" and _is_ultralytics_rtdetr(metadata, out0, nc):
        q = out0[1] if len(out0) > 1 and isinstance(out0[1], int) else None
        head = HeadSpec(layout=HeadLayout.RTDETR, num_classes=nc, strides=(), outputs=tuple(output_names),
                        num_queries=q)
        t, resize = Task.DETECT, ResizeMode.STRETCH  # its predictor stretches: LetterBox(scale_fill=True)
    elif task == "segment":
        nm = 32
        if len(output_shapes) > 1 and len(output_shapes[1]) == 4 and isinstance(output_shapes[1][1], int):
            nm = output_shapes[1][1]
        ps = output_shapes[1] if len(output_shapes) > 1 else []
        mask_hw = (ps[2], ps[3]) if len(ps) == 4 and isinstance(ps[2], int) and isinstance(ps[3], int) else None
        head = HeadSpec(layout=HeadLayout.ULTRALYTICS_SEGMENT, num_classes=nc, strides=strides,
                        num_mask_coeffs=nm, outputs=tuple(output_names), mask_hw=mask_hw)
        t = Task.SEGMENT
    elif task == "detect":
        end2end = len(out0) == 3 and out0[-1] == 6
        layout = HeadLayout.END2END if end2end else HeadLayout.ULTRALYTICS_DETECT
        head = HeadSpec(layout=layout, num_classes=nc, strides=strides, outputs=tuple(output_names))
        t = Task.DETECT
    else:
        raise ModelCardError(f"ultralytics task {task!r} is not supported (detect, segment)")
    dyn = not isinstance(input_shape[0], int) if input_shape else True
    if input_dtype not in INPUT_DTYPES:
        raise ModelCardError(f"input dtype {input_dtype} is not supported ({' or '.join(INPUT_DTYPES)})")
    return ModelCard(
        name=name, task=t, head=head,
        input=InputSpec(name=input_name, width=w, height=h, dtype=input_dtype, dynamic_batch=dyn,
                        resize=resize),
        normalization=Normalization(), pad_value=PAD_VALUE, class_names=class_names,
        provenance={"source": "ultralytics ONNX metadata", **{k: metadata[k] for k in ("version", "description")
                                                              if k in metadata}},
    )


_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)
"""What ``ast.literal_eval`` raises on text that is not a Python literal (or one too deeply nested)."""


def _literal(key: str, text: str, what: str) -> Any:
    """The Python literal in metadata ``key``, else ModelCardError ``ONNX metadata 'KEY' is not WHAT: 'TEXT'``."""
    try:
        return ast.literal_eval(text)
    except _LITERAL_ERRORS as e:
        raise _not_a(key, text, what) from e


def _not_a(key: str, text: str, what: str) -> ModelCardError:
    return ModelCardError(f"ONNX metadata {key!r} is not {what}: {text[:80]!r}")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _metadata_class_names(text: str) -> tuple[str, ...]:
    """Class names from ultralytics' ``names``: ``{0: 'person', 1: 'car'}`` (ids 0 to N-1), or a list of names.

    Raises:
        ModelCardError: if it is not such a dict or list, or names no class.
    """
    obj = _literal("names", text, "a dict literal")
    if isinstance(obj, dict):
        ids = list(obj)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in ids) or sorted(ids) != list(range(len(ids))):
            raise _not_a("names", text, f"a dict of class ids 0 to {len(ids) - 1}")
        names = tuple(str(obj[k]) for k in sorted(ids))
    elif isinstance(obj, (list, tuple)):
        names = tuple(str(n) for n in obj)
    else:
        raise _not_a("names", text, "a dict literal")
    if not names:
        raise ModelCardError(f"ONNX metadata 'names' lists no classes: {text[:80]!r}")
    return names


def _metadata_imgsz(text: str) -> tuple[int, int]:
    """``(height, width)`` from ultralytics' ``imgsz``: ``[h, w]``, or one size for both.

    Raises:
        ModelCardError: if it is not one or two positive integers.
    """
    what = "an image size [height, width] of positive integers"
    obj = _literal("imgsz", text, what)
    if _positive_int(obj):
        return obj, obj
    if isinstance(obj, (list, tuple)) and len(obj) == 2 and all(_positive_int(v) for v in obj):
        return obj[0], obj[1]
    raise _not_a("imgsz", text, what)


def _metadata_stride(text: str) -> int:
    """The largest head stride from ultralytics' ``stride``.

    Raises:
        ModelCardError: if it is not a positive integer.
    """
    obj = _literal("stride", text, "a positive integer")
    if not _positive_int(obj):
        raise _not_a("stride", text, "a positive integer")
    return int(obj)


def _is_ultralytics_rtdetr(metadata: dict[str, str], out0: list[int | str | None], nc: int) -> bool:
    """Whether an ultralytics detect export is RT-DETR: its description says so, or its one output is ``(B, Q, 4 + C)``.

    A YOLO head is ``(B, 4 + C, N)`` and an end2end one ``(B, K, 6)``; when the shape cannot tell
    (``Q == 4 + C``, or ``C == 2``), only the description does.
    """
    desc = metadata.get("description", "").lower().replace("-", "")
    if "rtdetr" in desc:
        return True
    if len(out0) != 3 or out0[2] != 4 + nc or out0[1] == 4 + nc or out0[2] == 6:
        return False
    return True
