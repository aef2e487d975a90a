"""Detector head decoding (``ultralytics_detect``, ``end2end``), NMS, and the detect postprocess.

The set-prediction heads (``detr``, ``rtdetr``) decode in :mod:`streamdet.postprocess.detr`.

Score threshold first (cheap, before any box work), the candidates above it whose box or score is
not finite (NaN, inf) dropped, ``pre_nms_topk``, cxcywh -> xyxy, the configured NMS
(:mod:`streamdet.nms`), ``max_detections``, then the letterbox undone and clipped.

Reference: ultralytics ``utils/ops.py`` (``non_max_suppression``, ``scale_boxes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.boxes import FloatArray, cxcywh_to_xyxy
from streamdet.card import HeadLayout, ModelCard
from streamdet.letterbox import LetterboxParams, boxes_input_to_frame
from streamdet.nms import IndexArray, SoftNmsMethod, batched_nms, batched_soft_nms, soft_nms
from streamdet.postprocess.detr import decode_detr, decode_rtdetr
from streamdet.postprocess.results import Candidates, Detections, NmsMethod, PostprocessConfig, finite_rows


def _suppress(
    boxes_xyxy: FloatArray, scores: FloatArray, class_ids: npt.NDArray[np.int64], cfg: PostprocessConfig
) -> tuple[IndexArray, FloatArray]:
    """Run the configured NMS; returns kept indices (descending score) and their (maybe decayed) scores."""
    if cfg.nms_method is NmsMethod.HARD:
        keep = batched_nms(boxes_xyxy, scores, class_ids, cfg.iou_threshold, class_agnostic=cfg.class_agnostic,
                           max_output=cfg.max_detections)
        return keep, scores[keep]
    method = SoftNmsMethod.GAUSSIAN if cfg.nms_method is NmsMethod.SOFT_GAUSSIAN else SoftNmsMethod.LINEAR
    kwargs: dict[str, Any] = {"sigma": cfg.soft_sigma, "score_threshold": cfg.score_threshold, "method": method,
                              "iou_threshold": cfg.iou_threshold, "max_output": cfg.max_detections}
    if cfg.class_agnostic:
        return soft_nms(boxes_xyxy, scores, **kwargs)
    return batched_soft_nms(boxes_xyxy, scores, class_ids, **kwargs)


def decode_ultralytics_detect(
    output0: npt.NDArray[Any], *, num_classes: int, cfg: PostprocessConfig
) -> list[Candidates]:
    """Decode an ultralytics detect (or segment) head and run NMS, per image.

    Per image: best class score and its class (or, with ``cfg.multi_label``, every class above the
    threshold), score threshold first (cheap, before any box work), the candidates above it whose
    box or score is not finite (NaN, inf) dropped (a NaN score already fails the threshold; an
    anchor with a NaN class score has a NaN best score), ``pre_nms_topk``, cxcywh -> xyxy, NMS, at
    most ``max_detections``. Only the candidate columns are transposed.

    Args:
        output0: ``(B, 4 + C [+ nm], N)`` raw output: rows 0..3 cxcywh in input pixels, rows
            ``4 .. 4 + C`` class scores after sigmoid (extra rows, e.g. mask coefficients, are ignored).
        num_classes: ``C``.
        cfg: :class:`PostprocessConfig`.

    Returns:
        One :class:`Candidates` per image (boxes in input pixels, finite, descending score).

    Raises:
        ValueError: if ``output0`` is not 3-D with at least ``4 + C`` rows.
    """
    out = np.asarray(output0)
    if out.ndim != 3 or out.shape[1] < 4 + num_classes:
        raise ValueError(f"expected output0 of shape (B, {4 + num_classes}+, N), got {out.shape}")
    results = []
    thr = cfg.score_threshold
    for pred in out:
        cls_scores = pred[4 : 4 + num_classes]  # (C, N) view
        if cfg.multi_label:
            ci, ai = np.nonzero(cls_scores > thr)
            sc = cls_scores[ci, ai]
        else:
            best = cls_scores.max(axis=0) if num_classes > 1 else cls_scores[0]
            ai = np.flatnonzero(best > thr)
            sc = best[ai]
            ci = cls_scores[:, ai].argmax(axis=0) if num_classes > 1 else np.zeros(ai.shape[0], np.int64)
        if ai.shape[0] == 0:
            results.append(Candidates.empty())
            continue
        raw = pred[0:4, ai]  # (4, K) cxcywh of the candidates above the threshold only
        ok = finite_rows(raw.T, sc)
        if ok is not None:
            ai, ci, sc, raw = ai[ok], ci[ok], sc[ok], raw[:, ok]
            if ai.shape[0] == 0:
                results.append(Candidates.empty())
                continue
        if ai.shape[0] > cfg.pre_nms_topk:
            top = np.argpartition(-sc, cfg.pre_nms_topk - 1)[: cfg.pre_nms_topk]
            top.sort()  # keep anchor order so ties break by anchor index
            ai, ci, sc, raw = ai[top], ci[top], sc[top], raw[:, top]
        scores = sc.astype(np.float32, copy=False)
        class_ids = ci.astype(np.int64, copy=False)
        boxes = cxcywh_to_xyxy(raw.T)
        keep, kept_scores = _suppress(boxes, scores, class_ids, cfg)
        results.append(Candidates(boxes[keep], kept_scores.astype(np.float32, copy=False), class_ids[keep],
                                  ai[keep].astype(np.int64, copy=False)))
    return results


def decode_end2end(outputs: Sequence[npt.NDArray[Any]], *, cfg: PostprocessConfig,
                   num_classes: int | None = None) -> list[Candidates]:
    """Decode an end2end head (NMS already inside the model): score threshold and top-k only.

    Rows the model should not have given are dropped before the top-k, never published: a box or
    score that is not finite (NaN, inf), and, with ``num_classes``, a class that is not an integer
    in ``[0, num_classes)`` (e.g. 5 or -1 for a 1-class card, or 0.5): the class id indexes the
    card's ``class_names``.

    Args:
        outputs: either one ``(B, K, 6)`` array of rows ``x1, y1, x2, y2, score, class`` in input
            pixels, or three arrays: boxes ``(B, K, 4)`` xyxy, scores ``(B, K)``, labels ``(B, K)``.
        cfg: :class:`PostprocessConfig` (``score_threshold``, ``max_detections``).
        num_classes: the card's class count ``C``; None: class ids are not range-checked (only
            non-integer ones are dropped).

    Returns:
        One :class:`Candidates` per image (``anchor_ids`` = row index), by descending score.

    Raises:
        ValueError: on any other output layout.
    """
    if len(outputs) == 1:
        o = np.asarray(outputs[0])
        if o.ndim != 3 or o.shape[2] != 6:
            raise ValueError(f"expected end2end output of shape (B, K, 6), got {o.shape}")
        boxes_b, scores_b, labels_b = o[..., 0:4], o[..., 4], o[..., 5]
    elif len(outputs) == 3:
        boxes_b, scores_b, labels_b = (np.asarray(x) for x in outputs)
        if boxes_b.ndim != 3 or boxes_b.shape[2] != 4 or scores_b.shape != boxes_b.shape[:2] \
                or labels_b.shape != boxes_b.shape[:2]:
            raise ValueError(f"expected end2end outputs (B, K, 4), (B, K), (B, K), got {boxes_b.shape}, "
                             f"{scores_b.shape}, {labels_b.shape}")
    else:
        raise ValueError(f"expected 1 or 3 end2end outputs, got {len(outputs)}")
    results = []
    for boxes, scores, labels in zip(boxes_b, scores_b, labels_b, strict=True):
        sel = np.flatnonzero(scores > cfg.score_threshold)
        bx, sc, lab = boxes[sel].astype(np.float32), scores[sel], labels[sel]
        sc32 = sc.astype(np.float32, copy=False)
        ok = finite_rows(bx, sc32)  # on the published float32 values
        if lab.dtype.kind == "f":  # a finite integer
            whole = np.isfinite(lab)
            whole &= lab == np.floor(lab)
            ok = whole if ok is None else ok & whole
        if num_classes is not None:
            in_range = (lab >= 0) & (lab < num_classes)
            ok = in_range if ok is None else ok & in_range
        if ok is not None and not ok.all():
            sel, bx, sc, sc32, lab = sel[ok], bx[ok], sc[ok], sc32[ok], lab[ok]
        order = np.argsort(-sc, kind="stable")[: cfg.max_detections]
        results.append(Candidates(bx[order], sc32[order], lab[order].astype(np.int64), sel[order].astype(np.int64)))
    return results


def candidates_to_detections(cand: Candidates, letterbox: LetterboxParams) -> Detections:
    """Map candidates from input pixels to frame pixels through the letterbox, clipped to the frame.

    Args:
        cand: one image's :class:`Candidates`.
        letterbox: the letterbox that produced that image's input.

    Returns:
        :class:`Detections` without masks.
    """
    boxes = boxes_input_to_frame(cand.boxes_xyxy, letterbox, clip=True)
    return Detections(boxes, cand.scores, cand.class_ids)


def check_batch(outputs: Sequence[npt.NDArray[Any]], letterboxes: Sequence[LetterboxParams]) -> None:
    """Check that there is an output and one letterbox per image of its batch.

    Args:
        outputs: the raw outputs (the first one's leading dimension is the batch).
        letterboxes: one per image.

    Raises:
        ValueError: if there is no output or the letterbox count differs from the batch size.
    """
    if not outputs:
        raise ValueError("expected at least one model output, got 0")
    b = np.asarray(outputs[0]).shape[0] if np.ndim(outputs[0]) else -1
    if b != len(letterboxes):
        raise ValueError(f"expected one letterbox per image ({b}), got {len(letterboxes)}")


def postprocess_detect(
    outputs: Sequence[npt.NDArray[Any]],
    letterboxes: Sequence[LetterboxParams],
    card: ModelCard,
    cfg: PostprocessConfig,
) -> list[Detections]:
    """Detections of a batch from a detector (``ultralytics_detect``, ``end2end``, ``detr`` or ``rtdetr`` head).

    Args:
        outputs: the raw outputs in the card's ``head.outputs`` order.
        letterboxes: one :class:`LetterboxParams` per image.
        card: the model card.
        cfg: :class:`PostprocessConfig`.

    Returns:
        One :class:`Detections` per image, boxes in frame pixels, by descending score.

    Raises:
        ValueError: if the outputs do not fit the head layout or the batch size.
    """
    check_batch(outputs, letterboxes)
    layout = card.head.layout
    nc = card.head.num_classes
    if layout is HeadLayout.END2END:
        cands = decode_end2end(outputs, cfg=cfg, num_classes=nc)
    elif layout is HeadLayout.DETR:
        if len(outputs) != 2:
            raise ValueError(f"expected 2 outputs (class logits, boxes) for head layout detr, got {len(outputs)}")
        cands = decode_detr(outputs[0], outputs[1], num_classes=nc, letterboxes=letterboxes, cfg=cfg)
    elif layout is HeadLayout.RTDETR:
        cands = decode_rtdetr(outputs[0], num_classes=nc, letterboxes=letterboxes, cfg=cfg)
    elif layout in (HeadLayout.ULTRALYTICS_DETECT, HeadLayout.ULTRALYTICS_SEGMENT):
        cands = decode_ultralytics_detect(outputs[0], num_classes=nc, cfg=cfg)
    else:
        raise ValueError(f"expected a detect head layout, got {layout.value}")
    return [candidates_to_detections(c, lb) for c, lb in zip(cands, letterboxes, strict=True)]
