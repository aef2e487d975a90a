"""Decode stage: one process per source; PyAV demux + decode, RGB24 frames into shared-memory slots.

The decoder preallocates its source's :class:`~pipeline.slotpool.SlotPool` (``slots`` frames of
the stream's size), converts each frame to RGB24 straight into a free slot and sends a
:class:`~streamdet.messages.FrameMsg` holding only the slot id. With no free slot it waits for a
credit: a file source is never dropped, a slow consumer slows the decoder. With ``tcp://``
transport the pixels travel inline instead.

A truncated or corrupt file keeps every frame that decodes; the problem is reported to the
runner (``source_error``) and the EOS carries it. Sources can be local files or anything FFmpeg
opens (URLs); URLs are only ever shown with credentials redacted.

Live sources (any URL: ``rtsp://`` cameras, ...) run differently:

* a reader thread opens the stream (RTSP over TCP by default, FFmpeg open/read timeouts) and
  puts each decoded frame into a one-frame mailbox that keeps only the newest frame; the stage
  thread takes a frame only once it holds a free slot, so while downstream is busy older frames
  are dropped (counted) instead of queueing: latency stays bounded (``live_slots`` frames in
  flight at most);
* the stage thread is a watchdog: no frame for ``stall_timeout_s`` (or no connection within
  ``open_timeout_s``) counts as a lost stream; the reader is abandoned and a new one connects
  after an exponential backoff with jitter, forever unless ``reconnect_max_attempts`` is set.
  A stop signal is seen within :data:`~pipeline.transport.POLL_MS` whatever the reader is doing;
* state changes (:class:`~streamdet.messages.SourceState`) and counters go to the postprocess
  stage as :class:`~streamdet.messages.SourceStatusMsg` on the events socket, which publishes them
  as ``status.<source_id>``;
* the frame pool is created at the first frame (the size is unknown before the camera answers);
  a later stream of a different size is accepted if it fits the slots, else the source fails with
  an ``error`` status.

Hardware decoding (``decode.hwaccel: cuda``, :class:`HWAccelOptions`) hands the bitstream to NVDEC
through FFmpeg's hwaccel in PyAV. PyAV downloads each decoded surface to host memory (NV12) as it
leaves the decoder, and the RGB24 conversion and the slot copy run on the CPU as in software
decode, so nothing downstream changes. The start-up probe proves NVDEC works for each source (file:
its first frame decodes on the device; URL: a CUDA device opens) or fails naming the source;
software decode is used instead only when ``decode.hwaccel_fallback`` asks for it, with a warning.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from pipeline.slotpool import SlotCredits, SlotPool
from pipeline.stages.base import Stage, StageSpec, StatusReporter
from pipeline.transport import (
    CONTROL_HWM,
    POLL_MS,
    StageEndpoints,
    StageFlags,
    Stopped,
    close_socket,
    make_socket,
    redact_url,
    send_parts,
)
from streamdet.messages import (
    INLINE_SLOT,
    CreditMsg,
    EndOfStream,
    EosReason,
    FrameMsg,
    SourceState,
    SourceStatusMsg,
    StageName,
    StatusKind,
)

MAX_CONSECUTIVE_DECODE_ERRORS = 25
"""A source whose packets fail to decode this many times in a row is given up."""

COUNTERS_EVERY_S = 1.0
"""How often a live decoder sends its counters (drops, frames received) to the postprocess stage."""

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp", "http", "https", "hls")
"""URL schemes accepted as live sources."""


class RtspTransport(str, Enum):
    """Lower transport of RTSP (FFmpeg ``rtsp_transport``)."""

    TCP = "tcp"  # interleaved in the RTSP connection: no loss, passes NAT and firewalls
    UDP = "udp"


@dataclass(frozen=True, kw_only=True)
class LiveOptions:
    """How live sources connect and reconnect.

    Attributes:
        rtsp_transport: RTSP lower transport.
        open_timeout_s: longest wait to connect, seconds.
        read_timeout_s: longest wait for data once connected (FFmpeg I/O timeout), seconds.
        stall_timeout_s: no frame for this long counts as a lost stream, seconds.
        reconnect_initial_s: first reconnection delay, seconds (doubled each failed attempt).
        reconnect_max_s: longest reconnection delay, seconds.
        reconnect_max_attempts: give up after this many failed attempts in a row (None: never).
    """

    rtsp_transport: RtspTransport = RtspTransport.TCP
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    stall_timeout_s: float = 5.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    reconnect_max_attempts: int | None = None

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "read_timeout_s", "stall_timeout_s", "reconnect_initial_s", "reconnect_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)!r}")
        if self.reconnect_max_attempts is not None and self.reconnect_max_attempts < 1:
            raise ValueError(f"expected reconnect_max_attempts >= 1 or None, got {self.reconnect_max_attempts!r}")

    def av_options(self, url: str) -> dict[str, str]:
        """FFmpeg options for opening ``url`` (RTSP transport and socket timeout in microseconds)."""
        if url.lower().startswith(("rtsp://", "rtsps://")):
            return {"rtsp_transport": self.rtsp_transport.value, "timeout": str(int(self.read_timeout_s * 1e6))}
        return {}


def reconnect_delay(attempt: int, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before reconnection attempt ``attempt``: exponential backoff with jitter.

    ``min(max_s, initial_s * 2 ** (attempt - 1))`` times a uniform factor in ``[0.75, 1.25]``
    (so consecutive delays still grow by at least 1.2x until the cap), as in the "exponential
    backoff and jitter" scheme (AWS Architecture Blog, 2015).

    Args:
        attempt: 1 for the first reconnection.
        initial_s: first delay, seconds.
        max_s: cap, seconds.
        rng: random source (default: the module's).

    Returns:
        Seconds to wait.

    Raises:
        ValueError: if ``attempt < 1``.
    """
    if attempt < 1:
        raise ValueError(f"expected attempt >= 1, got {attempt}")
    base = min(max_s, initial_s * 2.0 ** min(attempt - 1, 60))
    return base * (rng or random).uniform(0.75, 1.25)


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


class DecodeThreads(str, Enum):
    """FFmpeg decoder threading (``codec_context.thread_type``)."""

    AUTO = "AUTO"  # frame + slice threads where the codec supports them
    FRAME = "FRAME"
    SLICE = "SLICE"
    NONE = "NONE"


class HWAccelMode(str, Enum):
    """Hardware video decoding through FFmpeg's hwaccel (PyAV ``HWAccel``)."""

    NONE = "none"  # software decode on the CPU (FFmpeg's native decoders)
    CUDA = "cuda"  # NVDEC on an NVIDIA GPU; frames are downloaded to host memory as they leave the decoder


HWACCEL_FALLBACK_SETTING = "decode.hwaccel_fallback"
"""The setting that allows software decode when the hardware decoder cannot be used."""

HWACCEL_PROBE_PACKETS = 64
"""The start-up probe gives up finding a first frame on the hardware decoder after this many packets."""


@dataclass(frozen=True, kw_only=True)
class HWAccelOptions:
    """Hardware decoding of a source.

    Attributes:
        mode: :attr:`HWAccelMode.NONE` (software) or a hardware decoder.
        device: GPU index for the hardware decoder (CUDA ordinal).
        fallback: decode in software, with a warning, when the hardware decoder cannot be used for a
            source (default: fail naming the source).
    """

    mode: HWAccelMode = HWAccelMode.NONE
    device: int = 0
    fallback: bool = False

    def __post_init__(self) -> None:
        if self.device < 0:
            raise ValueError(f"expected device >= 0, got {self.device!r}")

    @property
    def enabled(self) -> bool:
        """Whether a hardware decoder is asked for."""
        return self.mode is not HWAccelMode.NONE

    @property
    def setting(self) -> str:
        """The settings as a user writes them: ``decode.hwaccel=cuda`` (and the device if not 0)."""
        return f"decode.hwaccel={self.mode.value}" + (f", decode.hwaccel_device={self.device}" if self.device else "")

    def software(self) -> HWAccelOptions:
        """The same options with hardware decoding off."""
        return HWAccelOptions(device=self.device, fallback=self.fallback)

    def av_hwaccel(self) -> Any:
        """The ``av.codec.hwaccel.HWAccel`` for ``av.open(..., hwaccel=...)``, or None for software decode.

        PyAV's own software fallback is always off: a stream the hardware decoder cannot take must
        fail (or be reopened in software by the caller, which says so), never switch silently.
        """
        if not self.enabled:
            return None
        from av.codec.hwaccel import HWAccel

        return HWAccel(device_type=self.mode.value, device=str(self.device), allow_software_fallback=False)


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


def _ffmpeg_log_detail(logs: list[tuple[int, str, str]]) -> str:
    """FFmpeg's error lines captured while opening (e.g. ``Cannot load libcuda.so.1``), joined on one line."""
    seen: dict[str, None] = {}
    for _level, _name, message in logs:
        text = " ".join(message.split())
        if text:
            seen[text] = None
    return "; ".join(seen)


def hwaccel_problem(url: str | None, hwaccel: HWAccelOptions) -> str:
    """Check that the hardware decoder works here (and for ``url``, if given); nothing is kept open.

    Without ``url`` only the device is checked (a CUDA context for NVDEC, as H.264 decode would
    make it): used for live sources, which are not opened at start-up. With ``url`` the file is
    opened with the hardware decoder, its video stream must be one the decoder supports, and its
    first frame must decode on the device.

    Args:
        url: a file to try, or None.
        hwaccel: the options (:attr:`HWAccelOptions.enabled`).

    Returns:
        "" if it works, else the problem (one line; credentials redacted), naming the setting.
    """
    import av
    import av.logging
    from av.codec.hwaccel import hwdevices_available

    what = f"hardware decode ({hwaccel.setting}) unavailable"
    if hwaccel.mode.value not in hwdevices_available():
        return f"{what}: this PyAV's FFmpeg has no {hwaccel.mode.value} support"
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # keeps FFmpeg's reason (e.g. "Cannot load libcuda.so.1") for the message
    error = ""
    try:
        with av.logging.Capture() as logs:
            try:
                problem = _try_hwaccel(av, url, hwaccel)
            except (av.FFmpegError, RuntimeError, NotImplementedError) as e:
                problem, error = f"cannot create a {hwaccel.mode.value.upper()} device", _ffmpeg_problem(e)
    finally:
        av.logging.set_level(previous)
    if not problem:
        return ""
    detail = redact_url(_ffmpeg_log_detail(logs))
    if detail and detail not in problem:
        problem = f"{problem}: {detail}"
    if error:
        problem = f"{problem} ({error})"
    return f"{what}: {problem}"


def _try_hwaccel(av: Any, url: str | None, hwaccel: HWAccelOptions) -> str:
    """The problem of :func:`hwaccel_problem` ("" if none); FFmpeg errors propagate."""
    if url is None:
        accel = hwaccel.av_hwaccel()
        try:
            accel.create(av.Codec("h264", "r"))  # makes (and frees) the device context NVDEC would use
        except NotImplementedError:
            return f"this PyAV's FFmpeg has no {hwaccel.mode.value} H.264 decoder"
        return ""
    with open_input(url, hwaccel=hwaccel, timeout=10.0) as container:
        stream = container.streams.video[0]
        if not stream.codec_context.is_hwaccel:
            return f"no {hwaccel.mode.value} hardware decoder for codec {stream.codec_context.name!r}"
        for k, packet in enumerate(container.demux(stream)):
            try:
                if stream.codec_context.decode(packet):
                    return ""
            except av.FFmpegError as e:
                return f"the first frame does not decode on the device ({_ffmpeg_problem(e)})"
            if k >= HWACCEL_PROBE_PACKETS:
                break
        return f"no frame decoded on the device from the first {HWACCEL_PROBE_PACKETS} packets"


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


class SourceError(Exception):
    """A source cannot be opened or is not a video; the message names it (redacted)."""


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
        live: live-source options.
    """

    source: SourceInfo
    pool: str
    num_slots: int
    endpoints: StageEndpoints
    max_frames: int | None = None
    loop: int = 1
    threads: DecodeThreads = DecodeThreads.AUTO
    live: LiveOptions = LiveOptions()

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
        if not ep.inline and self.source.is_file:  # a live source's pool is made at its first frame
            h, w = self.source.frame_hw
            pool = SlotPool.create(name=self.pool, num_slots=self.num_slots, slot_bytes=h * w * 3)
        events_out = None
        if self.source.is_live and ep.events:
            events_out = make_socket(ctx, zmq.PUSH, ep.events, bind=False, hwm=CONTROL_HWM)
        return DecodeStage(source=self.source, pool=pool, credits_in=credits_in, frames_out=frames_out,
                           status=status, flags=flags, max_frames=self.max_frames, loop=self.loop,
                           threads=self.threads, live=self.live, events_out=events_out,
                           pool_name="" if ep.inline else self.pool, num_slots=self.num_slots)


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
        live: live-source options.
        events_out: PUSH socket for :class:`SourceStatusMsg` (live sources; None: not sent).
        pool_name: name of the pool to create at the first frame of a live source ("" : inline).
        num_slots: slots of that pool.
    """

    name = StageName.DECODE

    def __init__(self, *, source: SourceInfo, pool: SlotPool | None, credits_in: zmq.Socket[Any],
                 frames_out: zmq.Socket[Any], status: StatusReporter, flags: StageFlags,
                 max_frames: int | None = None, loop: int = 1, threads: DecodeThreads = DecodeThreads.AUTO,
                 live: LiveOptions | None = None, events_out: zmq.Socket[Any] | None = None,
                 pool_name: str = "", num_slots: int = 0) -> None:
        self.source = source
        self.pool = pool
        self.live = live or LiveOptions()
        self.events_out = events_out
        self.pool_name = pool_name
        self.num_slots = num_slots
        self.dropped = 0
        self.skipped = 0
        self.received = 0
        self.state = SourceState.CONNECTING
        self.attempt = 0
        self._next_counters = 0.0
        self._received_before = 0
        self._reader: _LiveReader | None = None
        self._first_hw = source.frame_hw
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
        reason = self._decode_live() if self.source.is_live else self._decode_all()
        if self._error:
            self.status.send(StatusKind.SOURCE_ERROR, source_id=self.source.source_id,
                             message=f"{self.source.display}: {self._error} (kept {self.frames_sent} frames)")
        if self.source.is_live:
            self._event(SourceState.EOS, message=reason.value if not self._error else self._error)
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
        hw = self.source.hwaccel
        try:
            container = open_input(self.source.url, hwaccel=hw, timeout=10.0)
        except (av.FFmpegError, RuntimeError) as e:
            on = f" with {hw.setting}" if hw.enabled else ""
            self._error = f"cannot open{on} ({_ffmpeg_problem(e)})"
            return
        try:
            stream = container.streams.video[0]
            if hw.enabled and not stream.codec_context.is_hwaccel:  # the probe passed: never decode in software
                self._error = f"{hw.setting}: no hardware decoder for codec {stream.codec_context.name!r}"
                return
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

    # ------------------------------------------------------------------------- live sources
    def _event(self, state: SourceState, *, message: str = "", next_delay_s: float = 0.0,
               publish: bool = True) -> None:
        """Send the source's state (and counters) to the postprocess stage; never blocks."""
        if publish:
            self.state = state
        self._next_counters = time.monotonic() + COUNTERS_EVERY_S
        if self.events_out is None:
            return
        dropped = self.dropped + (self._reader.mailbox.dropped if self._reader is not None else 0)
        msg = SourceStatusMsg(self.source.source_id, state, self.attempt, next_delay_s, redact_url(message),
                              time.time(), dropped, self.skipped, self.received, publish)
        try:
            self.events_out.send(msg.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:  # the postprocess stage is far behind: counters catch up on the next one
            pass

    def _counters_due(self) -> None:
        if time.monotonic() >= self._next_counters:
            self._event(self.state, publish=False)

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` while watching the stop flags; False if the input was closed."""
        end = time.monotonic() + seconds
        while True:
            if not self.flags.alive():
                raise Stopped()
            if not self.flags.input_open():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            if self.credits is not None:
                self._drain_credits(int(min(left * 1000, POLL_MS)))
            else:
                time.sleep(min(left, POLL_MS / 1000))
            self._counters_due()

    def _decode_live(self) -> EosReason:
        """Connect, follow and reconnect a live source until stopped, ``max_frames`` or given up."""
        self.attempt = 0
        self._event(SourceState.CONNECTING, message=self.source.display)
        while True:
            reader = _LiveReader(url=self.source.url, live=self.live, threads=self.threads,
                                 hwaccel=self.source.hwaccel)
            reader.start()
            self._reader = reader
            try:
                outcome, problem = self._follow(reader)
            finally:
                reader.cancel.set()
                self.dropped += reader.mailbox.dropped
                self._reader = None
            if outcome is _Outcome.STOPPED:
                return EosReason.INTERRUPTED
            if outcome is _Outcome.MAX_FRAMES:
                return EosReason.MAX_FRAMES
            if outcome is _Outcome.FATAL:
                self._error = problem
                self._event(SourceState.ERROR, message=f"{self.source.display}: {problem}")
                return EosReason.ERROR
            if outcome is _Outcome.REFUSED:  # the server answered but refused: say so, then retry
                self._event(SourceState.ERROR, message=f"{self.source.display}: {problem}")
            if reader.frames:
                self.attempt = 0
            self.attempt += 1
            cap = self.live.reconnect_max_attempts
            if cap is not None and self.attempt > cap:
                self._error = f"gave up after {cap} failed reconnection attempts ({problem})"
                self._event(SourceState.ERROR, message=f"{self.source.display}: {self._error}")
                return EosReason.ERROR
            delay = reconnect_delay(self.attempt, initial_s=self.live.reconnect_initial_s,
                                    max_s=self.live.reconnect_max_s)
            self._event(SourceState.RECONNECTING, message=f"{self.source.display}: {problem}", next_delay_s=delay)
            if not self._wait(delay):
                return EosReason.INTERRUPTED

    def _follow(self, reader: _LiveReader) -> tuple[_Outcome, str]:
        """Pass the reader's newest frames downstream until the stream is lost or the input closes."""
        started = time.monotonic()
        connected = False
        min_dt = 1.0 / self.source.max_fps if self.source.max_fps else 0.0
        last_sent = -1e18
        held: int | None = None  # a free slot reserved for the next frame
        try:
            while True:
                if not self.flags.alive():
                    raise Stopped()
                if not self.flags.input_open():
                    return _Outcome.STOPPED, "stopped"
                self._counters_due()
                now = time.monotonic()
                if not connected and reader.connected.is_set():
                    connected = True
                    self._event(SourceState.CONNECTED, message=f"{self.source.display}: {reader.describe()}")
                if reader.done.is_set() and reader.mailbox.empty:
                    return reader.outcome, reader.problem
                if connected and now - max(reader.last_frame, started) > self.live.stall_timeout_s:
                    self._event(SourceState.STALLED,
                                message=f"no frame for {now - max(reader.last_frame, started):.1f} s")
                    return _Outcome.LOST, f"stalled (no frame for {self.live.stall_timeout_s:g} s)"
                if not connected and now - started > self.live.open_timeout_s + 1.0:
                    return _Outcome.LOST, f"no answer within {self.live.open_timeout_s:g} s"
                if self.credits is not None and held is None:
                    self._drain_credits(0)
                    held = self.credits.acquire()
                    if held is None:  # downstream busy: the mailbox keeps only the newest frame meanwhile
                        self._drain_credits(POLL_MS)
                        continue
                item = reader.mailbox.take(POLL_MS / 1000)
                if item is None:
                    continue
                self.received = reader.frames + self._received_before
                if min_dt and item.capture_mono - last_sent < min_dt * 0.95:
                    self.skipped += 1
                    continue
                problem = self._send_live(item, held)
                if problem:
                    return _Outcome.FATAL, problem
                held = None
                last_sent = item.capture_mono
                if self.max_frames is not None and self.frames_sent >= self.max_frames:
                    return _Outcome.MAX_FRAMES, ""
        finally:
            if held is not None and self.credits is not None:
                self.credits.release(held)
            self._received_before += reader.frames
            self.received = self._received_before

    def _send_live(self, item: _LiveFrame, held: int | None) -> str:
        """Convert a live frame into a slot (creating the pool at the first one) and send it.

        Returns:
            "" or the problem that ends the source (a frame larger than the slots).
        """
        t0 = time.perf_counter()
        rgb: npt.NDArray[np.uint8] = item.frame.to_ndarray(format="rgb24")  # type: ignore[assignment]
        h, w = rgb.shape[:2]
        if self.pool is None and self.pool_name:
            self.pool = SlotPool.create(name=self.pool_name, num_slots=self.num_slots, slot_bytes=h * w * 3)
            self.credits = SlotCredits(self.pool.num_slots)
            self._first_hw = (h, w)
            held = self.credits.acquire()
        decode_ms = item.decode_ms + (time.perf_counter() - t0) * 1000.0
        if self.pool is None:  # tcp transport: no slots; drop rather than queue at the high-water mark
            msg = FrameMsg(self.source.source_id, self.frames_sent, item.pts_s, (h, w), INLINE_SLOT, "",
                           item.capture_mono, decode_ms)
            parts: list[Any] = [msg.encode(), np.ascontiguousarray(rgb)]
            try:
                self.frames_out.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                return ""
        else:
            assert held is not None and self.credits is not None
            if h * w * 3 > self.pool.slot_bytes:  # the caller gives the held slot back
                fh, fw = self._first_hw
                return (f"resolution changed from {fw}x{fh} to {w}x{h}, larger than the frame slots "
                        "(restart the pipeline to accept it)")
            np.copyto(self.pool.view(held, (h, w, 3)), rgb)
            msg = FrameMsg(self.source.source_id, self.frames_sent, item.pts_s, (h, w), held, self.pool.name,
                           item.capture_mono, decode_ms + 0.0)
            send_parts(self.frames_out, [msg.encode()], self.flags.alive)
        self.frames_sent += 1
        return ""

    def stop(self) -> None:
        """Close the sockets and unlink the pool."""
        close_socket(self.frames_out, self.flags)
        if self.events_out is not None:
            close_socket(self.events_out, self.flags)
        self.credits_in.close(linger=0)
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class _Outcome(Enum):
    STOPPED = "stopped"  # input closed (stop signal)
    MAX_FRAMES = "max_frames"
    LOST = "lost"  # connection failed, dropped, ended or stalled: reconnect
    REFUSED = "refused"  # the server answered with a refusal (auth, not found): error status, reconnect
    FATAL = "fatal"  # no video stream, frames larger than the pool: give the source up


@dataclass(frozen=True)
class _LiveFrame:
    frame: Any  # av.VideoFrame
    pts_s: float
    capture_mono: float  # time.monotonic() at receipt
    decode_ms: float


class _Mailbox:
    """Holds only the newest frame: putting over an untaken one drops it (counted)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: _LiveFrame | None = None
        self.dropped = 0

    @property
    def empty(self) -> bool:
        return self._item is None

    def put(self, item: _LiveFrame) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify()

    def take(self, timeout_s: float) -> _LiveFrame | None:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            return item


_REFUSALS = ("HTTPClientError", "HTTPBadRequestError", "HTTPUnauthorizedError", "HTTPForbiddenError",
             "HTTPNotFoundError", "HTTPOtherClientError", "HTTPServerError", "InvalidDataError")


class _LiveReader(threading.Thread):
    """Opens a live stream and decodes it into a :class:`_Mailbox` (daemon thread; abandoned on cancel).

    PyAV calls can block for up to the open/read timeouts; the stage thread never waits on them:
    it watches :attr:`last_frame` and :attr:`done` and simply sets :attr:`cancel` and moves on.
    """

    def __init__(self, *, url: str, live: LiveOptions, threads: DecodeThreads,
                 hwaccel: HWAccelOptions | None = None) -> None:
        super().__init__(name="streamdet-live-reader", daemon=True)
        self.url = url
        self.live = live
        self.threads = threads
        self.hwaccel = hwaccel or HWAccelOptions()
        self.decoding = ""  # how the connected stream is decoded, for the ``connected`` status
        self.mailbox = _Mailbox()
        self.cancel = threading.Event()
        self.connected = threading.Event()
        self.done = threading.Event()
        self.last_frame = 0.0
        self.frames = 0
        self.frame_hw = (0, 0)
        self.codec = ""
        self.outcome = _Outcome.LOST
        self.problem = ""

    def describe(self) -> str:
        """``codec WxH`` of the connected stream (and how it is decoded, with a hardware decoder asked for)."""
        shape = f"{self.codec} {self.frame_hw[1]}x{self.frame_hw[0]}".strip()
        return f"{shape}, {self.decoding}" if self.decoding else shape

    def run(self) -> None:
        """Open, demux and decode until cancelled, the stream ends or an error."""
        import av

        try:
            self._read(av)
        except av.FFmpegError as e:
            refused = type(e).__name__ in _REFUSALS
            what = "refused" if refused else ("cannot connect" if not self.connected.is_set() else "read error")
            self.outcome = _Outcome.REFUSED if refused else _Outcome.LOST
            self.problem = f"{what} ({_ffmpeg_problem(e)})"
        except Exception as e:  # anything else: reconnect, saying what happened
            self.outcome, self.problem = _Outcome.LOST, f"reader failed ({type(e).__name__}: {_ffmpeg_problem(e)})"
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
            self.outcome, self.problem = _Outcome.FATAL, f"{problem}; set decode.hwaccel=none, or " \
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
                self.outcome, self.problem = _Outcome.FATAL, "no video stream"
                return
            stream = container.streams.video[0]
            stream.codec_context.thread_type = self.threads.value
            self.codec = stream.codec_context.name or ""
            self.frame_hw = (stream.codec_context.height, stream.codec_context.width)
            self.last_frame = time.monotonic()
            self.connected.set()
            consecutive = 0
            for packet in container.demux(stream):
                if self.cancel.is_set():
                    self.outcome, self.problem = _Outcome.LOST, "cancelled"
                    return
                t0 = time.perf_counter()
                try:
                    frames = stream.codec_context.decode(packet)
                except av.FFmpegError:
                    consecutive += 1
                    if consecutive >= MAX_CONSECUTIVE_DECODE_ERRORS:
                        self.outcome, self.problem = _Outcome.LOST, f"{consecutive} packets failed to decode"
                        return
                    continue
                consecutive = 0
                for frame in frames:
                    now = time.monotonic()
                    self.last_frame = now
                    self.frames += 1
                    pts_s = float(frame.time) if frame.time is not None else 0.0
                    self.mailbox.put(_LiveFrame(frame, pts_s, now, (time.perf_counter() - t0) * 1000.0))
                    t0 = time.perf_counter()
            self.outcome, self.problem = _Outcome.LOST, "stream ended"
        finally:
            container.close()
