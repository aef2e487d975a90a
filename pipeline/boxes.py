"""Box format conversions and geometry on float32 arrays.

All boxes are ``float32`` arrays of shape ``(N, 4)``. ``xyxy`` is ``(x1, y1, x2, y2)`` with
``x2 >= x1``; ``cxcywh`` is ``(centre_x, centre_y, width, height)``; ``xywh`` is COCO's
``(x1, y1, width, height)``. Units are whatever pixels the caller works in (model input pixels or
decoded-frame pixels); the function names say the format.

Reference: torchvision ``ops/boxes.py`` (``box_convert``, ``box_iou``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


def cxcywh_to_xyxy(boxes_cxcywh: npt.ArrayLike) -> FloatArray:
    """Convert centre-format boxes to corner format.

    Args:
        boxes_cxcywh: ``(N, 4)`` boxes as ``(cx, cy, w, h)``.

    Returns:
        ``(N, 4)`` float32 boxes as ``(x1, y1, x2, y2)``.
    """
    b = np.asarray(boxes_cxcywh, dtype=np.float32).reshape(-1, 4)
    half = b[:, 2:4] * 0.5
    return np.concatenate([b[:, 0:2] - half, b[:, 0:2] + half], axis=1)


def xyxy_to_cxcywh(boxes_xyxy: npt.ArrayLike) -> FloatArray:
    """Convert corner-format boxes to centre format.

    Args:
        boxes_xyxy: ``(N, 4)`` boxes as ``(x1, y1, x2, y2)``.

    Returns:
        ``(N, 4)`` float32 boxes as ``(cx, cy, w, h)``.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    wh = b[:, 2:4] - b[:, 0:2]
    return np.concatenate([b[:, 0:2] + wh * 0.5, wh], axis=1)


def xyxy_to_xywh(boxes_xyxy: npt.ArrayLike) -> FloatArray:
    """Convert corner-format boxes to COCO ``(x1, y1, w, h)`` format.

    Args:
        boxes_xyxy: ``(N, 4)`` boxes as ``(x1, y1, x2, y2)``.

    Returns:
        ``(N, 4)`` float32 boxes as ``(x1, y1, w, h)``.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, 0:2], b[:, 2:4] - b[:, 0:2]], axis=1)


def xywh_to_xyxy(boxes_xywh: npt.ArrayLike) -> FloatArray:
    """Convert COCO ``(x1, y1, w, h)`` boxes to corner format.

    Args:
        boxes_xywh: ``(N, 4)`` boxes as ``(x1, y1, w, h)``.

    Returns:
        ``(N, 4)`` float32 boxes as ``(x1, y1, x2, y2)``.
    """
    b = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, 0:2], b[:, 0:2] + b[:, 2:4]], axis=1)


def box_area(boxes_xyxy: FloatArray) -> FloatArray:
    """Area of each box; degenerate boxes (``x2 < x1``) count as zero.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.

    Returns:
        ``(N,)`` float32 areas.
    """
    wh = np.clip(boxes_xyxy[:, 2:4] - boxes_xyxy[:, 0:2], 0.0, None)
    return (wh[:, 0] * wh[:, 1]).astype(np.float32)


def box_iou(boxes1_xyxy: FloatArray, boxes2_xyxy: FloatArray) -> FloatArray:
    """Pairwise intersection over union.

    Args:
        boxes1_xyxy: ``(N, 4)`` float32 xyxy boxes.
        boxes2_xyxy: ``(M, 4)`` float32 xyxy boxes.

    Returns:
        ``(N, M)`` float32 IoU matrix; pairs whose union is zero have IoU 0.
    """
    a1 = box_area(boxes1_xyxy)
    a2 = box_area(boxes2_xyxy)
    lt = np.maximum(boxes1_xyxy[:, None, 0:2], boxes2_xyxy[None, :, 0:2])
    rb = np.minimum(boxes1_xyxy[:, None, 2:4], boxes2_xyxy[None, :, 2:4])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = a1[:, None] + a2[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou.astype(np.float32)


def clip_boxes(boxes_xyxy: FloatArray, frame_hw: tuple[int, int]) -> FloatArray:
    """Clip boxes to the frame ``[0, W] x [0, H]``.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes in frame pixels.
        frame_hw: frame size as ``(height, width)``.

    Returns:
        ``(N, 4)`` float32 clipped boxes (a new array).
    """
    h, w = frame_hw
    out = np.empty_like(boxes_xyxy, dtype=np.float32)
    np.clip(boxes_xyxy[:, 0::2], 0.0, float(w), out=out[:, 0::2])
    np.clip(boxes_xyxy[:, 1::2], 0.0, float(h), out=out[:, 1::2])
    return out
