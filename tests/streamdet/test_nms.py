"""NMS against cv2.dnn.NMSBoxes / NMSBoxesBatched and brute-force pure-Python references."""

from __future__ import annotations

import math
from fractions import Fraction

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamdet.nms import (
    SoftNmsMethod,
    batched_nms,
    batched_soft_nms,
    nms,
    soft_nms,
)

# ---------------------------------------------------------------- references


def xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    """Corner boxes to OpenCV's ``(x, y, w, h)`` (what ``cv2.dnn.NMSBoxes`` takes)."""
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def exact_iou(a: tuple[int, ...], b: tuple[int, ...]) -> Fraction:
    """IoU of two integer xyxy boxes as an exact fraction (0 when the union is empty)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0, r[2] - r[0]) * max(0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return Fraction(inter, union) if union > 0 else Fraction(0)


def ref_nms(boxes: list[tuple[int, ...]], scores: list[float], thr: float) -> list[int]:
    """Greedy NMS in pure Python: descending score, ties by index, suppress when IoU > thr."""
    t = Fraction(str(thr))
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(exact_iou(boxes[i], boxes[k]) <= t for k in keep):
            keep.append(i)
    return keep


def ref_batched_nms(boxes: list[tuple[int, ...]], scores: list[float], classes: list[int], thr: float) -> list[int]:
    keep: list[int] = []
    for c in sorted(set(classes)):
        members = [i for i in range(len(boxes)) if classes[i] == c]
        kept = ref_nms([boxes[i] for i in members], [scores[i] for i in members], thr)
        keep.extend(members[k] for k in kept)
    return sorted(keep, key=lambda i: (-scores[i], i))


def ref_soft_nms(
    boxes: list[tuple[int, ...]], scores: list[float], sigma: float, thr: float, method: SoftNmsMethod, nt: float
) -> tuple[list[int], list[float], float]:
    """Bodla et al. Algorithm 1 in float64; also returns the smallest gap between the best and the
    runner-up score at any pick (to skip near-ties whose order float32 rounding may flip).

    An exact tie counts as a gap of 0 unless the tied scores were computed alike (same box, same
    starting score, decayed by the same boxes): a decayed 0.75 * (1 - 2/3) is 0.25 in float64 but
    0.24999999 in float32, so its tie with an undecayed 0.25 is one only in float64."""
    alive = [i for i in range(len(boxes)) if scores[i] >= thr]
    cur = {i: float(scores[i]) for i in alive}
    history: dict[int, tuple[object, ...]] = {i: (scores[i],) for i in alive}
    keep, kept_scores, gap = [], [], math.inf
    while alive:
        best = max(alive, key=lambda i: (cur[i], -i))
        rest = [i for i in alive if i != best]
        if rest:
            d = cur[best] - max(cur[i] for i in rest)
            if d > 0:
                gap = min(gap, d)
            elif any(cur[i] == cur[best] and history[i] != history[best] for i in rest):
                gap = 0.0
        keep.append(best)
        kept_scores.append(cur[best])
        alive.remove(best)
        for i in alive:
            o = float(exact_iou(boxes[best], boxes[i]))
            if method is SoftNmsMethod.GAUSSIAN:
                cur[i] *= math.exp(-(o * o) / sigma)
                if o:  # (a factor of exactly 1 changes nothing in any precision)
                    history[i] += ((boxes[best], boxes[i]),)
            elif o > nt:
                cur[i] *= 1.0 - o
                history[i] += ((boxes[best], boxes[i]),)
            # a decayed score at (or within rounding of) the threshold: float32 may land either side
            gap = min(gap, abs(cur[i] - thr)) if (cur[i] != thr or cur[i] != scores[i]) else gap
        alive = [i for i in alive if cur[i] >= thr]
    return keep, kept_scores, gap


def min_threshold_gap(boxes: list[tuple[int, ...]], thr: float) -> float:
    """Smallest |IoU - thr| over pairs whose IoU is not exactly thr (to steer clear of rounding)."""
    t = Fraction(str(thr))
    gap = math.inf
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            d = abs(exact_iou(boxes[i], boxes[j]) - t)
            if d:
                gap = min(gap, float(d))
    return gap


# ---------------------------------------------------------------- strategies


@st.composite
def box_sets(draw: st.DrawFn, max_n: int = 40, positive: bool = False, span: int = 0) -> tuple[list, list]:
    """Integer xyxy boxes of very different, non-square sizes (thin, wide, tiny, huge, near-duplicates)."""
    n = draw(st.integers(0, max_n))
    lim = span or draw(st.sampled_from([20, 60, 400]))
    min_wh = 1 if positive else 0
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        if boxes and draw(st.booleans()):  # type: ignore[arg-type]
            bx = draw(st.sampled_from(boxes))  # jittered near-duplicate of an earlier box
            j = [draw(st.integers(-3, 3)) for _ in range(4)]
            x1, y1 = bx[0] + j[0], bx[1] + j[1]
            x2, y2 = max(x1 + min_wh, bx[2] + j[2]), max(y1 + min_wh, bx[3] + j[3])
        else:
            x1, y1 = draw(st.integers(0, lim)), draw(st.integers(0, lim))
            x2 = x1 + draw(st.integers(min_wh, lim))
            y2 = y1 + draw(st.integers(min_wh, lim // draw(st.sampled_from([1, 4, 10])) + min_wh))
            if draw(st.booleans()):  # type: ignore[arg-type]  # transpose: tall instead of wide
                x1, y1, x2, y2 = y1, x1, y2, x2
        boxes.append((x1, y1, x2, y2))
    score_pool = st.one_of(st.sampled_from([0.25, 0.5, 0.75]), st.floats(0.0625, 1.0, width=32))
    scores = [draw(score_pool) for _ in range(n)]
    return boxes, scores


THRESHOLDS = st.sampled_from([0.0, 0.3, 0.45, 0.5, 0.7, 0.9, 1.0])
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_arrays(boxes: list, scores: list) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)


# ---------------------------------------------------------------- property tests


@FAST
@given(data=box_sets(), thr=THRESHOLDS)
def test_nms_matches_bruteforce(data: tuple[list, list], thr: float) -> None:
    boxes, scores = data
    b, s = as_arrays(boxes, scores)
    # float32 scores decide the order in both implementations
    got = nms(b, s, thr)
    assert got.dtype == np.int64
    assert got.tolist() == ref_nms(boxes, s.tolist(), thr)


@FAST
@given(data=box_sets(positive=True), thr=st.sampled_from([0.3, 0.45, 0.5, 0.7, 0.9]))
def test_nms_matches_cv2(data: tuple[list, list], thr: float) -> None:
    boxes, scores = data
    assume(min_threshold_gap(boxes, thr) > 1e-6)  # cv2 computes IoU in double, then float
    b, s = as_arrays(boxes, scores)
    want = np.asarray(cv2.dnn.NMSBoxes(xyxy_to_xywh(b).tolist(), s.tolist(), 0.0, thr), dtype=np.int64).ravel()
    assert nms(b, s, thr).tolist() == want.tolist()


@FAST
@given(data=box_sets(), thr=THRESHOLDS, classes=st.lists(st.integers(0, 3), min_size=40, max_size=40))
def test_batched_nms_matches_per_class_bruteforce(data: tuple[list, list], thr: float, classes: list[int]) -> None:
    boxes, scores = data
    c = classes[: len(boxes)]
    b, s = as_arrays(boxes, scores)
    got = batched_nms(b, s, np.asarray(c, np.int64), thr)
    assert got.tolist() == ref_batched_nms(boxes, s.tolist(), c, thr)
    agnostic = batched_nms(b, s, np.asarray(c, np.int64), thr, class_agnostic=True)
    assert agnostic.tolist() == ref_nms(boxes, s.tolist(), thr)


@FAST
@given(data=box_sets(positive=True), thr=st.sampled_from([0.3, 0.5, 0.7]),
       classes=st.lists(st.integers(0, 3), min_size=40, max_size=40))
def test_batched_nms_matches_cv2_batched(data: tuple[list, list], thr: float, classes: list[int]) -> None:
    boxes, scores = data
    assume(min_threshold_gap(boxes, thr) > 1e-6)
    c = classes[: len(boxes)]
    b, s = as_arrays(boxes, scores)
    want = cv2.dnn.NMSBoxesBatched(xyxy_to_xywh(b).tolist(), s.tolist(), c, 0.0, thr)
    want = np.asarray(want, dtype=np.int64).ravel()
    got = batched_nms(b, s, np.asarray(c, np.int64), thr)
    # cv2 returns the kept set; compare as sets, and our order must be by descending score
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert got.tolist() == sorted(got.tolist(), key=lambda i: (-s[i], i))


@FAST
@given(data=box_sets(max_n=60, span=60), thr=THRESHOLDS, topk=st.integers(0, 70), cap=st.integers(0, 70))
def test_nms_topk_and_max_output(data: tuple[list, list], thr: float, topk: int, cap: int) -> None:
    boxes, scores = data
    b, s = as_arrays(boxes, scores)
    full = nms(b, s, thr)
    assert nms(b, s, thr, max_output=cap).tolist() == full[:cap].tolist()
    order = np.argsort(-s, kind="stable")[:topk]
    want = order[nms(b[order], s[order], thr)]
    assert nms(b, s, thr, pre_nms_topk=topk).tolist() == want.tolist()


@settings(max_examples=80, deadline=None)
@given(data=box_sets(max_n=25), sigma=st.sampled_from([0.3, 0.5, 1.0]),
       method=st.sampled_from(list(SoftNmsMethod)), thr=st.sampled_from([0.001, 0.1, 0.3]),
       nt=st.sampled_from([0.3, 0.5]))
def test_soft_nms_matches_bruteforce(data: tuple[list, list], sigma: float, method: SoftNmsMethod, thr: float,
                                     nt: float) -> None:
    boxes, scores = data
    b, s = as_arrays(boxes, scores)
    keep, kept, gap = ref_soft_nms(boxes, s.astype(np.float64).tolist(), sigma, thr, method, nt)
    assume(gap > 1e-4)
    got, got_scores = soft_nms(b, s, sigma=sigma, score_threshold=thr, method=method, iou_threshold=nt)
    assert got.tolist() == keep
    np.testing.assert_allclose(got_scores, np.asarray(kept, np.float32), rtol=1e-5, atol=1e-6)


def test_soft_nms_ties_are_decided_in_float32() -> None:
    """Hypothesis found it: 0.75 decayed by 1 - 2/3 is 0.25 in float64 and 0.24999999 in float32, so the
    float64 reference ties it with the undecayed 0.25s (and picks it by index) where soft_nms ranks it after
    them; the reference reports such a tie as a gap of 0 (the property test skips it)."""
    boxes: list[tuple[int, ...]] = [(0, 0, 12, 1), (0, 0, 0, 0), (-2, 0, 16, 1), (0, 0, 0, 0)]  # IoU(0, 2) = 2/3
    scores = [0.75, 0.25, 0.75, 0.25]
    b, s = as_arrays(boxes, scores)
    keep, _, gap = ref_soft_nms(boxes, s.astype(np.float64).tolist(), 0.3, 0.001, SoftNmsMethod.LINEAR, 0.3)
    assert keep == [0, 1, 2, 3] and gap == 0.0
    got, got_scores = soft_nms(b, s, sigma=0.3, score_threshold=0.001, method=SoftNmsMethod.LINEAR, iou_threshold=0.3)
    assert got.tolist() == [0, 1, 3, 2]
    assert got_scores[3] == np.float32(0.75) * (np.float32(1) - np.float32(2) / np.float32(3)) < np.float32(0.25)


@settings(max_examples=60, deadline=None)
@given(data=box_sets(max_n=25), classes=st.lists(st.integers(0, 2), min_size=25, max_size=25))
def test_batched_soft_nms_is_per_class(data: tuple[list, list], classes: list[int]) -> None:
    boxes, scores = data
    c = np.asarray(classes[: len(boxes)], np.int64)
    b, s = as_arrays(boxes, scores)
    idx, sc = batched_soft_nms(b, s, c)
    want: dict[int, float] = {}
    for cls in np.unique(c).tolist():
        m = np.flatnonzero(c == cls)
        k, ks = soft_nms(b[m], s[m])
        want.update(dict(zip(m[k].tolist(), ks.tolist(), strict=True)))
    assert sorted(idx.tolist()) == sorted(want)
    assert np.all(np.diff(sc) <= 0)
    np.testing.assert_array_equal(sc, np.asarray([want[i] for i in idx.tolist()], np.float32))


def test_large_input_matches_cv2_across_blocks() -> None:
    # more than one block of rows (2**20 // N rows per block)
    rng = np.random.default_rng(1)
    n = 2500
    c = rng.uniform(0, 1280, (n, 2))
    wh = rng.uniform(4, 300, (n, 2)) * np.array([1.0, 0.4])
    b = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
    s = rng.uniform(0.01, 1.0, n).astype(np.float32)
    want = np.asarray(cv2.dnn.NMSBoxes(xyxy_to_xywh(b).tolist(), s.tolist(), 0.0, 0.45), np.int64).ravel()
    assert nms(b, s, 0.45).tolist() == want.tolist()


# ---------------------------------------------------------------- edge table

BIG = (0, 0, 40, 10)
EDGE_CASES = [
    # id, boxes, scores, classes, thr, expected (class-aware)
    ("empty", [], [], [], 0.5, []),
    ("one box", [BIG], [0.3], [0], 0.5, [0]),
    ("ties identical boxes -> lowest index", [BIG, BIG, BIG], [0.5, 0.5, 0.5], [0, 0, 0], 0.5, [0]),
    ("ties disjoint boxes -> index order", [(0, 0, 1, 1), (5, 5, 6, 6), (9, 9, 10, 10)], [0.5, 0.9, 0.5],
     [0, 0, 0], 0.5, [1, 0, 2]),
    ("IoU exactly at threshold keeps both", [(0, 0, 4, 1), (0, 0, 2, 1)], [0.9, 0.8], [0, 0], 0.5, [0, 1]),
    ("IoU just above threshold suppresses", [(0, 0, 4, 1), (0, 0, 2, 1)], [0.9, 0.8], [0, 0], 0.49, [0]),
    ("class-aware: overlapping boxes of different classes both kept", [BIG, (1, 0, 41, 10)], [0.9, 0.8],
     [0, 1], 0.5, [0, 1]),
    ("same class overlapping -> one", [BIG, (1, 0, 41, 10)], [0.9, 0.8], [1, 1], 0.5, [0]),
    ("all identical boxes -> best score", [BIG] * 5, [0.1, 0.7, 0.3, 0.7, 0.2], [0] * 5, 0.5, [1]),
    ("all identical boxes at threshold 1.0 -> all kept", [BIG] * 3, [0.1, 0.3, 0.2], [0] * 3, 1.0, [1, 2, 0]),
    ("threshold 0: touching boxes kept", [(0, 0, 2, 2), (2, 0, 4, 2)], [0.9, 0.8], [0, 0], 0.0, [0, 1]),
    ("threshold 0: any overlap suppresses", [(0, 0, 2, 2), (1, 0, 40, 2)], [0.9, 0.8], [0, 0], 0.0, [0]),
    ("zero-area boxes never suppress (torchvision)", [(5, 5, 5, 5), (5, 5, 5, 5), (0, 0, 10, 10)],
     [0.9, 0.8, 0.7], [0, 0, 0], 0.5, [0, 1, 2]),
    # IoU 100/1900 = 0.0526 as xyxy; read as cxcywh the two boxes would not overlap at all
    ("thin wide vs tall narrow (xyxy, not cxcywh)", [(0, 0, 100, 10), (45, -45, 55, 55)], [0.9, 0.8], [0, 0],
     0.05, [0]),
]


@pytest.mark.parametrize("boxes, scores, classes, thr, expected", [c[1:] for c in EDGE_CASES],
                         ids=[c[0] for c in EDGE_CASES])
def test_edge_table(boxes: list, scores: list, classes: list, thr: float, expected: list[int]) -> None:
    b, s = as_arrays(boxes, scores)
    c = np.asarray(classes, np.int64)
    assert batched_nms(b, s, c, thr).tolist() == expected
    assert nms(b, s, thr).tolist() == ref_nms(boxes, s.tolist(), thr)
    assert batched_nms(b, s, c, thr).tolist() == ref_batched_nms(boxes, s.tolist(), classes, thr)


def test_cv2_agrees_on_threshold_equality_and_ties_but_not_zero_area() -> None:
    # documents which cv2 behaviours we match
    eq = [(0, 0, 4, 1), (0, 0, 2, 1)]
    assert list(cv2.dnn.NMSBoxes(eq, [0.9, 0.8], 0.0, 0.5)) == [0, 1]
    assert nms(np.asarray([(0, 0, 4, 1), (0, 0, 2, 1)], np.float32), np.asarray([0.9, 0.8], np.float32),
               0.5).tolist() == [0, 1]
    assert list(cv2.dnn.NMSBoxes([(0, 0, 4, 1)] * 3, [0.5] * 3, 0.0, 0.5)) == [0]
    # cv2 counts two identical zero-area boxes as IoU 1; we (and torchvision) as IoU 0
    assert list(cv2.dnn.NMSBoxes([(5, 5, 0, 0)] * 2, [0.5, 0.6], 0.0, 0.5)) == [1]
    z = np.asarray([(5, 5, 5, 5)] * 2, np.float32)
    assert nms(z, np.asarray([0.5, 0.6], np.float32), 0.5).tolist() == [1, 0]


@pytest.mark.parametrize("bad, match", [
    (dict(boxes_xyxy=np.zeros((3, 5), np.float32), scores=np.zeros(3, np.float32)), "boxes_xyxy of shape"),
    (dict(boxes_xyxy=np.zeros((3, 4), np.float32), scores=np.zeros(2, np.float32)), "scores of shape"),
])
def test_bad_shapes(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nms(bad["boxes_xyxy"], bad["scores"], 0.5)


def test_bad_class_ids_and_sigma() -> None:
    b = np.zeros((2, 4), np.float32)
    s = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="class_ids of shape"):
        batched_nms(b, s, np.zeros(3, np.int64), 0.5)
    with pytest.raises(ValueError, match="sigma"):
        soft_nms(b, s, sigma=0.0)


def test_soft_nms_edges() -> None:
    b = np.asarray([BIG, BIG, (100, 100, 110, 120)], np.float32)
    s = np.asarray([0.9, 0.8, 0.7], np.float32)
    idx, sc = soft_nms(b, s, sigma=0.5, score_threshold=0.001)
    # identical box decays by exp(-1/0.5); the disjoint one is untouched
    assert idx.tolist() == [0, 2, 1]
    np.testing.assert_allclose(sc, [0.9, 0.7, 0.8 * math.exp(-2.0)], rtol=1e-6)
    idx, sc = soft_nms(b, s, method=SoftNmsMethod.LINEAR, iou_threshold=0.3)
    assert idx.tolist() == [0, 2]  # linear decay of an identical box is (1 - 1) = 0 -> dropped
    e_idx, e_sc = soft_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    assert e_idx.shape == (0,) and e_sc.shape == (0,)
    idx, _ = soft_nms(b, s, score_threshold=0.75)
    assert idx.tolist() == [0]  # below-threshold inputs never enter; decayed ones drop
    idx, _ = batched_soft_nms(b, s, np.asarray([0, 1, 0]), max_output=2)
    assert idx.tolist() == [0, 1]
