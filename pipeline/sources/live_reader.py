"""The live reader thread: opens a live stream, decodes it and keeps only the newest frame.

A :class:`LiveReader` opens the stream (RTSP over TCP by default, FFmpeg open/read timeouts) and
puts each decoded frame into a one-frame :class:`Mailbox` that keeps only the newest frame (an
untaken frame it replaces is counted as dropped). The decode stage's thread
(:class:`pipeline.stages.decode.DecodeStage`) watches it as a watchdog and never waits on PyAV:
it abandons a reader (:attr:`LiveReader.cancel`) and starts a new one to reconnect.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pipeline.sources.ffmpeg import MAX_CONSECUTIVE_DECODE_ERRORS, ffmpeg_problem, open_input
from pipeline.sources.options import (
    HWACCEL_FALLBACK_SETTING,
    DecodeThreads,
    HWAccelOptions,
    LiveOptions,
    decoder_thread_count,
)


class LiveOutcome(Enum):
    """How following a live stream ended (what the stage does next)."""

    STOPPED = "stopped"  # input closed (stop signal)
    MAX_FRAMES = "max_frames"
    LOST = "lost"  # connection failed, dropped, ended or stalled: reconnect
    REFUSED = "refused"  # the server answered with a refusal (auth, not found): error status, reconnect
    FATAL = "fatal"  # no video stream, frames larger than the pool: give the source up


@dataclass(frozen=True)
class LiveFrame:
    """A decoded live frame as the reader hands it over.

    Attributes:
        frame: the ``av.VideoFrame``.
        pts_s: presentation time, seconds (0 if the stream has none).
        capture_mono: ``time.monotonic()`` at receipt, seconds.
        decode_ms: time spent decoding it, milliseconds.
    """

    frame: Any  # av.VideoFrame
    pts_s: float
    capture_mono: float
    decode_ms: float


class Mailbox:
    """Holds only the newest frame: putting over an untaken one drops it (counted in :attr:`dropped`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: LiveFrame | None = None
        self.dropped = 0

    @property
    def empty(self) -> bool:
        """Whether no frame is waiting."""
        return self._item is None

    def put(self, item: LiveFrame) -> None:
        """Leave ``item`` for the taker, replacing (and counting as dropped) a frame not yet taken."""
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify()

    def take(self, timeout_s: float) -> LiveFrame | None:
        """The waiting frame, waiting up to ``timeout_s`` seconds for one; None if none came."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            return item


_REFUSALS = ("HTTPClientError", "HTTPBadRequestError", "HTTPUnauthorizedError", "HTTPForbiddenError",
             "HTTPNotFoundError", "HTTPOtherClientError", "HTTPServerError", "InvalidDataError")


def _timed_out(e: Exception, waited_s: float, live: LiveOptions) -> bool:
    """Whether an open failed because nothing answered in time, not because the server refused.

    FFmpeg's RTSP client reports a server that accepts the connection and never replies as
    ``InvalidDataError`` once the open timeout has passed (measured: 2.01 s for 2 s), the same
    error as a reply it cannot parse: the time it took tells them apart.
    """
    return type(e).__name__ == "InvalidDataError" and waited_s >= 0.9 * _answer_timeout_s(live)


def _answer_timeout_s(live: LiveOptions) -> float:
    """How long an open waits for an answer: the open timeout, or the RTSP socket read timeout if shorter."""
    return min(live.open_timeout_s, live.read_timeout_s)


class LiveReader(threading.Thread):
    """Opens a live stream and decodes it into a :class:`Mailbox` (daemon thread; abandoned on cancel).

    PyAV calls can block for up to the open/read timeouts; the stage thread never waits on them:
    it watches :attr:`last_frame` and :attr:`done` and simply sets :attr:`cancel` and moves on.

    Args:
        url: the stream's URL.
        live: connection options (timeouts, RTSP transport).
        threads: decoder threading.
        hwaccel: hardware decoding (default: software).
    """

    def __init__(self, *, url: str, live: LiveOptions, threads: DecodeThreads,
                 hwaccel: HWAccelOptions | None = None) -> None:
        super().__init__(name="streamdet-live-reader", daemon=True)
        self.url = url
        self.live = live
        self.threads = threads
        self.hwaccel = hwaccel or HWAccelOptions()
        self.decoding = ""  # how the connected stream is decoded, for the ``connected`` status
        self.mailbox = Mailbox()
        self.cancel = threading.Event()
        self.connected = threading.Event()
        self.done = threading.Event()
        self.last_frame = 0.0
        self.frames = 0
        self.frame_hw = (0, 0)
        self.codec = ""
        self.outcome = LiveOutcome.LOST
        self.problem = ""

    def describe(self) -> str:
        """``codec WxH`` of the connected stream (and how it is decoded, with a hardware decoder asked for)."""
        shape = f"{self.codec} {self.frame_hw[1]}x{self.frame_hw[0]}".strip()
        return f"{shape}, {self.decoding}" if self.decoding else shape

    def run(self) -> None:
        """Open, demux and decode until cancelled, the stream ends or an error."""
        import av

        started = time.monotonic()
        try:
            self._read(av)
        except av.FFmpegError as e:
            refused = type(e).__name__ in _REFUSALS
            if refused and not self.connected.is_set() and _timed_out(e, time.monotonic() - started, self.live):
                self.outcome, self.problem = LiveOutcome.LOST, f"no answer within {_answer_timeout_s(self.live):g} s"
                return
            what = "refused" if refused else ("cannot connect" if not self.connected.is_set() else "read error")
            self.outcome = LiveOutcome.REFUSED if refused else LiveOutcome.LOST
            self.problem = f"{what} ({ffmpeg_problem(e)})"
        except Exception as e:  # anything else: reconnect, saying what happened
            self.outcome, self.problem = LiveOutcome.LOST, f"reader failed ({type(e).__name__}: {ffmpeg_problem(e)})"
        finally:
            self.done.set()

    def _open(self) -> Any:
        """Open the stream with the hardware decoder asked for; None (outcome set) if it cannot take it.

        The device was proved at start-up; a stream whose codec the hardware decoder does not take
        gives the source up (FATAL), or is reopened in software with ``fallback`` (said in
        :meth:`describe`). Network errors propagate (reconnect).
        """
        hw = self.hwaccel
        kwargs: dict[str, Any] = {"options": self.live.av_options(self.url),
                                  "timeout": (self.live.open_timeout_s, self.live.read_timeout_s)}
        problem = ""
        try:
            container = open_input(self.url, hwaccel=hw, **kwargs)
        except RuntimeError as e:  # PyAV: no stream of the input supports the hardware decoder
            container, problem = None, f"{hw.setting}: {e}"
        if container is not None and hw.enabled and container.streams.video \
                and not container.streams.video[0].codec_context.is_hwaccel:
            problem = f"{hw.setting}: no hardware decoder for codec {container.streams.video[0].codec_context.name!r}"
            container.close()
            container = None
        if not problem:
            self.decoding = f"{hw.mode.value} hardware decode" if hw.enabled else ""
            return container
        if not hw.fallback:
            self.outcome, self.problem = LiveOutcome.FATAL, f"{problem}; set decode.hwaccel=none, or " \
                                                            f"{HWACCEL_FALLBACK_SETTING}=true to decode in software"
            return None
        self.decoding = f"software decode ({problem}; {HWACCEL_FALLBACK_SETTING}=true)"
        return open_input(self.url, hwaccel=hw.software(), **kwargs)

    def _read(self, av: Any) -> None:
        container = self._open()
        if container is None:
            return
        try:
            if not container.streams.video:
                self.outcome, self.problem = LiveOutcome.FATAL, "no video stream"
                return
            stream = container.streams.video[0]
            stream.codec_context.thread_type = self.threads.value
            stream.codec_context.thread_count = decoder_thread_count()
            self.codec = stream.codec_context.name or ""
            self.frame_hw = (stream.codec_context.height, stream.codec_context.width)
            self.last_frame = time.monotonic()
            self.connected.set()
            consecutive = 0
            for packet in container.demux(stream):
                if self.cancel.is_set():
                    self.outcome, self.problem = LiveOutcome.LOST, "cancelled"
                    return
                t0 = time.perf_counter()
                try:
                    frames = stream.codec_context.decode(packet)
                except av.FFmpegError:
                    consecutive += 1
                    if consecutive >= MAX_CONSECUTIVE_DECODE_ERRORS:
                        self.outcome, self.problem = LiveOutcome.LOST, f"{consecutive} packets failed to decode"
                        return
                    continue
                consecutive = 0
                for frame in frames:
                    now = time.monotonic()
                    self.last_frame = now
                    self.frames += 1
                    pts_s = float(frame.time) if frame.time is not None else 0.0
                    self.mailbox.put(LiveFrame(frame, pts_s, now, (time.perf_counter() - t0) * 1000.0))
                    t0 = time.perf_counter()
            self.outcome, self.problem = LiveOutcome.LOST, "stream ended"
        finally:
            container.close()
