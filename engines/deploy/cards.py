"""Model cards for calibration: the FP32 model's card, and the card of a converted (INT8 / FP16) variant."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engines.deploy.options import CalibrationError, OutputPrecision
from streamdet.card import ModelCard, ModelCardError, card_from_ultralytics_metadata, card_path_for, load_card

__all__ = ["load_model_card", "variant_card"]

def load_model_card(model_path: str | os.PathLike[str]) -> ModelCard:
    """The card beside an ONNX model, else one built from its ultralytics metadata.

    Args:
        model_path: the ONNX model (``MODEL.onnx``; its card is ``MODEL.json``).

    Returns:
        The :class:`~streamdet.card.ModelCard`.

    Raises:
        CalibrationError: if the model is unreadable or has neither a card nor ultralytics metadata.
    """
    from engines.base import EngineError
    from engines.onnxruntime_backend import OnnxRuntimeEngine

    p = Path(model_path)
    beside = card_path_for(p)
    if beside.is_file():
        try:
            return load_card(beside)
        except ModelCardError as e:  # (its own message names the card and why)
            raise CalibrationError(str(e)) from e
    try:
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
