"""Quarter turns from a display matrix's angle, against ``np.rot90`` and OpenCV's rotation codes."""

import cv2
import numpy as np
import pytest

from streamdet.orientation import quarter_turns, upright, upright_hw

IMAGE = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)


@pytest.mark.parametrize(("rotation_deg", "k", "opencv"), [
    (0, 0, None),
    (90, 1, cv2.ROTATE_90_COUNTERCLOCKWISE),
    (-270, 1, cv2.ROTATE_90_COUNTERCLOCKWISE),
    (-90, 3, cv2.ROTATE_90_CLOCKWISE),
    (270, 3, cv2.ROTATE_90_CLOCKWISE),
    (180, 2, cv2.ROTATE_180),
    (-180, 2, cv2.ROTATE_180),
    (360, 0, None),
    (89.6, 1, cv2.ROTATE_90_COUNTERCLOCKWISE),  # a matrix a little off: its nearest quarter turn
    (44.0, 0, None),
])
def test_quarter_turns(rotation_deg, k, opencv):
    assert quarter_turns(rotation_deg) == k
    expected = IMAGE if opencv is None else cv2.rotate(IMAGE, opencv)
    got = upright(IMAGE, rotation_deg)
    np.testing.assert_array_equal(got, expected)
    assert upright_hw((2, 3), rotation_deg) == got.shape[:2]
    if k == 0:
        assert got is IMAGE  # no copy without a turn
