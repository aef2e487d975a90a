"""Probing sources at start-up: a file is opened once (size, rate, length); a live URL is only checked.

Sources can be local files or anything FFmpeg opens (URLs); URLs are only ever shown with
credentials redacted. With a hardware decoder asked for, the probe also proves it works for the
source (:func:`pipeline.sources.hwaccel.hwaccel_problem`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.sources.ffmpeg import ffmpeg_problem
from pipeline.sources.hwaccel import hwaccel_problem
from pipeline.sources.options import HWACCEL_FALLBACK_SETTING, HWAccelOptions
from pipeline.transport import redact_url
from streamdet.cli import relative_path_note
from streamdet.orientation import upright_hw

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp", "http", "https", "hls")
"""URL schemes accepted as live sources."""


class SourceError(Exception):
    """A source cannot be opened or is not a video; the message names it (redacted)."""


@dataclass(frozen=True)
class SourceInfo:
    """A source as the runner probed it.

    Attributes:
        source_id: topic-safe id (``detections.<source_id>``).
        url: file path or URL as given (may carry credentials: show :attr:`display` instead).
        is_file: whether it is a local file (finite; never dropped).
        frame_hw: ``(height, width)`` of the video stream, pixels.
        fps: average frame rate (frames per second), 0 if unknown.
        frames: frame count the container declares, 0 if unknown.
        max_fps: live sources: pass at most this many frames per second (None: all).
        hwaccel: how it is decoded (after the probe: software if the hardware decoder failed and
            ``fallback`` allowed it).
        warning: one line the runner prints at start-up ("" if none): the hardware decoder
            could not be used and the source falls back to software decode.

    A live (URL) source is not opened at start-up: its ``frame_hw`` is ``(0, 0)`` and ``fps`` 0
    until the decoder connects.
    """

    source_id: str
    url: str
    is_file: bool
    frame_hw: tuple[int, int]
    fps: float
    frames: int
    max_fps: float | None = None
    hwaccel: HWAccelOptions = HWAccelOptions()
    warning: str = ""

    @property
    def is_live(self) -> bool:
        """Whether it is a live source (a URL: reconnects, drops frames rather than queueing)."""
        return not self.is_file

    @property
    def display(self) -> str:
        """The source for messages and logs (credentials redacted)."""
        return redact_url(self.url)


def check_live_url(url: str) -> None:
    """Check that a live source URL is well formed (scheme, host, port); nothing is opened.

    Args:
        url: the URL.

    Raises:
        SourceError: naming the URL (credentials redacted) and the problem.
    """
    from urllib.parse import urlsplit

    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise SourceError(f"{shown}: malformed URL ({e})") from e
    scheme = parts.scheme.lower()
    if scheme not in LIVE_SCHEMES:
        raise SourceError(f"{shown}: malformed URL (expected a scheme in {', '.join(LIVE_SCHEMES)}, got {scheme!r})")
    if not parts.hostname or any(c.isspace() for c in url):
        raise SourceError(f"{shown}: malformed URL (expected {scheme}://HOST[:PORT]/PATH)")
    if port is not None and not 1 <= port <= 65535:
        raise SourceError(f"{shown}: malformed URL (port {port} outside 1..65535)")


def probe_source(url: str, source_id: str, *, max_fps: float | None = None,
                 hwaccel: HWAccelOptions | None = None) -> SourceInfo:
    """Open a file source once to check it is a video and learn its size, rate and length.

    A live source (a URL) is only checked for a well-formed URL: an unreachable camera must not
    fail the run (the decoder keeps reconnecting). With a hardware decoder asked for, it is tried
    too (:func:`hwaccel_problem`: the file's first frame, or for a URL the device alone).

    Args:
        url: path or URL.
        source_id: the id to give it.
        max_fps: live sources: frame-rate cap.
        hwaccel: hardware decoding (default: software).

    Returns:
        The :class:`SourceInfo`; its ``hwaccel`` is software and its ``warning`` says why if the
        hardware decoder failed and ``hwaccel.fallback`` is set.

    Raises:
        SourceError: if it does not exist, cannot be opened, or has no video stream (files), or a
            malformed URL, or the hardware decoder cannot be used for it (without ``fallback``).
    """
    info = _probe(url, source_id, max_fps=max_fps)
    hw = hwaccel or HWAccelOptions()
    if not hw.enabled:
        return info
    problem = hwaccel_problem(url if info.is_file else None, hw)
    if not problem:
        return replace(info, hwaccel=hw)
    if not hw.fallback:
        raise SourceError(f"{info.display}: {problem}; set decode.hwaccel=none, or {HWACCEL_FALLBACK_SETTING}=true "
                          "to decode in software")
    return replace(info, hwaccel=hw.software(),
                   warning=f"{info.display}: {problem}; decoding in software ({HWACCEL_FALLBACK_SETTING}=true)")


_SHOWN_PATH_MAX = 200
"""Longest file path an error line shows (a longer one is cut, ``…`` added)."""


def _probe(url: str, source_id: str, *, max_fps: float | None) -> SourceInfo:
    """:func:`probe_source` without the hardware decoder."""
    import av

    shown = redact_url(url)
    is_file = "://" not in url
    if not is_file:
        check_live_url(url)
        return SourceInfo(source_id=source_id, url=url, is_file=False, frame_hw=(0, 0), fps=0.0, frames=0,
                          max_fps=max_fps)
    if is_file:
        p = Path(url)
        shown = shown if len(shown) <= _SHOWN_PATH_MAX else shown[:_SHOWN_PATH_MAX] + "…"
        shown = shown.replace("\0", "\\0")
        try:
            if "\0" in url:  # (Path.exists says False: "no such file")
                raise ValueError("embedded null byte")
            exists = p.exists()
        except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SourceError(f"{shown}: not a readable path ({reason})") from e
        if not exists:
            raise SourceError(f"{shown}: no such file{relative_path_note(p)}")
        if not p.is_file():
            raise SourceError(f"{shown}: not a file")
        if not os.access(p, os.R_OK):
            raise SourceError(f"{shown}: permission denied")
    try:
        with av.open(url, mode="r", timeout=10.0) as container:
            if not container.streams.video:
                raise SourceError(f"{shown}: no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w <= 0 or h <= 0:
                raise SourceError(f"{shown}: video stream has no frame size")
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            frames = int(stream.frames or 0)
            h, w = upright_hw((h, w), _first_rotation(container, stream))
    except av.FFmpegError as e:
        raise SourceError(f"{shown}: not a readable video ({ffmpeg_problem(e)})") from e
    return SourceInfo(source_id=source_id, url=url, is_file=is_file, frame_hw=(h, w), fps=fps, frames=frames)


def _first_rotation(container: Any, stream: Any) -> float:
    """The display matrix angle of the stream's first frame (:mod:`streamdet.orientation`), 0 if none decodes.

    PyAV exposes the matrix on decoded frames only. A first frame that does not decode is left to
    the decoder to report; its frames are then taken as they are coded.
    """
    import av

    try:
        for frame in container.decode(stream):
            return float(frame.rotation)
    except (av.FFmpegError, ValueError):
        pass
    return 0.0
