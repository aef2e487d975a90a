"""Postprocess stage: raw outputs -> detections in frame pixels -> sinks.

Calls :func:`streamdet.postprocess.postprocess` with the card of the batch's model (the card's task
picks the head: detect, instance segment, semantic; ultralytics head decode, class-aware NMS or
Soft-NMS, score threshold, max detections, boxes mapped back through the letterbox and clipped;
end2end models only get the letterbox undone), builds the published JSON, hands each frame to
the sinks (which run in this process), then gives the frame slot back to its decoder. The stage
ends after every source's EOS has been passed to the sinks, flushes and closes them and reports
its counts to the runner.

A result whose outputs are :data:`streamdet.postprocess.KEPT_OUTPUTS` already went through NMS on
the device in the engine stage (``--device cuda``, detect heads), boxes in frame pixels: it is only
unpacked (:func:`streamdet.postprocess.unpack_detections`) and fed to the sinks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import zmq

from pipeline.output_pool import OutputReader
from pipeline.slotpool import PoolCache, StalePoolError
from pipeline.stages.base import (
    Stage,
    StageError,
    StageSpec,
    StatusReporter,
    close_sockets,
    credit_socket,
    frame_credit_sockets,
    receive,
    say,
)
from pipeline.stages.cascade import Cascade, SecondaryLink, pixels_of
from pipeline.stages.jsonl_sink import JsonlSink
from pipeline.stages.live_view import LIVE_HWM, LiveView, PreviewConfig
from pipeline.stages.mqtt_sink import MqttSink
from pipeline.stages.ordering import PublishOrder, Verdict, catch_up_with_last_line
from pipeline.stages.payloads import restart_payload
from pipeline.stages.postprocess_dynamic import DynamicSources
from pipeline.stages.sink_config import SinkConfig, open_sink
from pipeline.stages.sinks import FrameResult, Sink, detections_payload, dumps, status_payload
from pipeline.stages.stats import LiveStats, StatsConfig
from pipeline.supervise import Ledger
from pipeline.transport import (
    CONTROL_HWM,
    POLL_MS,
    StageEndpoints,
    StageFlags,
    make_socket,
    send_parts,
)
from streamdet.card import ModelCard
from streamdet.messages import (
    INLINE_SLOT,
    CreditMsg,
    EndOfStream,
    FrameRecord,
    ResultMsg,
    SourceAddedMsg,
    SourceStatusMsg,
    StageName,
    StageRestartMsg,
    StatusKind,
    decode_message,
)
from streamdet.postprocess import KEPT_OUTPUTS, PostprocessConfig, postprocess, unpack_detections

PROGRESS_EVERY_S = 0.1
"""Published frames are reported to the runner at most this often (and at each EOS), not once a batch."""


@dataclass(frozen=True, slots=True)
class _Pending:
    """A frame ready for the sinks (kept while it waits behind a gap)."""

    record: FrameRecord
    detections: Any
    model_name: str
    class_names: Sequence[str]
    engine_ms: float
    postprocess_ms: float
    inline: Any  # the zmq frame of inline pixels, or None
    children: Any = None  # secondary models' results by parent index (the cascade), or None


@dataclass(frozen=True, kw_only=True)
class PostprocessSpec(StageSpec):
    """Builds a :class:`PostprocessStage` in its process.

    Attributes:
        card: the model card.
        model_name: the model's name in published messages.
        config: the postprocess thresholds and options.
        sinks: which sinks to open.
        endpoints: the pipeline's endpoints.
        num_sources: the stage ends after that many EOS.
        stats: per-source statistics (stats line, ``stats`` topic, Prometheus endpoint).
        cards_by_source: ``(source_id, card)`` for sources served by another model than ``card``
            (their messages carry that card's name, and its task picks their postprocess).
        ledger_indices: each source's slot in the ledger, in ``stats.sources`` order (empty: their positions).
        dynamic: the control API is on: sources are added at runtime (:class:`~streamdet.messages.SourceAddedMsg`)
            and forgotten once their EOS is published; the stage ends when the input is closed
            (SIGINT/SIGTERM) and every running source's EOS is published, not after ``num_sources`` EOS.
        chain_cards: every model chain's card (chain 0 first), for sources added at runtime.
        preview: encode preview frames and send stats snapshots to ``endpoints.live`` (None: off).
        secondaries: secondary models run on crops of detections (:mod:`pipeline.stages.cascade`).
        cascade_card: the card of the model whose detections feed them (default: ``card``).

    With a ledger (:attr:`StageSpec.ledger`) the publication state survives a restart of the stage.
    """

    card: ModelCard
    model_name: str
    config: PostprocessConfig
    sinks: SinkConfig
    endpoints: StageEndpoints
    num_sources: int
    stats: StatsConfig = StatsConfig()
    cards_by_source: tuple[tuple[str, ModelCard], ...] = ()
    ledger_indices: tuple[int, ...] = ()
    dynamic: bool = False
    chain_cards: tuple[ModelCard, ...] = ()
    preview: PreviewConfig | None = None
    secondaries: tuple[SecondaryLink, ...] = ()
    cascade_card: ModelCard | None = None

    stage_name: ClassVar[StageName] = StageName.POSTPROCESS

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> PostprocessStage:
        """Bind the result socket, connect the frame-credit sockets, create the sinks."""
        ep = self.endpoints
        results_in = make_socket(ctx, zmq.PULL, ep.results, bind=True)
        events_in = make_socket(ctx, zmq.PULL, ep.events, bind=True, hwm=CONTROL_HWM) if ep.events else None
        credits_out = frame_credit_sockets(ctx, ep)
        by_source = dict(self.cards_by_source)
        ledger = self.attach_ledger()
        sinks = self.sinks.build(ctx=ctx, class_names=self.card.class_names,
                                 class_names_by_source={k: c.class_names for k, c in by_source.items()}, ledger=ledger)
        live = None
        if self.preview is not None and ep.live:
            live = LiveView(sock=make_socket(ctx, zmq.PUSH, ep.live, bind=False, hwm=LIVE_HWM), config=self.preview,
                            ledger=ledger)
        cascade = Cascade(links=self.secondaries, primary=self.cascade_card or self.card, ctx=ctx, flags=flags) \
            if self.secondaries else None
        stage = PostprocessStage(card=self.card, model_name=self.model_name, config=self.config,
                                 results_in=results_in, frame_credits_out=credits_out, sinks=sinks,
                                 status=status, flags=flags, num_sources=self.num_sources, events_in=events_in,
                                 stats=LiveStats(config=self.stats), cards_by_source=by_source,
                                 ledger=ledger, ledger_indices=self.ledger_indices, live_view=live, cascade=cascade)
        if self.dynamic:
            stage.follow_added_sources(ctx=ctx, chain_cards=self.chain_cards or (self.card,),
                                       pools=tuple(pool for pool, _ in ep.frame_credits))
        return stage


class PostprocessStage(DynamicSources, Stage):
    """Turns raw outputs into detections and feeds the sinks.

    Args:
        card: the model card.
        model_name: the model's name in published messages.
        config: the postprocess thresholds and options (instance masks are always computed as RLEs).
        results_in: PULL socket (bound) of :class:`ResultMsg` / :class:`EndOfStream`.
        frame_credits_out: PUSH socket per frame pool, to hand frame slots back.
        sinks: the sinks (opened by :meth:`start`).
        status: reports to the runner.
        flags: lifecycle flags.
        num_sources: the stage ends after this many EOS.
        events_in: PULL socket (bound) of the decoders' :class:`SourceStatusMsg` (None: none).
        stats: the statistics (default: none printed).
        cards_by_source: card per source for sources served by another model (default: none).
        ledger: the run's ledger (None: no supervision): the publication order state
            (:class:`~pipeline.stages.ordering.PublishOrder`) lives there.
        ledger_indices: the sources' slots in the ledger, in ``stats`` order (empty: their positions).
        live_view: previews and stats snapshots for the control API (None: off).
        cascade: the secondary models on crops of ``card``'s detections (None: none).
    """

    name = StageName.POSTPROCESS

    def __init__(self, *, card: ModelCard, model_name: str, config: PostprocessConfig, results_in: zmq.Socket[Any],
                 frame_credits_out: dict[str, zmq.Socket[Any]], sinks: Sequence[Sink], status: StatusReporter,
                 flags: StageFlags, num_sources: int, events_in: zmq.Socket[Any] | None = None,
                 stats: LiveStats | None = None, cards_by_source: dict[str, ModelCard] | None = None,
                 ledger: Ledger | None = None, ledger_indices: tuple[int, ...] = (),
                 live_view: LiveView | None = None, cascade: Cascade | None = None) -> None:
        self.card = card
        self.model_name = model_name
        # instance masks go out as COCO RLEs, so compute them straight in that form (box windows only)
        self.config = dataclasses.replace(config, masks_as_rle=True)
        self.results_in = results_in
        self.frame_credits_out = frame_credits_out
        self.sinks = list(sinks)
        self.status = status
        self.flags = flags
        self.num_sources = num_sources
        self.needs_pixels = any(s.needs_pixels for s in self.sinks)
        self.frames = 0
        self.detections = 0
        self._pools = PoolCache()
        self._opened: list[Sink] = []
        self.events_in = events_in
        self.live_stats = stats or LiveStats(config=StatsConfig(interval_s=0.0))
        self.cards_by_source = dict(cards_by_source or {})
        self.ledger = ledger
        # inline frames (tcp:// transport) cannot be sent again after a crash: no strict order then
        self.order = PublishOrder(sources=self.live_stats.config.sources, ledger=ledger,
                                  strict=bool(frame_credits_out), indices=ledger_indices)
        self._sources = [sid for sid, _ in self.live_stats.config.sources]
        self.duplicates = 0
        self._outputs = OutputReader()
        self.stale_results = 0
        self.live_view = live_view
        self._ctx: zmq.Context[Any] | None = None  # set by follow_added_sources: the stage is dynamic
        self._chain_cards: tuple[ModelCard, ...] = ()
        self._pool_of: dict[str, str] = {}  # dynamic: source id -> base name of its frame pool
        self.cascade = cascade
        if cascade is not None:  # a restart of a secondary engine is heard while the cascade waits for a slot
            cascade.on_wait = self._poll_events
        self._touched: set[str] = set()  # sources that published since the last release of held frames
        self._progress = [0, 0]  # frames, detections published and not yet reported
        self._reported_at = 0.0

    def start(self) -> None:
        """Open every sink (binds the PUB socket, waits for subscribers if configured).

        Raises:
            TransportError: if the publish endpoint cannot be bound.
            StageError: if an output file cannot be created, or the MQTT broker refused the login.
        """
        for sink in self.sinks:
            open_sink(sink)
            self._opened.append(sink)
            if isinstance(sink, JsonlSink) and sink.resumed_last_line is not None and self.ledger is not None:
                # a SIGKILL between the dead stage's last JSONL line and its ledger update
                catch_up_with_last_line(self.order, sink.resumed_last_line)
        try:
            self.live_stats.open(frames=self.published_by_source())
        except OSError as e:
            port = self.live_stats.config.metrics_port
            raise StageError(f"metrics port {port}: cannot serve Prometheus metrics ({e.strerror or e})") from e

    def _poll_events(self) -> None:
        """Publish pending source status events and, when due, the stats line."""
        while self.events_in is not None and self.events_in.poll(0, zmq.POLLIN):
            ev = decode_message(self.events_in.recv())
            if isinstance(ev, StageRestartMsg):
                self._on_restart(ev)
                continue
            if isinstance(ev, SourceAddedMsg):
                self._on_added(ev)
                continue
            if not isinstance(ev, SourceStatusMsg):
                raise StageError(f"postprocess: expected SourceStatusMsg on the events socket, got {type(ev).__name__}")
            self.live_stats.on_status(ev)
            if ev.publish:
                payload = status_payload(ev)
                for sink in self._opened:
                    sink.status(payload)
        if self.live_stats.due():
            for sink in self._opened:
                if isinstance(sink, MqttSink):
                    self.live_stats.set_sink_dropped("mqtt", sink.dropped)
            line, payload = self.live_stats.report()
            say(line)
            for sink in self._opened:
                sink.stats(payload)

    def _on_restart(self, ev: StageRestartMsg) -> None:
        """Publish a stage restart as ``status.<source_id>`` of every source it affects, count it."""
        self.live_stats.on_restart(ev.stage.value, ev.total)
        if ev.stage is StageName.SECONDARY and self.cascade is not None:
            self.cascade.resend()
        for sid in [ev.source_id] if ev.source_id and ev.stage is StageName.DECODE else self._sources:
            payload = restart_payload(ev, sid)
            for sink in self._opened:
                sink.status(payload)

    def run(self) -> None:
        """Process results until every source's EOS is published."""
        self._ended = sum(1 for sid in self._sources if self.order.ended(sid))
        poller = zmq.Poller()
        poller.register(self.results_in, zmq.POLLIN)
        if self.events_in is not None:
            poller.register(self.events_in, zmq.POLLIN)
        for sock in self.cascade.sockets() if self.cascade is not None else ():
            poller.register(sock, zmq.POLLIN)
        while not self._finished():
            poller.poll(POLL_MS if self.cascade is None else 2)
            self._poll_events()
            if self.live_view is not None:
                self.live_view.tick(self.live_stats)
            if self.cascade is not None:
                self._step_cascade()
            got = receive(self.results_in, self.flags, 0)
            if got is None:
                self._report_progress()
                continue
            msg, parts = got
            if isinstance(msg, ResultMsg):
                self._handle(msg, parts)
            elif isinstance(msg, EndOfStream):
                if self.cascade is None or not self.cascade.hold_eos(msg):
                    self._on_eos(msg)
            else:
                raise StageError(f"postprocess: expected ResultMsg or EndOfStream, got {type(msg).__name__}")
        self._report_progress(now=True)
        if self.ledger is not None:  # nothing can need a replay any more: the other stages may exit now
            self.ledger.set_finished()

    def _on_eos(self, msg: EndOfStream) -> None:
        now, lost = self.order.eos(msg)
        self._count_lost(msg.source_id, lost)
        if now:
            self._publish_eos(msg)

    def _step_cascade(self) -> None:
        """Results of the secondary models in; frames whose crops are all back out, in order; then held EOS."""
        assert self.cascade is not None
        self.cascade.step()
        for item in self.cascade.released():
            self._route(item)
        self._release_held()
        for eos in self.cascade.released_eos():
            self._on_eos(eos)

    def _publish_eos(self, msg: EndOfStream) -> None:
        # a restarted decoder counts from where it resumed, while frames the dead one had sent were
        # still published: the EOS counts what was published
        frames = self.order.next_index(msg.source_id)
        if frames > msg.frames:
            msg = dataclasses.replace(msg, frames=frames)
        self._poll_events()  # the source's last status (eos, error) goes out before its EOS
        for sink in self._opened:
            sink.end_of_stream(msg)
        self.order.eos_published(msg.source_id)
        self._ended += 1
        self._report_progress(now=True)
        self.status.send(StatusKind.SOURCE_END, source_id=msg.source_id, message=msg.reason.value,
                         frames=msg.frames)
        if self._ctx is not None:
            self._forget(msg.source_id)

    def _count_lost(self, source_id: str, lost: int) -> None:
        if lost > 0:
            self.live_stats.on_lost(source_id, lost)
            self.status.send(StatusKind.PROGRESS, source_id=source_id, lost=lost)

    def _handle(self, msg: ResultMsg, parts: list[Any]) -> None:
        got = self._outputs.arrays(msg, parts)
        if got is None:  # in the engine's output pool, taken back after a restart, or of a replaced engine
            if self.ledger is None:  # (without one nothing restarts, so nothing takes a slot back)
                raise StageError(f"postprocess: the outputs in {msg.outputs_pool} slot {msg.outputs_slot} are gone")
            self.stale_results += 1  # its frames, not published, are sent again for that restart
            return
        arrays, inline_pixels = got[0], iter(got[1])
        # a batch comes from one model chain, so its first frame's source names the model
        card = self.cards_by_source.get(msg.frames[0].frame.source_id, self.card) if self.cards_by_source \
            else self.card
        model_name = card.name if card is not self.card else self.model_name
        t0 = time.perf_counter()
        if tuple(o.name for o in msg.outputs) == KEPT_OUTPUTS:  # NMS done on the device
            dets = unpack_detections(arrays[0], arrays[1])
        else:
            dets = postprocess(arrays, [r.letterbox for r in msg.frames], card, self.config)
        post_ms = (time.perf_counter() - t0) * 1000.0
        cascade = self.cascade if self.cascade is not None and self.cascade.applies(card) else None
        for record, d in zip(msg.frames, dets, strict=True):
            f = record.frame
            inline = next(inline_pixels) if self.needs_pixels and f.slot == INLINE_SLOT else None
            item = _Pending(record, d, model_name, card.class_names, msg.engine_ms, post_ms, inline)
            if cascade is None or f.frame_index < self.order.next_index(f.source_id):
                self._route(item)  # (an old copy is a duplicate: the order says so)
            elif cascade.pending(f.source_id, f.frame_index):
                self.duplicates += 1  # a copy of a frame in the cascade: its slot goes back once that one is out
            elif (pixels := pixels_of(self._pools, record) if len(d) else None) is None and len(d) and f.slot >= 0:
                self.order.skip(f.source_id, f.frame_index)  # its pool is gone: its decoder sends it again
            else:
                cascade.add(item, pixels)
        self._release_held()

    def _route(self, item: _Pending) -> None:
        """Publish a frame now, hold it behind a gap, or drop it as a duplicate (its slot goes back)."""
        f = item.record.frame
        verdict, lost = self.order.frame(f.source_id, f.frame_index, item)
        self._count_lost(f.source_id, lost)
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
            self._credit(item.record)  # ignored by the decoder unless the slot still holds this frame
        elif verdict is Verdict.PUBLISH and self._publish(item):
            self._progress[0] += 1
            self._progress[1] += len(item.detections)
            self._touched.add(f.source_id)

    def _release_held(self) -> None:
        """Publish frames held behind a gap that is now filled, then a held EOS; report progress."""
        touched, self._touched = self._touched, set()
        for sid in touched:
            while (held := self.order.ready(sid)) is not None and self._publish(held):
                self._progress[0] += 1
                self._progress[1] += len(held.detections)
            eos = self.order.ready_eos(sid)
            if eos is not None:
                self._publish_eos(eos)
        self._report_progress()

    def _report_progress(self, *, now: bool = False) -> None:
        """Report the frames published since the last report: at once, or once :data:`PROGRESS_EVERY_S` passed."""
        frames, detections = self._progress
        if not frames or not now and time.monotonic() - self._reported_at < PROGRESS_EVERY_S:
            return
        self.frames += frames
        self.detections += detections
        self.status.send(StatusKind.PROGRESS, frames=frames, detections=detections)
        self._progress = [0, 0]
        self._reported_at = time.monotonic()

    def _publish(self, item: _Pending) -> bool:
        """Hand one frame to the sinks, record it, give its slot back; False if its pixels are gone."""
        record, d = item.record, item.detections
        f = record.frame
        pixels = None
        if self.needs_pixels:
            h, w = f.frame_hw
            if f.slot >= 0:
                try:
                    pixels = self._pools.get(f.pool).view(f.slot, (h, w, 3))
                except StalePoolError:  # its decoder restarted: the new one sends the frame again
                    self.order.skip(f.source_id, f.frame_index)
                    return False
            elif item.inline is not None:
                pixels = np.frombuffer(item.inline.buffer, dtype=np.uint8).reshape(h, w, 3)
        payload = detections_payload(record, d, model=item.model_name, class_names=item.class_names,
                                     engine_ms=item.engine_ms, postprocess_ms=item.postprocess_ms,
                                     children=item.children)
        self.live_stats.on_frame(f.source_id, payload["latency_ms"])
        # encoded once, before anything goes out: PUB, JSONL and the ledger update follow within microseconds
        result = FrameResult(record, d, payload, pixels, dumps(payload), item.children)
        for sink in self._opened:  # the messages first (PUB, JSONL)...
            if not sink.needs_pixels:
                sink.write(result)
        # ...recorded as published right away: a crash after this point does not repeat the frame,
        # one before it repeats it; keep the gap short (the video encode comes after)
        self.order.published(f.source_id, f.frame_index, len(d))
        if self.live_view is not None and self.live_view.wants(f.source_id, self.order.index(f.source_id)):
            self._preview(item, pixels)
        for sink in self._opened:
            if sink.needs_pixels:
                sink.write(result)
        del result, pixels
        self._credit(record)
        return True

    def _preview(self, item: _Pending, pixels: np.ndarray[Any, Any] | None) -> None:
        """Send a preview of the frame (its pixels from the slot; a copy is drawn on, before the other sinks)."""
        assert self.live_view is not None
        f = item.record.frame
        if pixels is None:  # (inline frames (tcp://) are kept only when a sink needs pixels; a stale pool: gone)
            pixels = pixels_of(self._pools, item.record)
            if pixels is None:
                return
        self.live_view.frame(f.source_id, f.frame_index, pixels, item.detections, item.class_names,
                             children=item.children)

    def _credit(self, record: FrameRecord) -> None:
        f = record.frame
        if f.slot >= 0:
            try:
                sock = credit_socket(self.frame_credits_out, f.pool)
            except KeyError:
                if self._ctx is not None:
                    return  # a late copy of a source already forgotten: its decoder is gone
                raise
            send_parts(sock, [CreditMsg(f.pool, f.slot, f.frame_index).encode()], self.flags.alive)

    def outputs_summary(self) -> list[str]:
        """One line per sink saying where its output went."""
        return [s.describe() for s in self._opened]

    def stop(self) -> None:
        """Flush and close the sinks, report where outputs went, close the sockets."""
        self._release(finish=True)

    def abandon(self) -> None:
        """As :meth:`stop`, but files stay for the restarted stage to resume and report (:meth:`Sink.abandon`)."""
        self._release(finish=False)

    def _release(self, *, finish: bool) -> None:
        self._report_progress(now=True)
        errors: list[str] = []
        for sink in self._opened:
            try:
                sink.close() if finish else sink.abandon()
            except Exception as e:  # a sink failing to flush must not keep the others from flushing
                errors.append(f"{sink.describe()}: cannot finish ({e})")
        lines = self.outputs_summary() + (self.cascade.summary_lines() if self.cascade else []) if finish else []
        if self.cascade is not None:
            self.cascade.close()
        for line in lines:
            self.status.send(StatusKind.OUTPUT, message=line)
        self._opened = []
        self._pools.close()
        self._outputs.close()
        self.live_stats.close()
        if self.live_view is not None:
            self.live_view.close()
        close_sockets(self.flags, outputs=self.frame_credits_out.values(), inputs=(self.results_in, self.events_in))
        if self.ledger is not None:
            self.order.ledger = None
            self.ledger.close()
            self.ledger = None
        if errors:
            raise StageError("; ".join(errors))
