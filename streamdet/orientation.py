"""A video frame turned upright, as its container's display matrix says it is shown.

Phones record portrait video as landscape frames plus a display matrix (an MP4 ``tkhd`` matrix,
Matroska ``ProjectionPoseRoll``) telling the player to turn them. FFmpeg's command line
(``-autorotate``, on by default) and OpenCV's ``VideoCapture`` (``CAP_PROP_ORIENTATION_AUTO``, on
by default with its FFmpeg backend, so ultralytics too) turn the frames before anyone sees them;
``cv2.imread`` likewise applies an image's EXIF orientation. streamdet does the same: a frame is
turned upright before it is letterboxed, written to the annotated video or used to calibrate, and
boxes are in the upright frame's pixels (``frame_hw`` is the upright size).

Only quarter turns are applied (as FFmpeg's ``-autorotate``); a mirrored or skewed matrix is
taken as its nearest quarter turn (PyAV reports the matrix's rotation angle only).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import numpy as np

_Image = TypeVar("_Image", bound=np.ndarray[Any, Any])


def quarter_turns(rotation_deg: float) -> int:
    """``np.rot90``'s ``k`` (0-3) that shows a frame as its display matrix says.

    Args:
        rotation_deg: PyAV's ``VideoFrame.rotation``: the display matrix's angle, degrees,
            counter-clockwise (FFmpeg's ``av_display_rotation_get``); 0 without a matrix.

    Returns:
        Counter-clockwise quarter turns, 0-3 (``-90`` -> 3: a quarter turn clockwise).
    """
    return int(round(rotation_deg / 90.0)) % 4


def upright_hw(frame_hw: tuple[int, int], rotation_deg: float) -> tuple[int, int]:
    """The ``(height, width)`` of a coded frame of ``frame_hw`` once turned upright."""
    h, w = frame_hw
    return (w, h) if quarter_turns(rotation_deg) % 2 else (h, w)


def upright(image: _Image, rotation_deg: float) -> _Image:
    """``image`` turned as its display matrix says (pixel for pixel what OpenCV's ``VideoCapture`` returns).

    Args:
        image: ``(H, W, C)`` or ``(H, W)`` pixels as decoded (the coded orientation).
        rotation_deg: PyAV's ``VideoFrame.rotation`` of the frame.

    Returns:
        ``image`` itself without a turn, else a view (not contiguous) of ``(W, H, ...)`` or
        ``(H, W, ...)`` for a half turn; copy it where contiguous pixels are needed.
    """
    k = quarter_turns(rotation_deg)
    return cast(_Image, np.rot90(image, k)) if k else image
