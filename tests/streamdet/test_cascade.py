"""Cascade geometry (streamdet/cascade.py) against brute force: parents, crop windows, children in frame pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamdet.cascade import children_to_frame, crop_window, select_parents
from streamdet.postprocess.results import Detections
from tests.streamdet.test_masks import pycoco_rle

FRAME_HW = (60, 100)
ORIGIN = (30, 20)  # the crop's top-left corner in the frame
CROP_HW = (24, 40)


def dets(boxes: list[list[float]], scores: list[float] | None = None, classes: list[int] | None = None,
         masks: np.ndarray | None = None) -> Detections:
    n = len(boxes)
    return Detections(np.asarray(boxes, np.float32).reshape(n, 4),
                      np.asarray(scores if scores is not None else [0.9] * n, np.float32),
                      np.asarray(classes if classes is not None else [0] * n, np.int64), masks=masks)


def reference_children(boxes_crop: np.ndarray, masks: np.ndarray, parent: tuple[float, ...] | None):
    """Brute force: each child's box and mask placed in a frame-sized array, cut to the box (clipped to the parent)."""
    out_boxes, out_masks = [], []
    for b, m in zip(boxes_crop, masks, strict=True):
        fb = b.astype(np.float64) + [ORIGIN[0], ORIGIN[1], ORIGIN[0], ORIGIN[1]]
        if parent is not None:
            fb = np.array([min(max(fb[0], parent[0]), parent[2]), min(max(fb[1], parent[1]), parent[3]),
                           min(max(fb[2], parent[0]), parent[2]), min(max(fb[3], parent[1]), parent[3])])
            if fb[2] <= fb[0] or fb[3] <= fb[1]:
                continue
        full = np.zeros(FRAME_HW, bool)
        full[ORIGIN[1]:ORIGIN[1] + CROP_HW[0], ORIGIN[0]:ORIGIN[0] + CROP_HW[1]] = m
        cut = np.zeros(FRAME_HW, bool)
        x0, y0, x1, y1 = math.floor(fb[0]), math.floor(fb[1]), math.ceil(fb[2]), math.ceil(fb[3])
        cut[y0:y1, x0:x1] = full[y0:y1, x0:x1]
        out_boxes.append(fb)
        out_masks.append(cut)
    return np.asarray(out_boxes, np.float32).reshape(-1, 4), out_masks


# child boxes in crop pixels (the crop spans x 30..70, y 20..44 of the frame); the parent box in frame pixels
CHILD_CASES = [
    pytest.param([[4, 4, 12, 20]], (32.0, 22.0, 68.0, 42.0), id="inside"),
    pytest.param([[0, 2, 6.5, 20]], (32.5, 22.0, 68.0, 42.0), id="past-left-edge-clipped"),
    pytest.param([[30, 0, 40, 24]], (32.0, 22.0, 68.0, 42.0), id="past-right-top-bottom-clipped"),
    pytest.param([[0, 0, 2, 24]], (32.5, 22.0, 68.0, 42.0), id="outside-dropped"),
    pytest.param([[0, 4, 2.5, 10], [10, 4, 20, 10]], (32.5, 22.0, 68.0, 42.0), id="zero-width-dropped"),
    pytest.param([[0, 0, 40, 24], [5, 5, 9, 9]], None, id="no-parent-unclipped"),
]


@pytest.mark.parametrize(("boxes", "parent"), CHILD_CASES)
def test_children_to_frame_equals_brute_force(boxes: list[list[float]], parent: tuple[float, ...] | None) -> None:
    rng = np.random.default_rng(7)
    b = np.asarray(boxes, np.float32)
    masks = rng.random((len(b), *CROP_HW)) > 0.4
    got = children_to_frame(dets(boxes, scores=[0.9 - 0.1 * i for i in range(len(b))], classes=list(range(len(b))),
                                 masks=masks), ORIGIN, FRAME_HW, parent)
    ref_boxes, ref_masks = reference_children(b, masks, parent)
    np.testing.assert_allclose(got.boxes_xyxy, ref_boxes, atol=1e-4)
    assert got.boxes_xyxy.dtype == np.float32
    assert got.mask_rles is not None
    assert list(got.mask_rles) == [pycoco_rle(m) for m in ref_masks]
    assert len(got) == len(ref_boxes)
    if parent is not None:
        p = np.asarray(parent, np.float32)
        assert np.all(got.boxes_xyxy[:, :2] >= p[:2]) and np.all(got.boxes_xyxy[:, 2:] <= p[2:])


def test_children_to_frame_keeps_scores_and_classes_of_kept_children() -> None:
    got = children_to_frame(dets([[0, 0, 1, 5], [5, 5, 9, 9], [20, 2, 45, 9]], [0.9, 0.8, 0.7], [3, 4, 5]),
                            ORIGIN, FRAME_HW, (32.0, 21.0, 68.0, 43.0))
    np.testing.assert_array_equal(got.class_ids, [4, 5])
    np.testing.assert_allclose(got.scores, [0.8, 0.7])
    np.testing.assert_allclose(got.boxes_xyxy, [[35, 25, 39, 29], [50, 22, 68, 29]])
    assert got.mask_rles is None


def test_children_to_frame_without_children() -> None:
    got = children_to_frame(dets([]), ORIGIN, FRAME_HW, (32.0, 21.0, 68.0, 43.0))
    assert len(got) == 0 and got.boxes_xyxy.shape == (0, 4)


@pytest.mark.parametrize(("box", "pad", "window"), [
    pytest.param((10, 10, 30, 20), 0.0, (10, 10, 30, 20), id="no-pad"),
    pytest.param((10.2, 10.7, 29.5, 19.1), 0.0, (10, 10, 30, 20), id="rounded-outwards"),
    pytest.param((10, 10, 30, 20), 0.1, (8, 9, 32, 21), id="pad-10pc"),
    pytest.param((0, 0, 20, 10), 0.5, (0, 0, 30, 15), id="clipped-top-left"),
    pytest.param((90, 50, 100, 60), 0.5, (85, 45, 100, 60), id="clipped-bottom-right"),
    pytest.param((99.5, 59.5, 99.8, 59.9), 0.0, (99, 59, 100, 60), id="sub-pixel-at-corner"),
])
def test_crop_window(box: tuple[float, ...], pad: float, window: tuple[int, ...]) -> None:
    assert crop_window(box, FRAME_HW, pad) == window


def test_crop_window_rejects_negative_pad() -> None:
    with pytest.raises(ValueError, match="pad"):
        crop_window((0, 0, 1, 1), FRAME_HW, -0.1)


def test_select_parents_best_first_counts_skipped() -> None:
    d = dets([[0, 0, 20, 20], [0, 0, 5, 30], [0, 0, 30, 30], [0, 0, 40, 40], [0, 0, 50, 50]],
             [0.5, 0.9, 0.6, 0.7, 0.95], [1, 1, 2, 1, 1])
    sel = select_parents(d, {1}, min_side_px=8, max_crops=2)
    assert sel.parents.tolist() == [4, 3]  # class 1, short side >= 8, by score; 0 over the limit
    assert (sel.too_small, sel.over_limit) == (1, 1)
    with pytest.raises(ValueError, match="max_crops"):
        select_parents(d, {1}, min_side_px=8, max_crops=0)
