"""Differentiable box geometry in torch for the detector's assigner and losses.

Boxes are ``(..., 4)`` float tensors, xyxy unless the name says otherwise. Distances ``ltrb`` are
from an anchor point to the left, top, right and bottom sides.
"""

from __future__ import annotations

import math

import torch


def bbox_ciou(box1_xyxy: torch.Tensor, box2_xyxy: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of paired boxes.

    ``CIoU = IoU - rho^2 / c^2 - alpha * v`` with ``rho`` the centre distance, ``c`` the diagonal of
    the smallest enclosing box, ``v = 4 / pi^2 (atan(w2 / h2) - atan(w1 / h1))^2`` and
    ``alpha = v / (v - IoU + 1)`` (no gradient through ``alpha``).

    Reference: Zheng et al. 2020, "Distance-IoU Loss: Faster and Better Learning for Bounding Box
    Regression" (AAAI), arXiv:1911.08287; ultralytics ``utils/metrics.py`` ``bbox_iou(CIoU=True)``.

    Args:
        box1_xyxy: ``(..., 4)`` boxes.
        box2_xyxy: ``(..., 4)`` boxes, broadcastable with ``box1_xyxy``.
        eps: numerical guard added to heights and denominators.

    Returns:
        ``(...)`` CIoU in ``[-1.5, 1]`` (1 for identical boxes).
    """
    b1_x1, b1_y1, b1_x2, b1_y2 = box1_xyxy.unbind(-1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2_xyxy.unbind(-1)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    inter = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(0) * (
        torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)
    ch = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2).pow(2) + (b2_y1 + b2_y2 - b1_y1 - b1_y2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def dist2bbox(distance_ltrb: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
    """Convert anchor points + side distances to xyxy boxes (ultralytics ``dist2bbox``).

    Args:
        distance_ltrb: ``(..., N, 4)`` distances ``(l, t, r, b)``.
        anchor_points: ``(N, 2)`` points ``(x, y)`` in the same units.

    Returns:
        ``(..., N, 4)`` xyxy boxes.
    """
    lt, rb = distance_ltrb.chunk(2, -1)
    return torch.cat((anchor_points - lt, anchor_points + rb), -1)


def bbox2dist(anchor_points: torch.Tensor, boxes_xyxy: torch.Tensor, max_dist: float) -> torch.Tensor:
    """Convert xyxy boxes to side distances from the anchor points, clamped to ``[0, max_dist - 0.01]``.

    Args:
        anchor_points: ``(N, 2)`` points.
        boxes_xyxy: ``(..., N, 4)`` boxes in the same units.
        max_dist: the largest distance the DFL bins can express (``reg_max - 1``).

    Returns:
        ``(..., N, 4)`` distances ``(l, t, r, b)``.
    """
    x1y1, x2y2 = boxes_xyxy.chunk(2, -1)
    return torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1).clamp_(0, max_dist - 0.01)
