"""Preprocess stage: letterbox, normalise and batch frames into the engine's input tensor.

Each frame is letterboxed to the model card's input size (:func:`streamdet.letterbox.letterbox_into`
writing into a preallocated buffer), then converted to the card's channel order and
normalisation, ``x = (pixel - mean) / std``, straight into one row of a ``(B, 3, H, W)`` tensor in
a shared-memory tensor pool this stage owns. A batch is sent when it holds ``max_batch`` frames,
when ``max_wait_ms`` passed since its first frame, or when a source ends. Frame slots stay lent
until the postprocess stage has published the frame and hands them back (so that a restarted
stage can have the frame sent again, :mod:`pipeline.supervise`); without a ledger (a stage run
on its own) they go back as soon as the frame is in the tensor, unless a sink keeps the pixels.

With a CUDA engine (``--device cuda``, ``preprocess.on_device`` on) the tensor pool is on the GPU
instead (:class:`pipeline.gpu.tensor_pool.DeviceTensorPool`): each frame is copied to the device
once, letterboxed and normalised there (:class:`pipeline.gpu.gpu_preprocess.GpuLetterbox`) into a row
of a device slot, and the ring's handle goes to the engine once, in a
:class:`~streamdet.messages.PoolHandleMsg` before the first batch. PyTorch is imported only then.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
import zmq

from pipeline.slotpool import PoolCache, SlotCredits, SlotPool, StalePoolError, pool_bytes
from pipeline.stages.base import (
    Stage,
    StageError,
    StageSpec,
    StatusReporter,
    check_alive,
    close_sockets,
    credit_socket,
    frame_credit_sockets,
    receive,
)
from pipeline.stages.normalize import KeptPadding, Normalizer
from pipeline.supervise import Ledger
from pipeline.transport import (
    POLL_MS,
    StageEndpoints,
    StageFlags,
    make_socket,
    send_parts,
)
from streamdet.card import ModelCard
from streamdet.letterbox import LetterboxParams, letterbox_into, rect_input_wh, resize_params
from streamdet.messages import (
    INLINE_SLOT,
    NO_SLOT,
    BatchMsg,
    CreditMsg,
    EndOfStream,
    FrameMsg,
    FrameRecord,
    PoolHandleMsg,
    StageName,
)

if TYPE_CHECKING:
    from pipeline.gpu.tensor_pool import DeviceTensorPool


RECT_MEMORY_S = 2.0
"""Dynamic-input models: frame sizes seen within this many seconds share one batch rectangle."""

STOP_WAIT_S = 10.0
"""Longest wait at the end for the engine to hand back the tensor slots it holds (it may be gone)."""


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec(StageSpec):
    """Builds a :class:`PreprocessStage` in its process.

    Attributes:
        card: the model card.
        endpoints: the pipeline's endpoints.
        tensor_pool: name of the tensor pool to create.
        tensor_slots: tensors in the pool.
        max_batch: frames per batch (the model's static batch size if it has one).
        pad_batches: pad every batch to ``max_batch`` rows (models with a static batch size).
        max_wait_ms: send a partial batch this long after its first frame.
        keep_pixels: a later stage needs the frame pixels (keep the slot / forward the bytes).
        num_sources: sources feeding the pipeline (the stage ends after that many EOS).
        tensor_device: preprocess on this torch device into a device tensor pool (``cuda``,
            ``cuda:N``; ``cpu`` only in tests, to run the same path without a GPU); None: on the host.
        rect_stride: the model's spatial input is dynamic: letterbox each frame into the smallest
            stride-multiple rectangle that holds it (:func:`streamdet.letterbox.rect_input_wh`); None:
            into the card's full input size.

    With a ledger (:attr:`StageSpec.ledger`) batches carry engine generations and the stage stays
    until the run finished.
    """

    card: ModelCard
    endpoints: StageEndpoints
    tensor_pool: str
    tensor_slots: int
    max_batch: int
    pad_batches: bool
    max_wait_ms: float
    keep_pixels: bool
    num_sources: int
    tensor_device: str | None = None
    rect_stride: int | None = None

    stage_name: ClassVar[StageName] = StageName.PREPROCESS

    @property
    def tensor_slot_bytes(self) -> int:
        """Bytes of one input tensor: ``max_batch`` rows of the card's full input size."""
        return self.card.batch_nbytes(self.max_batch)

    @property
    def pool_bytes(self) -> int:
        """Shared memory the stage creates at start: its tensor pool (none on a device or over tcp)."""
        if self.tensor_device is not None or self.endpoints.inline:
            return 0
        return pool_bytes(self.tensor_slots, self.tensor_slot_bytes)

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> PreprocessStage:
        """Bind the frame and tensor-credit sockets, connect the others, create the tensor pool."""
        ep = self.endpoints
        frames_in = make_socket(ctx, zmq.PULL, ep.frames, bind=True)
        credits_in = make_socket(ctx, zmq.PULL, ep.tensor_credits, bind=True)
        batches_out = make_socket(ctx, zmq.PUSH, ep.batches, bind=False)
        frame_credits_out = frame_credit_sockets(ctx, ep)
        iw, ih = self.card.input_wh
        dtype = np.dtype(self.card.input.dtype)
        tensor_pool = None
        device_pool = None
        if self.tensor_device is not None:
            from pipeline.gpu.tensor_pool import DeviceTensorPool

            device_pool = DeviceTensorPool.create(name=self.tensor_pool, num_slots=self.tensor_slots,
                                                  batch_shape=(self.max_batch, 3, ih, iw), dtype=dtype.name,
                                                  device=self.tensor_device)
        elif not ep.inline:
            tensor_pool = SlotPool.create(name=self.tensor_pool, num_slots=self.tensor_slots,
                                          slot_bytes=self.tensor_slot_bytes)
        return PreprocessStage(card=self.card, frames_in=frames_in, batches_out=batches_out,
                               tensor_credits_in=credits_in, frame_credits_out=frame_credits_out,
                               tensor_pool=tensor_pool, status=status, flags=flags, max_batch=self.max_batch,
                               pad_batches=self.pad_batches, max_wait_ms=self.max_wait_ms,
                               keep_pixels=self.keep_pixels, num_sources=self.num_sources,
                               device_pool=device_pool, rect_stride=self.rect_stride,
                               ledger=self.attach_ledger(),
                               ledger_chain=self.ledger.chain if self.ledger is not None else 0)


class PreprocessStage(Stage):
    """Letterboxes, normalises and batches frames.

    Args:
        card: the model card.
        frames_in: PULL socket (bound) of :class:`FrameMsg` / :class:`EndOfStream`.
        batches_out: PUSH socket to the engine.
        tensor_credits_in: PULL socket (bound) of :class:`CreditMsg` for the tensor pool.
        frame_credits_out: PUSH socket per frame pool, to hand frame slots back.
        tensor_pool: the tensor pool this stage owns, or None to send tensors inline.
        status: reports to the runner.
        flags: lifecycle flags.
        max_batch: frames per batch.
        pad_batches: pad every batch to ``max_batch`` rows.
        max_wait_ms: longest wait for a batch to fill, from its first frame.
        keep_pixels: keep frame slots (or forward inline pixels) for a later stage.
        num_sources: the stage ends after this many EOS.
        device_pool: a device tensor pool to preprocess into on its device instead (then
            ``tensor_pool`` is ignored); None: on the host.
        ledger: the run's ledger (None: no supervision). With it, frame slots are not handed back
            here (the postprocess stage does it once the frame is published), batches carry the
            chain's engine generation, the tensor slots lent to a dead engine are reclaimed when a
            new generation starts, and the stage runs until the ledger says the run finished.
        ledger_chain: the stage's model chain in the ledger.
        rect_stride: letterbox into the smallest stride-multiple rectangle that holds each frame (a
            model with a dynamic spatial input, as ultralytics' predictor does); with sources of
            different sizes, into the rectangle that holds all the sizes seen lately (a batch has one
            input size). None: the full input size.
    """

    name = StageName.PREPROCESS

    def __init__(self, *, card: ModelCard, frames_in: zmq.Socket[Any], batches_out: zmq.Socket[Any],
                 tensor_credits_in: zmq.Socket[Any], frame_credits_out: dict[str, zmq.Socket[Any]],
                 tensor_pool: SlotPool | None, status: StatusReporter, flags: StageFlags, max_batch: int,
                 pad_batches: bool, max_wait_ms: float, keep_pixels: bool, num_sources: int,
                 device_pool: DeviceTensorPool | None = None, ledger: Ledger | None = None,
                 ledger_chain: int = 0, rect_stride: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"expected max_batch >= 1, got {max_batch}")
        self.card = card
        self.frames_in = frames_in
        self.batches_out = batches_out
        self.tensor_credits_in = tensor_credits_in
        self.frame_credits_out = frame_credits_out
        self.tensor_pool = tensor_pool if device_pool is None else None
        self.device_pool = device_pool
        self.status = status
        self.flags = flags
        self.max_batch = max_batch
        self.pad_batches = pad_batches
        self.max_wait_s = max_wait_ms / 1000.0
        self.keep_pixels = keep_pixels
        self.num_sources = num_sources
        iw, ih = card.input_wh
        self._input_wh = (iw, ih)
        self._dtype = np.dtype(card.input.dtype)
        self.rect_stride = rect_stride if device_pool is None else None  # the device letterbox fills the square
        self._lb_by_wh: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}  # letterbox buffer per input size
        self._batch_wh = (iw, ih)  # input size of the batch being filled
        self._rect_seen: dict[tuple[int, int], float] = {}  # minimum rectangles of recent frames -> when last seen
        self._normalize = Normalizer(card)
        self._kept = KeptPadding()  # tensor-slot rows that hold a letterbox's padding already
        self._pools = PoolCache()
        self._pool_of: dict[str, str] = {}  # source id -> its frame pool (unmapped at its EOS)
        pool = device_pool if device_pool is not None else tensor_pool
        self._tensor_credits = SlotCredits(pool.num_slots) if pool is not None else None
        self._device: Any = None  # torch.device of the device pool
        self._gpu_letterbox: Any = None  # GpuLetterbox writing into its slots
        self._handle_sent = False
        if device_pool is not None:
            from pipeline.gpu.gpu_preprocess import GpuLetterbox

            self._device = device_pool.slot(0).device
            self._gpu_letterbox = GpuLetterbox(card=card, max_batch=1, device=self._device)
        # the batch being filled: a host array, or a device tensor (a device pool slot)
        self._tensor: Any = None
        self._tensor_slot = INLINE_SLOT
        self._records: list[FrameRecord] = []
        self._pixels: list[Any] = []
        self._first_at = 0.0
        self.ledger = ledger
        self._chain = ledger_chain
        self._engine_gen = ledger.engine_gen(ledger_chain) if ledger is not None else 0
        if ledger is not None:
            ledger.set_preprocess_ack(ledger_chain, self._engine_gen)
        self._lent: dict[int, int] = {}  # tensor slot -> tag of the batch lent to the engine
        self._batch_seq = 0
        self.stale_frames = 0

    def _check_engine_gen(self) -> None:
        """Take over a new engine generation: reclaim the tensor slots lent to the dead engine."""
        if self.ledger is None:
            return
        gen = self.ledger.engine_gen(self._chain)
        if gen == self._engine_gen:
            return
        assert self._tensor_credits is not None or not self._lent
        for slot in self._lent:
            assert self._tensor_credits is not None
            self._tensor_credits.release(slot)
        self._lent.clear()
        self._handle_sent = False  # the new engine needs the device pool's handle again
        self._engine_gen = gen
        self.ledger.set_preprocess_ack(self._chain, gen)

    def _alive(self) -> bool:
        """``flags.alive()`` for blocking sends, taking over a new engine generation meanwhile."""
        self._check_engine_gen()
        return self.flags.alive()

    def _finished(self, ended: int) -> bool:
        if self.ledger is None:
            return ended >= self.num_sources
        return ended >= self.num_sources and self.ledger.finished

    def start(self) -> None:
        """Nothing to acquire beyond what :meth:`PreprocessSpec.build` made."""

    def run(self) -> None:
        """Batch frames until every source has sent EOS (supervised: until the run finished)."""
        ended: set[str] = set()
        while not self._finished(len(ended)):
            self._check_engine_gen()
            timeout = POLL_MS
            if self._records:
                left = self._first_at + self.max_wait_s - time.monotonic()
                if left <= 0:
                    self._flush()
                    continue
                timeout = max(0, min(POLL_MS, int(left * 1000) + 1))
            got = receive(self.frames_in, self.flags, timeout)
            if got is None:
                continue
            msg, parts = got
            if isinstance(msg, FrameMsg):
                if msg.pool:
                    self._pool_of[msg.source_id] = msg.pool
                self._add(msg, parts[1].buffer if msg.slot == INLINE_SLOT else None)
                if len(self._records) >= self.max_batch:
                    self._flush()
            elif isinstance(msg, EndOfStream):
                self._flush()
                send_parts(self.batches_out, [msg.encode()], self._alive)
                ended.add(msg.source_id)
                pool = self._pool_of.pop(msg.source_id, None)
                if pool is not None:  # unmap it (a replayed frame maps it again); its memory goes once unlinked
                    self._pools.drop(pool)
            else:
                raise StageError(f"preprocess: expected FrameMsg or EndOfStream, got {type(msg).__name__}")

    def _begin_batch(self, input_wh: tuple[int, int]) -> None:
        self._batch_wh = input_wh
        iw, ih = input_wh
        if self.tensor_pool is None and self.device_pool is None:
            self._tensor = np.empty((self.max_batch, 3, ih, iw), dtype=self._dtype)
            self._tensor_slot = INLINE_SLOT
        else:
            assert self._tensor_credits is not None
            slot = self._tensor_credits.acquire()
            while slot is None:
                check_alive(self.flags)
                self._check_engine_gen()
                self._drain_tensor_credits(POLL_MS)
                slot = self._tensor_credits.acquire()
            self._tensor_slot = slot
            if self.device_pool is not None:
                self._tensor = self.device_pool.slot(slot)
            else:
                assert self.tensor_pool is not None
                self._tensor = self.tensor_pool.view(slot, (self.max_batch, 3, ih, iw), self._dtype)
        self._first_at = time.monotonic()

    def _drain_tensor_credits(self, timeout_ms: int) -> None:
        assert self._tensor_credits is not None
        pool = self.device_pool if self.device_pool is not None else self.tensor_pool
        while self.tensor_credits_in.poll(timeout_ms, zmq.POLLIN):
            credit = CreditMsg.decode(self.tensor_credits_in.recv())
            timeout_ms = 0
            if self.ledger is None:
                self._tensor_credits.release(credit.slot)
                continue
            # stale: from a dead engine's era (slot reclaimed) or for an older pool generation
            if pool is None or credit.pool != pool.name or self._lent.get(credit.slot) != credit.tag:
                continue
            del self._lent[credit.slot]
            self._tensor_credits.release(credit.slot)

    def _add(self, frame: FrameMsg, inline: memoryview | None) -> None:
        t0 = time.perf_counter()
        h, w = frame.frame_hw
        if inline is not None:
            image = np.frombuffer(inline, dtype=np.uint8).reshape(h, w, 3)
        else:
            try:
                image = self._pools.get(frame.pool).view(frame.slot, (h, w, 3))
            except StalePoolError:  # its decoder restarted: the new one sends the frame again
                self.stale_frames += 1
                return
        input_wh = self._input_wh if self.rect_stride is None else self._rect_for((h, w))
        if self._records and (input_wh[0] > self._batch_wh[0] or input_wh[1] > self._batch_wh[1]):
            self._flush()  # a batch holds one input size: this frame needs a larger one
        if not self._records:
            if self._tensor_credits is not None:
                self._drain_tensor_credits(0)
            self._begin_batch(input_wh)
        assert self._tensor is not None
        row = len(self._records)
        if self._gpu_letterbox is not None:
            params = self._letterbox_on_device(image, row)
        else:
            lb = self._lb_by_wh.get(input_wh)
            if lb is None:
                lb = self._lb_by_wh[input_wh] = np.empty((input_wh[1], input_wh[0], 3), dtype=np.uint8)
            slot, params = self._tensor_slot, resize_params((h, w), input_wh, self.card.input.resize)
            window = self._kept.window(slot, self._batch_wh, row, params)
            letterbox_into(image, lb, params, pad_value=self.card.pad_value, fill_pad=window is None)
            self._normalize(lb, self._tensor[row], window)
            self._kept.wrote(slot, self._batch_wh, row, params)
        del image
        if self.ledger is not None:  # the postprocess stage hands the slot back once published
            if inline is not None and self.keep_pixels:
                self._pixels.append(inline)
        elif not self.keep_pixels:
            if frame.slot >= 0:
                credit = CreditMsg(frame.pool, frame.slot)
                send_parts(credit_socket(self.frame_credits_out, frame.pool), [credit.encode()], self.flags.alive)
            frame = replace(frame, slot=NO_SLOT, pool="")
        elif inline is not None:
            self._pixels.append(inline)
        ms = (time.perf_counter() - t0) * 1000.0
        self._records.append(FrameRecord(frame, params, ms))

    def _rect_for(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The input size for a dynamic-input model's frame: the smallest rectangle holding every size seen lately.

        With one frame size (one source, or sources alike) it is that size's minimum rectangle, as
        ultralytics' predictor uses; with sources of different sizes, the rectangle holding all of
        them (still at most the card's size, same scale), so that their frames share batches.
        """
        rect = rect_input_wh(frame_hw, self._input_wh, self.rect_stride or 32)
        now = time.monotonic()
        self._rect_seen[rect] = now
        if len(self._rect_seen) > 1:
            for old in [r for r, t in self._rect_seen.items() if now - t > RECT_MEMORY_S]:
                del self._rect_seen[old]
        return max(r[0] for r in self._rect_seen), max(r[1] for r in self._rect_seen)

    def _letterbox_on_device(self, image: npt.NDArray[np.uint8], row: int) -> LetterboxParams:
        """Copy a host frame to the device once, letterbox + normalise it into row ``row`` of the slot."""
        import torch

        with warnings.catch_warnings():  # inline frames are read-only buffers; they are only read
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(image)
        frame = host.to(self._device)  # the one host-to-device copy (synchronous from pageable memory)
        _, params = self._gpu_letterbox([frame], out=self._tensor[row : row + 1])
        return params[0]

    def _flush(self) -> None:
        if not self._records:
            return
        assert self._tensor is not None
        n = len(self._records)
        rows = self.max_batch if self.pad_batches else n
        iw, ih = self._batch_wh
        pool_name = self.tensor_pool.name if self.tensor_pool is not None else ""
        if self.device_pool is not None:
            from pipeline.gpu.tensor_pool import synchronize

            pool_name = self.device_pool.name
            synchronize(self._device)  # the engine reads the slot in another process
            if not self._handle_sent:
                announce = PoolHandleMsg(pool_name, self.device_pool.handle().encode())
                send_parts(self.batches_out, [announce.encode()], self._alive)
                self._handle_sent = True
        self._batch_seq += 1
        msg = BatchMsg(tuple(self._records), self._tensor_slot, pool_name, (rows, 3, ih, iw), self._dtype.name,
                       self._engine_gen, self._batch_seq)
        parts: list[Any] = [msg.encode()]
        if self._tensor_slot == INLINE_SLOT:
            parts.append(np.ascontiguousarray(self._tensor[:rows]))
        else:
            self._lent[self._tensor_slot] = self._batch_seq
        parts.extend(self._pixels)
        send_parts(self.batches_out, parts, self._alive)
        self._records = []
        self._pixels = []
        self._tensor = None

    def stop(self) -> None:
        """Wait for the engine to hand back the tensors, close the sockets, unlink the tensor pool."""
        if self._tensor is not None and self._tensor_slot != INLINE_SLOT and self._tensor_credits is not None:
            self._tensor_credits.release(self._tensor_slot)  # a batch never sent (the stage failed while filling it)
        self._tensor = None
        if self._tensor_credits is not None:  # the engine may still be reading the last tensor
            deadline = time.monotonic() + STOP_WAIT_S
            while self._tensor_credits.in_use and self.flags.alive() and time.monotonic() < deadline:
                self._drain_tensor_credits(POLL_MS)
        self._pools.close()
        close_sockets(self.flags, outputs=(self.batches_out, *self.frame_credits_out.values()),
                      inputs=(self.frames_in, self.tensor_credits_in))
        if self.tensor_pool is not None:
            self.tensor_pool.close()
            self.tensor_pool = None
        if self.device_pool is not None:
            self.device_pool.close()
            self.device_pool = None
        self._gpu_letterbox = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
