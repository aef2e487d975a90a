"""Postprocess: raw model outputs to detections in frame pixels.

Pure functions over numpy arrays plus the frozen :class:`Detections` result; the pipeline's
postprocess stage wraps them. Supported heads (see :class:`streamdet.card.HeadLayout`):

* ``ultralytics_detect``: ``(B, 4 + C, N)``; score threshold, cxcywh -> xyxy, NMS, top-k, undo the
  letterbox, clip.
* ``end2end``: NMS inside the model; score threshold, top-k and the letterbox only.
* ``ultralytics_segment``: as detect, then masks for the kept detections only (one matrix product
  with the prototypes, see :mod:`streamdet.masks`).
* ``detr``, ``rtdetr``: set prediction, one box per query: softmax (no-object class) or sigmoid
  scores, best class per query or top-K over queries and classes, no NMS; the card's resize
  (letterbox or stretch) undone.
* ``semantic_logits``: per-pixel argmax, letterbox undone, nearest-neighbour resize to the frame.

Modules: :mod:`~streamdet.postprocess.results` (result and settings types),
:mod:`~streamdet.postprocess.detect` (detector heads and NMS), :mod:`~streamdet.postprocess.detr`
(set-prediction heads), :mod:`~streamdet.postprocess.segment`,
:mod:`~streamdet.postprocess.semantic`, :mod:`~streamdet.postprocess.dispatch` (:func:`postprocess`),
:mod:`~streamdet.postprocess.device` (device-NMS results on the wire) and
:mod:`~streamdet.postprocess.checks` (model outputs against the card).

References: ultralytics ``utils/ops.py`` (``non_max_suppression``, ``scale_boxes``,
``process_mask_native``); supervision ``detection/core.py`` (a validated detections type).
"""

from __future__ import annotations

from streamdet.postprocess.checks import (
    Shape,
    check_outputs_against_card,
    expected_num_anchors,
)
from streamdet.postprocess.detect import (
    candidates_to_detections,
    decode_end2end,
    decode_ultralytics_detect,
    postprocess_detect,
)
from streamdet.postprocess.detr import (
    decode_detr,
    decode_rtdetr,
    softmax_last,
)
from streamdet.postprocess.device import (
    KEPT_OUTPUTS,
    device_nms_supported,
    pack_detections,
    unpack_detections,
)
from streamdet.postprocess.dispatch import (
    postprocess,
)
from streamdet.postprocess.results import (
    EVAL_CONFIG,
    Candidates,
    Detections,
    NmsMethod,
    PostprocessConfig,
)
from streamdet.postprocess.segment import (
    postprocess_segment,
    segment_mask_logits,
)
from streamdet.postprocess.semantic import (
    channel_argmax,
    postprocess_semantic,
    semantic_map_to_frame,
)

__all__ = [
    "Candidates",
    "Detections",
    "EVAL_CONFIG",
    "KEPT_OUTPUTS",
    "NmsMethod",
    "PostprocessConfig",
    "Shape",
    "candidates_to_detections",
    "channel_argmax",
    "check_outputs_against_card",
    "decode_detr",
    "decode_end2end",
    "decode_rtdetr",
    "decode_ultralytics_detect",
    "device_nms_supported",
    "expected_num_anchors",
    "pack_detections",
    "postprocess",
    "postprocess_detect",
    "postprocess_segment",
    "postprocess_semantic",
    "segment_mask_logits",
    "semantic_map_to_frame",
    "softmax_last",
    "unpack_detections",
]
