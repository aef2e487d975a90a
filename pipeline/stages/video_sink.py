"""Annotated-video sink: frames with their detections drawn, encoded as H.264 through PyAV.

Each file is written under a temporary name (``.<stem>.partial<suffix>``) and finished at ``path``
when its source ends or the sink closes. The temporary file survives a crash: MP4 and MOV are written
fragmented (a fragment per keyframe, a keyframe every :data:`KEYFRAME_INTERVAL_S`), so a killed
process loses at most the last couple of seconds; Matroska is readable as it is. A clean finish
remuxes the fragmented file (stream copy, no re-encoding) into a regular MP4/MOV, and a restarted
sink (``resume=True``) keeps the partial files a crash left as finished segments. From :meth:`VideoSink.open`
to its close, the sink holds a lock beside ``path`` (:class:`~pipeline.stages.sink_base._OutputLock`): a
second run naming the same file is refused at start-up, before it touches anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pipeline.stages.base import say, show_life
from pipeline.stages.sink_base import FrameResult, OutputInUseError, Sink, _AtomicFile, _OutputLock
from streamdet.messages import EndOfStream

if TYPE_CHECKING:
    import av

__all__ = ["CONTAINERS", "KEYFRAME_INTERVAL_S", "MAX_PTS_GAP_S", "PTS_TIME_BASE", "VIDEO_CODEC", "VIDEO_OPTIONS",
           "VideoSink", "check_video_path"]

VIDEO_CODEC = "libx264"
VIDEO_OPTIONS = {"preset": "veryfast", "crf": "23"}
"""H.264 encoder settings of the annotated-video sink (speed over size: it shares the CPU)."""

KEYFRAME_INTERVAL_S = 2.0
"""Longest time between keyframes (so between MP4 fragments) of a fragmented file: what a crash loses."""

FRAGMENTED_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}
"""Muxer options of the temporary MP4/MOV: a fragment per keyframe, each written out when complete."""

PTS_TIME_BASE = Fraction(1, 90000)
"""Time base of the annotated video's frames: each frame is shown for as long as the source shows it
(variable frame rates kept), at the container's own precision (Matroska: milliseconds). AVI, a
constant-rate container, counts in frames of the source's nominal rate instead."""

MAX_PTS_GAP_S = 10.0
"""A source's frames further apart than this (a camera's outage), or going back (a reconnect, a
looped file), are one frame apart in the annotated video, at the source's nominal rate."""


def _even(n: int) -> int:
    """The largest even size up to ``n``, at least 2 (yuv420p: a 1-pixel side is scaled to 2)."""
    return max(2, n - n % 2)


CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".avi": "avi"}
"""The annotated video's container (FFmpeg format name) by the output file's suffix."""


def check_video_path(path: str | os.PathLike[str]) -> Path:
    """The output path of the annotated video, if its suffix names a container the sink writes.

    Raises:
        ValueError: naming the path and the suffixes accepted (``.txt`` made the postprocess stage
            fail at the first frame with FFmpeg's ``Could not determine output format``).
    """
    p = Path(path)
    if p.suffix.lower() not in CONTAINERS:
        *most, last = CONTAINERS
        raise ValueError(f"{str(path)!r}: expected a video file ending in {', '.join(most)} or {last} "
                         f"(the container comes from the suffix), got {p.suffix or 'no suffix'}")
    return p


def _container_format(path: Path) -> str | None:
    return CONTAINERS.get(path.suffix.lower())


def _fragmented(path: Path) -> bool:
    return _container_format(path) in ("mp4", "mov")


def _whole_fragments_end(path: Path) -> int:
    """Length of the prefix of a fragmented MP4 that is whole boxes ending with a whole fragment.

    Returns:
        The end of the last complete ``moof`` + ``mdat`` pair (the end of ``moov`` if there is none),
        or 0 if the file has no complete ``moov``.
    """
    size = path.stat().st_size
    keep, pos, moov, moof = 0, 0, False, False
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            n, kind = struct.unpack(">I4s", head[:8])
            if n == 1:
                if len(head) < 16:
                    break
                n = struct.unpack(">Q", head[8:16])[0]
            elif n == 0:
                n = size - pos
            if n < 8 or pos + n > size:
                break
            pos += n
            if kind == b"moov":
                moov, moof, keep = True, False, pos
            elif kind == b"moof":
                moof = True
            elif kind == b"mdat" and moov and moof:
                moof, keep = False, pos
    return keep


def _remux(src: Path, dst: Path) -> int:
    """Copy the video packets of ``src`` into a regular file at ``dst`` (no re-encoding).

    Written under ``.<stem>.remux<suffix>`` and renamed to ``dst``; nothing is written when ``src``
    holds no packet. Timestamps are shifted so the first frame is at 0 (a fragmented file starts at
    the encoder's reordering delay, a directly written one at 0 with an edit list).

    Returns:
        The number of packets (frames) copied; a demuxing error ends the copy early.

    Raises:
        OSError: if ``dst`` cannot be written.
        av.FFmpegError: if ``src`` cannot be opened.
    """
    import av

    work = dst.with_name(f".{dst.stem}.remux{dst.suffix}")
    work.unlink(missing_ok=True)
    n = 0
    shift: int | None = None
    with av.open(str(src)) as inp:
        s_in = inp.streams.video[0]
        try:
            with av.open(str(work), mode="w", format=_container_format(dst)) as out:
                s_out = out.add_stream_from_template(s_in)
                for packet in _packets_until_cut(inp.demux(s_in)):
                    if packet.dts is None or packet.pts is None or packet.is_corrupt:
                        continue
                    if shift is None:  # the first frame at 0, as a directly written file has it
                        shift = packet.pts
                    packet.pts -= shift
                    packet.dts -= shift
                    packet.stream = s_out
                    out.mux(packet)
                    n += 1
                    if n % 512 == 0:  # (a long video: the runner must not take the stage as hung)
                        show_life()
            if n and _count_packets(work) != n:  # (FFmpeg does not always report a failed write)
                raise OSError(errno.EIO, f"the copy of {n} frames could not be read back in full", str(dst))
        except BaseException:  # (no room for the copy, say: no half-written file left behind)
            work.unlink(missing_ok=True)
            raise
    if n == 0:
        work.unlink(missing_ok=True)
    else:
        os.replace(work, dst)
    return n


def _packets_until_cut(packets: Iterator[av.Packet]) -> Iterator[av.Packet]:
    """``packets`` until the first demuxing error (a cut-off end: what came before is kept)."""
    import av

    with contextlib.suppress(av.FFmpegError):
        yield from packets


def _count_packets(path: Path) -> int:
    """Video packets (frames) in ``path`` that demux before any error (0 if it cannot be opened)."""
    import av

    n = 0
    try:
        with av.open(str(path)) as c:
            for i, packet in enumerate(c.demux(c.streams.video[0])):
                n += packet.size > 0
                if i % 512 == 511:
                    show_life()
    except (av.FFmpegError, IndexError):
        pass
    return n


class _VideoOut:
    """One source's video file: encoder, muxer, temporary file."""

    def __init__(self, path: Path, fps: float, frame_hw: tuple[int, int]) -> None:
        import av

        self.file = _AtomicFile(path)
        self.fragmented = _fragmented(path)
        self.container = av.open(str(self.file.tmp), mode="w", format=_container_format(path),
                                 options=dict(FRAGMENTED_OPTIONS) if self.fragmented else {})
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        options = dict(VIDEO_OPTIONS)
        if self.fragmented:
            options["g"] = str(max(1, round(KEYFRAME_INTERVAL_S * float(rate))))
        stream = self.container.add_stream(VIDEO_CODEC, rate=rate, options=options)
        assert isinstance(stream, av.VideoStream)
        self.time_base = PTS_TIME_BASE if _container_format(path) != "avi" else 1 / rate  # (AVI: constant rate)
        stream.codec_context.time_base = self.time_base
        h, w = frame_hw
        stream.width, stream.height = _even(w), _even(h)  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        self.stream: av.VideoStream = stream
        self.frames = 0
        self._frame_ticks = max(1, round(1 / (rate * self.time_base)))
        self._pts = -1  # the last frame's, in ``time_base``
        self._pts_s = 0.0  # the last frame's source PTS, seconds

    def _next_pts(self, pts_s: float) -> int:
        """The frame's PTS: the source's spacing of frames kept, a jump back or beyond MAX_PTS_GAP_S one frame long."""
        step = pts_s - self._pts_s
        ticks = round(step / self.time_base) if self._pts >= 0 and 0 < step <= MAX_PTS_GAP_S else self._frame_ticks
        self._pts = 0 if self._pts < 0 else self._pts + max(1, ticks)
        self._pts_s = pts_s
        return self._pts

    def write(self, image_rgb: npt.NDArray[np.uint8], pts_s: float) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(image_rgb, format="rgb24")
        frame.pts = self._next_pts(pts_s)
        frame.time_base = self.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def abandon(self) -> None:
        """Flush the encoder and close the file, leaving it under its temporary name (never raises)."""
        with contextlib.suppress(Exception):
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        with contextlib.suppress(Exception):
            self.container.close()

    def close(self) -> None:
        """Flush the encoder and finish the file at its path (a fragmented one remuxed into a regular one)."""
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        if not self.fragmented:
            self.file.commit()
            return
        tmp = self.file.tmp
        try:
            copied = _remux(tmp, self.file.path)
            tmp.unlink()
        except OSError:  # no room for the regular copy: the fragmented file plays as it is
            if (end := _whole_fragments_end(tmp)) < tmp.stat().st_size:
                os.truncate(tmp, end)  # (a last fragment cut short by a full disk)
            copied = _count_packets(tmp)
            tmp.unlink() if copied == 0 else self.file.commit()
        if copied < self.frames:  # (FFmpeg does not always report a failed write)
            raise OSError(errno.EIO, f"{copied} of its {self.frames} frames could be read back", str(self.file.path))


class VideoSink(Sink):
    """Writes annotated frames (boxes, labels, masks, class maps drawn with OpenCV) as H.264 video through PyAV.

    One file per source: ``path`` for the first source of ``fps_by_source`` (without any: the first
    to send a frame), ``<stem>-<source_id><suffix>`` for the others. Files are written under a
    temporary name and finished at their path when the source ends or the sink closes; MP4/MOV are
    written fragmented and remuxed into a regular file then, so the temporary file of a killed process
    plays up to its last keyframe (at most :data:`KEYFRAME_INTERVAL_S` before the crash).

    Args:
        path: the output video file (container from its suffix: ``.mp4``, ``.mkv``, ``.mov``...).
        fps_by_source: each source's frame rate (0: unknown, 25 is used), in the sources' order.
        class_names: names by class id for the labels.
        class_names_by_source: per-source names (sources served by another model), overriding
            ``class_names``.
        resume: after a crash, keep each temporary file left behind as a finished segment
            ``<stem>-seg<k><suffix>`` (k = 1, 2...: the first free number; MP4/MOV remuxed up to
            their last whole fragment) before new frames start a new temporary file.
    """

    needs_pixels = True

    def __init__(self, *, path: str | os.PathLike[str], fps_by_source: Mapping[str, float],
                 class_names: Sequence[str], class_names_by_source: Mapping[str, Sequence[str]] | None = None,
                 resume: bool = False) -> None:
        self.path = Path(path)
        self.fps_by_source = dict(fps_by_source)
        self.class_names = tuple(class_names)
        self.class_names_by_source = {k: tuple(v) for k, v in (class_names_by_source or {}).items()}
        self.resume = resume
        self.frames_not_written = 0
        self._outs: dict[str, _VideoOut] = {}
        self._done: list[tuple[Path, int]] = []
        self._broken: dict[str, tuple[Path, str]] = {}  # source id -> its file, what went wrong
        self._lock = _OutputLock(self.path)  # held from open() to close() or abandon()

    def describe(self) -> str:
        """``video <path> (N frames)`` per file (segments kept after a crash first), and frames not written."""
        parts = [f"{p} ({n} frames)" for p, n in self._done + [(o.file.path, o.frames) for o in self._outs.values()]]
        lost = f", {self.frames_not_written} frames not written" if self.frames_not_written else ""
        return "video " + (", ".join(parts) if parts else f"{self.path} (no frames)") + lost

    def _break(self, sid: str, path: Path, e: Exception) -> None:
        """A file that cannot be written (a full disk, a failed remux): its frames are dropped from here on.

        The run goes on (the detections are published and in the JSONL already); :meth:`close`
        keeps what can be read back of the file and fails the stage's finish with the reason.
        """
        out = self._outs.pop(sid, None)
        if out is not None:
            out.abandon()
        problem = f"{path}: cannot write ({getattr(e, 'strerror', None) or e})"
        self._broken[sid] = (path, problem)
        say(f"warning: {problem}; the annotated frames of source {sid} are not written from here on")

    def open(self) -> None:
        """Check the output can be written (files come with the first frame); resume: keep crash leftovers.

        With ``resume``, each temporary file a crash left is kept as a segment (see the class).
        The temporary file of ``path`` is created and removed again, so that an output that cannot
        be written fails here, before the run starts, and not at the first frame (where the frame
        is already published and the annotated one would be lost with each restart).

        Raises:
            ValueError: if the suffix names no container the sink writes (:func:`check_video_path`).
            OutputInUseError: if another sink (another run) holds the lock of ``path``: nothing is touched.
            OSError: naming ``path``, if the directory or the file cannot be created (or ``path``
                is a directory), or a segment cannot be written.
        """
        check_video_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.taking():
            self._open()

    def _open(self) -> None:
        if self.resume:
            paths = dict.fromkeys([self.path] + [self._source_path(sid) for sid in self.fps_by_source])
            for path in paths:
                if _AtomicFile(path).tmp.exists():
                    self._keep_segment(path)
        target = _AtomicFile(self.path)
        target.check_target()
        try:
            target.tmp.touch()
            target.tmp.unlink()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def _keep_segment(self, path: Path) -> None:
        """Turn the temporary file of ``path`` left by a crash into ``<stem>-seg<k><suffix>``."""
        import av

        tmp = _AtomicFile(path).tmp
        k = 1
        while (seg := path.with_name(f"{path.stem}-seg{k}{path.suffix}")).exists():
            k += 1
        if not _fragmented(path):
            os.replace(tmp, seg)
            self._done.append((seg, _count_packets(seg)))
            return
        end = _whole_fragments_end(tmp)
        if end < tmp.stat().st_size:
            os.truncate(tmp, end)  # a fragment cut off by the crash
        try:
            frames = _remux(tmp, seg)
        except av.FFmpegError:  # unreadable header: nothing was written before the crash
            frames = 0
        tmp.unlink()
        if frames:
            self._done.append((seg, frames))

    def _source_path(self, source_id: str) -> Path:
        return self.path.with_name(f"{self.path.stem}-{source_id}{self.path.suffix}")

    def _path_for(self, source_id: str) -> Path:
        first = next(iter(self.fps_by_source), None)
        if first is None:  # sources unknown: the first to send a frame gets the plain name
            taken = {o.file.path for o in self._outs.values()} | {p for p, _ in self._done}
            return self._source_path(source_id) if self.path in taken else self.path
        return self.path if source_id == first else self._source_path(source_id)

    def write(self, result: FrameResult) -> None:
        """Draw and encode the frame."""
        from pipeline.annotate import annotate_result

        if result.pixels is None:
            return
        import av

        sid = result.record.frame.source_id
        if sid in self._broken:
            self.frames_not_written += 1
            return
        out = self._outs.get(sid)
        image = result.pixels if result.pixels.flags.writeable else result.pixels.copy()
        annotate_result(image, result.detections, self.class_names_by_source.get(sid, self.class_names),
                        result.children)
        path = out.file.path if out is not None else self._path_for(sid)
        try:
            if out is None:
                out = self._outs[sid] = _VideoOut(path, self.fps_by_source.get(sid, 0.0), result.record.frame.frame_hw)
            out.write(image, result.record.frame.pts_s)
        except (OSError, av.FFmpegError) as e:
            self._break(sid, path, e)
            self.frames_not_written += 1

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Finish the source's file."""
        self._finish(eos.source_id)

    def _finish(self, sid: str) -> None:
        import av

        out = self._outs.pop(sid, None)
        if out is not None:
            try:
                out.close()
                self._done.append((out.file.path, out.frames))
            except (OSError, av.FFmpegError) as e:
                self._break(sid, out.file.path, e)

    def close(self) -> None:
        """Finish every open file; keep what can be read back of those that could not be written.

        Raises:
            OSError: naming each file that could not be written and why (the others are finished).
        """
        try:
            self._close()
        finally:
            self._lock.release(remove=True)

    def _close(self) -> None:
        for sid in list(self._outs):
            self._finish(sid)
        problems = []
        for path, problem in self._broken.values():
            with contextlib.suppress(Exception):  # (what could be written; nothing on a full disk)
                if _AtomicFile(path).tmp.exists():
                    self._keep_segment(path)
            problems.append(problem)
        self._broken.clear()
        if problems:
            raise OSError("; ".join(problems))

    def abandon(self) -> None:
        """Close every open file under its temporary name: a restarted sink keeps each as a segment."""
        for out in self._outs.values():
            out.abandon()
        self._outs.clear()
        self._lock.release()

    def finish_left(self) -> bool:
        """Keep the temporary files a dead sink left as finished segments (as a restarted sink does).

        For the runner when the postprocess stage is not started again.

        Returns:
            Whether there was a file to keep (then :meth:`describe` names the segments); False for
            files another run holds the lock of (they are its own, being written).

        Raises:
            OSError: if a segment cannot be written.
        """
        self.resume = True
        try:
            self.open()
        except OutputInUseError:
            return False
        self._lock.release(remove=True)
        return bool(self._done)
