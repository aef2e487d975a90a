"""Semantic-segmentation metrics shared by the evaluator and the semantic trainer: confusion matrix, IoU, mIoU.

Per-class IoU is the dataset-wide ``TP / (TP + FP + FN)`` of a pixel confusion matrix; mIoU is its
mean over the classes (background included) present in the ground truth or the prediction
(``nanmean``, as mmsegmentation's ``mIoU``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt


def confusion_matrix(
    pred: npt.NDArray[np.integer[Any]],
    target: npt.NDArray[np.integer[Any]],
    num_classes: int,
    valid: npt.NDArray[np.bool_] | None = None,
    *,
    ignore_index: int | None = None,
) -> npt.NDArray[np.int64]:
    """Pixel confusion matrix.

    Args:
        pred: predicted class ids, any shape, values in ``[0, num_classes)``.
        target: true class ids, same shape.
        num_classes: ``C``.
        valid: optional bool mask of the pixels to count, same shape.
        ignore_index: target ids ``>= ignore_index`` are not counted: ``num_classes`` skips every
            id outside the classes (e.g. a 255 "void" label, :mod:`training.evaluate`'s rule);
            None counts every pixel (then target ids must be in ``[0, num_classes)``, as the
            semantic trainer's letterboxed labels are).

    Returns:
        ``(C, C)`` int64, ``[true, predicted]`` pixel counts.

    Raises:
        ValueError: on mismatched shapes, or a counted predicted id ``>= num_classes``.
    """
    if pred.shape != target.shape or (valid is not None and valid.shape != target.shape):
        raise ValueError(f"expected equal shapes, got pred {pred.shape} target {target.shape} "
                         f"valid {None if valid is None else valid.shape}")
    t = np.asarray(target).astype(np.int64).ravel()
    p = np.asarray(pred).astype(np.int64).ravel()
    keep = None if valid is None else np.asarray(valid).ravel()
    if ignore_index is not None:
        counted = t < ignore_index
        keep = counted if keep is None else keep & counted
    if keep is not None:
        t, p = t[keep], p[keep]
    if p.size and int(p.max()) >= num_classes:
        raise ValueError(f"expected predicted class ids < {num_classes}, got {int(p.max())}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes).astype(np.int64)


def iou_per_class(confusion: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.float64]:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a confusion matrix.

    Args:
        confusion: ``(C, C)`` ``[true, predicted]`` counts.

    Returns:
        ``(C,)`` float64; NaN where a class is absent from both prediction and ground truth.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: npt.NDArray[np.integer[Any]]) -> float:
    """mIoU: mean of :func:`iou_per_class` over the classes present (background included).

    Args:
        confusion: ``(C, C)`` ``[true, predicted]`` counts.

    Returns:
        mIoU in ``[0, 1]``; NaN when no pixel was counted.
    """
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def pixel_accuracy(confusion: npt.NDArray[np.integer[Any]]) -> float:
    """Fraction of counted pixels predicted correctly (0 when none was counted)."""
    cm = np.asarray(confusion)
    return float(np.trace(cm) / max(cm.sum(), 1))
