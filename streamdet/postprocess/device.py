"""Detections whose NMS ran on the device: when that applies, and their wire form (engine -> postprocess).

The engine stage runs NMS on the GPU (``pipeline.gpu.gpu_nms``) for the models
:func:`device_nms_supported` accepts and sends :func:`pack_detections`' arrays under the output
names :data:`KEPT_OUTPUTS`; the postprocess stage turns them back with :func:`unpack_detections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.card import HeadLayout, ModelCard
from streamdet.postprocess.results import Detections, NmsMethod, PostprocessConfig

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
