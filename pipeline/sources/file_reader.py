"""Decoding a file source into RGB24 frames, keeping every frame that decodes.

A truncated or corrupt file keeps every frame that decodes; the problem is handed to the caller
(the decode stage reports it to the runner as ``source_error`` and the EOS carries it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.sources.ffmpeg import MAX_CONSECUTIVE_DECODE_ERRORS, SWSCALE_THREADS, ffmpeg_problem, open_input, to_rgb24
from pipeline.sources.options import DecodeThreads, decoder_thread_count
from pipeline.sources.probe import SourceInfo
from pipeline.sources.truncation import MATROSKA_FORMATS, matroska_declared_size
from streamdet.orientation import upright_hw


def file_frames(source: SourceInfo, *, threads: DecodeThreads, on_error: Callable[[str], None],
                skip: int = 0) -> Iterator[tuple[npt.NDArray[np.uint8] | None, float, float]]:
    """Decode a probed file source once, from its first frame to its last.

    Frames are turned upright as their display matrix says (:mod:`streamdet.orientation`); those
    whose upright size differs from the probed ``frame_hw`` are rescaled to it (the frame slots
    keep their size). A frame without a timestamp gets ``index / fps``.

    Args:
        source: the probed file source (its ``hwaccel`` says how to decode it).
        threads: decoder threading.
        on_error: called with the problem (one line, credentials redacted) when the file cannot be
            opened, a read fails, too many packets in a row fail to decode (iteration ends), or, at
            the end, when packets were corrupt or failed to decode.
        skip: the first ``skip`` frames are decoded but not converted; they are yielded with
            ``rgb`` None (a restarted decoder resuming after the frames already published).

    Yields:
        ``(rgb, pts_s, decode_ms)``: the upright frame, ``(H, W, 3)`` uint8 RGB, possibly a
        non-contiguous view (None for a skipped
        frame); its presentation time, seconds; the time spent reading, decoding and converting
        it, milliseconds.
    """
    import av

    t0 = time.perf_counter()
    hw = source.hwaccel
    try:
        container = open_input(source.url, hwaccel=hw, timeout=10.0)
    except (av.FFmpegError, RuntimeError) as e:
        on = f" with {hw.setting}" if hw.enabled else ""
        on_error(f"cannot open{on} ({ffmpeg_problem(e)})")
        return
    try:
        stream = container.streams.video[0]
        if hw.enabled and not stream.codec_context.is_hwaccel:  # the probe passed: never decode in software
            on_error(f"{hw.setting}: no hardware decoder for codec {stream.codec_context.name!r}")
            return
        stream.codec_context.thread_type = threads.value
        stream.codec_context.thread_count = decoder_thread_count()
        fallback_dt = 1.0 / source.fps if source.fps > 0 else 0.0
        corrupt = failed = consecutive = 0
        index = 0
        pts_s = 0.0
        read_error = ""
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as e:
                read_error = f"read error ({ffmpeg_problem(e)})"
                on_error(read_error)
                packet = None
            if packet is not None and packet.is_corrupt:
                corrupt += 1
            try:
                frames = stream.codec_context.decode(packet)
            except av.FFmpegError as e:
                failed += 1
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_DECODE_ERRORS:
                    on_error(f"{failed} packets failed to decode ({ffmpeg_problem(e)})")
                    return
                continue
            consecutive = 0
            for frame in frames:
                if index < skip:
                    pts_s = float(frame.time) if frame.time is not None else index * fallback_dt
                    index += 1
                    yield None, pts_s, 0.0
                    t0 = time.perf_counter()
                    continue
                rgb = _slot_rgb(frame, source.frame_hw)
                pts_s = float(frame.time) if frame.time is not None else index * fallback_dt
                index += 1
                yield rgb, pts_s, (time.perf_counter() - t0) * 1000.0
                t0 = time.perf_counter()
            if packet is None:
                break
        if (corrupt or failed) and index and not hw.enabled and threads in (DecodeThreads.AUTO, DecodeThreads.FRAME):
            for rgb, tail_pts_s in _tail_frames(source, after_pts_s=pts_s):
                index += 1
                yield rgb if index > skip else None, tail_pts_s, 0.0
        if not read_error and (corrupt or failed):
            what = [f"{corrupt} corrupt packets"] if corrupt else []
            what += [f"{failed} packets failed to decode"] if failed else []
            on_error("truncated or corrupt (" + ", ".join(what) + ")")
        elif not read_error and (cut := _cut_short(source.url, container.format.name)):
            on_error(cut)
        elif not read_error and index == 0:
            on_error("no frame decoded (the video stream holds none)")
    finally:
        container.close()


def _slot_rgb(frame: Any, frame_hw: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """A decoded frame as upright RGB of the probed ``frame_hw`` (a size change mid-stream is rescaled).

    The frame slots keep their size, so a frame of another size is scaled to it before the turn.
    """
    rotation = frame.rotation  # (read before a reformat, which may not carry the display matrix)
    if upright_hw((frame.height, frame.width), rotation) != frame_hw:
        ch, cw = upright_hw(frame_hw, rotation)  # the coded size that turns into frame_hw
        frame = frame.reformat(width=cw, height=ch, threads=SWSCALE_THREADS)
    return to_rgb24(frame, rotation)


def _tail_frames(source: SourceInfo, *, after_pts_s: float) -> Iterator[tuple[npt.NDArray[np.uint8], float]]:
    """The frames after ``after_pts_s`` that a single-threaded decoder still gets out of a damaged file.

    FFmpeg's frame-threaded H.264 decoder drops the frames it holds in its threads when a packet
    fails (the last, partial packet of a cut MP4: 2 of 55 frames on 2 cores, as OpenCV's reader
    loses them too); decoded again in one thread from the keyframe before, they come out. Only
    the tail is recovered; a frame that does not decode at all stays lost.
    """
    import av

    try:
        container = av.open(source.url, mode="r", timeout=10.0)
    except (av.FFmpegError, OSError):
        return
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = DecodeThreads.NONE.value
        if stream.time_base:
            container.seek(int(after_pts_s / stream.time_base), stream=stream, backward=True, any_frame=False)
        for packet in container.demux(stream):
            try:
                frames = stream.codec_context.decode(packet)
            except av.FFmpegError:
                continue
            for frame in frames:
                if frame.time is None or frame.time <= after_pts_s + 1e-9:
                    continue
                yield _slot_rgb(frame, source.frame_hw), float(frame.time)
    except av.FFmpegError:
        return
    finally:
        container.close()


def _cut_short(url: str, format_name: str) -> str:
    """The problem of a local file shorter than its header declares, or "" (see :mod:`pipeline.sources.truncation`)."""
    if format_name not in MATROSKA_FORMATS or not os.path.isfile(url):
        return ""
    try:
        declared, size = matroska_declared_size(url), os.path.getsize(url)
    except OSError:
        return ""
    return f"truncated (the file has {size} of the {declared} bytes its header declares)" \
        if declared is not None and size < declared else ""

