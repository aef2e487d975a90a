"""The cascade: secondary models on crops of the primary model's detections, driven by the postprocess stage.

For each frame of the primary model, once its detections are known, :class:`Cascade` picks the
detections of the classes a secondary model wants (:func:`streamdet.cascade.select_parents`),
cuts each crop straight from the frame still held in its decoder's slot (a view: the frame is not
copied), letterboxes it per the secondary model's card into a row of the secondary's
shared-memory tensor slot, and sends full batches (or partial ones after ``max_wait_ms``) to the
secondary's own engine process (:class:`SecondaryEngineSpec`, an ordinary engine stage). Crops of
several frames and sources share a batch. The results come back here: the secondary's
detections are decoded with its card, mapped from crop to frame pixels
(:func:`streamdet.cascade.children_to_frame`), read as text when asked, and attached to the frame.

A frame leaves the cascade, in its source's order, once every crop of it and of every earlier
frame of the source is back; a source's EOS waits behind its last frame. Frames without crops go
through the same queue, so publication order is kept. If the secondary engine is restarted
(supervision), the batches it had not answered are sent again; a batch unanswered for
:data:`BATCH_TIMEOUT_S` is given up (its crops get no children, and are counted).

Peers: DeepStream's secondary GIE (``operate-on-class-ids``, ``input-object-min-width``), Savant
``input.objects``, Roboflow workflow crops.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import zmq

from pipeline.slotpool import SlotCredits, SlotPool, StalePoolError, pool_bytes
from pipeline.stages.base import StageError, StatusReporter
from pipeline.stages.engine import EngineSpec, EngineStage
from pipeline.transport import StageFlags, close_socket, make_socket, send_parts
from streamdet.card import ModelCard
from streamdet.cascade import Children, children_to_frame, crop_window, select_parents
from streamdet.messages import (
    BatchMsg,
    CreditMsg,
    EndOfStream,
    FrameRecord,
    ResultMsg,
    StageName,
    decode_message,
)
from streamdet.postprocess import Detections, PostprocessConfig, postprocess
from streamdet.preprocess_ops import preprocess_batch
from streamdet.reading import read_text

BATCH_TIMEOUT_S = 30.0
"""A secondary batch unanswered this long is given up (its crops publish without children)."""


@dataclass(frozen=True, kw_only=True)
class SecondaryLink:
    """One secondary model as the postprocess stage drives it (picklable, built at start-up).

    Attributes:
        card: the secondary model's card (its input size, head and class names).
        config: its postprocess settings (thresholds, NMS, masks as crop-sized arrays).
        parent_class_ids: the primary class ids whose detections feed it.
        min_side_px: boxes with a shorter side under this (frame pixels) are skipped and counted.
        pad: crop = box grown by this fraction of its width and height on each side.
        max_crops: most crops per frame.
        max_batch: most crops per batch (the tensor slot's rows).
        pad_batches: the model has a static batch size: batches are padded to ``max_batch``.
        max_wait_ms: a partial batch is sent this long after its first crop.
        tensor_slots: input tensors in flight.
        read_text: read the children's labels left to right into the parent's ``text``.
        batches: endpoint of the secondary engine's batch socket (it binds).
        results: endpoint where its results come back (this stage binds).
        credits: endpoint where its tensor-slot credits come back (this stage binds).
        tensor_pool: the shared-memory tensor pool this stage creates (generation included).
    """

    card: ModelCard
    config: PostprocessConfig
    parent_class_ids: tuple[int, ...]
    min_side_px: float
    pad: float
    max_crops: int
    max_batch: int
    pad_batches: bool
    max_wait_ms: float
    tensor_slots: int
    read_text: bool
    batches: str
    results: str
    credits: str
    tensor_pool: str

    @property
    def tensor_slot_bytes(self) -> int:
        """Bytes of one input tensor: ``max_batch`` crops at the card's input size."""
        return self.card.batch_nbytes(self.max_batch)

    @property
    def pool_bytes(self) -> int:
        """Shared memory of its tensor pool (the postprocess stage creates it at start)."""
        return pool_bytes(self.tensor_slots, self.tensor_slot_bytes)


@dataclass(frozen=True, kw_only=True)
class SecondaryEngineSpec(EngineSpec):
    """The engine process of a secondary model: an :class:`EngineStage` fed with crops by the postprocess stage.

    Its ``endpoints`` carry the secondary's own batch, result and credit endpoints. It never drops
    batches as stale (the postprocess stage, which made them, sends the unanswered ones again when
    this stage is restarted).
    """

    stage_name: ClassVar[StageName] = StageName.SECONDARY

    @property
    def source_id(self) -> str:
        """The secondary model's name: its status reports are labelled ``secondary:<name>``."""
        return self.card.name

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> EngineStage:
        """As :meth:`EngineSpec.build`; batches are never stale (generation 0)."""
        stage = super().build(ctx=ctx, flags=flags, status=status)
        stage.generation = 0
        return stage


@dataclass
class _Entry:
    """A frame waiting in the cascade: its postprocess item, its crops still out, the children found so far."""

    item: Any
    outstanding: set[tuple[int, int]] = field(default_factory=set)  # (secondary index, parent index)
    children: dict[int, list[Children]] = field(default_factory=dict)


@dataclass
class _Flight:
    """A batch sent to a secondary engine: done once its tensor slot and its results are both back."""

    msg: BatchMsg
    sent: float
    credited: bool = False
    answered: bool = False


@dataclass
class _Counts:
    crops: int = 0
    batches: int = 0
    too_small: int = 0
    over_limit: int = 0
    timeouts: int = 0
    resent: int = 0
    crop_ms: float = 0.0
    engine_ms: float = 0.0


class _Secondary:
    """The runtime side of one :class:`SecondaryLink`: its tensor pool, sockets, open batch and batches in flight."""

    def __init__(self, link: SecondaryLink, ctx: zmq.Context[Any]) -> None:
        self.link = link
        card = link.card
        iw, ih = card.input_wh
        self.dtype = np.dtype(card.input.dtype)
        self.row_shape = (3, ih, iw)
        self.pool = SlotPool.create(name=link.tensor_pool, num_slots=link.tensor_slots,
                                    slot_bytes=link.tensor_slot_bytes)
        self.free = SlotCredits(link.tensor_slots)
        self.batches_out = make_socket(ctx, zmq.PUSH, link.batches, bind=False)
        self.results_in = make_socket(ctx, zmq.PULL, link.results, bind=True)
        self.credits_in = make_socket(ctx, zmq.PULL, link.credits, bind=True)
        self.records: list[FrameRecord] = []
        self.slot = -1
        self.tensor: npt.NDArray[Any] | None = None
        self.opened_at = 0.0
        self.tag = 0
        self.in_flight: dict[int, _Flight] = {}
        self.tag_of: dict[tuple[str, int, int], int] = {}  # a batch's first crop (source, frame, parent) -> its tag
        self.counts = _Counts()

    def close(self, flags: StageFlags) -> None:
        self.tensor = None
        for sock in (self.batches_out, self.results_in, self.credits_in):
            close_socket(sock, flags)
        self.pool.close()


class Cascade:
    """Runs the secondary models of one primary model (see the module docstring).

    Args:
        links: the secondary models, in settings order.
        primary: the primary model's card (frames of other models pass straight through).
        ctx: the process's ZeroMQ context.
        flags: the stage's lifecycle flags.
    """

    def __init__(self, *, links: tuple[SecondaryLink, ...], primary: ModelCard, ctx: zmq.Context[Any],
                 flags: StageFlags) -> None:
        self.primary = primary
        self.flags = flags
        self._sec: list[_Secondary] = []
        try:
            for link in links:
                self._sec.append(_Secondary(link, ctx))
        except Exception:
            self.close()
            raise
        self._queues: dict[str, deque[_Entry]] = {}
        self._waiting: dict[tuple[str, int], _Entry] = {}
        self._held_eos: dict[str, EndOfStream] = {}
        self._ready_eos: list[EndOfStream] = []
        self.on_wait: Callable[[], None] | None = None
        """Called while waiting for a free secondary tensor slot: the stage's event handling, so that a
        restart of a secondary engine (whose batches hold every slot) is heard and :meth:`resend` runs."""

    def sockets(self) -> list[zmq.Socket[Any]]:
        """The sockets the stage's poller should wake up for (results and credits)."""
        return [s for sec in self._sec for s in (sec.results_in, sec.credits_in)]

    def applies(self, card: ModelCard) -> bool:
        """Whether frames of this card's model go through the cascade."""
        return card is self.primary or card == self.primary

    def pending(self, source_id: str, frame_index: int) -> bool:
        """Whether that frame is in the cascade already (a replayed copy is a duplicate)."""
        return any(e.item.record.frame.frame_index == frame_index for e in self._queues.get(source_id, ()))

    # -- frames in -------------------------------------------------------------------------------------

    def add(self, item: Any, pixels: npt.NDArray[np.uint8] | None) -> None:
        """Queue a frame (the postprocess item: ``record``, ``detections``) and send its crops.

        Args:
            item: the frame's postprocess item.
            pixels: the frame ``(H, W, 3)`` uint8 RGB (a view of its slot), or None when no crop is needed.
        """
        f = item.record.frame
        entry = _Entry(item)
        dets: Detections = item.detections
        plan: list[tuple[_Secondary, list[int]]] = []
        for k, sec in enumerate(self._sec):
            link = sec.link
            sel = select_parents(dets, link.parent_class_ids, min_side_px=link.min_side_px, max_crops=link.max_crops)
            sec.counts.too_small += sel.too_small
            sec.counts.over_limit += sel.over_limit
            if sel.parents.size:
                parents = sel.parents.tolist()
                plan.append((sec, parents))
                entry.outstanding.update((k, parent) for parent in parents)
        self._queues.setdefault(f.source_id, deque()).append(entry)
        if not plan:
            return
        if pixels is None:
            raise StageError(f"cascade: frame {f.frame_index} of {f.source_id} has crops but no pixels")
        self._waiting[(f.source_id, f.frame_index)] = entry
        # every crop is outstanding before the first is cut: waiting for a tensor slot in _cut takes
        # results in (step), and an answer to this frame's first crops must not find it complete
        for sec, parents in plan:
            for parent in parents:
                self._cut(sec, item.record, parent, dets.boxes_xyxy[parent], pixels)

    def _cut(self, sec: _Secondary, record: FrameRecord, parent: int, box: npt.NDArray[np.float32],
             pixels: npt.NDArray[np.uint8]) -> None:
        """Letterbox one crop into the open batch (a view of the frame, no copy of it); send the batch when full."""
        t0 = time.perf_counter()
        if sec.tensor is None:
            self._open(sec)
        assert sec.tensor is not None
        x0, y0, x1, y1 = crop_window(box, record.frame.frame_hw, sec.link.pad)
        row = len(sec.records)
        _, lbs = preprocess_batch([pixels[y0:y1, x0:x1]], sec.link.card, out=sec.tensor[row : row + 1])
        ms = (time.perf_counter() - t0) * 1000.0
        sec.records.append(FrameRecord(record.frame, lbs[0], ms, (parent, x0, y0)))
        sec.counts.crops += 1
        sec.counts.crop_ms += ms
        if len(sec.records) >= sec.link.max_batch:
            self._send(sec)

    def _open(self, sec: _Secondary) -> None:
        """Take a free tensor slot for a new batch, waiting for credits (and results) if none is free."""
        while (slot := sec.free.acquire()) is None:
            if not self.flags.alive():
                raise StageError("cascade: stopped while waiting for a secondary tensor slot")
            if sec.credits_in.poll(50, zmq.POLLIN) or sec.results_in.poll(0, zmq.POLLIN):
                self.step()
            if self.on_wait is not None:
                self.on_wait()
            self._expire(sec)
        sec.slot = slot
        sec.tensor = sec.pool.view(slot, (sec.link.max_batch, *sec.row_shape), sec.dtype)
        sec.opened_at = time.monotonic()

    def _send(self, sec: _Secondary) -> None:
        if not sec.records:
            return
        n = len(sec.records)
        rows = sec.link.max_batch if sec.link.pad_batches else n
        if rows > n:
            assert sec.tensor is not None
            sec.tensor[n:rows] = 0.0
        sec.tag += 1
        msg = BatchMsg(tuple(sec.records), sec.slot, sec.link.tensor_pool, (rows, *sec.row_shape),
                       sec.dtype.name, 0, sec.tag)
        sec.in_flight[sec.tag] = _Flight(msg, time.monotonic())
        sec.tag_of[_first_crop(msg)] = sec.tag
        sec.records, sec.tensor = [], None
        sec.counts.batches += 1
        send_parts(sec.batches_out, [msg.encode()], self.flags.alive)

    # -- results in ------------------------------------------------------------------------------------

    def step(self) -> None:
        """Take credits and results that arrived; send partial batches that waited ``max_wait_ms``."""
        now = time.monotonic()
        for sec in self._sec:
            while sec.credits_in.poll(0, zmq.POLLIN):
                credit = decode_message(sec.credits_in.recv())
                if isinstance(credit, CreditMsg):
                    self._credit(sec, credit.tag)
            while sec.results_in.poll(0, zmq.POLLIN):
                parts = sec.results_in.recv_multipart(copy=False)
                msg = decode_message(parts[0].buffer)
                if isinstance(msg, ResultMsg):
                    self._results(sec, msg, parts)
                elif not isinstance(msg, EndOfStream):
                    raise StageError(f"cascade: expected ResultMsg from the secondary engine, got {type(msg).__name__}")
            if sec.records and (now - sec.opened_at) * 1000.0 >= sec.link.max_wait_ms:
                self._send(sec)
            self._expire(sec)

    def _credit(self, sec: _Secondary, tag: int) -> None:
        """The engine is done with a batch's tensor slot (a stale or repeated credit is ignored)."""
        fl = sec.in_flight.get(tag)
        if fl is None or fl.credited:
            return
        fl.credited = True
        if fl.answered:
            self._finish(sec, tag)

    def _finish(self, sec: _Secondary, tag: int) -> _Flight:
        """A batch is done (answered and credited) or given up: its tensor slot is free again.

        The slot is kept until the results are back too, so that a batch can be sent again after a
        restart of the secondary engine whatever the moment it died.
        """
        fl = sec.in_flight.pop(tag)
        sec.free.release(fl.msg.tensor_slot)
        return fl

    def _results(self, sec: _Secondary, msg: ResultMsg, parts: list[Any]) -> None:
        tag = sec.tag_of.pop(_first_crop(msg), None)
        fl = sec.in_flight.get(tag) if tag is not None else None
        if fl is None or fl.answered:
            return  # a second answer to a batch sent again after a restart of the secondary engine
        fl.answered = True
        if fl.credited:
            self._finish(sec, tag)  # type: ignore[arg-type]
        arrays = [spec.array_from(parts[1 + i].buffer) for i, spec in enumerate(msg.outputs)]
        link = sec.link
        k = self._sec.index(sec)
        sec.counts.engine_ms += msg.engine_ms
        crop_dets = postprocess(arrays, [r.letterbox for r in msg.frames], link.card, link.config)
        for record, d in zip(msg.frames, crop_dets, strict=True):
            f = record.frame
            parent, x0, y0 = record.crop
            entry = self._waiting.get((f.source_id, f.frame_index))
            if entry is None or (k, parent) not in entry.outstanding:
                continue  # a frame forgotten meanwhile
            children = children_to_frame(d, (x0, y0), f.frame_hw, entry.item.detections.boxes_xyxy[parent])
            text = score = None
            if link.read_text:
                text, score = read_text(children.boxes_xyxy, children.scores, children.class_ids,
                                        link.card.class_names, link.config.score_threshold)
            entry.children.setdefault(parent, []).append(Children(children, link.card.class_names, text, score))
            self._done(entry, k, parent)

    def _done(self, entry: _Entry, k: int, parent: int) -> None:
        entry.outstanding.discard((k, parent))
        if not entry.outstanding:
            f = entry.item.record.frame
            self._waiting.pop((f.source_id, f.frame_index), None)

    def _give_up(self, sec: _Secondary, tag: int) -> None:
        """Drop a batch: its slot comes back (if it has not), its crops publish without children."""
        fl = self._finish(sec, tag)
        sec.tag_of.pop(_first_crop(fl.msg), None)
        sec.counts.timeouts += 1
        k = self._sec.index(sec)
        for r in fl.msg.frames:
            entry = self._waiting.get((r.frame.source_id, r.frame.frame_index))
            if entry is not None:
                self._done(entry, k, r.crop[0])

    def _expire(self, sec: _Secondary) -> None:
        """Give up batches unanswered for :data:`BATCH_TIMEOUT_S`."""
        now = time.monotonic()
        for tag, fl in list(sec.in_flight.items()):
            if not fl.answered and now - fl.sent >= BATCH_TIMEOUT_S:
                self._give_up(sec, tag)

    def resend(self) -> None:
        """The secondary engine was restarted: send its unanswered batches again (their slots are still theirs)."""
        for sec in self._sec:
            for fl in sec.in_flight.values():
                if fl.answered:
                    continue
                fl.sent = time.monotonic()
                sec.counts.resent += 1
                send_parts(sec.batches_out, [fl.msg.encode()], self.flags.alive)

    # -- frames out ------------------------------------------------------------------------------------

    def released(self) -> Iterator[Any]:
        """Frames whose crops are all back, in each source's order, with their children attached."""
        for sid, q in list(self._queues.items()):
            while q and not q[0].outstanding:
                e = q.popleft()
                yield dataclasses.replace(e.item, children=e.children) if e.children else e.item
            if not q:
                del self._queues[sid]
                eos = self._held_eos.pop(sid, None)
                if eos is not None:
                    self._ready_eos.append(eos)

    def hold_eos(self, eos: EndOfStream) -> bool:
        """Keep a source's EOS while frames of it are in the cascade (returned later by :meth:`released_eos`)."""
        for sec in self._sec:  # its last crops go out now rather than after max_wait_ms
            if any(r.frame.source_id == eos.source_id for r in sec.records):
                self._send(sec)
        if self._queues.get(eos.source_id):
            self._held_eos[eos.source_id] = eos
            return True
        return False

    def released_eos(self) -> list[EndOfStream]:
        """EOS messages whose frames have all left the cascade."""
        out, self._ready_eos = self._ready_eos, []
        return out

    def forget(self, source_id: str) -> None:
        """Drop a source's queued frames (their pool is gone; the decoder sends them again)."""
        for e in self._queues.pop(source_id, deque()):
            f = e.item.record.frame
            self._waiting.pop((f.source_id, f.frame_index), None)
        self._held_eos.pop(source_id, None)

    def summary_lines(self) -> list[str]:
        """One line per secondary model: crops, batches, cost per crop, skipped crops."""
        out = []
        for sec in self._sec:
            c = sec.counts
            per_batch = c.crops / c.batches if c.batches else 0.0
            per_crop = c.crop_ms / c.crops if c.crops else 0.0
            engine = c.engine_ms / c.batches if c.batches else 0.0
            out.append(f"secondary {sec.link.card.name}: {c.crops} crops in {c.batches} batches "
                       f"({per_batch:.1f} per batch, {engine:.1f} ms engine per batch), {per_crop:.2f} ms per crop "
                       f"to cut and letterbox, skipped {c.too_small} smaller than min_side_px and "
                       f"{c.over_limit} over max_crops" + (f", {c.timeouts} batches timed out" if c.timeouts else ""))
        return out

    def counts(self) -> dict[str, int]:
        """Totals over the secondary models (crops, batches, skipped, timed out)."""
        cs = [s.counts for s in self._sec]
        return {"crops": sum(c.crops for c in cs), "crop_batches": sum(c.batches for c in cs),
                "crops_too_small": sum(c.too_small for c in cs), "crops_over_limit": sum(c.over_limit for c in cs),
                "crop_timeouts": sum(c.timeouts for c in cs)}

    def close(self) -> None:
        """Close the sockets and the tensor pools (unlinked: this stage created them)."""
        for sec in self._sec:
            sec.close(self.flags)
        self._sec = []


def _first_crop(msg: BatchMsg | ResultMsg) -> tuple[str, int, int]:
    """A batch's key: its first crop's (source, frame index, parent) (results carry the batch's records back)."""
    r = msg.frames[0]
    return r.frame.source_id, r.frame.frame_index, r.crop[0]


def pixels_of(pools: Any, record: FrameRecord) -> npt.NDArray[np.uint8] | None:
    """The frame's pixels as a view of its slot, or None when its pool is gone (its decoder restarted)."""
    f = record.frame
    if f.slot < 0:
        return None
    try:
        return pools.get(f.pool).view(f.slot, (f.frame_hw[0], f.frame_hw[1], 3))  # type: ignore[no-any-return]
    except StalePoolError:
        return None
