"""Decode stage: one process per source; PyAV demux + decode, RGB24 frames into shared-memory slots.

The decoder preallocates its source's :class:`~pipeline.slotpool.SlotPool` (``slots`` frames of
the stream's size), converts each frame to RGB24 straight into a free slot and sends a
:class:`~pipeline.messages.FrameMsg` holding only the slot id. With no free slot it waits for a
credit: a file source is never dropped, a slow consumer slows the decoder. With ``tcp://``
transport the pixels travel inline instead.

A truncated or corrupt file keeps every frame that decodes; the problem is reported to the
runner (``source_error``) and the EOS carries it. Sources can be local files or anything FFmpeg
opens (URLs); URLs are only ever shown with credentials redacted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from pipeline.messages import INLINE_SLOT, CreditMsg, EndOfStream, EosReason, FrameMsg, StageName, StatusKind
from pipeline.slotpool import SlotCredits, SlotPool
from pipeline.stages.base import Stage, StageSpec, StatusReporter
from pipeline.transport import (
    POLL_MS,
    StageEndpoints,
    StageFlags,
    Stopped,
    close_socket,
    make_socket,
    redact_url,
    send_parts,
)

MAX_CONSECUTIVE_DECODE_ERRORS = 25
"""A source whose packets fail to decode this many times in a row is given up."""


class DecodeThreads(str, Enum):
    """FFmpeg decoder threading (``codec_context.thread_type``)."""

    AUTO = "AUTO"  # frame + slice threads where the codec supports them
    FRAME = "FRAME"
    SLICE = "SLICE"
    NONE = "NONE"


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
    """

    source_id: str
    url: str
    is_file: bool
    frame_hw: tuple[int, int]
    fps: float
    frames: int

    @property
    def display(self) -> str:
        """The source for messages and logs (credentials redacted)."""
        return redact_url(self.url)


class SourceError(Exception):
    """A source cannot be opened or is not a video; the message names it (redacted)."""


def probe_source(url: str, source_id: str) -> SourceInfo:
    """Open a source once to check it is a video and learn its size, rate and length.

    Args:
        url: path or URL.
        source_id: the id to give it.

    Returns:
        The :class:`SourceInfo`.

    Raises:
        SourceError: if it does not exist, cannot be opened, or has no video stream.
    """
    import av

    shown = redact_url(url)
    is_file = "://" not in url
    if is_file:
        p = Path(url)
        if not p.exists():
            raise SourceError(f"{shown}: no such file")
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
    except av.FFmpegError as e:
        raise SourceError(f"{shown}: not a readable video ({_ffmpeg_problem(e)})") from e
    return SourceInfo(source_id=source_id, url=url, is_file=is_file, frame_hw=(h, w), fps=fps, frames=frames)


def _ffmpeg_problem(e: Exception) -> str:
    strerror = getattr(e, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(e)
    return redact_url(" ".join(text.split()))


@dataclass(frozen=True, kw_only=True)
class DecodeSpec(StageSpec):
    """Builds a :class:`DecodeStage` in its process.

    Attributes:
        source: the probed source.
        pool: name of the frame pool to create.
        num_slots: frames in the pool.
        endpoints: the pipeline's endpoints.
        max_frames: stop after this many frames (None: all).
        loop: read a file source this many times in a row (soak tests).
        threads: decoder threading.
    """

    source: SourceInfo
    pool: str
    num_slots: int
    endpoints: StageEndpoints
    max_frames: int | None = None
    loop: int = 1
    threads: DecodeThreads = DecodeThreads.AUTO

    @property
    def stage_name(self) -> StageName:
        """:attr:`StageName.DECODE`."""
        return StageName.DECODE

    @property
    def source_id(self) -> str:
        """The decoded source's id."""
        return self.source.source_id

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> DecodeStage:
        """Bind the credit socket, connect the frame socket, create the pool and the stage."""
        ep = self.endpoints
        credits_in = make_socket(ctx, zmq.PULL, ep.credit_endpoint(self.pool), bind=True)
        frames_out = make_socket(ctx, zmq.PUSH, ep.frames, bind=False)
        pool = None
        if not ep.inline:
            h, w = self.source.frame_hw
            pool = SlotPool.create(name=self.pool, num_slots=self.num_slots, slot_bytes=h * w * 3)
        return DecodeStage(source=self.source, pool=pool, credits_in=credits_in, frames_out=frames_out,
                           status=status, flags=flags, max_frames=self.max_frames, loop=self.loop,
                           threads=self.threads)


class DecodeStage(Stage):
    """Decodes one source into frame slots.

    Args:
        source: the probed source.
        pool: the frame pool this stage owns, or None to send pixels inline.
        credits_in: PULL socket (bound) receiving :class:`CreditMsg` for the pool's slots.
        frames_out: PUSH socket to the preprocess stage.
        status: reports to the runner.
        flags: lifecycle flags.
        max_frames: stop after this many frames (None: all).
        loop: passes over a file source.
        threads: decoder threading.
    """

    name = StageName.DECODE

    def __init__(self, *, source: SourceInfo, pool: SlotPool | None, credits_in: zmq.Socket[Any],
                 frames_out: zmq.Socket[Any], status: StatusReporter, flags: StageFlags,
                 max_frames: int | None = None, loop: int = 1, threads: DecodeThreads = DecodeThreads.AUTO) -> None:
        self.source = source
        self.pool = pool
        self.credits_in = credits_in
        self.frames_out = frames_out
        self.status = status
        self.flags = flags
        self.max_frames = max_frames
        self.loop = max(1, loop) if source.is_file else 1
        self.threads = threads
        self.credits = SlotCredits(pool.num_slots) if pool is not None else None
        self.frames_sent = 0
        self._error = ""

    def start(self) -> None:
        """Nothing to acquire beyond what :meth:`DecodeSpec.build` made (the source opens on ``go``)."""

    def run(self) -> None:
        """Wait for ``go``, decode every frame (or until stopped), send EOS, wait for the slots."""
        while not self.flags.go.wait(POLL_MS / 1000):  # every stage must be ready before anything is sent
            if not self.flags.alive():
                raise Stopped()
        reason = self._decode_all()
        if self._error:
            self.status.send(StatusKind.SOURCE_ERROR, source_id=self.source.source_id,
                             message=f"{self.source.display}: {self._error} (kept {self.frames_sent} frames)")
        self._send_eos(reason)
        self._await_credits()

    def _decode_all(self) -> EosReason:
        pts_offset = 0.0
        for _ in range(self.loop):
            last_pts = None
            for frame_rgb, pts_s, decode_ms in self._frames():
                if not self.flags.input_open():
                    return EosReason.INTERRUPTED
                if not self._send_frame(frame_rgb, pts_s + pts_offset, decode_ms):
                    return EosReason.INTERRUPTED
                last_pts = pts_s
                if self.max_frames is not None and self.frames_sent >= self.max_frames:
                    return EosReason.MAX_FRAMES
            if self._error:
                return EosReason.ERROR
            if last_pts is None:
                break
            pts_offset += last_pts + (1.0 / self.source.fps if self.source.fps > 0 else 0.0)
        if not self.flags.input_open():
            return EosReason.INTERRUPTED
        return EosReason.FINISHED

    def _frames(self) -> Iterator[tuple[npt.NDArray[np.uint8], float, float]]:
        """Yield ``(rgb (H, W, 3) uint8, pts_s, decode_ms)``; records a problem in ``self._error``."""
        import av

        t0 = time.perf_counter()
        try:
            container = av.open(self.source.url, mode="r", timeout=10.0)
        except av.FFmpegError as e:
            self._error = f"cannot open ({_ffmpeg_problem(e)})"
            return
        try:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = self.threads.value
            h0, w0 = self.source.frame_hw
            fallback_dt = 1.0 / self.source.fps if self.source.fps > 0 else 0.0
            corrupt = failed = consecutive = 0
            index = 0
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.FFmpegError as e:
                    self._error = f"read error ({_ffmpeg_problem(e)})"
                    packet = None
                if packet is not None and packet.is_corrupt:
                    corrupt += 1
                try:
                    frames = stream.codec_context.decode(packet)
                except av.FFmpegError as e:
                    failed += 1
                    consecutive += 1
                    if consecutive >= MAX_CONSECUTIVE_DECODE_ERRORS:
                        self._error = f"{failed} packets failed to decode ({_ffmpeg_problem(e)})"
                        return
                    continue
                consecutive = 0
                for frame in frames:
                    if frame.height != h0 or frame.width != w0:  # size change mid-stream: keep the slot size
                        frame = frame.reformat(width=w0, height=h0)
                    rgb: npt.NDArray[np.uint8] = frame.to_ndarray(format="rgb24")  # type: ignore[assignment]
                    pts_s = float(frame.time) if frame.time is not None else index * fallback_dt
                    index += 1
                    yield rgb, pts_s, (time.perf_counter() - t0) * 1000.0
                    t0 = time.perf_counter()
                if packet is None:
                    break
            if not self._error and (corrupt or failed):
                what = [f"{corrupt} corrupt packets"] if corrupt else []
                what += [f"{failed} packets failed to decode"] if failed else []
                self._error = "truncated or corrupt (" + ", ".join(what) + ")"
        finally:
            container.close()

    def _send_frame(self, rgb: npt.NDArray[np.uint8], pts_s: float, decode_ms: float) -> bool:
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        if self.pool is None:
            msg = FrameMsg(self.source.source_id, self.frames_sent, pts_s, (h, w), INLINE_SLOT, "",
                           time.monotonic(), decode_ms)
            send_parts(self.frames_out, [msg.encode(), np.ascontiguousarray(rgb)], self.flags.alive)
        else:
            slot = self._acquire_slot()
            if slot is None:
                return False
            np.copyto(self.pool.view(slot, (h, w, 3)), rgb)
            ms = decode_ms + (time.perf_counter() - t0) * 1000.0
            msg = FrameMsg(self.source.source_id, self.frames_sent, pts_s, (h, w), slot, self.pool.name,
                           time.monotonic(), ms)
            send_parts(self.frames_out, [msg.encode()], self.flags.alive)
        self.frames_sent += 1
        return True

    def _drain_credits(self, timeout_ms: int) -> None:
        assert self.credits is not None
        while self.credits_in.poll(timeout_ms, zmq.POLLIN):
            credit = CreditMsg.decode(self.credits_in.recv())
            self.credits.release(credit.slot)
            timeout_ms = 0

    def _acquire_slot(self) -> int | None:
        """A free slot, waiting for credits; None if the input was closed meanwhile."""
        assert self.credits is not None
        self._drain_credits(0)
        slot = self.credits.acquire()
        while slot is None:
            if not self.flags.alive():
                raise Stopped()
            if not self.flags.input_open():
                return None
            self._drain_credits(POLL_MS)
            slot = self.credits.acquire()
        return slot

    def _send_eos(self, reason: EosReason) -> None:
        error = self._error or ("stopped" if reason is EosReason.ERROR else "")
        eos = EndOfStream(self.source.source_id, self.frames_sent, reason, error if reason is EosReason.ERROR else "")
        send_parts(self.frames_out, [eos.encode()], self.flags.alive)
        self.status.send(StatusKind.PROGRESS, source_id=self.source.source_id, decoded=self.frames_sent)

    def _await_credits(self) -> None:
        """Keep the pool alive until every slot is back (consumers may still be reading it)."""
        if self.credits is None:
            return
        while not self.credits.all_free:
            if not self.flags.alive():
                raise Stopped()
            self._drain_credits(POLL_MS)

    def stop(self) -> None:
        """Close the sockets and unlink the pool."""
        close_socket(self.frames_out, self.flags)
        self.credits_in.close(linger=0)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
