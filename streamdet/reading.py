"""Reading a plate's text from its character detections (the cascade's last step), pure numpy.

The secondary model finds characters on a plate crop; :func:`read_text` keeps the confident ones
and reads them left to right. NMS is not done here: the detections come out of the postprocess
(the plate models are evaluated with class-agnostic NMS at IoU 0.5, so two classes on one
glyph leave one detection).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

READ_MIN_SCORE = 0.25
"""Default score a character detection needs to be read (the pipeline's default score threshold)."""


def read_text(
    boxes_xyxy: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float32],
    class_ids: npt.NDArray[np.integer],
    alphabet: Sequence[str],
    min_score: float = READ_MIN_SCORE,
) -> tuple[str, float]:
    """Read characters left to right.

    Detections with ``score >= min_score`` are sorted by box centre x (ties: by left edge, then
    by input order, a stable sort); their classes are looked up in ``alphabet`` and joined.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes, any pixel frame (crop, input or frame pixels).
        scores: ``(N,)`` float32 scores in ``[0, 1]``.
        class_ids: ``(N,)`` integer class ids, indices into ``alphabet``.
        alphabet: one string per class (a character, or several).
        min_score: detections scoring less are dropped.

    Returns:
        ``(text, score)``: the text (``""`` when nothing is kept) and the reading score, the
        minimum score of the characters read (a text is as sure as its least sure character;
        ``0.0`` for an empty text).

    Raises:
        ValueError: on mismatched shapes or a class id outside ``alphabet``.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float32)
    s = np.asarray(scores, dtype=np.float32)
    c = np.asarray(class_ids)
    n = s.shape[0] if s.ndim == 1 else -1
    if b.shape != (n, 4) or s.shape != (n,) or c.shape != (n,):
        raise ValueError(f"expected boxes (N, 4), scores (N,), class_ids (N,), got {b.shape}, {s.shape}, {c.shape}")
    keep = np.flatnonzero(s >= min_score)
    if keep.size == 0:
        return "", 0.0
    kc = c[keep].astype(np.int64)
    if kc.min() < 0 or kc.max() >= len(alphabet):
        raise ValueError(f"expected class ids in [0, {len(alphabet)}), got {kc.tolist()}")
    cx = (b[keep, 0] + b[keep, 2]) * 0.5
    order = np.lexsort((np.arange(keep.size), b[keep, 0], cx))
    text = "".join(alphabet[int(k)] for k in kc[order])
    return text, float(s[keep].min())
