"""Set-prediction (DETR-family) heads: one box per query, decoded without NMS.

* ``detr``: class logits ``(B, Q, C + 1)``, the last class "no object", turned into
  probabilities by a softmax over all ``C + 1``; boxes ``(B, Q, 4)`` cxcywh normalised to the model
  input. Reference: Carion et al., "End-to-End Object Detection with Transformers" (ECCV 2020),
  facebookresearch/detr ``models/detr.py`` ``PostProcess`` (``prob[..., :-1].max(-1)``).
* ``rtdetr``: one output ``(B, Q, 4 + C)``: boxes cxcywh normalised to the model input, then class
  scores already after the sigmoid (ultralytics ``RTDETRDecoder`` in export mode). Reference: Zhao
  et al., "DETRs Beat YOLOs on Real-time Object Detection" (CVPR 2024), lyuwenyu/RT-DETR
  ``RTDETRPostProcessor`` (top-K over queries x classes) and ultralytics
  ``models/rtdetr/predict.py`` (best class per query).

Selection, the same for both: with ``cfg.multi_label`` every (query, class) pair above
``cfg.score_threshold`` competes and the best ``cfg.max_detections`` are kept (the RT-DETR reference
post-processor's top-K over queries and classes, so one query may give two classes); without it each
query gives its best class only (the DETR post-processor, ultralytics' RT-DETR predictor). Ties keep
query order. A candidate whose box or score is not finite (NaN, inf) is dropped before the top-K
(:func:`finite_rows`). Boxes are scaled to the image's input size (its :class:`~streamdet.letterbox.LetterboxParams`
``input_wh``) and converted to xyxy; the resize the card names (letterbox or stretch) is undone
afterwards by :func:`~streamdet.postprocess.detect.candidates_to_detections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.boxes import cxcywh_to_xyxy
from streamdet.letterbox import LetterboxParams
from streamdet.postprocess.results import Candidates, PostprocessConfig, finite_rows


def _select(scores_qc: npt.NDArray[np.float32], boxes_cxcywh_norm: npt.NDArray[Any], input_wh: tuple[int, int],
            cfg: PostprocessConfig) -> Candidates:
    """One image's candidates from its ``(Q, C)`` class scores and ``(Q, 4)`` boxes, by descending score.

    Candidates whose box or score is not finite are dropped before the top-k.
    """
    thr = cfg.score_threshold
    if cfg.multi_label:
        qi, ci = np.nonzero(scores_qc > thr)  # row-major: query order, then class order
        sc = scores_qc[qi, ci]
    else:
        ci = scores_qc.argmax(axis=1) if scores_qc.shape[1] > 1 else np.zeros(scores_qc.shape[0], np.int64)
        best = scores_qc[np.arange(scores_qc.shape[0]), ci]
        qi = np.flatnonzero(best > thr)
        ci, sc = ci[qi], best[qi]
    raw = np.asarray(boxes_cxcywh_norm[qi], dtype=np.float32)
    ok = finite_rows(raw, sc)
    if ok is not None:
        qi, ci, sc, raw = qi[ok], ci[ok], sc[ok], raw[ok]
    order = np.argsort(-sc, kind="stable")[: cfg.max_detections]
    iw, ih = input_wh
    boxes = cxcywh_to_xyxy(raw[order] * np.array([iw, ih, iw, ih], dtype=np.float32))
    return Candidates(boxes, sc[order].astype(np.float32, copy=False), ci[order].astype(np.int64, copy=False),
                      qi[order].astype(np.int64, copy=False))


def _check_batch(b: int, letterboxes: Sequence[LetterboxParams]) -> None:
    if b != len(letterboxes):
        raise ValueError(f"expected one letterbox per image ({b}), got {len(letterboxes)}")


def softmax_last(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Softmax over the last axis in float32, shifted by the maximum (no overflow).

    Args:
        x: any float array.

    Returns:
        float32 array of the same shape whose last axis sums to 1.
    """
    z = np.asarray(x, dtype=np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: npt.NDArray[np.float32] = e / e.sum(axis=-1, keepdims=True)
    return out


def decode_detr(logits: npt.NDArray[Any], boxes: npt.NDArray[Any], *, num_classes: int,
                letterboxes: Sequence[LetterboxParams], cfg: PostprocessConfig) -> list[Candidates]:
    """Decode a DETR head: softmax with a no-object class, one box per query, no NMS.

    Args:
        logits: ``(B, Q, C + 1)`` class logits, the last column "no object".
        boxes: ``(B, Q, 4)`` cxcywh boxes normalised to the model input (0..1).
        num_classes: ``C`` (without the no-object class).
        letterboxes: one per image; their ``input_wh`` scales the boxes to input pixels.
        cfg: :class:`PostprocessConfig` (``score_threshold``, ``max_detections``, ``multi_label``).

    Returns:
        One :class:`Candidates` per image: boxes xyxy in input pixels, ``anchor_ids`` the query
        indices, by descending score; queries whose box or score is not finite are left out.

    Raises:
        ValueError: if the shapes are not ``(B, Q, C + 1)`` and ``(B, Q, 4)`` or the batch and the
            letterboxes differ.
    """
    lg, bx = np.asarray(logits), np.asarray(boxes)
    if lg.ndim != 3 or lg.shape[2] != num_classes + 1:
        raise ValueError(f"expected DETR class logits of shape (B, Q, {num_classes}+1), got {lg.shape}")
    if bx.shape != (lg.shape[0], lg.shape[1], 4):
        raise ValueError(f"expected DETR boxes of shape {(lg.shape[0], lg.shape[1], 4)}, got {bx.shape}")
    _check_batch(lg.shape[0], letterboxes)
    out = []
    for i, lb in enumerate(letterboxes):
        prob = softmax_last(lg[i])[:, :num_classes]
        out.append(_select(prob, bx[i], lb.input_wh, cfg))
    return out


def decode_rtdetr(output0: npt.NDArray[Any], *, num_classes: int, letterboxes: Sequence[LetterboxParams],
                  cfg: PostprocessConfig) -> list[Candidates]:
    """Decode an RT-DETR head as ultralytics exports it: sigmoid scores, one box per query, no NMS.

    Args:
        output0: ``(B, Q, 4 + C)``: cxcywh boxes normalised to the model input, then class scores
            after the sigmoid.
        num_classes: ``C``.
        letterboxes: one per image; their ``input_wh`` scales the boxes to input pixels.
        cfg: :class:`PostprocessConfig` (``score_threshold``, ``max_detections``, ``multi_label``).

    Returns:
        One :class:`Candidates` per image: boxes xyxy in input pixels, ``anchor_ids`` the query
        indices, by descending score; queries whose box or score is not finite are left out.

    Raises:
        ValueError: if the shape is not ``(B, Q, 4 + C)`` or the batch and the letterboxes differ.
    """
    o = np.asarray(output0)
    if o.ndim != 3 or o.shape[2] != 4 + num_classes:
        raise ValueError(f"expected RT-DETR output of shape (B, Q, 4+{num_classes}), got {o.shape}")
    _check_batch(o.shape[0], letterboxes)
    out = []
    for i, lb in enumerate(letterboxes):
        out.append(_select(np.asarray(o[i, :, 4:], dtype=np.float32), o[i, :, :4], lb.input_wh, cfg))
    return out
