"""DETR-family heads: decoding against independent reference decoders, card checks, the stretch resize."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from streamdet.card import HeadLayout, ModelCardError, card_from_ultralytics_metadata
from streamdet.letterbox import (
    LetterboxParams,
    ResizeMode,
    boxes_frame_to_input,
    boxes_input_to_frame,
    letterbox,
    resize_params,
)
from streamdet.postprocess import PostprocessConfig, check_outputs_against_card, decode_detr, decode_rtdetr, postprocess
from tests.helpers.standin_detr import RTDETR_METADATA, detr_card


def ref_detr(logits, boxes, input_wh, thr, max_det, multi_label, softmax):
    """Per-query loops, written from the papers' post-processors (not from streamdet's code)."""
    iw, ih = input_wh
    rows = []
    for q in range(logits.shape[0]):
        if softmax:
            ex = [math.exp(float(v) - float(max(logits[q]))) for v in logits[q]]
            probs = [e / sum(ex) for e in ex][:-1]  # drop no-object
        else:
            probs = [float(v) for v in logits[q]]
        if multi_label:
            cands = [(p, q, c) for c, p in enumerate(probs) if p > thr]
        else:
            c = max(range(len(probs)), key=lambda k: (probs[k], -k))  # first of equal maxima
            cands = [(probs[c], q, c)] if probs[c] > thr else []
        for p, qq, c in cands:
            cx, cy, w, h = (float(v) for v in boxes[qq])
            rows.append((p, qq, c, [(cx - w / 2) * iw, (cy - h / 2) * ih, (cx + w / 2) * iw, (cy + h / 2) * ih]))
    rows.sort(key=lambda r: -r[0])  # stable: ties keep (query, class) order
    return rows[:max_det]


def assert_same(cand, rows):
    assert len(cand) == len(rows)
    if rows:
        np.testing.assert_allclose(cand.scores, [r[0] for r in rows], rtol=1e-5, atol=1e-6)
        assert cand.anchor_ids.tolist() == [r[1] for r in rows]
        assert cand.class_ids.tolist() == [r[2] for r in rows]
        np.testing.assert_allclose(cand.boxes_xyxy, [r[3] for r in rows], atol=1e-3)


CASES = [  # (queries, classes, threshold, max_det, multi_label)
    (50, 3, 0.25, 300, False),
    (50, 3, 0.25, 300, True),
    (50, 3, 0.0, 10, True),
    (50, 3, 0.9, 300, False),
    (1, 1, 0.1, 5, False),
    (1, 1, 0.1, 5, True),
    (300, 80, 0.05, 100, True),
    (300, 80, 0.3, 1, False),
    (7, 2, 1.0, 300, False),  # nothing above a threshold of 1
]


@pytest.mark.parametrize("q,c,thr,max_det,multi", CASES)
def test_detr_decode_equals_reference(q, c, thr, max_det, multi):
    rng = np.random.default_rng(q * 1000 + c)
    logits = (rng.normal(size=(2, q, c + 1)) * 3).astype(np.float32)
    logits[1, :, -1] += 4.0  # the second image: mostly no-object
    boxes = rng.uniform(0.05, 0.95, size=(2, q, 4)).astype(np.float32)
    lbs = [LetterboxParams((480, 640), (640, 384), (512, 384), (64, 0)), LetterboxParams((720, 1280), (320, 320),
                                                                                          (320, 180), (0, 70))]
    cfg = PostprocessConfig(score_threshold=thr, max_detections=max_det, multi_label=multi)
    got = decode_detr(logits, boxes, num_classes=c, letterboxes=lbs, cfg=cfg)
    for i, lb in enumerate(lbs):
        assert_same(got[i], ref_detr(logits[i], boxes[i], lb.input_wh, thr, max_det, multi, softmax=True))


@pytest.mark.parametrize("q,c,thr,max_det,multi", CASES)
def test_rtdetr_decode_equals_reference(q, c, thr, max_det, multi):
    rng = np.random.default_rng(q * 7 + c)
    out = np.concatenate([rng.uniform(0.05, 0.95, size=(3, q, 4)),
                          1 / (1 + np.exp(-rng.normal(size=(3, q, c)) * 3))], axis=2).astype(np.float32)
    out[2, :, 4] = out[2, :, 4].round(1) + 0.003  # ties: equal scores keep query order (none at a threshold)
    lbs = [LetterboxParams((272, 640), (640, 640), (640, 640), (0, 0))] * 3
    cfg = PostprocessConfig(score_threshold=thr, max_detections=max_det, multi_label=multi)
    got = decode_rtdetr(out, num_classes=c, letterboxes=lbs, cfg=cfg)
    for i in range(3):
        assert_same(got[i], ref_detr(out[i, :, 4:], out[i, :, :4], (640, 640), thr, max_det, multi, softmax=False))


def test_no_nms_overlapping_queries_both_kept():
    """Two queries on the same object: a set-prediction head has no NMS, both come out (as in the references)."""
    out = np.array([[[0.5, 0.5, 0.2, 0.2, 0.9], [0.5, 0.5, 0.2, 0.2, 0.8]]], np.float32)
    card = card_from_ultralytics_metadata({**RTDETR_METADATA, "names": "{0: 'a'}"}, "images", [1, 3, 640, 640],
                                          ["output0"], [[1, 2, 5]])
    dets = postprocess([out], [resize_params((100, 200), (640, 640), ResizeMode.STRETCH)], card, PostprocessConfig())
    assert len(dets[0]) == 2
    np.testing.assert_allclose(dets[0].boxes_xyxy, [[80, 40, 120, 60]] * 2, atol=1e-4)  # x * 200, y * 100


def test_stretch_letterbox_is_cv2_resize_and_inverts():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(272, 640, 3), dtype=np.uint8)
    out, p = letterbox(img, (320, 320), mode=ResizeMode.STRETCH)
    assert p == LetterboxParams((272, 640), (320, 320), (320, 320), (0, 0))
    np.testing.assert_array_equal(out, cv2.resize(img, (320, 320), interpolation=cv2.INTER_LINEAR))
    boxes = np.array([[10, 20, 630, 250], [0, 0, 640, 272]], np.float32)
    np.testing.assert_allclose(boxes_input_to_frame(boxes_frame_to_input(boxes, p), p), boxes, atol=1e-3)
    assert resize_params((272, 640), (320, 320)) == letterbox(img, (320, 320))[1]  # letterbox stays the default


def test_ultralytics_rtdetr_metadata_makes_a_card():
    card = card_from_ultralytics_metadata(RTDETR_METADATA, "images", ["batch", 3, 640, 640], ["output0"],
                                          [["batch", 300, 7]])
    assert card.head.layout is HeadLayout.RTDETR and card.head.num_queries == 300
    assert card.input.resize is ResizeMode.STRETCH and card.input_wh == (640, 640)
    assert card.class_names == ("red", "green", "blue")
    # two classes: (B, 300, 6) looks like an end2end head; the description tells them apart
    two = {**RTDETR_METADATA, "names": "{0: 'a', 1: 'b'}"}
    assert card_from_ultralytics_metadata(two, "images", [1, 3, 640, 640], ["output0"],
                                          [[1, 300, 6]]).head.layout is HeadLayout.RTDETR
    yolo = {k: v for k, v in two.items() if k != "description"}
    e2e = card_from_ultralytics_metadata(yolo, "images", [1, 3, 640, 640], ["output0"], [[1, 300, 6]])
    assert e2e.head.layout is HeadLayout.END2END and e2e.input.resize is ResizeMode.LETTERBOX
    # no description, but the shape (B, Q, 4 + C) with Q != 4 + C says RT-DETR
    nodesc = {k: v for k, v in RTDETR_METADATA.items() if k != "description"}
    assert card_from_ultralytics_metadata(nodesc, "images", [1, 3, 640, 640], ["output0"],
                                          [[1, 300, 7]]).head.layout is HeadLayout.RTDETR
    # a YOLO head (B, 4 + C, N) stays a YOLO head
    assert card_from_ultralytics_metadata(nodesc, "images", [1, 3, 640, 640], ["output0"],
                                          [[1, 7, 8400]]).head.layout is HeadLayout.ULTRALYTICS_DETECT


@pytest.mark.parametrize("shapes,needle", [
    ([["b", 64, 4], ["b", 64, 4]], "3+1=4 class logits"),  # no no-object column: C + 1 = 4 would pass, see next
    ([["b", 64, 3], ["b", 64, 4]], "expected pred_logits with 3+1=4 class logits (the last is no-object) per "
                                   "query, got 3"),
    ([["b", 100, 4], ["b", 100, 4]], "expected pred_logits with 64 queries (head.num_queries), got 100"),
    ([["b", 64, 4], ["b", 50, 4]], "same query count in pred_logits and pred_boxes, got 64 and 50"),
    ([["b", 64, 4], ["b", 64, 2]], "expected pred_boxes boxes of 4 values"),
    ([["b", 64, 4]], "expected 2 model outputs (class logits, boxes) for head layout detr, got 1"),
    ([["b", 64, 4, 1], ["b", 64, 4]], "expected pred_logits of rank 3"),
], ids=["ok", "classes", "queries", "query-pair", "box-cols", "count", "rank"])
def test_detr_card_checks(shapes, needle):
    card = detr_card()
    if needle.startswith("3+1=4"):
        check_outputs_against_card(card, shapes)  # the right shapes pass
        return
    with pytest.raises(ModelCardError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_outputs_against_card(card, shapes)


@pytest.mark.parametrize("shape,needle", [
    (["b", 300, 7], None),
    (["b", 300, 84], "expected output0 with 4+3=7 values per query, got 84"),
    (["b", 100, 7], "expected output0 with 300 queries (head.num_queries), got 100"),
    (["b", 7, 8400], "expected output0 with 4+3=7 values per query, got 8400"),
])
def test_rtdetr_card_checks(shape, needle):
    card = card_from_ultralytics_metadata(RTDETR_METADATA, "images", ["batch", 3, 640, 640], ["output0"],
                                          [["batch", 300, 7]])
    if needle is None:
        check_outputs_against_card(card, [shape])
        return
    with pytest.raises(ModelCardError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_outputs_against_card(card, [shape])
