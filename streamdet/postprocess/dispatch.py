"""The postprocess entry point: pick the head's postprocess from the model card."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt

from streamdet.card import HeadLayout, ModelCard
from streamdet.letterbox import LetterboxParams
from streamdet.postprocess.detect import check_batch, postprocess_detect
from streamdet.postprocess.results import Detections, PostprocessConfig
from streamdet.postprocess.segment import postprocess_segment
from streamdet.postprocess.semantic import postprocess_semantic


def postprocess(
    outputs: Sequence[npt.NDArray[Any]],
    letterboxes: Sequence[LetterboxParams],
    card: ModelCard,
    cfg: PostprocessConfig,
) -> list[Detections]:
    """Postprocess a batch according to the card's head layout (which the card's ``task`` fixes).

    ``ultralytics_segment`` with ``cfg.masks`` off is decoded as a detector (boxes only).

    Args:
        outputs: the raw outputs in the card's ``head.outputs`` order.
        letterboxes: one per image.
        card: the model card.
        cfg: :class:`PostprocessConfig`.

    Returns:
        One :class:`Detections` per image.

    Raises:
        ValueError: if the outputs do not fit the layout or the batch size.
    """
    layout = card.head.layout
    if layout is HeadLayout.ULTRALYTICS_SEGMENT:
        if not cfg.masks:  # boxes only: the mask-coefficient rows are ignored, prototypes never touched
            return postprocess_detect(outputs[:1], letterboxes, card, cfg)
        return postprocess_segment(outputs, letterboxes, card, cfg)
    if layout is HeadLayout.SEMANTIC_LOGITS:
        if not cfg.masks:
            check_batch(outputs, letterboxes)
            return [Detections.empty() for _ in letterboxes]
        return postprocess_semantic(outputs, letterboxes, card, cfg)
    return postprocess_detect(outputs, letterboxes, card, cfg)
