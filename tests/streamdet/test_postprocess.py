"""Postprocess: hand-built head outputs through known letterboxes, masks, semantic maps, card checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, ModelCardError, Normalization, Task
from streamdet.letterbox import letterbox, letterbox_params
from streamdet.masks import mask_logits, masks_to_rle
from streamdet.postprocess import (
    Detections,
    NmsMethod,
    PostprocessConfig,
    check_outputs_against_card,
    decode_ultralytics_detect,
    device_nms_supported,
    expected_num_anchors,
    postprocess,
    postprocess_detect,
    postprocess_semantic,
)
from streamdet.preprocess_ops import preprocess_batch
from tests.streamdet.mask_reference import MH, MW, NM, make_protos, reference_frame_mask

IN_WH = (64, 32)
FRAME_HW = (48, 128)  # letterbox: scale 0.5, resized 64x24, pad (0, 4)
LB = letterbox_params(FRAME_HW, IN_WH)


def make_card(task: Task, layout: HeadLayout, nc: int, *, nm: int = 0, outputs: tuple[str, ...] = ("output0",),
              mask_hw: tuple[int, int] | None = None, in_wh: tuple[int, int] = IN_WH, **kw: object) -> ModelCard:
    return ModelCard(name="t", task=task,
                     head=HeadSpec(layout=layout, num_classes=nc, num_mask_coeffs=nm, outputs=outputs, mask_hw=mask_hw),
                     input=InputSpec(width=in_wh[0], height=in_wh[1]), class_names=tuple(f"c{i}" for i in range(nc)),
                     **kw)  # type: ignore[arg-type]


DET_CARD = make_card(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 3)


def frame_to_input_cxcywh(box_frame: tuple[float, float, float, float]) -> list[float]:
    x1, y1, x2, y2 = box_frame
    sx, sy = LB.scale_xy
    px, py = LB.pad_xy
    ix1, iy1, ix2, iy2 = x1 * sx + px, y1 * sy + py, x2 * sx + px, y2 * sy + py
    return [(ix1 + ix2) / 2, (iy1 + iy2) / 2, ix2 - ix1, iy2 - iy1]


def detect_output(cols: list, nc: int = 3, n: int = 8, extra_rows: int = 0) -> np.ndarray:
    """(1, 4 + nc + extra, n) with one column per (cxcywh, class, score)."""
    out = np.zeros((1, 4 + nc + extra_rows, n), np.float32)
    for j, (box, cls, score) in enumerate(cols):
        out[0, 0:4, j] = box
        out[0, 4 + cls, j] = score
    return out


BOX_A = (10.0, 8.0, 50.0, 40.0)


def test_decode_known_boxes_through_letterbox() -> None:
    a = frame_to_input_cxcywh(BOX_A)
    assert a == [15.0, 16.0, 20.0, 16.0]
    shifted = [a[0] + 1, a[1], a[2], a[3]]
    out = detect_output([
        (a, 0, 0.9),
        (shifted, 0, 0.8),  # same class, IoU 0.9 -> suppressed
        (a, 1, 0.7),  # other class -> kept (class-aware)
        (a, 2, 0.2),  # below score threshold
        ([60, 6, 20, 8], 2, 0.6),  # input [50, 2, 70, 10] -> partly in the pad and past the frame
        (a, 1, 0.25),  # exactly at the threshold: dropped (strictly greater)
    ])
    cfg = PostprocessConfig(score_threshold=0.25, iou_threshold=0.5)
    (det,) = postprocess_detect([out], [LB], DET_CARD, cfg)
    assert det.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert det.class_ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(det.boxes_xyxy, [BOX_A, BOX_A, (100.0, 0.0, 128.0, 12.0)], atol=1e-5)
    assert det.boxes_xyxy.dtype == np.float32 and det.class_ids.dtype == np.int64

    (agn,) = postprocess_detect([out], [LB], DET_CARD, PostprocessConfig(score_threshold=0.25, iou_threshold=0.5,
                                                                          class_agnostic=True))
    assert agn.scores.tolist() == pytest.approx([0.9, 0.6])


def test_decode_candidates_keep_anchor_ids_and_input_pixels() -> None:
    a = frame_to_input_cxcywh(BOX_A)
    out = detect_output([([0, 0, 0, 0], 0, 0.0), (a, 2, 0.8)])
    (cand,) = decode_ultralytics_detect(out, num_classes=3, cfg=PostprocessConfig())
    assert cand.anchor_ids.tolist() == [1]
    np.testing.assert_allclose(cand.boxes_xyxy, [[5, 8, 25, 24]])


def test_score_threshold_and_max_detections() -> None:
    n = 20
    cols = [([4 + 3 * j, 16, 2, 2], j % 3, 0.3 + 0.03 * j) for j in range(n)]  # disjoint boxes
    out = detect_output(cols, n=n)
    (det,) = postprocess_detect([out], [LB], DET_CARD, PostprocessConfig(score_threshold=0.25, max_detections=5))
    assert len(det) == 5
    np.testing.assert_allclose(det.scores, [0.3 + 0.03 * j for j in range(19, 14, -1)], rtol=1e-6)
    (det,) = postprocess_detect([out], [LB], DET_CARD, PostprocessConfig(score_threshold=0.6))
    assert len(det) == sum(0.3 + 0.03 * j > 0.6 for j in range(n))
    (det,) = postprocess_detect([out], [LB], DET_CARD, PostprocessConfig(score_threshold=0.25, pre_nms_topk=3))
    assert len(det) == 3 and det.scores[0] == pytest.approx(0.3 + 0.03 * 19)


def test_batch_of_two_with_different_letterboxes() -> None:
    lb2 = letterbox_params((32, 64), IN_WH)  # identity letterbox
    a = frame_to_input_cxcywh(BOX_A)
    out = np.concatenate([detect_output([(a, 0, 0.9)]), detect_output([(a, 1, 0.8)])])
    d1, d2 = postprocess_detect([out], [LB, lb2], DET_CARD, PostprocessConfig())
    np.testing.assert_allclose(d1.boxes_xyxy, [BOX_A], atol=1e-5)
    np.testing.assert_allclose(d2.boxes_xyxy, [[5, 8, 25, 24]], atol=1e-5)
    with pytest.raises(ValueError, match="one letterbox per image"):
        postprocess_detect([out], [LB], DET_CARD, PostprocessConfig())


def test_multi_label() -> None:
    a = frame_to_input_cxcywh(BOX_A)
    out = detect_output([(a, 0, 0.9)])
    out[0, 4 + 2, 0] = 0.5
    (det,) = postprocess_detect([out], [LB], DET_CARD, PostprocessConfig(multi_label=True))
    assert det.class_ids.tolist() == [0, 2]
    (det,) = postprocess_detect([out], [LB], DET_CARD, PostprocessConfig())
    assert det.class_ids.tolist() == [0]


def test_soft_nms_method_decays_overlaps() -> None:
    a = frame_to_input_cxcywh(BOX_A)
    out = detect_output([(a, 0, 0.9), (a, 0, 0.8)])
    cfg = PostprocessConfig(score_threshold=0.05, nms_method=NmsMethod.SOFT_GAUSSIAN, soft_sigma=0.5)
    (det,) = postprocess_detect([out], [LB], DET_CARD, cfg)
    np.testing.assert_allclose(det.scores, [0.9, 0.8 * math.exp(-2.0)], rtol=1e-5)


@pytest.mark.parametrize("three", [False, True], ids=["one (B,K,6) output", "boxes/scores/labels outputs"])
def test_end2end_passthrough(three: bool) -> None:
    rows = np.array([[[5, 8, 25, 24, 0.9, 2], [50, 2, 70, 10, 0.6, 1], [0, 0, 1, 1, 0.1, 0],
                      [5, 8, 25, 24, 0.8, 2]]], np.float32)  # no NMS: the overlapping row stays
    if three:
        outputs: list[np.ndarray] = [rows[..., :4], rows[..., 4], rows[..., 5].astype(np.int64)]
        card = make_card(Task.DETECT, HeadLayout.END2END, 3, outputs=("boxes", "scores", "labels"))
    else:
        outputs = [rows]
        card = make_card(Task.DETECT, HeadLayout.END2END, 3)
    (det,) = postprocess(outputs, [LB], card, PostprocessConfig(score_threshold=0.25))
    assert det.class_ids.tolist() == [2, 2, 1]
    np.testing.assert_allclose(det.scores, [0.9, 0.8, 0.6], rtol=1e-6)
    np.testing.assert_allclose(det.boxes_xyxy, [BOX_A, BOX_A, (100, 0, 128, 12)], atol=1e-5)
    (det,) = postprocess(outputs, [LB], card, PostprocessConfig(score_threshold=0.25, max_detections=1))
    assert det.scores.tolist() == pytest.approx([0.9])


# ---------------------------------------------------------------- instance masks

def test_postprocess_segment_masks_for_kept_only() -> None:
    nc = 3
    card = make_card(Task.SEGMENT, HeadLayout.ULTRALYTICS_SEGMENT, nc, nm=NM, outputs=("output0", "output1"),
                     mask_hw=(MH, MW))
    a = frame_to_input_cxcywh((0.0, 0.0, 128.0, 48.0))
    out0 = detect_output([(a, 0, 0.9), (a, 0, 0.85), (frame_to_input_cxcywh(BOX_A), 1, 0.8)], nc=nc, extra_rows=NM)
    out0[0, 4 + nc :, 0] = (1.0, 0.0)
    out0[0, 4 + nc :, 1] = (0.0, 1.0)  # suppressed by NMS: no mask computed for it
    out0[0, 4 + nc :, 2] = (0.0, 1.0)
    protos = make_protos()[None]
    (det,) = postprocess([out0, protos], [LB], card, PostprocessConfig())
    assert det.class_ids.tolist() == [0, 1]
    assert det.masks is not None and det.masks.shape == (2, *FRAME_HW)
    logits = mask_logits(np.asarray([[1.0, 0.0], [0.0, 1.0]], np.float32), protos[0])
    assert (det.masks[0] == reference_frame_mask(logits[0], (0, 0, 128, 48), LB)).all()
    assert not det.masks[1][:, 50:].any() and not det.masks[1][40:].any()  # cut to BOX_A

    (rle,) = postprocess([out0, protos], [LB], card, PostprocessConfig(masks_as_rle=True))
    assert rle.masks is None and rle.mask_rles == tuple(masks_to_rle(det.masks))  # same masks, as COCO RLEs
    np.testing.assert_array_equal(rle.boxes_xyxy, det.boxes_xyxy)
    (boxes_only,) = postprocess([out0, protos], [LB], card, PostprocessConfig(masks=False))
    assert boxes_only.masks is None and boxes_only.mask_rles is None
    np.testing.assert_array_equal(boxes_only.boxes_xyxy, det.boxes_xyxy)


# ---------------------------------------------------------------- semantic


def test_semantic_undoes_letterbox() -> None:
    card = make_card(Task.SEMANTIC, HeadLayout.SEMANTIC_LOGITS, 3)
    lg = np.zeros((1, 3, 32, 64), np.float32)
    lg[0, 0] = 1.0
    lg[0, 1, 4:16, 0:32] = 5.0  # top-left quarter of the valid region
    lg[0, 2, 0:4] = 9.0  # the pad rows: must not leak into the frame
    lg[0, 2, 28:32] = 9.0
    (det,) = postprocess_semantic([lg], [LB], card)
    assert det.semantic is not None and det.semantic.shape == FRAME_HW and det.semantic.dtype == np.uint8
    want = np.zeros(FRAME_HW, np.uint8)
    want[0:24, 0:64] = 1
    np.testing.assert_array_equal(det.semantic, want)
    assert len(det) == 0


# ---------------------------------------------------------------- Detections / config validation

N3: dict = dict(boxes_xyxy=np.zeros((3, 4), np.float32), scores=np.zeros(3, np.float32),
               class_ids=np.zeros(3, np.int64))


@pytest.mark.parametrize("change, match", [
    (dict(boxes_xyxy=np.zeros((3, 4), np.float64)), "boxes_xyxy"),
    (dict(boxes_xyxy=np.zeros((3, 5), np.float32)), "boxes_xyxy"),
    (dict(scores=np.zeros(2, np.float32)), "scores"),
    (dict(class_ids=np.zeros(3, np.int32)), "class_ids"),
    (dict(class_ids=[0, 0, 0]), "class_ids"),
    (dict(masks=np.zeros((2, 4, 4), bool)), "masks"),
    (dict(masks=np.zeros((3, 4, 4), np.float32)), "masks"),
    (dict(semantic=np.zeros((4, 4), np.int64)), "semantic"),
    (dict(semantic=np.zeros((4, 4, 1), np.uint8)), "semantic"),
])
def test_detections_validation(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"expected {match}"):
        Detections(**{**N3, **change})


def test_detections_ok() -> None:
    d = Detections(**N3, masks=np.zeros((3, 4, 5), np.uint8))
    assert len(d) == 3
    assert len(Detections.empty(semantic=np.zeros((4, 4), np.uint8))) == 0


@pytest.mark.parametrize("kw", [dict(score_threshold=1.5), dict(iou_threshold=-0.1), dict(max_detections=0),
                                dict(pre_nms_topk=0), dict(soft_sigma=0.0), dict(mask_threshold=1.0),
                                dict(nms_method="hard")])
def test_config_validation(kw: dict) -> None:
    with pytest.raises(ValueError, match="expected"):
        PostprocessConfig(**kw)


# ---------------------------------------------------------------- card checks

SEG_CARD = make_card(Task.SEGMENT, HeadLayout.ULTRALYTICS_SEGMENT, 10, nm=32, outputs=("output0", "output1"),
                     in_wh=(640, 384))
DET10 = make_card(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 10, in_wh=(640, 384))
SEM_CARD = make_card(Task.SEMANTIC, HeadLayout.SEMANTIC_LOGITS, 11, in_wh=(640, 384))
E2E = make_card(Task.DETECT, HeadLayout.END2END, 10, in_wh=(640, 384))


def test_expected_anchors() -> None:
    assert expected_num_anchors((640, 384), (8, 16, 32)) == 80 * 48 + 40 * 24 + 20 * 12 == 5040


@pytest.mark.parametrize("card, shapes", [
    (DET10, [["batch", 14, 5040]]),
    (DET10, [[1, 14, "anchors"]]),
    (SEG_CARD, [[None, 46, 5040], [None, 32, 96, 160]]),
    (SEM_CARD, [["b", 11, 384, 640]]),
    (E2E, [[1, 300, 6]]),
    (E2E, [[1, 300, 4], [1, 300], [1, 300]]),
])
def test_card_check_ok(card: ModelCard, shapes: list) -> None:
    check_outputs_against_card(card, shapes)


@pytest.mark.parametrize("card, shapes, match", [
    (DET10, [[1, 84, 5040]], "expected output0 with 4+10=14 rows, got 84"),
    (DET10, [[1, 14, 8400]], "5040 anchor columns"),
    (DET10, [[1, 14, 5040], [1, 32, 96, 160]], "expected 1 model output"),
    (DET10, [[14, 5040]], "rank 3"),
    (SEG_CARD, [[1, 46, 5040]], "expected 2 model outputs"),
    (SEG_CARD, [[1, 14, 5040], [1, 32, 96, 160]], "4+10+32=46 rows, got 14"),
    (SEG_CARD, [[1, 46, 5040], [1, 32, 48, 80]], "prototype size 96x160"),
    (SEG_CARD, [[1, 46, 5040], [1, 16, 96, 160]], "32 prototypes"),
    (SEM_CARD, [[1, 11, 384]], "rank 4"),
    (SEM_CARD, [[1, 10, 384, 640]], "11 class channels"),
    (SEM_CARD, [[1, 11, 96, 160]], "input resolution"),
    (E2E, [[1, 300, 7]], "6 values"),
    (E2E, [[1, 300, 4], [1, 300]], "1 or 3"),
])
def test_card_check_mismatch(card: ModelCard, shapes: list, match: str) -> None:
    with pytest.raises(ModelCardError, match=match.replace("+", r"\+")):
        check_outputs_against_card(card, shapes)


# ---------------------------------------------------------------- preprocess


def test_preprocess_batch_matches_manual() -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (48, 128, 3), dtype=np.uint8), rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)]
    x, lbs = preprocess_batch(imgs, DET_CARD)
    assert x.shape == (2, 3, 32, 64) and x.dtype == np.float32
    for i, img in enumerate(imgs):
        lb_img, p = letterbox(img, IN_WH, 114)
        assert lbs[i] == p
        np.testing.assert_allclose(x[i], lb_img.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert x[0, :, 0, 0].tolist() == pytest.approx([114 / 255] * 3)  # pad row

    bgr = make_card(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 3, normalization=Normalization(
        mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0)))
    bgr = bgr.model_copy(update={"input": InputSpec(width=64, height=32, channel_order="BGR", dtype="float16")})
    x16, _ = preprocess_batch(imgs, bgr)
    assert x16.dtype == np.float16
    lb_img, _ = letterbox(imgs[0], IN_WH, 114)
    want = (lb_img[..., ::-1].transpose(2, 0, 1) - np.array([1.0, 2.0, 3.0])[:, None, None]) / np.array(
        [2.0, 4.0, 8.0])[:, None, None]
    np.testing.assert_allclose(x16[0].astype(np.float64), want, rtol=2e-3, atol=1e-2)
    out = np.empty((2, 3, 32, 64), np.float32)
    y, _ = preprocess_batch(imgs, DET_CARD, out=out)
    assert y is out and np.array_equal(out, x)
    with pytest.raises(ValueError, match="expected at least one image"):
        preprocess_batch([], DET_CARD)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_batch([imgs[0].astype(np.float32)], DET_CARD)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("shape", "dtype", "rounded"),
    [
        ((1, 3, 3), np.float32, False),  # one class: all zeros
        ((2, 5, 7), np.float32, False),
        ((11, 48, 80), np.float32, True),  # many exact ties: the lower class id wins, as np.argmax
        ((11, 48, 80), np.float16, False),
        ((11, 48, 80), np.float64, False),
        ((256, 4, 4), np.float32, False),  # the largest uint8 class id
    ],
)
def test_channel_argmax_equals_numpy(shape, dtype, rounded):
    from streamdet.postprocess import channel_argmax

    lg = np.random.default_rng(0).standard_normal(shape)
    lg = (np.round(lg) if rounded else lg).astype(dtype)
    got = channel_argmax(lg)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.argmax(lg, axis=0))
    view = lg[:, 1:-1, 2:]  # a letterbox crop: rows with strides
    np.testing.assert_array_equal(channel_argmax(view), np.argmax(view, axis=0))


# ---------------------------------------------------------------- device NMS


@pytest.mark.parametrize("layout, cfg, want", [
    (HeadLayout.ULTRALYTICS_DETECT, PostprocessConfig(), True),
    (HeadLayout.ULTRALYTICS_DETECT, PostprocessConfig(class_agnostic=True), True),
    (HeadLayout.ULTRALYTICS_DETECT, PostprocessConfig(multi_label=True), False),
    (HeadLayout.ULTRALYTICS_DETECT, PostprocessConfig(nms_method=NmsMethod.SOFT_GAUSSIAN), False),
    (HeadLayout.ULTRALYTICS_DETECT, PostprocessConfig(nms_method=NmsMethod.SOFT_LINEAR), False),
    (HeadLayout.ULTRALYTICS_SEGMENT, PostprocessConfig(), False),  # masks need the CPU postprocess
    (HeadLayout.ULTRALYTICS_SEGMENT, PostprocessConfig(masks=False), True),  # decoded as a detector
    (HeadLayout.END2END, PostprocessConfig(), False),
    (HeadLayout.SEMANTIC_LOGITS, PostprocessConfig(masks=False), False),
])
def test_device_nms_supported(layout: HeadLayout, cfg: PostprocessConfig, want: bool) -> None:
    tasks = {HeadLayout.ULTRALYTICS_SEGMENT: Task.SEGMENT, HeadLayout.SEMANTIC_LOGITS: Task.SEMANTIC}
    task = tasks.get(layout, Task.DETECT)
    card = make_card(task, layout, 3, nm=NM if layout is HeadLayout.ULTRALYTICS_SEGMENT else 0)
    assert device_nms_supported(card, cfg) is want
