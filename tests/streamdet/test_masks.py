"""Instance masks and COCO RLE against brute-force sampling and pycocotools."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from streamdet.letterbox import letterbox_params
from streamdet.masks import (
    box_pixel_window,
    class_map_to_rles,
    encode_rle,
    mask_logits,
    masks_to_rle,
    prototype_masks_to_frame,
    prototype_masks_to_rle,
    rle_to_masks,
    rles_to_class_map,
    window_to_rle,
)
from tests.streamdet.mask_reference import make_protos, reference_frame_mask

IN_WH = (64, 32)
FRAME_HW = (48, 128)
LB = letterbox_params(FRAME_HW, IN_WH)  # scale 0.5, resized 64x24, pad (0, 4)


def pycoco_rle(mask: np.ndarray) -> dict:
    """pycocotools' RLE of one (H, W) mask, counts decoded to str."""
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def pycoco_decode(rle: dict) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


# ---------------------------------------------------------------- mask logits and frame masks


def test_mask_logits_is_the_coefficient_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    coeffs = rng.standard_normal((5, 3)).astype(np.float32)
    protos = rng.standard_normal((3, 4, 6)).astype(np.float32)
    got = mask_logits(coeffs, protos)
    want = np.array([sum(float(coeffs[k, j]) * protos[j].astype(np.float64) for j in range(3)) for k in range(5)])
    assert got.shape == (5, 4, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert mask_logits(np.zeros((0, 3), np.float32), protos).shape == (0, 4, 6)


@pytest.mark.parametrize("coeffs, protos, match", [
    (np.zeros((2, 3)), np.zeros((3, 4)), "expected protos of shape \\(nm, mh, mw\\)"),
    (np.zeros((2, 2)), np.zeros((3, 4, 4)), "expected coeffs of shape \\(K, 3\\)"),
    (np.zeros(3), np.zeros((3, 4, 4)), "expected coeffs of shape \\(K, 3\\)"),
])
def test_mask_logits_rejects_bad_shapes(coeffs, protos, match) -> None:
    with pytest.raises(ValueError, match=match):
        mask_logits(coeffs, protos)


def ref_window(box: tuple[float, ...], frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Brute force: the bounding window of the pixels whose centres lie in the box (half-open)."""
    fh, fw = frame_hw
    x1, y1, x2, y2 = box
    xs = [x for x in range(fw) if x1 <= x + 0.5 < x2]
    ys = [y for y in range(fh) if y1 <= y + 0.5 < y2]
    if not xs or not ys:
        return None  # type: ignore[return-value]
    return xs[0], ys[0], xs[-1] + 1, ys[-1] + 1


@pytest.mark.parametrize("box", [
    (0.0, 0.0, 10.0, 8.0),
    (0.5, 0.5, 1.5, 1.5),  # exactly one pixel centre, on the lower edges (inclusive)
    (0.4, 0.4, 0.5, 0.5),  # upper edge on a centre: exclusive, empty
    (0.6, 0.6, 1.4, 1.4),  # between centres: empty
    (-5.0, -5.0, 3.2, 2.7),  # clipped at the top left
    (7.7, 5.1, 50.0, 50.0),  # clipped at the bottom right
    (20.0, 1.0, 30.0, 4.0),  # wholly outside
    (3.0, 3.0, 2.0, 2.0),  # inverted: empty
])
def test_box_pixel_window_matches_bruteforce(box: tuple[float, ...]) -> None:
    frame_hw = (6, 10)
    x0, y0, x1, y1 = box_pixel_window(box, frame_hw)
    assert 0 <= x0 <= x1 <= frame_hw[1] and 0 <= y0 <= y1 <= frame_hw[0]
    want = ref_window(box, frame_hw)
    if want is None:
        assert x1 == x0 or y1 == y0
    else:
        assert (x0, y0, x1, y1) == want


@pytest.mark.parametrize("coeffs, box", [
    ((1.0, 0.0), (0.0, 0.0, 128.0, 48.0)),
    ((1.0, 0.0), (0.0, 0.0, 40.0, 48.0)),  # cuts the block: nothing right of x = 40
    ((0.0, 1.0), (3.3, 5.7, 111.2, 40.4)),  # ramp: zero crossing mid-map, fractional box
    ((0.5, 0.5), (10.0, 8.0, 50.0, 40.0)),
])
def test_prototype_masks_match_bruteforce(coeffs: tuple[float, float], box: tuple[float, ...]) -> None:
    protos = make_protos()
    logits = mask_logits(np.asarray([coeffs], np.float32), protos)
    got = prototype_masks_to_frame(logits, np.asarray([box], np.float32), LB, 0.5)[0]
    want = reference_frame_mask(logits[0], box, LB)
    assert got.shape == FRAME_HW and got.dtype == bool
    # cv2 quantises sample positions to 1/32 px; allow a handful of pixels right at the zero crossing
    assert int((got != want).sum()) <= 0.002 * want.size
    if coeffs == (1.0, 0.0):
        assert (got == want).all()  # crossings fall between pixel centres here: exact


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9])
def test_prototype_mask_threshold_is_on_the_sigmoid(threshold: float) -> None:
    protos = make_protos()
    logits = mask_logits(np.asarray([[0.0, 1.0]], np.float32), protos)  # the ramp
    box = (0.0, 0.0, 128.0, 48.0)
    got = prototype_masks_to_frame(logits, np.asarray([box], np.float32), LB, threshold)[0]
    want = reference_frame_mask(logits[0], box, LB, thr_logit=math.log(threshold / (1 - threshold)))
    assert int((got != want).sum()) <= 0.002 * want.size
    assert want.any() and not want.all()  # the threshold cuts the ramp inside the frame


def test_segment_block_lands_where_expected() -> None:
    # proto rows 2..5, cols 4..11 -> input rows 8..23, cols 16..47 -> frame rows 8..39, cols 32..95
    protos = make_protos()
    logits = mask_logits(np.asarray([[1.0, 0.0]], np.float32), protos)
    m = prototype_masks_to_frame(logits, np.asarray([[0, 0, 128, 48]], np.float32), LB)[0]
    ys, xs = np.nonzero(m)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (8, 39, 32, 95)


@pytest.mark.parametrize("boxes, thr, match", [
    (np.zeros((2, 4)), 0.5, "expected boxes_xyxy of shape \\(1, 4\\)"),
    (np.zeros((1, 4)), 0.0, "expected mask_threshold in \\(0, 1\\)"),
    (np.zeros((1, 4)), 1.0, "expected mask_threshold in \\(0, 1\\)"),
])
def test_prototype_masks_reject_bad_inputs(boxes, thr, match) -> None:
    logits = np.zeros((1, 8, 16), np.float32)
    for fn in (prototype_masks_to_frame, prototype_masks_to_rle):
        with pytest.raises(ValueError, match=match):
            fn(logits, boxes, LB, thr)
    with pytest.raises(ValueError, match="expected logits of shape \\(K, mh, mw\\)"):
        prototype_masks_to_frame(np.zeros((8, 16), np.float32), boxes, LB, 0.5)


def test_prototype_masks_to_rle_equals_frame_masks() -> None:
    protos = make_protos()
    coeffs = np.asarray([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 1.0]], np.float32)
    boxes = np.asarray([(0, 0, 128, 48), (3.3, 5.7, 111.2, 40.4), (200, 0, 300, 10), (10, 8, 50, 40)], np.float32)
    logits = mask_logits(coeffs, protos)
    assert prototype_masks_to_rle(logits, boxes, LB) == masks_to_rle(prototype_masks_to_frame(logits, boxes, LB))


# ---------------------------------------------------------------- RLE


def _corner(h: int, w: int, y: int, x: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y, x] = 1
    return m


RLE_EDGE_MASKS = {
    "empty": np.zeros((5, 7), np.uint8),
    "full": np.ones((5, 7), np.uint8),
    "1x1 on": np.ones((1, 1), np.uint8),
    "1x1 off": np.zeros((1, 1), np.uint8),
    "first pixel": _corner(5, 7, 0, 0),  # the RLE starts with an empty run of zeros
    "last pixel": _corner(5, 7, 4, 6),
    "top right": _corner(5, 7, 0, 6),
    "bottom left": _corner(5, 7, 4, 0),
    "one column": np.pad(np.ones((5, 1), np.uint8), ((0, 0), (3, 3))),
    "one row": np.pad(np.ones((1, 7), np.uint8), ((2, 2), (0, 0))),
    "stripes": np.tile(np.asarray([[0, 1]], np.uint8), (4, 9))[:, :17],
    "zero rows": np.zeros((0, 4), np.uint8),
    "zero cols": np.zeros((4, 0), np.uint8),
    "long run": np.ones((300, 400), np.uint8),  # counts past the 5-bit LEB chunks
}


@pytest.mark.parametrize("mask", list(RLE_EDGE_MASKS.values()), ids=list(RLE_EDGE_MASKS))
def test_encode_rle_equals_pycocotools(mask: np.ndarray) -> None:
    got = encode_rle(mask)
    assert got == pycoco_rle(mask)
    assert isinstance(got["counts"], str) and got["size"] == list(mask.shape)
    assert encode_rle(mask.astype(bool)) == got  # bool masks give the same RLE
    json.dumps(got)
    if mask.size:
        np.testing.assert_array_equal(pycoco_decode(got), mask)


def test_encode_rle_random_masks_equal_pycocotools() -> None:
    rng = np.random.default_rng(5)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = (rng.random((h, w)) < rng.choice([0.02, 0.5, 0.98])).astype(np.uint8)
        assert encode_rle(m) == pycoco_rle(m)


@pytest.mark.parametrize("shape", [(3,), (1, 3, 3), ()])
def test_encode_rle_rejects_non_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected a mask of shape \\(H, W\\)"):
        encode_rle(np.zeros(shape, np.uint8))


def test_rle_round_trip_and_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((4, 37, 53)) > 0.6
    masks[2] = False
    rles = masks_to_rle(masks)
    json.dumps(rles)  # JSON-ready
    for m, r in zip(masks, rles, strict=True):
        direct = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert r["counts"] == direct["counts"].decode("ascii") and r["size"] == [37, 53]
        assert mask_utils.area(direct) == m.sum()
        assert encode_rle(m) == r
    back = rle_to_masks(rles)
    assert back.dtype == np.uint8 and back.shape == masks.shape
    np.testing.assert_array_equal(back, masks.astype(np.uint8))
    assert masks_to_rle(np.zeros((0, 5, 5), bool)) == []
    bytes_rles = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    np.testing.assert_array_equal(rle_to_masks(bytes_rles), back)
    with pytest.raises(ValueError, match="one size"):
        rle_to_masks([rles[0], masks_to_rle(np.ones((1, 3, 3), bool))[0]])


@pytest.mark.parametrize("bad, match", [
    ([{"size": [2, 2]}], "expected an RLE dict with size and counts"),
    (["not a dict"], "expected an RLE dict with size and counts"),
    ([{"size": [2, 2], "counts": [0, 4]}], "expected compressed RLE counts"),
])
def test_rle_to_masks_rejects_malformed(bad: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rle_to_masks(bad)


def test_rle_helpers_on_empty_input() -> None:
    assert rle_to_masks([]).shape == (0, 0, 0)
    assert rles_to_class_map([]).shape == (0, 0)
    assert class_map_to_rles(np.zeros((0, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="expected masks of shape \\(N, H, W\\)"):
        masks_to_rle(np.zeros((3, 3), bool))


def test_window_to_rle_equals_full_frame_rle() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        fh, fw = (int(v) for v in rng.integers(1, 30, 2))
        bh, bw = int(rng.integers(0, fh + 1)), int(rng.integers(0, fw + 1))
        y0, x0 = int(rng.integers(0, fh - bh + 1)), int(rng.integers(0, fw - bw + 1))
        win = rng.random((bh, bw)) > rng.choice([0.0, 0.5, 1.0])
        full = np.zeros((fh, fw), bool)
        full[y0 : y0 + bh, x0 : x0 + bw] = win
        assert window_to_rle(win, x0, y0, (fh, fw)) == pycoco_rle(full)
    with pytest.raises(ValueError, match="inside"):
        window_to_rle(np.ones((2, 2), bool), 3, 0, (4, 4))
    with pytest.raises(ValueError, match="expected a \\(bh, bw\\) window"):
        window_to_rle(np.ones(4, bool), 0, 0, (4, 4))


# ---------------------------------------------------------------- semantic class maps


def test_class_map_rles_round_trip_and_match_pycocotools() -> None:
    rng = np.random.default_rng(2)
    cm = rng.choice(np.asarray([0, 3, 7, 255], np.uint8), (23, 31), p=[0.5, 0.3, 0.15, 0.05])
    pairs = class_map_to_rles(cm)
    assert [k for k, _ in pairs] == [0, 3, 7, 255]
    for k, r in pairs:
        assert r == pycoco_rle(cm == k)
    np.testing.assert_array_equal(rles_to_class_map(pairs), cm)
    np.testing.assert_array_equal(rles_to_class_map(pairs[1:], background=9), np.where(cm == 0, 9, cm))


def test_class_maps_later_mask_wins_and_bad_ids() -> None:
    a = {"size": [2, 2], "counts": pycoco_rle(np.ones((2, 2), np.uint8))["counts"]}
    b = pycoco_rle(np.asarray([[1, 0], [0, 0]], np.uint8))
    np.testing.assert_array_equal(rles_to_class_map([(1, a), (2, b)]), [[2, 1], [1, 1]])
    with pytest.raises(ValueError, match="expected class ids in 0..255"):
        rles_to_class_map([(256, a)])
    with pytest.raises(ValueError, match="expected an \\(H, W\\) uint8 class map"):
        class_map_to_rles(np.zeros((2, 2), np.int32))
