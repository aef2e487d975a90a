"""Do the calibration frames show what the model detects? Confident FP32 detections on them.

INT8 activation ranges come from the calibration frames. Footage on which the model finds nothing
(another scene, none of its classes) calibrates ranges for activations the model never produces in
service, and the INT8 model can lose accuracy without any error. :func:`confident_detections`
runs the FP32 model on the calibration frames (ONNX Runtime, the model card's preprocessing and
postprocessing), and :func:`coverage_warning` turns a low count into one warning line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from engines.onnxruntime_backend import OnnxRuntimeEngine
from streamdet.card import ModelCard, Task
from streamdet.postprocess import PostprocessConfig, postprocess
from streamdet.preprocess_ops import preprocess_batch

CONFIDENT_SCORE = 0.25
"""Score above which a detection counts as confident (the serving default threshold)."""

MIN_DETECTIONS_PER_FRAME = 0.5
"""Fewer confident detections than this per calibration frame, on average, is warned about."""

BATCH = 8
"""Frames per FP32 inference batch."""


def confident_detections(model_path: str | os.PathLike[str], card: ModelCard,
                         frames: Sequence[npt.NDArray[np.uint8]], *, score_threshold: float = CONFIDENT_SCORE,
                         batch: int = BATCH) -> int:
    """Count the FP32 model's detections scoring above ``score_threshold`` on ``frames``.

    Args:
        model_path: the FP32 ONNX model.
        card: its model card (preprocessing, head layout, class count).
        frames: ``(H, W, 3)`` uint8 RGB frames.
        score_threshold: the confidence that counts, in ``[0, 1)``.
        batch: frames per inference batch (a static-batch model runs one at a time).

    Returns:
        The number of detections after NMS over all frames.

    Raises:
        engines.base.EngineError: if ONNX Runtime cannot load or run the model.
    """
    cfg = PostprocessConfig(score_threshold=score_threshold, masks=False)
    step = batch if card.input.dynamic_batch else 1
    total = 0
    with OnnxRuntimeEngine(model_path=model_path) as engine:
        for start in range(0, len(frames), step):
            x, lbs = preprocess_batch(list(frames[start : start + step]), card)
            total += sum(len(d) for d in postprocess(engine.infer(x), lbs, card, cfg))
    return total


def coverage_warning(card: ModelCard, num_frames: int, detections: int, sources: Sequence[str]) -> str | None:
    """One warning line when the calibration frames hold few confident detections, else None.

    Args:
        card: the model card (semantic models are not checked: they have no detections).
        num_frames: calibration frames used.
        detections: :func:`confident_detections` on them.
        sources: the calibration sources, as the user named them.

    Returns:
        ``"calibration frames: ..."`` naming the count, the frames and the sources, or None when
        there are at least :data:`MIN_DETECTIONS_PER_FRAME` detections per frame.
    """
    if card.task is Task.SEMANTIC or num_frames == 0 or detections >= MIN_DETECTIONS_PER_FRAME * num_frames:
        return None
    return (f"calibration frames: {detections} confident detections (score > {CONFIDENT_SCORE}) on {num_frames} "
            f"frames of {', '.join(sources)}: they look unlike what {card.name} detects, so the INT8 ranges may "
            f"cost accuracy; calibrate on footage of the scenes the model will serve")
