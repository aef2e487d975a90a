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


def box_area(boxes_xyxy: FloatArray) -> FloatArray:
    """Area of each box; degenerate boxes (``x2 < x1``) count as zero.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.

    Returns:
        ``(N,)`` float32 areas.
    """
    wh = np.clip(boxes_xyxy[:, 2:4] - boxes_xyxy[:, 0:2], 0.0, None)
    return (wh[:, 0] * wh[:, 1]).astype(np.float32)


def box_planes(boxes_xyxy: FloatArray) -> FloatArray:
    """Coordinate planes of boxes for :func:`box_iou_planes`.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.

    Returns:
        ``(5, N)`` float32 rows ``x1, y1, x2, y2, area`` (area as :func:`box_area`).
    """
    planes = np.empty((5, boxes_xyxy.shape[0]), dtype=np.float32)
    planes[0:4] = boxes_xyxy.T
    planes[4] = box_area(boxes_xyxy)
    return planes


def box_iou_planes(rows: FloatArray, cols: FloatArray) -> FloatArray:
    """Pairwise IoU of boxes given as :func:`box_planes`.

    Works on separate coordinate planes with in-place operations (a third of the temporaries of
    the ``(N, M, 2)`` broadcast form); NMS calls it on blocks of rows of one plane array.

    Args:
        rows: ``(5, N)`` planes.
        cols: ``(5, M)`` planes.

    Returns:
        ``(N, M)`` float32 IoU; pairs whose union is zero have IoU 0.
    """
    w = np.minimum(rows[2][:, None], cols[2][None, :])
    w -= np.maximum(rows[0][:, None], cols[0][None, :])
    np.maximum(w, 0.0, out=w)
    h = np.minimum(rows[3][:, None], cols[3][None, :])
    h -= np.maximum(rows[1][:, None], cols[1][None, :])
    np.maximum(h, 0.0, out=h)
    w *= h  # intersection
    np.add(rows[4][:, None], cols[4][None, :], out=h)
    h -= w  # union
    iou = np.zeros_like(w)
    np.divide(w, h, out=iou, where=h > 0)
    return iou


def box_iou(boxes1_xyxy: FloatArray, boxes2_xyxy: FloatArray) -> FloatArray:
    """Pairwise intersection over union.

    Args:
        boxes1_xyxy: ``(N, 4)`` float32 xyxy boxes.
        boxes2_xyxy: ``(M, 4)`` float32 xyxy boxes.

    Returns:
        ``(N, M)`` float32 IoU matrix; pairs whose union is zero have IoU 0.
    """
    return box_iou_planes(box_planes(boxes1_xyxy), box_planes(boxes2_xyxy))
