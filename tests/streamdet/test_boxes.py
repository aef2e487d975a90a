"""Box conversions, areas and IoU against pure-Python references (exact fractions for integer boxes)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from streamdet.boxes import box_area, box_iou, box_iou_planes, box_planes, cxcywh_to_xyxy


def ref_area(b: tuple[float, ...]) -> Fraction:
    """Area of one xyxy box as an exact fraction; degenerate boxes count as zero."""
    x1, y1, x2, y2 = (Fraction(v) for v in b)
    return max(Fraction(0), x2 - x1) * max(Fraction(0), y2 - y1)


def ref_iou(a: tuple[float, ...], b: tuple[float, ...]) -> Fraction:
    """IoU of two xyxy boxes as an exact fraction (0 when the union is empty)."""
    fa, fb = [Fraction(v) for v in a], [Fraction(v) for v in b]
    iw = max(Fraction(0), min(fa[2], fb[2]) - max(fa[0], fb[0]))
    ih = max(Fraction(0), min(fa[3], fb[3]) - max(fa[1], fb[1]))
    inter = iw * ih
    union = ref_area(a) + ref_area(b) - inter
    return inter / union if union > 0 else Fraction(0)


# ---------------------------------------------------------------- conversions

CXCYWH_CASES = [
    # (cx, cy, w, h) -> (x1, y1, x2, y2)
    ((10.0, 20.0, 4.0, 6.0), (8.0, 17.0, 12.0, 23.0)),
    ((0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),  # a point
    ((-5.0, -5.0, 2.0, 2.0), (-6.0, -6.0, -4.0, -4.0)),  # negative coordinates stay as they are
    ((1.5, 2.5, 3.0, 1.0), (0.0, 2.0, 3.0, 3.0)),  # fractional centres
    ((100.0, 50.0, 0.0, 10.0), (100.0, 45.0, 100.0, 55.0)),  # zero width
]


@pytest.mark.parametrize("cxcywh, want", CXCYWH_CASES)
def test_cxcywh_to_xyxy_table(cxcywh: tuple[float, ...], want: tuple[float, ...]) -> None:
    got = cxcywh_to_xyxy(np.asarray([cxcywh], np.float32))
    assert got.dtype == np.float32 and got.shape == (1, 4)
    assert got[0].tolist() == list(want)


def test_cxcywh_to_xyxy_matches_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(0)
    b = np.concatenate([rng.uniform(-100, 1000, (200, 2)), rng.uniform(0, 300, (200, 2))], 1).astype(np.float32)
    got = cxcywh_to_xyxy(b)
    for (cx, cy, w, h), row in zip(b.tolist(), got.tolist(), strict=True):
        want = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]  # float64 reference
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fn", [cxcywh_to_xyxy])
@pytest.mark.parametrize("arg, shape", [([], (0, 4)), ([1, 2, 3, 4], (1, 4)), ([[1, 2, 3, 4]] * 3, (3, 4))])
def test_conversions_take_lists_and_flat_boxes(fn, arg: list, shape: tuple[int, int]) -> None:
    got = fn(arg)
    assert got.shape == shape and got.dtype == np.float32


# ---------------------------------------------------------------- area and IoU

AREA_CASES = [
    ((0, 0, 4, 3), 12),
    ((2, 2, 2, 9), 0),  # zero width
    ((5, 5, 3, 9), 0),  # inverted x: degenerate, not negative
    ((5, 5, 3, 1), 0),  # inverted both: not a positive product of negatives
    ((-2, -1, 1.5, 0.5), 5.25),
]


@pytest.mark.parametrize("box, want", AREA_CASES)
def test_box_area_table(box: tuple[float, ...], want: float) -> None:
    assert ref_area(box) == want  # the table itself agrees with the reference
    got = box_area(np.asarray([box], np.float32))
    assert got.dtype == np.float32 and got.tolist() == [want]


IOU_CASES = [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
    ((0, 0, 10, 10), (5, 0, 15, 10), 1 / 3),
    ((0, 0, 10, 10), (2, 2, 4, 4), 0.04),  # contained
    ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),  # two identical points: zero union -> 0, not NaN
    ((0, 0, 10, 10), (4, 4, 4, 4), 0.0),  # a point inside a box
    ((5, 5, 0, 0), (0, 0, 5, 5), 0.0),  # inverted box: zero area
]


@pytest.mark.parametrize("a, b, want", IOU_CASES)
def test_box_iou_table(a: tuple[float, ...], b: tuple[float, ...], want: float) -> None:
    assert float(ref_iou(a, b)) == pytest.approx(want)
    got = box_iou(np.asarray([a], np.float32), np.asarray([b], np.float32))
    assert got.shape == (1, 1) and got.dtype == np.float32
    assert got[0, 0] == pytest.approx(want, abs=1e-7)
    assert box_iou(np.asarray([b], np.float32), np.asarray([a], np.float32))[0, 0] == got[0, 0]  # symmetric


def test_box_iou_matches_exact_reference() -> None:
    rng = np.random.default_rng(3)
    xy = rng.integers(-20, 200, (60, 2))
    wh = rng.integers(0, 80, (60, 2)) * rng.choice([0, 1], (60, 2), p=[0.1, 0.9])
    b = np.concatenate([xy, xy + wh], 1)
    got = box_iou(b[:25].astype(np.float32), b.astype(np.float32))
    assert got.shape == (25, 60)
    want = np.array([[float(ref_iou(tuple(p), tuple(q))) for q in b.tolist()] for p in b[:25].tolist()])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_box_iou_empty_sides() -> None:
    b = np.zeros((3, 4), np.float32)
    assert box_iou(np.zeros((0, 4), np.float32), b).shape == (0, 3)
    assert box_iou(b, np.zeros((0, 4), np.float32)).shape == (3, 0)


def test_box_planes_rows() -> None:
    b = np.asarray([[0, 0, 4, 3], [5, 5, 3, 9]], np.float32)
    p = box_planes(b)
    assert p.shape == (5, 2) and p.dtype == np.float32
    np.testing.assert_array_equal(p[0:4], b.T)
    np.testing.assert_array_equal(p[4], [12.0, 0.0])


def _broadcast_iou(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """The plain (N, M, 2) broadcast IoU, same float32 operations in the same order."""
    a1, a2 = box_area(b1), box_area(b2)
    lt = np.maximum(b1[:, None, 0:2], b2[None, :, 0:2])
    rb = np.minimum(b1[:, None, 2:4], b2[None, :, 2:4])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = a1[:, None] + a2[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0).astype(np.float32)


def test_plane_iou_bit_identical_to_broadcast_iou() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(-50, 1300, (300, 2))
    wh = rng.uniform(0, 300, (300, 2)) * rng.choice([0.0, 1.0], (300, 2), p=[0.05, 0.95])
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    want = _broadcast_iou(b[:100], b)
    np.testing.assert_array_equal(box_iou_planes(box_planes(b[:100]), box_planes(b)), want)
    np.testing.assert_array_equal(box_iou(b[:100], b), want)


