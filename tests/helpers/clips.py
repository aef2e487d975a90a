"""Small H.264 clips written by the tests themselves (PyAV, libx264): nothing is downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt


def write_h264(path: Path, frames_rgb: Sequence[npt.NDArray[np.uint8]], *, rate: int = 25,
               stream_options: dict[str, str] | None = None, container_options: dict[str, str] | None = None,
               display_rotation: int | None = None) -> Path:
    """Encode ``(H, W, 3)`` uint8 RGB frames (all one size) into ``path``, frame ``i`` at PTS ``i / rate``.

    Args:
        path: the output (its suffix picks the container).
        frames_rgb: the frames.
        rate: frames per second.
        stream_options: libx264 options (``{"crf": "12"}``).
        container_options: muxer options (``{"movflags": "faststart"}``: the MP4 index first).
        display_rotation: a display matrix turning the frames by this many degrees,
            counter-clockwise (PyAV's ``set_display_rotation``); None: no matrix.

    Returns:
        ``path``.
    """
    h, w = frames_rgb[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream("libx264", rate=rate, options=stream_options or {})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if display_rotation is not None:
            s.set_display_rotation(display_rotation)
        for i, img in enumerate(frames_rgb):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path
