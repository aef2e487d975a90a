"""Instance-segmentation postprocess (``ultralytics_segment``): boxes as a detector, then masks.

NMS runs on the boxes; masks are computed for the kept detections only (one matrix product with
the prototypes, see :mod:`streamdet.masks`), as frame-sized arrays or as COCO RLEs.

Reference: ultralytics ``utils/ops.py`` (``process_mask_native``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.boxes import FloatArray
from streamdet.card import ModelCard
from streamdet.letterbox import LetterboxParams
from streamdet.masks import mask_logits, prototype_masks_to_frame, prototype_masks_to_rle
from streamdet.postprocess.detect import candidates_to_detections, check_batch, decode_ultralytics_detect
from streamdet.postprocess.results import Candidates, Detections, PostprocessConfig


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
    check_batch(outputs, letterboxes)
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
        logits = segment_mask_logits(out0[b], protos[b], cand, num_classes=nc, num_mask_coeffs=nm)
        if cfg.masks_as_rle:
            rles = prototype_masks_to_rle(logits, d.boxes_xyxy, lb, cfg.mask_threshold)
            dets.append(Detections(d.boxes_xyxy, d.scores, d.class_ids, mask_rles=tuple(rles)))
        else:
            masks = prototype_masks_to_frame(logits, d.boxes_xyxy, lb, cfg.mask_threshold)
            dets.append(Detections(d.boxes_xyxy, d.scores, d.class_ids, masks=masks))
    return dets
