"""Non-maximum suppression: greedy hard NMS, class-aware NMS and Soft-NMS, on float32 numpy arrays.

Semantics of :func:`nms` (greedy hard NMS) match ``torchvision.ops.nms`` and
``cv2.dnn.NMSBoxes``: candidates are visited by descending score and a candidate is suppressed
when its IoU with an already kept box is **strictly greater** than ``iou_threshold`` (IoU exactly
at the threshold keeps both). Score ties are broken by input index (a stable sort), as
``cv2.dnn.NMSBoxes`` does (``std::stable_sort``). Boxes whose union is zero (two zero-area boxes)
have IoU 0 here, so zero-area boxes never suppress anything; this matches torchvision (whose
0/0 = NaN compares false) and differs from ``cv2.dnn.NMSBoxes``, which counts two identical
zero-area boxes as IoU 1.

The IoU work is vectorized: the score-sorted candidates are processed in blocks of rows; for each
block the IoU rows of the candidates not yet suppressed are computed at once (upper triangle
only; bit-identical to :func:`streamdet.boxes.box_iou`, with less memory traffic), then a cheap
scan over those rows ORs the
boolean "overlaps too much" row of every kept box into the suppression mask. Memory is bounded by
one block (about ``2**20`` IoU values) plus ``O(N)``; the scan stops once ``max_output`` boxes are
kept.

References:
    torchvision ``ops/boxes.py`` (``nms``, ``batched_nms``); OpenCV ``modules/dnn/src/nms.inl.hpp``
    (``NMSFast_``); N. Bodla, B. Singh, R. Chellappa, L. S. Davis, "Soft-NMS -- Improving Object
    Detection With One Line of Code", ICCV 2017 (and its reference ``cpu_soft_nms``).
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import numpy.typing as npt

from streamdet.boxes import FloatArray, box_iou_planes, box_planes

IndexArray = npt.NDArray[np.int64]

_BLOCK_PAIRS = 1 << 20  # IoU values computed per block (4 MiB of float32)


class SoftNmsMethod(str, Enum):
    """Score decay of Soft-NMS (Bodla et al. 2017)."""

    GAUSSIAN = "gaussian"  # s <- s * exp(-IoU^2 / sigma)
    LINEAR = "linear"  # s <- s * (1 - IoU) when IoU > iou_threshold


def _check_inputs(boxes_xyxy: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    b = np.asarray(boxes_xyxy, dtype=np.float32)
    s = np.asarray(scores, dtype=np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"expected boxes_xyxy of shape (N, 4), got {b.shape}")
    if s.shape != (b.shape[0],):
        raise ValueError(f"expected scores of shape ({b.shape[0]},), got {s.shape}")
    return b, s


def _check_class_ids(class_ids: npt.ArrayLike, n: int) -> IndexArray:
    c = np.asarray(class_ids)
    if c.shape != (n,):
        raise ValueError(f"expected class_ids of shape ({n},), got {c.shape}")
    if n and not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.equal(np.mod(c, 1), 0)):
            raise ValueError(f"expected integer class_ids, got dtype {c.dtype} with fractional values")
    return c.astype(np.int64, copy=False)


def _sorted_order(scores: FloatArray, pre_nms_topk: int | None) -> IndexArray:
    """Indices by descending score, ties by ascending index, cut to ``pre_nms_topk``."""
    order = np.argsort(-scores, kind="stable").astype(np.int64, copy=False)
    if pre_nms_topk is not None:
        if pre_nms_topk < 0:
            raise ValueError(f"expected pre_nms_topk >= 0, got {pre_nms_topk}")
        order = order[:pre_nms_topk]
    return order


def _greedy_sorted(boxes_sorted: FloatArray, iou_threshold: float, max_output: int) -> IndexArray:
    """Greedy hard NMS on boxes already sorted by descending score.

    Returns positions (into ``boxes_sorted``) of the kept boxes, ascending.
    """
    k = boxes_sorted.shape[0]
    if k == 0 or max_output <= 0:
        return np.zeros(0, dtype=np.int64)
    cols = box_planes(boxes_sorted)
    removed = np.zeros(k, dtype=bool)
    keep: list[int] = []
    block = max(1, _BLOCK_PAIRS // k)
    start = 0
    while start < k and len(keep) < max_output:
        stop = min(k, start + block)
        rows = np.flatnonzero(~removed[start:stop]) + start
        if rows.size:
            # (R, k - start): does row r overlap candidate j (j >= start) more than the threshold?
            over = box_iou_planes(cols[:, rows], cols[:, start:]) > iou_threshold
            tail = removed[start:]  # a view: updates land in ``removed``
            for r, i in enumerate(rows.tolist()):
                if removed[i]:
                    continue
                keep.append(i)
                if len(keep) >= max_output:
                    break
                tail |= over[r]
        start = stop
    return np.asarray(keep, dtype=np.int64)


def nms(
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    iou_threshold: float,
    *,
    pre_nms_topk: int | None = None,
    max_output: int | None = None,
) -> IndexArray:
    """Greedy hard non-maximum suppression (class-agnostic).

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes (any pixel units).
        scores: ``(N,)`` float32 scores.
        iou_threshold: a box is suppressed when its IoU with a kept, higher-scored box is strictly
            greater than this.
        pre_nms_topk: only the ``pre_nms_topk`` highest-scored boxes take part (``None``: all).
        max_output: stop once this many boxes are kept (``None``: no limit). The result equals the
            first ``max_output`` entries of the unlimited result.

    Returns:
        ``(K,)`` int64 indices into the input of the kept boxes, by descending score (ties by index).

    Raises:
        ValueError: on mismatched shapes or a negative ``pre_nms_topk``.
    """
    b, s = _check_inputs(boxes_xyxy, scores)
    order = _sorted_order(s, pre_nms_topk)
    limit = order.shape[0] if max_output is None else int(max_output)
    return order[_greedy_sorted(b[order], float(iou_threshold), limit)]


def batched_nms(
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    class_ids: npt.ArrayLike,
    iou_threshold: float,
    *,
    class_agnostic: bool = False,
    pre_nms_topk: int | None = None,
    max_output: int | None = None,
) -> IndexArray:
    """Class-aware greedy hard NMS: boxes of different classes never suppress each other.

    The result equals running :func:`nms` on each class separately and merging by descending
    score (ties by index), like ``torchvision.ops.batched_nms``. torchvision gets there by
    offsetting each class's boxes by ``class_id * (max_coordinate + 1)``; in float32 that offset
    moves coordinates by up to one ulp of the offset (about 1e-3 px for 10 classes of 1280 px
    frames), which can flip decisions at the threshold, so this runs the blocks per class instead
    (a loop over the classes present, not over boxes), which is exact.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.
        scores: ``(N,)`` float32 scores.
        class_ids: ``(N,)`` integer class ids.
        iou_threshold: suppression threshold, as in :func:`nms`.
        class_agnostic: ignore ``class_ids`` (plain :func:`nms`).
        pre_nms_topk: only the ``pre_nms_topk`` highest-scored boxes overall take part.
        max_output: keep at most this many boxes overall (the highest-scored ones).

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by descending score (ties by index).

    Raises:
        ValueError: on mismatched shapes.
    """
    b, s = _check_inputs(boxes_xyxy, scores)
    c = _check_class_ids(class_ids, b.shape[0])
    if class_agnostic:
        return nms(b, s, iou_threshold, pre_nms_topk=pre_nms_topk, max_output=max_output)
    order = _sorted_order(s, pre_nms_topk)
    limit = order.shape[0] if max_output is None else int(max_output)
    c_sorted = c[order]
    b_sorted = b[order]
    uniq = np.unique(c_sorted)
    if uniq.shape[0] <= 1:
        return order[_greedy_sorted(b_sorted, float(iou_threshold), limit)]
    kept_positions = []
    for cls in uniq.tolist():
        pos = np.flatnonzero(c_sorted == cls)  # ascending = still score-sorted
        kept_positions.append(pos[_greedy_sorted(b_sorted[pos], float(iou_threshold), limit)])
    merged = np.sort(np.concatenate(kept_positions))[:limit]
    return order[merged]


def soft_nms(
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: SoftNmsMethod = SoftNmsMethod.GAUSSIAN,
    iou_threshold: float = 0.3,
    max_output: int | None = None,
) -> tuple[IndexArray, FloatArray]:
    """Soft-NMS (class-agnostic): decay the scores of overlapping boxes instead of removing them.

    Repeatedly picks the remaining box with the highest (decayed) score (ties: lowest index),
    keeps it, multiplies the score of every other remaining box by ``exp(-IoU^2 / sigma)``
    (Gaussian) or by ``1 - IoU`` where ``IoU > iou_threshold`` (linear), and drops boxes whose
    score falls below ``score_threshold``. Boxes whose input score is below ``score_threshold``
    never take part. Each step is one vectorized IoU row.

    Reference: Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code",
    ICCV 2017, Algorithm 1 and the authors' ``cpu_soft_nms``.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.
        scores: ``(N,)`` float32 scores.
        sigma: Gaussian decay width (> 0).
        score_threshold: boxes whose decayed score is below this are dropped.
        method: :class:`SoftNmsMethod`.
        iou_threshold: the linear method's overlap threshold ``N_t``.
        max_output: stop after this many boxes are kept.

    Returns:
        ``(indices, decayed_scores)``: ``(K,)`` int64 indices into the input in selection order
        (non-increasing decayed score) and ``(K,)`` float32 decayed scores at selection.

    Raises:
        ValueError: on mismatched shapes or ``sigma <= 0``.
    """
    b, s = _check_inputs(boxes_xyxy, scores)
    if not sigma > 0:
        raise ValueError(f"expected sigma > 0, got {sigma}")
    method = SoftNmsMethod(method)
    limit = b.shape[0] if max_output is None else int(max_output)
    thr = np.float32(score_threshold)
    alive = np.flatnonzero(s >= thr).astype(np.int64)  # ascending: argmax picks the lowest index on ties
    cur = s[alive]
    cols = box_planes(b[alive])
    keep: list[int] = []
    kept_scores: list[float] = []
    neg_inv_sigma = np.float32(-1.0 / sigma)
    one = np.float32(1.0)
    while alive.size and len(keep) < limit:
        j = int(np.argmax(cur))
        keep.append(int(alive[j]))
        kept_scores.append(float(cur[j]))
        iou = box_iou_planes(cols[:, j : j + 1], cols)[0]
        if method is SoftNmsMethod.GAUSSIAN:
            iou *= iou
            iou *= neg_inv_sigma
            cur = cur * np.exp(iou)
        else:
            cur = np.where(iou > iou_threshold, cur * (one - iou), cur)
        live = cur >= thr
        live[j] = False
        alive, cur, cols = alive[live], cur[live], cols[:, live]
    return np.asarray(keep, dtype=np.int64), np.asarray(kept_scores, dtype=np.float32)


def batched_soft_nms(
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    class_ids: npt.ArrayLike,
    *,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: SoftNmsMethod = SoftNmsMethod.GAUSSIAN,
    iou_threshold: float = 0.3,
    max_output: int | None = None,
) -> tuple[IndexArray, FloatArray]:
    """Class-aware Soft-NMS: :func:`soft_nms` per class, merged by descending decayed score.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.
        scores: ``(N,)`` float32 scores.
        class_ids: ``(N,)`` integer class ids.
        sigma: Gaussian decay width.
        score_threshold: boxes whose decayed score is below this are dropped.
        method: :class:`SoftNmsMethod`.
        iou_threshold: the linear method's overlap threshold.
        max_output: keep at most this many boxes overall (highest decayed scores).

    Returns:
        ``(indices, decayed_scores)`` as in :func:`soft_nms`, ordered by descending decayed score
        (ties by index).

    Raises:
        ValueError: on mismatched shapes or ``sigma <= 0``.
    """
    b, s = _check_inputs(boxes_xyxy, scores)
    c = _check_class_ids(class_ids, b.shape[0])
    idx_parts: list[IndexArray] = []
    score_parts: list[FloatArray] = []
    for cls in np.unique(c).tolist():
        members = np.flatnonzero(c == cls)
        k, ks = soft_nms(b[members], s[members], sigma=sigma, score_threshold=score_threshold,
                         method=method, iou_threshold=iou_threshold, max_output=max_output)
        idx_parts.append(members[k])
        score_parts.append(ks)
    if not idx_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    idx = np.concatenate(idx_parts)
    sc = np.concatenate(score_parts)
    order = np.lexsort((idx, -sc))
    if max_output is not None:
        order = order[: int(max_output)]
    return idx[order].astype(np.int64, copy=False), sc[order].astype(np.float32, copy=False)
