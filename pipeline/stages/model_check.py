"""A model's interface from its ONNX file, its model card, and the checks that the two agree.

:func:`inspect_onnx` reads the model's inputs, outputs and metadata without running it;
:func:`resolve_card` finds its card (a file, ``MODEL.json`` beside it, or ultralytics' metadata
inside it); :func:`check_card_against_model` and :func:`checked_card` check that they agree
(outputs whose sizes the graph leaves symbolic are sized by shape inference, else one CPU run);
:func:`batching` says how big its batches are. The runner calls these at start-up, before any
decoding (:mod:`pipeline.chains`), so a wrong card fails in one line before a frame is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import EngineError
from streamdet.card import (
    INPUT_DTYPES,
    ModelCard,
    ModelCardError,
    card_from_ultralytics_metadata,
    card_path_for,
    load_card,
)
from streamdet.cli import relative_path_note

Dim = int | str | None


@dataclass(frozen=True)
class ModelInfo:
    """A model's interface as its ONNX file declares it.

    Attributes:
        path: the ``.onnx`` file.
        input_name: the single input's name.
        input_shape: its shape (``int`` for static dims, ``str``/``None`` for dynamic ones).
        output_names: output names, in graph order.
        output_shapes: their shapes.
        metadata: ``metadata_props`` (ultralytics exports keep ``names``, ``imgsz``... here).
        input_dtype: the input's element type as numpy names it (``float32``, ``float16``, ``uint8``...),
            None when the graph does not say.
    """

    path: Path
    input_name: str
    input_shape: tuple[Dim, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[Dim, ...], ...]
    metadata: dict[str, str]
    input_dtype: str | None = None

    @property
    def static_batch(self) -> int | None:
        """The input's batch size if fixed in the graph, else None."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None


def _dims(value_info: Any) -> tuple[Dim, ...]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return ()
    out: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(str(d.dim_param))
        else:
            out.append(None)
    return tuple(out)


_ONNX_DTYPES = {"FLOAT": "float32", "DOUBLE": "float64"}
"""ONNX element type names whose numpy name is not simply the name in lower case."""


def _dtype(value_info: Any) -> str | None:
    """A tensor's element type as numpy names it (``FLOAT`` -> ``float32``), None if undefined or unknown."""
    from onnx import TensorProto

    elem = value_info.type.tensor_type.elem_type
    if elem == TensorProto.UNDEFINED:
        return None
    try:
        name = TensorProto.DataType.Name(elem)
    except ValueError:
        return None
    return _ONNX_DTYPES.get(name, name.lower())


def inspect_onnx(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a model's inputs, outputs and metadata without running it.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The :class:`ModelInfo`.

    Raises:
        EngineError: if the file is missing, unreadable, not ONNX, or has not exactly one image input.
    """
    import onnx

    p = Path(path)
    if not p.exists():
        raise EngineError(f"{p}: model file not found{relative_path_note(p)}")
    if not p.is_file():
        raise EngineError(f"{p}: model path is not a file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-ish errors, OSError
        raise EngineError(f"{p}: not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from e
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not graph.node or not graph.output:
        raise EngineError(f"{p}: not a readable ONNX model (no graph)")
    if len(inputs) != 1:
        raise EngineError(f"{p}: expected 1 image input, got {len(inputs)} ({[i.name for i in inputs]})")
    return ModelInfo(
        path=p,
        input_name=inputs[0].name,
        input_shape=_dims(inputs[0]),
        output_names=tuple(o.name for o in graph.output),
        output_shapes=tuple(_dims(o) for o in graph.output),
        metadata={m.key: m.value for m in model.metadata_props},
        input_dtype=_dtype(inputs[0]),
    )


def resolve_card(info: ModelInfo, card_path: str | os.PathLike[str] | None = None) -> ModelCard:
    """Find the model card: the given file, else ``MODEL.json`` beside the model, else ONNX metadata.

    The last resort is the ultralytics metadata inside the ONNX file (class names, image size); its
    card takes the model's input dtype when the pipeline can feed it (``half=True`` exports take float16).

    Args:
        info: the inspected model.
        card_path: an explicit card file, or None.

    Returns:
        The :class:`ModelCard`.

    Raises:
        ModelCardError: if the card is missing/invalid or the model has neither a card nor metadata
            (the message names the file).
    """
    if card_path is not None:
        return load_card(card_path)
    beside = card_path_for(info.path)
    if beside.is_file():
        return load_card(beside)
    dtype = info.input_dtype if info.input_dtype in INPUT_DTYPES else "float32"
    try:
        return card_from_ultralytics_metadata(
            info.metadata, info.input_name, list(info.input_shape), list(info.output_names),
            [list(s) for s in info.output_shapes], name=info.path.stem, input_dtype=dtype,
        )
    except ModelCardError as e:
        raise ModelCardError(f"{info.path}: no model card {beside.name} beside it and {e}") from e


def check_card_against_model(card: ModelCard, info: ModelInfo, card_name: str = "model card") -> None:
    """Check that a card describes the model: input name, dtype, layout and size, output names and shapes.

    The engines feed the model the card's dtype as it is (ONNX Runtime refuses another type at the
    first batch, TensorRT compares it with its input binding), so the two must be equal.

    Also runs ``streamdet.postprocess.check_outputs_against_card`` on the declared output shapes, then,
    where those leave dimensions symbolic (a ``dynamic=True`` export's anchor count, a dynamic input
    size), on the shapes the outputs have for the card's input size (:func:`output_shapes_at_card_size`),
    so that a card with the wrong head layout or strides fails here, not in the postprocess.

    Args:
        card: the card.
        info: the inspected model.
        card_name: how to name the card in errors (its path).

    Raises:
        ModelCardError: naming the card, the model and the first contradiction.
    """
    where = f"{card_name} contradicts {info.path}"
    if card.input.name != info.input_name:
        raise ModelCardError(f"{where}: input name {card.input.name!r} vs {info.input_name!r} in the model")
    if info.input_dtype is not None and card.input.dtype != info.input_dtype:
        fed = "" if info.input_dtype in INPUT_DTYPES else f" (the pipeline feeds {' or '.join(INPUT_DTYPES)} only)"
        raise ModelCardError(f"{where}: input dtype {card.input.dtype} in the card, {info.input_dtype} in the "
                             f"model{fed}")
    shape = info.input_shape
    if len(shape) != 4:
        raise ModelCardError(f"{where}: expected a 4-D NCHW input, the model has shape {list(shape)}")
    expect = {1: 3, 2: card.input.height, 3: card.input.width}
    for axis, want in expect.items():
        got = shape[axis]
        if isinstance(got, int) and got != want:
            what = {1: "channels", 2: "input height", 3: "input width"}[axis]
            raise ModelCardError(f"{where}: {what} {want} in the card, {got} in the model "
                                 f"(input shape {list(shape)})")
    missing = [n for n in card.head.outputs if n not in info.output_names]
    if missing:
        raise ModelCardError(f"{where}: outputs {missing} not in the model (it has {list(info.output_names)})")
    order = [info.output_names.index(n) for n in card.head.outputs]
    shapes = [list(info.output_shapes[i]) for i in order]
    try:
        from streamdet.postprocess import check_outputs_against_card
    except ImportError:  # pragma: no cover - the postprocess module ships with the package
        return
    try:
        check_outputs_against_card(card, shapes)
    except (ValueError, ModelCardError) as e:
        raise ModelCardError(f"{where}: {e}") from e
    if not any(_unsized(s) for s in shapes):
        return
    sized = [list(s) for s in output_shapes_at_card_size(info, card)]
    sized = [sized[i] for i in order]
    if sized == shapes:
        return
    try:
        check_outputs_against_card(card, sized)
    except (ValueError, ModelCardError) as e:
        iw, ih = card.input_wh
        got = ", ".join(f"{n} {s}" for n, s in zip(card.head.outputs, sized))
        raise ModelCardError(f"{where}: {e} (its outputs for a {iw}x{ih} input: {got})") from e


def _unsized(shape: tuple[Dim, ...] | list[Dim]) -> bool:
    """Whether a shape leaves something the checks read unknown: its rank, or a dimension after the batch."""
    return not shape or not all(isinstance(d, int) for d in shape[1:])


def _filled(declared: tuple[Dim, ...], found: tuple[Dim, ...] | None) -> tuple[Dim, ...]:
    """``declared`` with its unknown dimensions after the batch (its rank too, if unknown) taken from ``found``."""
    if found is None or (declared and len(found) != len(declared)):
        return declared
    if not declared:
        return found
    rest = (d if isinstance(d, int) or not isinstance(f, int) else f for d, f in zip(declared[1:], found[1:]))
    return (declared[0], *rest)


def output_shapes_at_card_size(info: ModelInfo, card: ModelCard) -> tuple[tuple[Dim, ...], ...]:
    """The model's output shapes for one batch of the card's input size, as far as they can be told.

    The dimensions the graph declares symbolic (an ultralytics ``dynamic=True`` export's
    ``('batch', 84, 'anchors')``, every output of a model with a dynamic input size) are found by
    ONNX shape inference with the input fixed to ``(batch, 3, card height, card width)``; those it
    leaves unknown (e.g. after a ``Shape``-computed ``Split``), by one ONNX Runtime run on zeros of
    that size on the CPU. The batch is the model's fixed one, else 1. Dimensions the graph fixes, and
    a symbolic batch, are kept as it declares them.

    Args:
        info: the inspected model.
        card: its card (input size and dtype).

    Returns:
        One shape per output, in ``info.output_names`` order; dimensions nothing could tell stay
        symbolic (a model ONNX Runtime cannot load or run on the CPU keeps what shape inference found).
    """
    feed = (info.static_batch or 1, 3, card.input.height, card.input.width)
    shapes = tuple(_filled(d, f) for d, f in zip(info.output_shapes, _inferred_output_shapes(info, feed)))
    if any(_unsized(s) for n, s in zip(info.output_names, shapes) if n in card.head.outputs):
        ran = _run_output_shapes(info, card.input.dtype, feed)
        shapes = tuple(_filled(d, f) for d, f in zip(shapes, ran))
    _return_freed_memory()
    return shapes


def _return_freed_memory() -> None:
    """Hand the heap the model's graph took back to the system (glibc ``malloc_trim``; elsewhere nothing).

    The runner checks every model once at start-up and lives as long as the run: the parsed graph
    and its shape inference (about 25 MiB for the bundled 4.8 MB detector) stayed resident in it,
    freed but not returned, for the whole run.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _inferred_output_shapes(info: ModelInfo, feed: tuple[int, ...]) -> list[tuple[Dim, ...] | None]:
    """Output shapes by ONNX shape inference with the input's shape set to ``feed`` (None each where it fails)."""
    import onnx
    from onnx import shape_inference

    none: list[tuple[Dim, ...] | None] = [None] * len(info.output_names)
    try:
        model = onnx.load(str(info.path), load_external_data=False)
        graph = model.graph
        (image,) = [i for i in graph.input if i.name == info.input_name]
        shape = image.type.tensor_type.shape
        del shape.dim[:]
        for v in feed:
            shape.dim.add().dim_value = v
        for out in graph.output:  # inferred afresh: declared symbolic dims would be kept as they are
            out.type.tensor_type.ClearField("shape")
        del graph.value_info[:]
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a graph onnx cannot infer (custom ops, > 2 GiB): ONNX Runtime may still tell
        return none
    found = {o.name: _dims(o) for o in inferred.graph.output}
    return [found.get(n) or None for n in info.output_names]


def _run_output_shapes(info: ModelInfo, dtype: str, feed: tuple[int, ...]) -> list[tuple[Dim, ...] | None]:
    """Output shapes of one ONNX Runtime run (CPU) on zeros of shape ``feed`` (None each if it cannot run)."""
    import numpy as np

    none: list[tuple[Dim, ...] | None] = [None] * len(info.output_names)
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # no warnings about declared output shapes: this is what looks at them
        opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(info.path), sess_options=opts, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {info.input_name: np.zeros(feed, np.dtype(dtype))})
        names = [o.name for o in sess.get_outputs()]
    except Exception:  # ops the CPU provider lacks (a TensorRT-only model), too little memory: not checked here
        return none
    found = {n: tuple(int(d) for d in np.shape(o)) for n, o in zip(names, outs)}
    return [found.get(n) for n in info.output_names]


def checked_card(info: ModelInfo, card_path: str | os.PathLike[str] | None = None) -> ModelCard:
    """The model's card (:func:`resolve_card`), checked against the model (:func:`check_card_against_model`).

    Args:
        info: the inspected model.
        card_path: an explicit card file, or None (``MODEL.json`` beside the model, else its ONNX metadata).

    Returns:
        The checked :class:`ModelCard`.

    Raises:
        ModelCardError: if the card is missing or invalid, or contradicts the model (naming both).
    """
    card = resolve_card(info, card_path)
    beside = info.path.with_suffix(".json")
    name = str(card_path) if card_path is not None else (str(beside) if beside.is_file() else "ONNX metadata")
    check_card_against_model(card, info, name)
    return card


def batching(info: ModelInfo, card: ModelCard, max_batch: int) -> tuple[int, bool]:
    """Images per engine batch and whether batches are padded: ``max_batch``, unless the model's batch size is fixed.

    Returns:
        ``(batch, pad)``: ``(max_batch, False)`` for a dynamic batch, else ``(static size, True)``.
    """
    if info.static_batch is not None or not card.input.dynamic_batch:
        return info.static_batch or 1, True
    return max_batch, False
