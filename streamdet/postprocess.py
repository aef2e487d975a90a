"""Postprocess: raw model outputs to detections in frame pixels.

Pure functions over numpy arrays plus the frozen :class:`Detections` result; the pipeline's
postprocess stage wraps them. Supported heads (see :class:`streamdet.card.HeadLayout`):

* ``ultralytics_detect``: ``(B, 4 + C, N)``; score threshold, cxcywh -> xyxy, NMS, top-k, undo the
  letterbox, clip.
* ``end2end``: NMS inside the model; score threshold, top-k and the letterbox only.
* ``ultralytics_segment``: as detect, then masks for the kept detections only (one matrix product
  with the prototypes, see :mod:`streamdet.masks`).
* ``semantic_logits``: per-pixel argmax, letterbox undone, nearest-neighbour resize to the frame.

References: ultralytics ``utils/ops.py`` (``non_max_suppression``, ``scale_boxes``,
``process_mask_native``); supervision ``detection/core.py`` (a validated detections type).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from streamdet.boxes import FloatArray, cxcywh_to_xyxy
from streamdet.card import HeadLayout, ModelCard, ModelCardError
from streamdet.letterbox import LetterboxParams, boxes_input_to_frame
from streamdet.masks import mask_logits, prototype_masks_to_frame, prototype_masks_to_rle
from streamdet.nms import IndexArray, SoftNmsMethod, batched_nms, batched_soft_nms, soft_nms

Shape = Sequence[int | str | None]


class NmsMethod(str, Enum):
    """Which suppression the postprocess runs."""

    HARD = "hard"  # greedy hard NMS (streamdet.nms.batched_nms)
    SOFT_GAUSSIAN = "soft_gaussian"  # Soft-NMS, Gaussian decay (Bodla et al. 2017)
    SOFT_LINEAR = "soft_linear"  # Soft-NMS, linear decay


@dataclass(frozen=True, slots=True, eq=False)
class Detections:
    """Detections of one frame, in frame pixels.

    Attributes:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes in frame pixels.
        scores: ``(N,)`` float32 confidences in ``[0, 1]``.
        class_ids: ``(N,)`` int64 class ids (index into the model card's ``class_names``).
        masks: optional ``(N, H, W)`` bool or uint8 instance masks in frame pixels.
        semantic: optional ``(H, W)`` uint8 class map in frame pixels (pixel value = class id, the
            logits' channel index).
        mask_rles: optional instance masks as ``N`` COCO RLEs ``{"size": [H, W], "counts": str}``
            (what :attr:`PostprocessConfig.masks_as_rle` gives instead of ``masks``: no frame-sized arrays).

    Raises:
        ValueError: if a field has the wrong shape or dtype (``expected …, got …``).
    """

    boxes_xyxy: FloatArray
    scores: FloatArray
    class_ids: npt.NDArray[np.int64]
    masks: npt.NDArray[Any] | None = None
    semantic: npt.NDArray[np.uint8] | None = None
    mask_rles: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        b, s, c = self.boxes_xyxy, self.scores, self.class_ids
        for name, arr in (("boxes_xyxy", b), ("scores", s), ("class_ids", c)):
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"expected {name} as a numpy array, got {type(arr).__name__}")
        if b.dtype != np.float32 or b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"expected boxes_xyxy (N, 4) float32, got {b.shape} {b.dtype}")
        n = b.shape[0]
        if s.dtype != np.float32 or s.shape != (n,):
            raise ValueError(f"expected scores ({n},) float32, got {s.shape} {s.dtype}")
        if c.dtype != np.int64 or c.shape != (n,):
            raise ValueError(f"expected class_ids ({n},) int64, got {c.shape} {c.dtype}")
        if self.masks is not None:
            m = self.masks
            if not isinstance(m, np.ndarray) or m.ndim != 3 or m.shape[0] != n or m.dtype not in (
                np.bool_, np.uint8
            ):
                got = f"{m.shape} {m.dtype}" if isinstance(m, np.ndarray) else type(m).__name__
                raise ValueError(f"expected masks ({n}, H, W) bool or uint8, got {got}")
        if self.mask_rles is not None:
            r = self.mask_rles
            if not isinstance(r, tuple) or len(r) != n or not all(
                    isinstance(x, dict) and "size" in x and "counts" in x for x in r):
                raise ValueError(f"expected mask_rles as a tuple of {n} RLE dicts, got {str(r)[:80]}")
        if self.semantic is not None:
            sm = self.semantic
            if not isinstance(sm, np.ndarray) or sm.ndim != 2 or sm.dtype != np.uint8:
                got = f"{sm.shape} {sm.dtype}" if isinstance(sm, np.ndarray) else type(sm).__name__
                raise ValueError(f"expected semantic (H, W) uint8, got {got}")
            if self.masks is not None and self.masks.shape[1:] != sm.shape:
                raise ValueError(f"expected masks of size {sm.shape} like semantic, got {self.masks.shape[1:]}")

    def __len__(self) -> int:
        return int(self.boxes_xyxy.shape[0])

    @classmethod
    def empty(cls, *, semantic: npt.NDArray[np.uint8] | None = None) -> Detections:
        """No boxes (optionally with a semantic map)."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                   semantic=semantic)


@dataclass(frozen=True, slots=True)
class PostprocessConfig:
    """Postprocess settings.

    The IoU threshold default 0.45 is the YOLOv5 / OpenCV-DNN-sample default for serving (it
    suppresses duplicates a little harder than ultralytics' 0.7, which is tuned for mAP); see
    :data:`EVAL_CONFIG` for the settings used to measure mAP.

    Attributes:
        score_threshold: keep candidates whose score is strictly greater than this.
        iou_threshold: NMS suppresses a box whose IoU with a kept box is strictly greater.
        max_detections: most detections per image (highest scores).
        pre_nms_topk: most candidates per image entering NMS (highest scores).
        class_agnostic: NMS across classes (else boxes of different classes never suppress).
        multi_label: a candidate may yield one detection per class above the threshold (as
            ultralytics' validator), else only its best class.
        nms_method: :class:`NmsMethod`.
        soft_sigma: Gaussian Soft-NMS width.
        mask_threshold: instance-mask probability threshold in ``(0, 1)``.
        masks: compute instance masks / semantic class maps; False: segment models give boxes
            only (no prototype work), semantic models give empty detections.
        masks_as_rle: instance masks as COCO RLEs (``Detections.mask_rles``) computed on each box's
            pixel window, instead of ``(N, H, W)`` frame-sized arrays (the pipeline's form: memory
            and time follow the boxes, not ``N * H * W``).

    Raises:
        ValueError: on out-of-range values.
    """

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 300
    pre_nms_topk: int = 3000
    class_agnostic: bool = False
    multi_label: bool = False
    nms_method: NmsMethod = NmsMethod.HARD
    soft_sigma: float = 0.5
    mask_threshold: float = 0.5
    masks: bool = True
    masks_as_rle: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"expected score_threshold in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"expected iou_threshold in [0, 1], got {self.iou_threshold}")
        if self.max_detections < 1:
            raise ValueError(f"expected max_detections >= 1, got {self.max_detections}")
        if self.pre_nms_topk < 1:
            raise ValueError(f"expected pre_nms_topk >= 1, got {self.pre_nms_topk}")
        if not self.soft_sigma > 0.0:
            raise ValueError(f"expected soft_sigma > 0, got {self.soft_sigma}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"expected mask_threshold in (0, 1), got {self.mask_threshold}")
        if not isinstance(self.nms_method, NmsMethod):
            raise ValueError(f"expected nms_method as NmsMethod, got {self.nms_method!r}")


EVAL_CONFIG = PostprocessConfig(score_threshold=0.001, iou_threshold=0.7, max_detections=300, pre_nms_topk=30000,
                                multi_label=True)
"""Settings for mAP measurement, as ultralytics' ``DetectionValidator``: conf 0.001, IoU 0.7,
max_det 300, ``multi_label=True`` (an anchor yields one candidate per class above the threshold;
mmyolo's test config does the same). The pipeline's defaults stay single-label."""


@dataclass(frozen=True, slots=True, eq=False)
class Candidates:
    """Detections of one image after NMS, still in model-input pixels.

    Attributes:
        boxes_xyxy: ``(K, 4)`` float32 xyxy boxes in model-input pixels (not clipped).
        scores: ``(K,)`` float32 scores, descending.
        class_ids: ``(K,)`` int64 class ids.
        anchor_ids: ``(K,)`` int64 column of the raw output each came from (for mask coefficients).
    """

    boxes_xyxy: FloatArray
    scores: FloatArray
    class_ids: npt.NDArray[np.int64]
    anchor_ids: IndexArray

    def __post_init__(self) -> None:
        k = self.boxes_xyxy.shape[0] if self.boxes_xyxy.ndim == 2 else -1
        if self.boxes_xyxy.shape != (k, 4) or self.boxes_xyxy.dtype != np.float32:
            raise ValueError(f"expected boxes_xyxy (K, 4) float32, got {self.boxes_xyxy.shape} "
                             f"{self.boxes_xyxy.dtype}")
        for name, arr, dt in (("scores", self.scores, np.float32), ("class_ids", self.class_ids, np.int64),
                              ("anchor_ids", self.anchor_ids, np.int64)):
            if arr.shape != (k,) or arr.dtype != dt:
                raise ValueError(f"expected {name} ({k},) {np.dtype(dt)}, got {arr.shape} {arr.dtype}")

    def __len__(self) -> int:
        return int(self.boxes_xyxy.shape[0])


def _empty_candidates() -> Candidates:
    return Candidates(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                      np.zeros(0, np.int64))


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
    threshold), score threshold first (cheap, before any box work), ``pre_nms_topk``, cxcywh ->
    xyxy, NMS, at most ``max_detections``. Only the candidate columns are transposed.

    Args:
        output0: ``(B, 4 + C [+ nm], N)`` raw output: rows 0..3 cxcywh in input pixels, rows
            ``4 .. 4 + C`` class scores after sigmoid (extra rows, e.g. mask coefficients, are ignored).
        num_classes: ``C``.
        cfg: :class:`PostprocessConfig`.

    Returns:
        One :class:`Candidates` per image (boxes in input pixels, descending score).

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
            results.append(_empty_candidates())
            continue
        if ai.shape[0] > cfg.pre_nms_topk:
            top = np.argpartition(-sc, cfg.pre_nms_topk - 1)[: cfg.pre_nms_topk]
            top.sort()  # keep anchor order so ties break by anchor index
            ai, ci, sc = ai[top], ci[top], sc[top]
        scores = sc.astype(np.float32, copy=False)
        class_ids = ci.astype(np.int64, copy=False)
        boxes = cxcywh_to_xyxy(pred[0:4, ai].T)
        keep, kept_scores = _suppress(boxes, scores, class_ids, cfg)
        results.append(Candidates(boxes[keep], kept_scores.astype(np.float32, copy=False), class_ids[keep],
                                  ai[keep].astype(np.int64, copy=False)))
    return results


def decode_end2end(outputs: Sequence[npt.NDArray[Any]], *, cfg: PostprocessConfig) -> list[Candidates]:
    """Decode an end2end head (NMS already inside the model): score threshold and top-k only.

    Args:
        outputs: either one ``(B, K, 6)`` array of rows ``x1, y1, x2, y2, score, class`` in input
            pixels, or three arrays: boxes ``(B, K, 4)`` xyxy, scores ``(B, K)``, labels ``(B, K)``.
        cfg: :class:`PostprocessConfig` (``score_threshold``, ``max_detections``).

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
        sel = sel[np.argsort(-scores[sel], kind="stable")][: cfg.max_detections]
        results.append(Candidates(boxes[sel].astype(np.float32), scores[sel].astype(np.float32),
                                  np.rint(labels[sel]).astype(np.int64), sel.astype(np.int64)))
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


def _check_batch(outputs: Sequence[npt.NDArray[Any]], letterboxes: Sequence[LetterboxParams]) -> None:
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
    """Detections of a batch from a detector (``ultralytics_detect`` or ``end2end`` head).

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
    _check_batch(outputs, letterboxes)
    layout = card.head.layout
    if layout is HeadLayout.END2END:
        cands = decode_end2end(outputs, cfg=cfg)
    elif layout in (HeadLayout.ULTRALYTICS_DETECT, HeadLayout.ULTRALYTICS_SEGMENT):
        cands = decode_ultralytics_detect(outputs[0], num_classes=card.head.num_classes, cfg=cfg)
    else:
        raise ValueError(f"expected a detect head layout, got {layout.value}")
    return [candidates_to_detections(c, lb) for c, lb in zip(cands, letterboxes, strict=True)]


def segment_mask_logits(
    output0: npt.NDArray[Any],
    protos: npt.NDArray[Any],
    cand: Candidates,
    *,
    num_classes: int,
    num_mask_coeffs: int,
) -> FloatArray:
    """Prototype-resolution mask logits of one image's kept detections (one matrix product).

    Args:
        output0: ``(4 + C + nm, N)`` that image's raw detect output (mask coefficients in the last
            ``nm`` rows).
        protos: ``(nm, mh, mw)`` that image's prototypes.
        cand: its :class:`Candidates` (``anchor_ids`` pick the coefficients).
        num_classes: ``C``.
        num_mask_coeffs: ``nm``.

    Returns:
        ``(K, mh, mw)`` float32 logits (see :func:`streamdet.masks.prototype_masks_to_frame` and
        :func:`streamdet.masks.prototype_masks_to_rle`).
    """
    coeffs = output0[4 + num_classes : 4 + num_classes + num_mask_coeffs, cand.anchor_ids].T
    return mask_logits(coeffs, protos)


def segment_masks(
    output0: npt.NDArray[Any],
    protos: npt.NDArray[Any],
    cand: Candidates,
    boxes_frame_xyxy: FloatArray,
    letterbox: LetterboxParams,
    *,
    num_classes: int,
    num_mask_coeffs: int,
    mask_threshold: float,
) -> npt.NDArray[np.bool_]:
    """Instance masks, in frame pixels, of one image's kept detections.

    Args:
        output0: ``(4 + C + nm, N)`` that image's raw detect output.
        protos: ``(nm, mh, mw)`` that image's prototypes.
        cand: its :class:`Candidates`.
        boxes_frame_xyxy: ``(K, 4)`` the candidates' boxes in frame pixels (the mask crop).
        letterbox: the image's letterbox.
        num_classes: ``C``.
        num_mask_coeffs: ``nm``.
        mask_threshold: probability threshold.

    Returns:
        ``(K, fh, fw)`` bool masks.
    """
    logits = segment_mask_logits(output0, protos, cand, num_classes=num_classes, num_mask_coeffs=num_mask_coeffs)
    return prototype_masks_to_frame(logits, boxes_frame_xyxy, letterbox, mask_threshold)


def postprocess_segment(
    outputs: Sequence[npt.NDArray[Any]],
    letterboxes: Sequence[LetterboxParams],
    card: ModelCard,
    cfg: PostprocessConfig,
) -> list[Detections]:
    """Detections with instance masks from an ``ultralytics_segment`` head.

    NMS runs on the boxes; masks are computed for the kept detections only.

    Args:
        outputs: ``[output0 (B, 4 + C + nm, N), protos (B, nm, mh, mw)]``.
        letterboxes: one per image.
        card: the model card.
        cfg: :class:`PostprocessConfig`.

    Returns:
        One :class:`Detections` per image with ``masks`` ``(K, fh, fw)`` bool (or, with
        ``cfg.masks_as_rle``, ``mask_rles``: the same masks as COCO RLEs).

    Raises:
        ValueError: if the outputs do not fit the layout or the batch size.
    """
    _check_batch(outputs, letterboxes)
    if len(outputs) < 2:
        raise ValueError(f"expected 2 segment outputs (detections, prototypes), got {len(outputs)}")
    out0, protos = np.asarray(outputs[0]), np.asarray(outputs[1])
    nc, nm = card.head.num_classes, card.head.num_mask_coeffs
    if out0.ndim != 3 or out0.shape[1] != 4 + nc + nm:
        raise ValueError(f"expected output0 of shape (B, {4 + nc + nm}, N), got {out0.shape}")
    if protos.ndim != 4 or protos.shape[1] != nm or protos.shape[0] != out0.shape[0]:
        raise ValueError(f"expected prototypes of shape ({out0.shape[0]}, {nm}, mh, mw), got {protos.shape}")
    cands = decode_ultralytics_detect(out0, num_classes=nc, cfg=cfg)
    dets = []
    for b, (cand, lb) in enumerate(zip(cands, letterboxes, strict=True)):
        d = candidates_to_detections(cand, lb)
        if cfg.masks_as_rle:
            logits = segment_mask_logits(out0[b], protos[b], cand, num_classes=nc, num_mask_coeffs=nm)
            rles = prototype_masks_to_rle(logits, d.boxes_xyxy, lb, cfg.mask_threshold)
            dets.append(Detections(d.boxes_xyxy, d.scores, d.class_ids, mask_rles=tuple(rles)))
            continue
        masks = segment_masks(out0[b], protos[b], cand, d.boxes_xyxy, lb, num_classes=nc, num_mask_coeffs=nm,
                              mask_threshold=cfg.mask_threshold)
        dets.append(Detections(d.boxes_xyxy, d.scores, d.class_ids, masks=masks))
    return dets


def channel_argmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """``np.argmax(logits, axis=0)`` as uint8, about 8x faster on CPU.

    One pass per channel with OpenCV: ``better = logits[c] > best`` (strictly, so a tie keeps the
    lower class id, as ``np.argmax`` does), ``best = max(best, logits[c])``, and, because ``c`` is
    larger than every id stored so far, ``ids = max(ids, better & c)``. Only NaN logits can give a
    different answer (``np.argmax`` picks the first NaN, this never picks one).

    Args:
        logits: ``(C, H, W)`` float logits, ``1 <= C <= 256`` (views with row strides are fine).

    Returns:
        ``(H, W)`` uint8 class ids.
    """
    lg = logits if logits.dtype in (np.float32, np.float64) else logits.astype(np.float32)
    best = np.array(lg[0], dtype=lg.dtype, order="C")
    ids = np.zeros(best.shape, np.uint8)
    for c in range(1, lg.shape[0]):
        better = cv2.compare(lg[c], best, cv2.CMP_GT)  # OpenCV takes the row-strided views as they are
        cv2.max(lg[c], best, dst=best)
        cv2.max(ids, cv2.bitwise_and(better, c), dst=ids)
    return ids


def semantic_map_to_frame(
    logits: npt.NDArray[Any], letterbox: LetterboxParams
) -> npt.NDArray[np.uint8]:
    """Per-pixel class map of one image, in frame pixels.

    The argmax is taken only over the letterbox's valid region of the logits (scaled to the logits'
    resolution when it differs from the input's), then resized to the frame with centre-aligned
    nearest neighbour (``cv2.INTER_NEAREST_EXACT``).

    Args:
        logits: ``(C, H, W)`` logits (``C <= 256``).
        letterbox: the image's letterbox.

    Returns:
        ``(fh, fw)`` uint8 class map.

    Raises:
        ValueError: if ``logits`` is not 3-D or has more than 256 classes.
    """
    lg = np.asarray(logits)
    if lg.ndim != 3 or not 0 < lg.shape[0] <= 256:
        raise ValueError(f"expected logits of shape (C <= 256, H, W), got {lg.shape}")
    _, h, w = lg.shape
    iw, ih = letterbox.input_wh
    (rw, rh), (px, py) = letterbox.resized_wh, letterbox.pad_xy
    fx, fy = w / iw, h / ih
    x0, y0 = int(round(px * fx)), int(round(py * fy))
    x1, y1 = max(x0 + 1, int(round((px + rw) * fx))), max(y0 + 1, int(round((py + rh) * fy)))
    classes = channel_argmax(lg[:, y0:y1, x0:x1])
    fh, fw = letterbox.frame_hw
    if classes.shape == (fh, fw):
        return classes
    return cv2.resize(classes, (fw, fh), interpolation=cv2.INTER_NEAREST_EXACT)


def postprocess_semantic(
    outputs: Sequence[npt.NDArray[Any]],
    letterboxes: Sequence[LetterboxParams],
    card: ModelCard,
    cfg: PostprocessConfig | None = None,
) -> list[Detections]:
    """Semantic class maps from a ``semantic_logits`` head.

    Args:
        outputs: ``[logits (B, C, H, W)]``.
        letterboxes: one per image.
        card: the model card.
        cfg: unused (same signature as the other postprocess functions).

    Returns:
        One :class:`Detections` per image with no boxes and ``semantic`` ``(fh, fw)`` uint8.

    Raises:
        ValueError: if the output is not 4-D or its batch size does not match.
    """
    _check_batch(outputs, letterboxes)
    lg = np.asarray(outputs[0])
    if lg.ndim != 4:
        raise ValueError(f"expected semantic logits of shape (B, C, H, W), got {lg.shape}")
    return [Detections.empty(semantic=semantic_map_to_frame(lg[b], lb)) for b, lb in enumerate(letterboxes)]


KEPT_OUTPUTS = ("kept_counts", "kept_rows")
"""Output names of a result whose NMS already ran on the device (see :func:`pack_detections`)."""


def device_nms_supported(card: ModelCard, cfg: PostprocessConfig) -> bool:
    """Whether the engine stage may run this model's NMS on the device (``pipeline.gpu.gpu_nms``).

    True for ``ultralytics_detect`` heads (and ``ultralytics_segment`` with ``cfg.masks`` off, which is
    decoded as a detector) with hard NMS and a single label per candidate; every other case
    (masks, semantic maps, end2end heads, Soft-NMS, ``multi_label``) keeps the CPU postprocess.
    """
    layout = card.head.layout
    detect = layout is HeadLayout.ULTRALYTICS_DETECT or (layout is HeadLayout.ULTRALYTICS_SEGMENT and not cfg.masks)
    return detect and cfg.nms_method is NmsMethod.HARD and not cfg.multi_label


def pack_detections(dets: Sequence[Detections]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Pack a batch's boxes-only detections for the wire (engine -> postprocess, :data:`KEPT_OUTPUTS`).

    Args:
        dets: one :class:`Detections` per image (boxes in frame pixels).

    Returns:
        ``(counts, rows)``: ``(B,)`` int32 detections per image, and ``(B, K, 6)`` float32 rows
        ``[x1, y1, x2, y2, score, class_id]`` (``K`` = the largest count, at least 1; rows past an
        image's count are zero). Class ids are exact in float32 (below 2**24).
    """
    counts = np.array([len(d) for d in dets], dtype=np.int32)
    rows = np.zeros((len(dets), max(1, int(counts.max(initial=0))), 6), dtype=np.float32)
    for i, d in enumerate(dets):
        n = len(d)
        rows[i, :n, 0:4] = d.boxes_xyxy
        rows[i, :n, 4] = d.scores
        rows[i, :n, 5] = d.class_ids
    return counts, rows


def unpack_detections(counts: npt.NDArray[Any], rows: npt.NDArray[Any]) -> list[Detections]:
    """Inverse of :func:`pack_detections`.

    Raises:
        ValueError: if the shapes do not fit together.
    """
    if counts.ndim != 1 or rows.ndim != 3 or rows.shape[0] != counts.shape[0] or rows.shape[2] != 6 \
            or (counts.size and (counts.min() < 0 or counts.max() > rows.shape[1])):
        raise ValueError(f"expected counts (B,) and rows (B, K, 6) with counts <= K, got {counts.shape} and "
                         f"{rows.shape}")
    out = []
    for i, n in enumerate(counts.tolist()):
        r = rows[i, :n]
        out.append(Detections(np.ascontiguousarray(r[:, 0:4], dtype=np.float32),
                              np.ascontiguousarray(r[:, 4], dtype=np.float32), r[:, 5].astype(np.int64)))
    return out


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
            _check_batch(outputs, letterboxes)
            return [Detections.empty() for _ in letterboxes]
        return postprocess_semantic(outputs, letterboxes, card, cfg)
    return postprocess_detect(outputs, letterboxes, card, cfg)


def expected_num_anchors(input_wh: tuple[int, int], strides: Sequence[int]) -> int:
    """Anchor points of an anchor-free head: ``sum over strides of ceil(H/s) * ceil(W/s)``."""
    w, h = input_wh
    return sum(math.ceil(h / s) * math.ceil(w / s) for s in strides)


def _dim_mismatch(got: int | str | None, want: int) -> bool:
    return isinstance(got, int) and got != want


def check_outputs_against_card(
    card: ModelCard, output_shapes: Sequence[Shape], output_names: Sequence[str] | None = None
) -> None:
    """Check a model's output shapes against its card, before any frame is read.

    Symbolic dimensions (strings or ``None``, e.g. a dynamic batch) are not checked.

    Args:
        card: the model card.
        output_shapes: the model's output shapes, in the card's ``head.outputs`` order.
        output_names: names for messages (default: the card's ``head.outputs``).

    Raises:
        ModelCardError: naming the first mismatch, e.g. ``expected output0 with 4+10=14 rows, got 84``.
    """
    head = card.head
    names = list(output_names) if output_names is not None else list(head.outputs)
    names += [f"output{i}" for i in range(len(names), len(output_shapes))]
    iw, ih = card.input_wh
    nc = head.num_classes
    shapes = [list(s) for s in output_shapes]

    def fail(msg: str) -> None:
        raise ModelCardError(msg)

    def need_count(n: int, what: str) -> None:
        if len(shapes) != n:
            fail(f"expected {n} model output{'s' if n > 1 else ''} ({what}) for head layout {head.layout.value}, "
                 f"got {len(shapes)}")

    def need_rank(i: int, rank: int, form: str) -> None:
        if len(shapes[i]) != rank:
            fail(f"expected {names[i]} of rank {rank} {form}, got shape {shapes[i]}")

    if head.layout in (HeadLayout.ULTRALYTICS_DETECT, HeadLayout.ULTRALYTICS_SEGMENT):
        seg = head.layout is HeadLayout.ULTRALYTICS_SEGMENT
        nm = head.num_mask_coeffs
        if seg:
            if nm <= 0:
                fail(f"expected num_mask_coeffs > 0 for head layout {head.layout.value}, got {nm}")
            need_count(2, "detections, prototypes")
        else:
            need_count(1, "detections")
        need_rank(0, 3, "(B, rows, anchors)")
        rows = 4 + nc + (nm if seg else 0)
        formula = f"4+{nc}+{nm}" if seg else f"4+{nc}"
        if _dim_mismatch(shapes[0][1], rows):
            fail(f"expected {names[0]} with {formula}={rows} rows, got {shapes[0][1]}")
        if head.strides:
            n = expected_num_anchors((iw, ih), head.strides)
            if _dim_mismatch(shapes[0][2], n):
                fail(f"expected {names[0]} with {n} anchor columns for input {iw}x{ih} and strides "
                     f"{list(head.strides)}, got {shapes[0][2]}")
        if seg:
            need_rank(1, 4, "(B, nm, mh, mw)")
            mh, mw = head.mask_hw if head.mask_hw is not None else (math.ceil(ih / 4), math.ceil(iw / 4))
            if _dim_mismatch(shapes[1][1], nm):
                fail(f"expected {names[1]} with {nm} prototypes, got {shapes[1][1]}")
            if _dim_mismatch(shapes[1][2], mh) or _dim_mismatch(shapes[1][3], mw):
                fail(f"expected {names[1]} prototype size {mh}x{mw} (HxW), got {shapes[1][2]}x{shapes[1][3]}")
    elif head.layout is HeadLayout.END2END:
        if len(shapes) == 1:
            need_rank(0, 3, "(B, K, 6)")
            if _dim_mismatch(shapes[0][2], 6):
                fail(f"expected {names[0]} rows of 6 values (x1, y1, x2, y2, score, class), got {shapes[0][2]}")
        elif len(shapes) == 3:
            need_rank(0, 3, "(B, K, 4)")
            if _dim_mismatch(shapes[0][2], 4):
                fail(f"expected {names[0]} boxes of 4 values, got {shapes[0][2]}")
            need_rank(1, 2, "(B, K)")
            need_rank(2, 2, "(B, K)")
        else:
            fail(f"expected 1 or 3 model outputs for head layout end2end, got {len(shapes)}")
    elif head.layout is HeadLayout.SEMANTIC_LOGITS:
        need_count(1, "logits")
        need_rank(0, 4, "(B, C, H, W)")
        if _dim_mismatch(shapes[0][1], nc):
            fail(f"expected {names[0]} with {nc} class channels, got {shapes[0][1]}")
        if _dim_mismatch(shapes[0][2], ih) or _dim_mismatch(shapes[0][3], iw):
            fail(f"expected {names[0]} logits at input resolution {ih}x{iw} (HxW), got "
                 f"{shapes[0][2]}x{shapes[0][3]}")
        if nc > 256:
            fail(f"expected at most 256 semantic classes (uint8 class map), got {nc}")
