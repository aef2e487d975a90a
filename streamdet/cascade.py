"""Cascades: a secondary model run on crops of a primary model's detections (pure numpy).

The geometry and bookkeeping the pipeline's cascade uses (``pipeline/stages/cascade.py``):
which primary detections get a crop (:func:`select_parents`), the crop window around a box
(:func:`crop_window`), and the secondary model's detections mapped from crop pixels back to frame
pixels (:func:`children_to_frame`), masks as frame-sized COCO RLEs built from the crop without a
frame-sized array. Peers: DeepStream's secondary GIE (``operate-on-gie-id``,
``operate-on-class-ids``, ``input-object-min-width/height``), Savant ``input.objects``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamdet.masks import window_to_rle
from streamdet.postprocess.results import Detections


@dataclass(frozen=True, slots=True)
class Selection:
    """The primary detections of one frame that get a crop.

    Attributes:
        parents: ``(K,)`` int64 indices into the frame's detections, by descending score.
        too_small: detections of a wanted class skipped because the shorter side of their box is
            under the minimum.
        over_limit: detections of a wanted class, large enough, skipped because the frame already
            had ``max_crops`` crops.
    """

    parents: npt.NDArray[np.int64]
    too_small: int
    over_limit: int


def select_parents(detections: Detections, class_ids: Collection[int], *, min_side_px: float,
                   max_crops: int) -> Selection:
    """Pick the detections a secondary model runs on: wanted classes, large enough, best first, at most ``max_crops``.

    Args:
        detections: one frame's primary detections (boxes xyxy in frame pixels, by descending score).
        class_ids: the primary class ids that feed the secondary model.
        min_side_px: a box whose shorter side is less than this (frame pixels) is skipped and counted.
        max_crops: most crops per frame (the highest-scoring ones).

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: if ``max_crops`` is less than 1.
    """
    if max_crops < 1:
        raise ValueError(f"expected max_crops >= 1, got {max_crops}")
    if len(detections) == 0:
        return Selection(np.zeros(0, np.int64), 0, 0)
    wanted = np.isin(detections.class_ids, np.fromiter(class_ids, dtype=np.int64))
    b = detections.boxes_xyxy
    side = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    big = wanted & (side >= min_side_px)
    idx = np.flatnonzero(big)
    idx = idx[np.argsort(-detections.scores[idx], kind="stable")]
    return Selection(idx[:max_crops].astype(np.int64), int(wanted.sum() - big.sum()), max(0, idx.size - max_crops))


def crop_window(box_xyxy: npt.ArrayLike, frame_hw: tuple[int, int], pad: float) -> tuple[int, int, int, int]:
    """The pixel window cut around a box: grown by ``pad`` of its width and height on each side, clipped.

    Args:
        box_xyxy: ``(4,)`` xyxy box in frame pixels.
        frame_hw: frame size ``(height, width)``.
        pad: fraction of the box's width (left and right) and height (top and bottom) added on each side.

    Returns:
        ``(x0, y0, x1, y1)`` integer window (``x1``, ``y1`` exclusive) inside the frame, at least 1x1:
        the grown box's edges rounded outwards.

    Raises:
        ValueError: on a negative ``pad`` or a non-positive frame size.
    """
    fh, fw = int(frame_hw[0]), int(frame_hw[1])
    if pad < 0 or fh <= 0 or fw <= 0:
        raise ValueError(f"expected pad >= 0 and a positive frame size, got pad={pad} frame_hw={frame_hw}")
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box_xyxy, dtype=np.float64).reshape(4))
    px, py = (x2 - x1) * pad, (y2 - y1) * pad
    x0 = min(max(0, math.floor(x1 - px)), fw - 1)
    y0 = min(max(0, math.floor(y1 - py)), fh - 1)
    return x0, y0, max(x0 + 1, min(fw, math.ceil(x2 + px))), max(y0 + 1, min(fh, math.ceil(y2 + py)))


def children_to_frame(crop_dets: Detections, origin_xy: tuple[int, int], frame_hw: tuple[int, int],
                      parent_xyxy: npt.ArrayLike | None = None) -> Detections:
    """Map a secondary model's detections on a crop to frame pixels, clipped to their parent's box.

    The crop is the parent box grown by the secondary's ``pad`` (context for the secondary model),
    so a child can reach past its parent box. A child is a part of its parent: with
    ``parent_xyxy`` its box is clipped to the parent box and its mask to the parent box's pixels
    (floor/ceil of its edges), and a child left with no area is dropped.

    Args:
        crop_dets: detections in crop pixels (the crop's letterbox already undone, clipped to the
            crop), with optional ``masks`` ``(K, ch, cw)`` in crop pixels.
        origin_xy: the crop's top-left corner ``(x0, y0)`` in frame pixels.
        frame_hw: frame size ``(height, width)``.
        parent_xyxy: ``(4,)`` the parent's box xyxy in frame pixels, or None for no clipping.

    Returns:
        :class:`Detections` with boxes in frame pixels and, when the crop had masks, ``mask_rles``:
        frame-sized COCO RLEs (each zero outside its box window; built from the window only).

    Raises:
        ValueError: if a mask does not fit in the frame at ``origin_xy``.
    """
    x0, y0 = int(origin_xy[0]), int(origin_xy[1])
    boxes = crop_dets.boxes_xyxy + np.array([x0, y0, x0, y0], dtype=np.float32)
    keep = None
    if parent_xyxy is not None and len(crop_dets):
        px1, py1, px2, py2 = (float(v) for v in np.asarray(parent_xyxy, dtype=np.float32).reshape(4))
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], px1, px2)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], py1, py2)
        keep = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        if keep.size == len(crop_dets):
            keep = None
    scores, class_ids, masks = crop_dets.scores, crop_dets.class_ids, crop_dets.masks
    if keep is not None:
        boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]
        masks = masks[keep] if masks is not None else None
    rles = None
    if masks is not None:
        ch, cw = masks.shape[1:]
        out = []
        for k in range(len(boxes)):
            # the window of the crop's mask the child keeps: its (clipped) box's pixels, floor/ceil in frame pixels
            fx0, fy0, fx1, fy1 = boxes[k].tolist()
            wx0, wy0 = max(0, math.floor(fx0) - x0), max(0, math.floor(fy0) - y0)
            wx1, wy1 = min(cw, math.ceil(fx1) - x0), min(ch, math.ceil(fy1) - y0)
            win = masks[k, wy0:wy1, wx0:wx1] if wx1 > wx0 and wy1 > wy0 else np.zeros((0, 0), bool)
            out.append(window_to_rle(win, x0 + wx0, y0 + wy0, frame_hw))
        rles = tuple(out)
    return Detections(boxes.astype(np.float32, copy=False), scores, class_ids, mask_rles=rles)


@dataclass(frozen=True, slots=True)
class Children:
    """What one secondary model found on one primary detection's crop.

    Attributes:
        detections: boxes xyxy in frame pixels (and masks as frame-sized RLEs) of the secondary's classes.
        class_names: the secondary model's class names.
        text: the characters read left to right (secondaries with ``read_text``), else None.
        text_score: the reading score (the least confident character read), else None.
    """

    detections: Detections
    class_names: tuple[str, ...]
    text: str | None = None
    text_score: float | None = None
