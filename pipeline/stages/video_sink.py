"""Annotated-video sink: frames with their detections drawn, encoded as H.264 through PyAV.

Each file is written under a temporary name (``.<stem>.partial<suffix>``) and finished at ``path``
when its source ends or the sink closes. The temporary file survives a crash: MP4 and MOV are written
fragmented (a fragment per keyframe, a keyframe every :data:`KEYFRAME_INTERVAL_S`), so a killed
process loses at most the last couple of seconds; Matroska is readable as it is. A clean finish
remuxes the fragmented file (stream copy, no re-encoding) into a regular MP4/MOV, and a restarted
sink (``resume=True``) keeps the partial files a crash left as finished segments.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pipeline.stages.sink_base import FrameResult, Sink, _AtomicFile
from streamdet.messages import EndOfStream

if TYPE_CHECKING:
    import av

__all__ = ["CONTAINERS", "KEYFRAME_INTERVAL_S", "VIDEO_CODEC", "VIDEO_OPTIONS", "VideoSink", "check_video_path"]

VIDEO_CODEC = "libx264"
VIDEO_OPTIONS = {"preset": "veryfast", "crf": "23"}
"""H.264 encoder settings of the annotated-video sink (speed over size: it shares the CPU)."""

KEYFRAME_INTERVAL_S = 2.0
"""Longest time between keyframes (so between MP4 fragments) of a fragmented file: what a crash loses."""

FRAGMENTED_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}
"""Muxer options of the temporary MP4/MOV: a fragment per keyframe, each written out when complete."""


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
        with av.open(str(work), mode="w", format=_container_format(dst)) as out:
            s_out = out.add_stream_from_template(s_in)
            try:
                for packet in inp.demux(s_in):
                    if packet.dts is None or packet.pts is None or packet.is_corrupt:
                        continue
                    if shift is None:  # the first frame at 0, as a directly written file has it
                        shift = packet.pts
                    packet.pts -= shift
                    packet.dts -= shift
                    packet.stream = s_out
                    out.mux(packet)
                    n += 1
            except av.FFmpegError:
                pass  # a cut-off end: keep what came before
    if n == 0:
        work.unlink(missing_ok=True)
    else:
        os.replace(work, dst)
    return n


def _count_packets(path: Path) -> int:
    """Video packets (frames) in ``path`` that demux before any error (0 if it cannot be opened)."""
    import av

    n = 0
    try:
        with av.open(str(path)) as c:
            for packet in c.demux(c.streams.video[0]):
                n += packet.size > 0
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
        h, w = frame_hw
        stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        self.stream: av.VideoStream = stream
        self.frames = 0

    def write(self, image_rgb: npt.NDArray[np.uint8]) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(image_rgb, format="rgb24")
        frame.pts = self.frames
        frame.time_base = self.stream.codec_context.time_base or Fraction(1, 25)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file at its path (a fragmented one remuxed into a regular one)."""
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        if not self.fragmented:
            self.file.commit()
        elif _remux(self.file.tmp, self.file.path) or self.frames == 0:
            self.file.tmp.unlink()
        else:
            raise OSError(f"{self.file.tmp}: no frame could be read back to finish {self.file.path}")


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
        self._outs: dict[str, _VideoOut] = {}
        self._done: list[tuple[Path, int]] = []

    def describe(self) -> str:
        """``video <path> (N frames)`` per file (segments kept after a crash first)."""
        parts = [f"{p} ({n} frames)" for p, n in self._done + [(o.file.path, o.frames) for o in self._outs.values()]]
        return "video " + (", ".join(parts) if parts else f"{self.path} (no frames)")

    def open(self) -> None:
        """Check the output can be written (files come with the first frame); resume: keep crash leftovers.

        With ``resume``, each temporary file a crash left is kept as a segment (see the class).
        The temporary file of ``path`` is created and removed again, so that an output that cannot
        be written fails here, before the run starts, and not at the first frame (where the frame
        is already published and the annotated one would be lost with each restart).

        Raises:
            ValueError: if the suffix names no container the sink writes (:func:`check_video_path`).
            OSError: naming ``path``, if the directory or the file cannot be created (or ``path``
                is a directory), or a segment cannot be written.
        """
        check_video_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        sid = result.record.frame.source_id
        out = self._outs.get(sid)
        if out is None:
            out = _VideoOut(self._path_for(sid), self.fps_by_source.get(sid, 0.0), result.record.frame.frame_hw)
            self._outs[sid] = out
        image = result.pixels if result.pixels.flags.writeable else result.pixels.copy()
        annotate_result(image, result.detections, self.class_names_by_source.get(sid, self.class_names),
                        result.children)
        out.write(image)

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Finish the source's file."""
        out = self._outs.pop(eos.source_id, None)
        if out is not None:
            out.close()
            self._done.append((out.file.path, out.frames))

    def close(self) -> None:
        """Finish every open file."""
        for sid in list(self._outs):
            out = self._outs.pop(sid)
            out.close()
            self._done.append((out.file.path, out.frames))
