"""Postprocess result and settings types: :class:`Detections`, :class:`Candidates`, :class:`PostprocessConfig`.

:class:`Detections` is a frozen, validated result (after supervision ``detection/core.py``);
:class:`Candidates` is one image's NMS output still in model-input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.boxes import FloatArray
from streamdet.nms import IndexArray


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

    @classmethod
    def empty(cls) -> Candidates:
        """No candidates."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                   np.zeros(0, np.int64))


def finite_rows(boxes: npt.NDArray[Any], scores: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | None:
    """Which candidates have a finite box and score: None when all do (the usual case, one cheap check).

    The decoders call it on the candidates above the score threshold only (a NaN score already
    fails the threshold), before top-k and NMS, so a NaN or infinite box never takes a slot.

    Args:
        boxes: ``(K, 4)`` boxes.
        scores: ``(K,)`` scores.

    Returns:
        None if every row is finite, else the ``(K,)`` bool mask of the finite rows.
    """
    if np.isfinite(boxes).all() and np.isfinite(scores).all():
        return None
    ok: npt.NDArray[np.bool_] = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    return ok
