"""Candidates a model should not give are dropped by every decoder, never published.

A box or score that is not finite (NaN, inf) is dropped before top-k and NMS (else it reaches the
JSON serialiser, which refuses NaN, and kills the postprocess stage); an end2end class id that is
not an integer in ``[0, C)`` is dropped (the class id indexes the card's ``class_names``). Each
case goes through :func:`streamdet.postprocess.postprocess` and is compared with the same output
whose bad candidates were never there: the finite ones come out unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamdet.card import HeadLayout, Task
from streamdet.postprocess import Detections, NmsMethod, PostprocessConfig, postprocess
from tests.streamdet.mask_reference import MH, MW, NM, make_protos
from tests.streamdet.test_postprocess import BOX_A, LB, detect_output, frame_to_input_cxcywh, make_card

NAN, INF = float("nan"), float("inf")
A = frame_to_input_cxcywh(BOX_A)
B = frame_to_input_cxcywh((60.0, 20.0, 100.0, 44.0))  # disjoint from A


def assert_same(got: Detections, want: Detections) -> None:
    assert len(want) > 0
    np.testing.assert_array_equal(got.boxes_xyxy, want.boxes_xyxy)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.class_ids, want.class_ids)
    for g, w in ((got.masks, want.masks), (got.mask_rles, want.mask_rles)):
        assert (g is None) == (w is None)
        if g is not None:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    json.dumps([got.boxes_xyxy.tolist(), got.scores.tolist()], allow_nan=False)  # what the sinks need


# ---------------------------------------------------------------- ultralytics detect / segment

# (cxcywh, class, score); the bad ones score highest, so they would take the top-k slots
BAD_COLS = [([NAN, A[1], A[2], A[3]], 0, 0.99), ([A[0], A[1], INF, A[3]], 1, 0.98), ([-INF, 3, 4, 5], 2, 0.97),
            (A, 2, INF), (B, 1, NAN)]
GOOD_COLS = [(A, 0, 0.9), (B, 2, 0.7)]


def yolo_outputs(cols: list, extra_rows: int = 0) -> np.ndarray:
    return detect_output(cols, n=len(BAD_COLS) + len(GOOD_COLS), extra_rows=extra_rows)


@pytest.mark.parametrize("cfg", [PostprocessConfig(), PostprocessConfig(pre_nms_topk=2),
                                 PostprocessConfig(multi_label=True),
                                 PostprocessConfig(nms_method=NmsMethod.SOFT_GAUSSIAN),
                                 PostprocessConfig(class_agnostic=True, max_detections=2)],
                         ids=["default", "topk2", "multi_label", "soft_nms", "agnostic"])
def test_ultralytics_detect_drops_nonfinite(cfg: PostprocessConfig) -> None:
    card = make_card(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 3)
    bad = yolo_outputs(BAD_COLS + GOOD_COLS)
    clean = yolo_outputs([(box, c, 0.0) for box, c, _ in BAD_COLS] + GOOD_COLS)
    clean[0, :4, : len(BAD_COLS)] = 0.0
    (det,) = postprocess([bad], [LB], card, cfg)
    (want,) = postprocess([clean], [LB], card, cfg)
    assert_same(det, want)
    assert det.scores.tolist() == pytest.approx([0.9, 0.7])


def test_ultralytics_nan_in_another_class_drops_the_anchor() -> None:
    card = make_card(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 3)
    out = yolo_outputs(GOOD_COLS)
    out[0, 4 + 1, 0] = NAN  # anchor 0's best class is 0 (0.9), but class 1 is NaN
    (det,) = postprocess([out], [LB], card, PostprocessConfig())
    assert det.scores.tolist() == pytest.approx([0.7])


@pytest.mark.parametrize("rle", [False, True], ids=["masks", "rle"])
def test_ultralytics_segment_drops_nonfinite_and_keeps_masks_aligned(rle: bool) -> None:
    card = make_card(Task.SEGMENT, HeadLayout.ULTRALYTICS_SEGMENT, 3, nm=NM, outputs=("output0", "output1"),
                     mask_hw=(MH, MW))
    bad = yolo_outputs(BAD_COLS + GOOD_COLS, extra_rows=NM)
    bad[0, 7:, :] = np.array([[1.0], [0.0]], np.float32)
    bad[0, 7:, -1] = (0.0, 1.0)  # the last good anchor has the other prototype
    clean = bad.copy()
    clean[0, :7, : len(BAD_COLS)] = 0.0
    protos = make_protos()[None]
    for cfg in (PostprocessConfig(masks_as_rle=rle), PostprocessConfig(masks=False)):
        (det,) = postprocess([bad, protos], [LB], card, cfg)
        (want,) = postprocess([clean, protos], [LB], card, cfg)
        assert_same(det, want)
        assert len(det) == 2


# ---------------------------------------------------------------- end2end

GOOD_ROWS = [[5, 8, 25, 24, 0.9, 0], [50, 2, 70, 10, 0.6, 1]]
BAD_ROWS = [[NAN, 8, 25, 24, 0.99, 0], [5, 8, INF, 24, 0.98, 0], [5, 8, 25, 24, NAN, 0], [5, 8, 25, 24, INF, 0],
            [5, 8, 25, 24, 0.97, 5], [5, 8, 25, 24, 0.96, 3], [5, 8, 25, 24, 0.95, -1], [5, 8, 25, 24, 0.94, 0.5],
            [5, 8, 25, 24, 0.93, NAN], [5, 8, 25, 24, 0.92, INF]]


@pytest.mark.parametrize("three", [False, True], ids=["one (B,K,6) output", "boxes/scores/labels outputs"])
@pytest.mark.parametrize("max_det", [300, 2])
def test_end2end_drops_nonfinite_and_out_of_range_classes(three: bool, max_det: int) -> None:
    cfg = PostprocessConfig(max_detections=max_det)

    def run(rows: list) -> Detections:
        r = np.array([rows], np.float32)
        if three:  # float labels here: an int array cannot hold 0.5 or NaN
            card = make_card(Task.DETECT, HeadLayout.END2END, 3, outputs=("boxes", "scores", "labels"))
            return postprocess([r[..., :4], r[..., 4], r[..., 5]], [LB], card, cfg)[0]
        return postprocess([r], [LB], make_card(Task.DETECT, HeadLayout.END2END, 3), cfg)[0]

    det = run(BAD_ROWS[:5] + GOOD_ROWS[:1] + BAD_ROWS[5:] + GOOD_ROWS[1:])
    assert_same(det, run(GOOD_ROWS))
    assert det.class_ids.tolist() == [0, 1]


def test_end2end_int_labels_out_of_range() -> None:
    card = make_card(Task.DETECT, HeadLayout.END2END, 2, outputs=("boxes", "scores", "labels"))
    boxes = np.array([[[5, 8, 25, 24]] * 4], np.float32)
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    labels = np.array([[2, 1, -1, 0]], np.int64)
    (det,) = postprocess([boxes, scores, labels], [LB], card, PostprocessConfig())
    assert det.class_ids.tolist() == [1, 0]
    assert det.scores.tolist() == pytest.approx([0.8, 0.6])


# ---------------------------------------------------------------- detr / rtdetr

Q, C = 8, 3
QUERY_BOXES = np.array([[0.3, 0.5, 0.2, 0.4], [0.7, 0.5, 0.2, 0.3]] * (Q // 2), np.float32)  # cxcywh, 0..1


def detr_outputs(bad: bool, rtdetr: bool) -> list[np.ndarray]:
    """Queries 0 and 5 good; 1..4 bad (score highest, finite only in the good copy) or below the threshold."""
    boxes = QUERY_BOXES.copy()
    scores = np.full((Q, C), 0.01, np.float32)
    scores[0, 1], scores[5, 2] = 0.8, 0.6
    if bad:
        boxes[1, 0], boxes[2, 3], boxes[3, 1] = NAN, INF, -INF
        scores[1:4, 0] = 0.95
        scores[4, 1] = NAN if not rtdetr else INF
    if rtdetr:
        return [np.concatenate([boxes, scores], axis=1)[None]]
    logits = np.log(np.concatenate([scores, np.full((Q, 1), 0.05, np.float32)], axis=1))
    if bad:
        logits[4, 1] = NAN  # NaN logits make the whole query NaN after the softmax
    return [logits[None], boxes[None]]


@pytest.mark.parametrize("rtdetr", [False, True], ids=["detr", "rtdetr"])
@pytest.mark.parametrize("cfg", [PostprocessConfig(), PostprocessConfig(max_detections=2),
                                 PostprocessConfig(multi_label=True, max_detections=2)],
                         ids=["default", "max_det2", "multi_label"])
def test_set_prediction_heads_drop_nonfinite(rtdetr: bool, cfg: PostprocessConfig) -> None:
    layout = HeadLayout.RTDETR if rtdetr else HeadLayout.DETR
    card = make_card(Task.DETECT, layout, C, outputs=("output0",) if rtdetr else ("logits", "boxes"))
    (det,) = postprocess(detr_outputs(True, rtdetr), [LB], card, cfg)
    (want,) = postprocess(detr_outputs(False, rtdetr), [LB], card, cfg)
    assert_same(det, want)
    assert det.class_ids.tolist() == [1, 2]
