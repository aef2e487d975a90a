"""Letterbox parameters, image and box mapping against ultralytics' formula and cv2 references."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamdet.constants import PAD_VALUE
from streamdet.letterbox import (
    LetterboxParams,
    boxes_frame_to_input,
    boxes_input_to_frame,
    letterbox,
    letterbox_params,
)


def ultralytics_letterbox(
    frame_hw: tuple[int, int], input_wh: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """ultralytics ``LetterBox`` (``auto=False``, ``center=True``, ``scaleup=True``), written out independently.

    Returns ``(resized_wh, (top, bottom, left, right))``.
    """
    h, w = frame_hw
    iw, ih = input_wh
    r = min(ih / h, iw / w)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    dw, dh = (iw - new_w) / 2, (ih - new_h) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    return (new_w, new_h), (top, bottom, left, right)


SIZES = [
    # (frame_hw, input_wh)
    ((48, 128), (64, 32)),  # the postprocess tests' fixture: scale 0.5, resized 64x24, pad (0, 4)
    ((720, 1280), (640, 640)),
    ((1080, 1920), (640, 384)),
    ((480, 640), (640, 640)),
    ((640, 480), (640, 640)),  # portrait: pad left and right
    ((640, 640), (640, 640)),  # exact fit: no pad, no resize
    ((100, 100), (640, 640)),  # upscaling
    ((333, 517), (320, 320)),  # odd pad split
    ((1, 1), (64, 32)),
    ((37, 1), (64, 32)),
    ((240, 320), (63, 47)),  # odd input size
]


@pytest.mark.parametrize("frame_hw, input_wh", SIZES)
def test_letterbox_params_match_ultralytics(frame_hw: tuple[int, int], input_wh: tuple[int, int]) -> None:
    p = letterbox_params(frame_hw, input_wh)
    resized_wh, (top, bottom, left, right) = ultralytics_letterbox(frame_hw, input_wh)
    assert p.frame_hw == frame_hw and p.input_wh == input_wh
    assert p.resized_wh == resized_wh
    assert p.pad_xy == (left, top)
    assert (left + resized_wh[0] + right, top + resized_wh[1] + bottom) == input_wh
    assert p.scale_xy == (resized_wh[0] / frame_hw[1], resized_wh[1] / frame_hw[0])


@pytest.mark.parametrize("frame_hw, input_wh, resized_wh, pad_xy", [
    ((1, 1000), (64, 64), (64, 1), (0, 31)),  # would round to 0 rows: at least 1
    ((1000, 1), (64, 64), (1, 64), (31, 0)),
    ((2, 2), (1, 1), (1, 1), (0, 0)),
])
def test_letterbox_params_extreme_aspect(frame_hw, input_wh, resized_wh, pad_xy) -> None:
    p = letterbox_params(frame_hw, input_wh)
    assert (p.resized_wh, p.pad_xy) == (resized_wh, pad_xy)


@pytest.mark.parametrize("frame_hw, input_wh", [((0, 10), (8, 8)), ((10, -1), (8, 8)), ((10, 10), (0, 8))])
def test_letterbox_params_rejects_non_positive(frame_hw, input_wh) -> None:
    with pytest.raises(ValueError, match="expected positive sizes"):
        letterbox_params(frame_hw, input_wh)


def cv2_letterbox(image: np.ndarray, input_wh: tuple[int, int], pad: int) -> np.ndarray:
    """Reference: cv2.resize to the ultralytics size, then cv2.copyMakeBorder."""
    resized_wh, (top, bottom, left, right) = ultralytics_letterbox(image.shape[:2], input_wh)
    img = image if resized_wh == (image.shape[1], image.shape[0]) else cv2.resize(
        image, resized_wh, interpolation=cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[:, :, None]
    out = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=[pad] * 4)
    return out.reshape(input_wh[1], input_wh[0], image.shape[2])


@pytest.mark.parametrize("frame_hw, input_wh", [s for s in SIZES if s[0][0] * s[0][1] <= 1920 * 1080])
@pytest.mark.parametrize("channels", [3, 1, 4])
def test_letterbox_image_matches_cv2(frame_hw: tuple[int, int], input_wh: tuple[int, int], channels: int) -> None:
    rng = np.random.default_rng(frame_hw[0] * 7 + channels)
    img = rng.integers(0, 256, (*frame_hw, channels), dtype=np.uint8)
    got, p = letterbox(img, input_wh, 77)
    assert got.shape == (input_wh[1], input_wh[0], channels) and got.dtype == np.uint8
    assert p == letterbox_params(frame_hw, input_wh)
    np.testing.assert_array_equal(got, cv2_letterbox(img, input_wh, 77))


def test_letterbox_default_pad_and_reused_buffer() -> None:
    img = np.full((48, 128, 3), 9, np.uint8)
    out = np.full((32, 64, 3), 255, np.uint8)  # stale content must be overwritten, pad included
    got, p = letterbox(img, (64, 32), out=out)
    assert got is out
    np.testing.assert_array_equal(got, cv2_letterbox(img, (64, 32), PAD_VALUE))
    assert p.pad_xy == (0, 4) and (got[:4] == PAD_VALUE).all() and (got[28:] == PAD_VALUE).all()


@pytest.mark.parametrize("image, out, match", [
    (np.zeros((4, 4), np.uint8), None, "expected \\(H, W, C\\) uint8 image"),
    (np.zeros((4, 4, 3), np.float32), None, "expected \\(H, W, C\\) uint8 image"),
    (np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), "expected out of shape \\(4, 8, 3\\)"),
    (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 8, 3), np.float32), "expected out of shape"),
])
def test_letterbox_rejects_bad_arrays(image, out, match) -> None:
    with pytest.raises(ValueError, match=match):
        letterbox(image, (8, 4), out=out)


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize("frame_hw, input_wh", SIZES)
def test_boxes_round_trip_and_reference(frame_hw: tuple[int, int], input_wh: tuple[int, int]) -> None:
    p = letterbox_params(frame_hw, input_wh)
    fh, fw = frame_hw
    rng = np.random.default_rng(fh + fw)
    xy = rng.uniform(0, 1, (50, 2)) * (fw, fh)
    wh = rng.uniform(0, 1, (50, 2)) * (np.asarray([fw, fh]) - xy)  # inside the frame
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    inp = boxes_frame_to_input(boxes, p)
    sx, sy = p.resized_wh[0] / fw, p.resized_wh[1] / fh
    px, py = p.pad_xy
    want = boxes.astype(np.float64) * (sx, sy, sx, sy) + (px, py, px, py)
    np.testing.assert_allclose(inp, want, rtol=1e-6, atol=1e-4)
    back = boxes_input_to_frame(inp, p)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)


def test_boxes_input_to_frame_clips_only_when_asked() -> None:
    p = letterbox_params((48, 128), (64, 32))  # scale 0.5, pad (0, 4)
    inp = np.asarray([[-2.0, 0.0, 70.0, 30.0], [10.0, 8.0, 20.0, 12.0]], np.float32)
    np.testing.assert_array_equal(boxes_input_to_frame(inp, p), [[0, 0, 128, 48], [20, 8, 40, 16]])
    np.testing.assert_array_equal(boxes_input_to_frame(inp, p, clip=False), [[-4, -8, 140, 52], [20, 8, 40, 16]])
    assert boxes_input_to_frame(np.zeros((0, 4), np.float32), p).shape == (0, 4)


# ---------------------------------------------------------------- LetterboxParams


def test_params_list_round_trip() -> None:
    p = letterbox_params((333, 517), (320, 320))
    assert p.to_list() == [333, 517, 320, 320, *p.resized_wh, *p.pad_xy]
    assert LetterboxParams.from_list(p.to_list()) == p
    assert LetterboxParams.from_list(tuple(float(v) for v in p.to_list())) == p  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 8 letterbox values, got 7"):
        LetterboxParams.from_list(p.to_list()[:7])


@pytest.mark.parametrize("args, match", [
    (((0, 10), (8, 8), (8, 8), (0, 0)), "expected positive frame_hw"),
    (((10, 10), (8, -8), (8, 8), (0, 0)), "expected positive input_wh"),
    (((10, 10), (8, 8), (0, 8), (0, 0)), "expected positive resized_wh"),
    (((10, 10), (8, 8), (8, 8), (-1, 0)), "expected non-negative pad_xy"),
    (((10, 10), (8, 8), (8, 6), (0, 3)), "expected resized_wh \\+ pad_xy inside input_wh"),
    (((10, 10), (8, 8), (6, 8), (3, 0)), "expected resized_wh \\+ pad_xy inside input_wh"),
])
def test_params_validation(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LetterboxParams(*args)
