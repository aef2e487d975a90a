"""Decode stage: one process per source; PyAV demux + decode, RGB24 frames into shared-memory slots.

The decoder preallocates its source's :class:`~pipeline.slotpool.SlotPool` (``slots`` frames of
the stream's size), converts each frame to RGB24 straight into a free slot and sends a
:class:`~streamdet.messages.FrameMsg` holding only the slot id. With no free slot it waits for a
credit: a file source is never dropped, a slow consumer slows the decoder. With ``tcp://``
transport the pixels travel inline instead.

A truncated or corrupt file keeps every frame that decodes (:mod:`pipeline.sources.file_reader`);
the problem is reported to the runner (``source_error``) and the EOS carries it. Sources can be
local files or anything FFmpeg opens (URLs); URLs are only ever shown with credentials redacted.

Live sources (any URL: ``rtsp://`` cameras, ...) run differently:

* a reader thread (:class:`~pipeline.sources.live_reader.LiveReader`) opens the stream and puts
  each decoded frame into a one-frame mailbox that keeps only the newest frame; the stage thread
  takes a frame only once it holds a free slot, so while downstream is busy older frames are
  dropped (counted) instead of queueing: latency stays bounded (``live_slots`` frames in flight
  at most);
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

Hardware decoding (``decode.hwaccel``) is described in :mod:`pipeline.sources.hwaccel`. Options,
probing and the readers live in :mod:`pipeline.sources` (import them from there: ``.probe``,
``.options``, ``.live_reader``, ``.hwaccel``, ``.ffmpeg``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import zmq

from pipeline.slotpool import SlotCredits, SlotPool, SlotPoolError, pool_bytes
from pipeline.sources.ffmpeg import to_rgb24
from pipeline.sources.file_reader import file_frames
from pipeline.sources.live_reader import LiveFrame, LiveOutcome, LiveReader
from pipeline.sources.options import DecodeThreads, LiveOptions, reconnect_delay
from pipeline.sources.probe import SourceInfo
from pipeline.stages.base import Stage, StageSpec, StatusReporter, check_alive, close_sockets
from pipeline.stages.replay import ReplayBook
from pipeline.supervise import Ledger
from pipeline.transport import (
    CONTROL_HWM,
    POLL_MS,
    StageEndpoints,
    StageFlags,
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

COUNTERS_EVERY_S = 1.0
"""How often a live decoder sends its counters (drops, frames received) to the postprocess stage."""


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

    With a ledger (:attr:`StageSpec.ledger`) the stage resumes after a restart and replays after a
    downstream restart; without one it starts at frame 0 and never replays.
    """

    source: SourceInfo
    pool: str
    num_slots: int
    endpoints: StageEndpoints
    max_frames: int | None = None
    loop: int = 1
    threads: DecodeThreads = DecodeThreads.AUTO
    live: LiveOptions = LiveOptions()

    stage_name: ClassVar[StageName] = StageName.DECODE

    @property
    def source_id(self) -> str:
        """The decoded source's id."""
        return self.source.source_id

    @property
    def pool_bytes(self) -> int:
        """Shared memory the stage creates at start: a file source's frame pool (a live one's comes later)."""
        if self.endpoints.inline or not self.source.is_file:
            return 0
        h, w = self.source.frame_hw
        return pool_bytes(self.num_slots, h * w * 3)

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
                           pool_name="" if ep.inline else self.pool, num_slots=self.num_slots,
                           ledger=self.attach_ledger(), ledger_chain=self.ledger.chain if self.ledger else 0,
                           ledger_source=self.ledger.source if self.ledger else 0)


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
        ledger: the run's ledger (None: no supervision). With it, the stage starts after the
            frames already published (a file) or sent (a live source) by an earlier incarnation,
            and sends its unpublished frames again whenever its chain's replay generation changes.
        ledger_chain: the source's model chain in the ledger.
        ledger_source: the source's index in the ledger.
    """

    name = StageName.DECODE

    def __init__(self, *, source: SourceInfo, pool: SlotPool | None, credits_in: zmq.Socket[Any],
                 frames_out: zmq.Socket[Any], status: StatusReporter, flags: StageFlags,
                 max_frames: int | None = None, loop: int = 1, threads: DecodeThreads = DecodeThreads.AUTO,
                 live: LiveOptions | None = None, events_out: zmq.Socket[Any] | None = None,
                 pool_name: str = "", num_slots: int = 0, ledger: Ledger | None = None, ledger_chain: int = 0,
                 ledger_source: int = 0) -> None:
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
        self._reader: LiveReader | None = None
        self._first_hw = source.frame_hw
        self.credits_in = credits_in
        self.frames_out = frames_out
        self.status = status
        self.flags = flags
        self.max_frames = max_frames
        self.loop = max(1, loop) if source.is_file else 1
        self.threads = threads
        self.credits = SlotCredits(pool.num_slots) if pool is not None else None
        self.book = ReplayBook(ledger=ledger, chain=ledger_chain, source=ledger_source)
        if ledger is not None:  # DELETE /sources/{id}: the runner asks through the ledger
            flags.source_stop = self.book.stop_requested
        self.first_index = self.book.first_index(is_file=source.is_file)
        self.frames_sent = self.first_index
        self._error = ""

    def start(self) -> None:
        """Nothing to acquire beyond what :meth:`DecodeSpec.build` made (the source opens on ``go``)."""

    def run(self) -> None:
        """Wait for ``go``, decode every frame (or until stopped), send EOS, wait for the slots."""
        while not self.flags.go.wait(POLL_MS / 1000):  # every stage must be ready before anything is sent
            check_alive(self.flags)
        reason = self._decode_live() if self.source.is_live else self._decode_all()
        if reason is EosReason.INTERRUPTED and self.book.stop_requested() and not self.flags.stop_input.is_set():
            reason = EosReason.REMOVED
        if self._error:
            self.status.send(StatusKind.SOURCE_ERROR, source_id=self.source.source_id,
                             message=f"{self.source.display}: {self._error} (kept {self.frames_sent} frames)")
        if self.source.is_live:
            self._event(SourceState.EOS, message=reason.value if not self._error else self._error)
        self._send_eos(reason)
        self._await_credits()

    def _decode_all(self) -> EosReason:
        pts_offset = 0.0
        to_skip = self.first_index  # frames an earlier incarnation already had published
        for _ in range(self.loop):
            last_pts = None
            for frame_rgb, pts_s, decode_ms in file_frames(self.source, threads=self.threads,
                                                           on_error=self._set_error, skip=to_skip):
                if not self.flags.input_open():
                    return EosReason.INTERRUPTED
                if frame_rgb is None:
                    to_skip -= 1
                    last_pts = pts_s
                    continue
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

    def _set_error(self, problem: str) -> None:
        """Record the problem that ends (or taints) the source; sent to the runner and in the EOS."""
        self._error = problem

    def _send_frame(self, rgb: npt.NDArray[np.uint8], pts_s: float, decode_ms: float) -> bool:
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        self._maybe_replay()
        self.book.reserve(self.frames_sent + 1)
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
            self.book.lend(slot, msg)
            send_parts(self.frames_out, [msg.encode()], self.flags.alive)
        self.frames_sent += 1
        return True

    def _drain_credits(self, timeout_ms: int) -> None:
        assert self.credits is not None
        while self.credits_in.poll(timeout_ms, zmq.POLLIN):
            credit = CreditMsg.decode(self.credits_in.recv())
            if self.book.credited(credit):  # else stale: an older pool generation, or another frame
                self.credits.release(credit.slot)
            timeout_ms = 0

    def _maybe_replay(self) -> None:
        """Send the unpublished frames (and the EOS, if sent) again once the chain's replay generation changed."""
        for msg in self.book.due():
            send_parts(self.frames_out, [msg.encode()], self.flags.alive)

    def _acquire_slot(self) -> int | None:
        """A free slot, waiting for credits; None if the input was closed meanwhile."""
        assert self.credits is not None
        self._drain_credits(0)
        slot = self.credits.acquire()
        while slot is None:
            check_alive(self.flags)
            self._maybe_replay()
            if not self.flags.input_open():
                return None
            self._drain_credits(POLL_MS)
            slot = self.credits.acquire()
        return slot

    def _send_eos(self, reason: EosReason) -> None:
        error = self._error or ("stopped" if reason is EosReason.ERROR else "")
        eos = EndOfStream(self.source.source_id, self.frames_sent, reason, error if reason is EosReason.ERROR else "")
        self._maybe_replay()
        self.book.eos = eos
        send_parts(self.frames_out, [eos.encode()], self.flags.alive)
        self.status.send(StatusKind.PROGRESS, source_id=self.source.source_id, decoded=self.frames_sent)

    def _await_credits(self) -> None:
        """Keep the pool alive until every slot is back and, supervised, the EOS is published.

        Until then a restart downstream may ask for a replay of the unpublished frames.
        """
        while True:
            check_alive(self.flags)
            self._maybe_replay()
            if (self.credits is None or self.credits.all_free) and self.book.published():
                return
            if self.credits is not None:
                self._drain_credits(POLL_MS)
            else:
                time.sleep(POLL_MS / 1000)

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
            check_alive(self.flags)
            if not self.flags.input_open():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            if self.credits is not None:
                self._drain_credits(int(min(left * 1000, POLL_MS)))
                self._maybe_replay()
            else:
                time.sleep(min(left, POLL_MS / 1000))
            self._counters_due()

    def _decode_live(self) -> EosReason:
        """Connect, follow and reconnect a live source until stopped, ``max_frames`` or given up."""
        self.attempt = 0
        self._event(SourceState.CONNECTING, message=self.source.display)
        while True:
            reader = LiveReader(url=self.source.url, live=self.live, threads=self.threads,
                                 hwaccel=self.source.hwaccel)
            reader.start()
            self._reader = reader
            try:
                outcome, problem = self._follow(reader)
            finally:
                reader.cancel.set()
                self.dropped += reader.mailbox.dropped
                self._reader = None
            if outcome is LiveOutcome.STOPPED:
                return EosReason.INTERRUPTED
            if outcome is LiveOutcome.MAX_FRAMES:
                return EosReason.MAX_FRAMES
            if outcome is LiveOutcome.FATAL:
                self._error = problem
                self._event(SourceState.ERROR, message=f"{self.source.display}: {problem}")
                return EosReason.ERROR
            if outcome is LiveOutcome.REFUSED:  # the server answered but refused: say so, then retry
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

    def _follow(self, reader: LiveReader) -> tuple[LiveOutcome, str]:
        """Pass the reader's newest frames downstream until the stream is lost or the input closes."""
        started = time.monotonic()
        connected = False
        min_dt = 1.0 / self.source.max_fps if self.source.max_fps else 0.0
        last_sent = -1e18
        held: int | None = None  # a free slot reserved for the next frame
        try:
            while True:
                check_alive(self.flags)
                if not self.flags.input_open():
                    return LiveOutcome.STOPPED, "stopped"
                self._counters_due()
                self._maybe_replay()
                now = time.monotonic()
                if not connected and reader.connected.is_set():
                    connected = True
                    self._event(SourceState.CONNECTED, message=f"{self.source.display}: {reader.describe()}")
                if reader.done.is_set() and reader.mailbox.empty:
                    return reader.outcome, reader.problem
                if connected and now - max(reader.last_frame, started) > self.live.stall_timeout_s:
                    self._event(SourceState.STALLED,
                                message=f"no frame for {now - max(reader.last_frame, started):.1f} s")
                    return LiveOutcome.LOST, f"stalled (no frame for {self.live.stall_timeout_s:g} s)"
                if not connected and now - started > self.live.open_timeout_s + 1.0:
                    return LiveOutcome.LOST, f"no answer within {self.live.open_timeout_s:g} s"
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
                ended = self._send_live(item, held)
                if ended is not None:
                    return ended
                held = None
                last_sent = item.capture_mono
                if self.max_frames is not None and self.frames_sent >= self.max_frames:
                    return LiveOutcome.MAX_FRAMES, ""
        finally:
            if held is not None and self.credits is not None:
                self.credits.release(held)
            self._received_before += reader.frames
            self.received = self._received_before

    def _send_live(self, item: LiveFrame, held: int | None) -> tuple[LiveOutcome, str] | None:
        """Convert a live frame into a slot (creating the pool at the first one) and send it.

        Returns:
            None, or how following the stream ends: FATAL for a frame larger than the slots,
            REFUSED (reported, then a reconnection after the backoff) when ``/dev/shm`` has no room
            for the pool now.
        """
        t0 = time.perf_counter()
        rgb = to_rgb24(item.frame)
        h, w = rgb.shape[:2]
        if self.pool is None and self.pool_name:
            try:
                self.pool = SlotPool.create(name=self.pool_name, num_slots=self.num_slots, slot_bytes=h * w * 3)
            except SlotPoolError as e:  # (/dev/shm full for now: say so, try again at the next connection)
                return LiveOutcome.REFUSED, str(e)
            self.credits = SlotCredits(self.pool.num_slots)
            self._first_hw = (h, w)
            held = self.credits.acquire()
        decode_ms = item.decode_ms + (time.perf_counter() - t0) * 1000.0
        self.book.reserve(self.frames_sent + 1)
        if self.pool is None:  # tcp transport: no slots; drop rather than queue at the high-water mark
            msg = FrameMsg(self.source.source_id, self.frames_sent, item.pts_s, (h, w), INLINE_SLOT, "",
                           item.capture_mono, decode_ms)
            parts: list[Any] = [msg.encode(), np.ascontiguousarray(rgb)]
            try:
                self.frames_out.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                return None
        else:
            assert held is not None and self.credits is not None
            if h * w * 3 > self.pool.slot_bytes:  # the caller gives the held slot back
                fh, fw = self._first_hw
                return LiveOutcome.FATAL, (f"resolution changed from {fw}x{fh} to {w}x{h}, larger than the frame "
                                           "slots (restart the pipeline to accept it)")
            np.copyto(self.pool.view(held, (h, w, 3)), rgb)
            msg = FrameMsg(self.source.source_id, self.frames_sent, item.pts_s, (h, w), held, self.pool.name,
                           item.capture_mono, decode_ms + 0.0)
            self.book.lend(held, msg)
            send_parts(self.frames_out, [msg.encode()], self.flags.alive)
        self.frames_sent += 1
        return None

    def stop(self) -> None:
        """Close the sockets and unlink the pool."""
        close_sockets(self.flags, outputs=(self.frames_out, self.events_out), inputs=(self.credits_in,))
        self.book.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
