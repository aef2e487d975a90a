"""FFmpeg (PyAV) access shared by the probe and the readers: open an input with its decoder, errors as one line.

PyAV is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.sources.options import HWAccelOptions
from pipeline.transport import redact_url
from streamdet.orientation import upright

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MAX_CONSECUTIVE_DECODE_ERRORS = 25
"""A source whose packets fail to decode this many times in a row is given up."""

SWSCALE_THREADS = 1
"""Threads of FFmpeg's colour conversion (swscale) per frame.

PyAV's default, 0, lets swscale split every frame over as many threads as there are cores. A
source's decoder already runs beside the engine and the other sources, so here those threads only
add wake-ups: on the 2-core machine, converting H.264 frames to RGB24 with one thread cost 0.65
instead of 0.9-1.2 ms of CPU per frame (decode included) at 640x272, 1.85 instead of 2.1-2.9 ms at
1280x720, with about 9 context switches fewer per frame; the pixels are the same.
"""


def to_rgb24(frame: Any, rotation_deg: float | None = None) -> npt.NDArray[np.uint8]:
    """A decoded frame as upright RGB24 pixels, converted by swscale in one thread (:data:`SWSCALE_THREADS`).

    Args:
        frame: a PyAV ``VideoFrame`` in host memory, any pixel format.
        rotation_deg: the display matrix's angle to turn it by (:mod:`streamdet.orientation`);
            None: the frame's own (``frame.rotation``).

    Returns:
        uint8 array ``(H, W, 3)``, RGB (FFmpeg's colour matrix for the frame), turned upright: the
        frame's own size, or its width and height swapped for a quarter turn (then a
        non-contiguous view).
    """
    rgb: npt.NDArray[np.uint8] = frame.to_ndarray(format="rgb24", threads=SWSCALE_THREADS)
    return upright(rgb, frame.rotation if rotation_deg is None else rotation_deg)


def open_input(url: str, *, hwaccel: HWAccelOptions, **kwargs: Any) -> Any:
    """``av.open(url, mode="r", ...)`` with the source's hardware decoder attached.

    Args:
        url: path or URL.
        hwaccel: hardware decoding options (software: a plain ``av.open``).
        **kwargs: more ``av.open`` arguments (``timeout``, ``options``).

    Returns:
        The open ``av.container.InputContainer``.

    Raises:
        av.FFmpegError: if FFmpeg cannot open the input, or cannot create the hardware device.
        RuntimeError: (PyAV) hardware decoding asked for but no stream of the input supports it.
    """
    import av

    accel = hwaccel.av_hwaccel()
    if accel is None:
        return av.open(url, mode="r", **kwargs)
    return av.open(url, mode="r", hwaccel=accel, **kwargs)


def ffmpeg_problem(e: Exception) -> str:
    """An FFmpeg (or other) error as one line: its ``strerror`` if any, else its text; credentials redacted.

    Args:
        e: the exception (typically ``av.FFmpegError``).

    Returns:
        One line, whitespace collapsed, URLs redacted.
    """
    strerror = getattr(e, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(e)
    return redact_url(" ".join(text.split()))


def ffmpeg_log_detail(logs: list[tuple[int, str, str]]) -> str:
    """FFmpeg's error lines captured while opening (e.g. ``Cannot load libcuda.so.1``), joined on one line.

    Args:
        logs: ``(level, logger name, message)`` as ``av.logging.Capture`` collects them.

    Returns:
        The distinct messages, in order, whitespace collapsed, joined with ``"; "`` ("" if none).
    """
    seen: dict[str, None] = {}
    for _level, _name, message in logs:
        text = " ".join(message.split())
        if text:
            seen[text] = None
    return "; ".join(seen)
