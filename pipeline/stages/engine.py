"""Engine stage: runs the model on each batch through the :class:`engines.base.Engine` interface.

The backend is picked by the :class:`engines.base.Backend` enum in :func:`make_engine` (plain
Python, no registry), so TensorRT or CUDA engines slot in without touching the stage. The stage
reads the input tensor from the preprocess stage's shared-memory pool (or inline), hands the
tensor slot back as soon as the engine returns, and sends the raw outputs (real rows only) in a
slot of its output pool (:mod:`pipeline.output_pool`) or, without a free slot or a pool, as
extra message parts of the :class:`~streamdet.messages.ResultMsg`.

Device batches (``--device cuda`` with ``preprocess.on_device``): the preprocess stage announces
its device tensor pool once (:class:`~streamdet.messages.PoolHandleMsg`); the stage opens the ring
once and runs the engine's ``infer_device`` on the slot (no host copy of the input). For
detect heads with hard NMS (:func:`streamdet.postprocess.device_nms_supported`) it also runs NMS on
the device (:func:`pipeline.gpu.gpu_nms.postprocess_detect_torch`, letterbox undone there) and
sends only the kept detections (:data:`streamdet.postprocess.KEPT_OUTPUTS`); other heads send
their raw outputs, copied to the host, to the CPU postprocess as usual. ``engine_ms`` then
includes the device NMS and the copy to the host. PyTorch is imported only on this path.

With ``more_engines`` the stage runs several host batches at once, one engine instance and
thread each, and still publishes them in order (``engine.concurrent_batches``; docs/pipeline.md).
Reading a model's interface and checking its card live in :mod:`pipeline.stages.model_check`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import zmq

from engines.base import Backend, DeviceEngine, Engine
from pipeline.output_pool import MAX_POOL_BYTES, OutputPool, outputs_bytes
from pipeline.slotpool import PoolCache, SlotPoolError, StalePoolError, shm_free_bytes
from pipeline.stages.base import (
    Stage,
    StageError,
    StageSpec,
    StatusReporter,
    check_alive,
    close_sockets,
    receive,
    say,
)
from pipeline.supervise import Ledger
from pipeline.transport import (
    POLL_MS,
    StageEndpoints,
    StageFlags,
    make_socket,
    send_parts,
)
from streamdet.card import ModelCard, ModelCardError
from streamdet.messages import (
    INLINE_SLOT,
    BatchMsg,
    CreditMsg,
    EndOfStream,
    FrameRecord,
    PoolHandleMsg,
    ResultMsg,
    StageName,
    TensorSpec,
)


def make_engine(*, backend: Backend, model_path: str | os.PathLike[str], device: str = "cpu",
                intra_op_threads: int = 0, allow_fallback: bool = False) -> Engine:
    """Create the engine for a backend and device (not started), via :func:`engines.select.select_engine`.

    Args:
        backend: which backend.
        model_path: the model file (``.onnx``; TensorRT and CUDA backends find their files beside it).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        intra_op_threads: CPU threads per operator (ONNX Runtime; 0 = one per core).
        allow_fallback: fall back to the next available backend instead of failing.

    Returns:
        An :class:`Engine`.

    Raises:
        EngineError: if the backend cannot run here (the message says why).
    """
    from engines.select import select_engine

    return select_engine(backend, device, model_path, allow_fallback=allow_fallback,
                         intra_op_threads=intra_op_threads)


@dataclass(frozen=True, kw_only=True)
class EngineSpec(StageSpec):
    """Builds an :class:`EngineStage` in its process.

    Attributes:
        card: the model card.
        model_path: the model file.
        backend: which engine.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        intra_op_threads: CPU threads per operator.
        allow_fallback: fall back to another backend when this one cannot run.
        endpoints: the pipeline's endpoints.
        num_sources: the stage ends after that many EOS.
        warmup_batch: batch size of one warm-up inference before reporting ready (0: none).
        device_batches: batches come from a device tensor pool (the engine must have ``infer_device``).
        device_nms: with device batches, run NMS on the device with these thresholds (a
            ``streamdet.postprocess.PostprocessConfig``; None: send the raw outputs to the host).
        concurrent_batches: batches run at once, each by its own engine instance on its own thread
            (host batches only; see :class:`EngineStage`).
        output_pool: name (generation included) of the shared-memory pool the stage creates to hand
            its outputs to the postprocess stage (:mod:`pipeline.output_pool`); None: outputs travel
            inline in the messages. Needs ``warmup_batch`` (the warm-up's outputs size the slots)
            and a ledger (the stage then outlives the postprocess stage's reads).

    With a ledger (:attr:`StageSpec.ledger`) the stage drops batches made for an older engine
    generation and stays until the run finished.
    """

    card: ModelCard
    model_path: str
    backend: Backend
    device: str
    intra_op_threads: int
    allow_fallback: bool
    endpoints: StageEndpoints
    num_sources: int
    warmup_batch: int = 0
    device_batches: bool = False
    device_nms: Any = None
    concurrent_batches: int = 1
    output_pool: str | None = None

    stage_name: ClassVar[StageName] = StageName.ENGINE

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> EngineStage:
        """Bind the batch socket, connect the result and credit sockets, create the engine."""
        ep = self.endpoints
        batches_in = make_socket(ctx, zmq.PULL, ep.batches, bind=True)
        results_out = make_socket(ctx, zmq.PUSH, ep.results, bind=False)
        credits_out = make_socket(ctx, zmq.PUSH, ep.tensor_credits, bind=False)
        engines = [make_engine(backend=self.backend, model_path=self.model_path, device=self.device,
                               intra_op_threads=self.intra_op_threads, allow_fallback=self.allow_fallback)]
        if self.concurrent_batches > 1:  # more instances of what the first settled on (any fallback warned once)
            from engines.onnxruntime_backend import OnnxRuntimeEngine

            if not isinstance(engines[0], OnnxRuntimeEngine) or engines[0].providers != ("CPUExecutionProvider",):
                raise StageError(f"engine: concurrent batches need ONNX Runtime on the CPU, "
                                 f"not {type(engines[0]).__name__} on {self.device}")
            engines += [make_engine(backend=Backend.ONNXRUNTIME, model_path=self.model_path, device="cpu",
                                    intra_op_threads=self.intra_op_threads)
                        for _ in range(self.concurrent_batches - 1)]
        return EngineStage(engine=engines[0], more_engines=tuple(engines[1:]), card=self.card,
                           batches_in=batches_in, results_out=results_out,
                           tensor_credits_out=credits_out, status=status, flags=flags,
                           num_sources=self.num_sources, warmup_batch=self.warmup_batch,
                           device_batches=self.device_batches, device_nms=self.device_nms,
                           ledger=self.attach_ledger(),
                           ledger_chain=self.ledger.chain if self.ledger is not None else 0,
                           output_pool=self.output_pool)


@dataclass(frozen=True)
class _Pending:
    """A host batch being run on an engine thread."""

    msg: BatchMsg
    pixel_parts: list[Any]
    engine: Engine
    future: Future[tuple[list[Any], float]]


class EngineStage(Stage):
    """Runs the engine on every batch.

    Args:
        engine: the (not yet started) engine.
        card: the model card (output names and order).
        batches_in: PULL socket (bound) of :class:`BatchMsg` / :class:`EndOfStream`.
        results_out: PUSH socket to the postprocess stage.
        tensor_credits_out: PUSH socket handing tensor slots back to the preprocess stage.
        status: reports to the runner.
        flags: lifecycle flags.
        num_sources: the stage ends after this many EOS.
        warmup_batch: batch size of one warm-up inference in :meth:`start` (0: none), so the first
            real batch does not pay for lazy allocations.
        device_batches: expect batches in a device tensor pool (:class:`~streamdet.messages.PoolHandleMsg`
            first); the engine must have ``infer_device(batch: torch.Tensor) -> list[torch.Tensor]``.
        device_nms: with device batches, a ``streamdet.postprocess.PostprocessConfig`` to run NMS on
            the device with (detect heads only); None: raw outputs go to the host.
        ledger: the run's ledger (None: no supervision). With it, the stage drops batches stamped
            with an older engine generation than its own (made for a dead engine, their tensor
            slots already reclaimed) and runs until the ledger says the run finished.
        ledger_chain: the stage's model chain in the ledger.
        output_pool: name of the output pool to create in :meth:`start`, sized from the warm-up
            batch's outputs (None, no warm-up batch, no ledger, or NMS on the device, whose kept
            detections are small: outputs travel inline). It takes at most an eighth of the free
            ``/dev/shm``; if that is too little, outputs travel inline, and if it cannot be
            created the stage warns once and sends inline.
        more_engines: further instances of the same model (not yet started). With them the stage
            runs that many more host batches at once, each instance on its own thread, and still
            publishes results (and hands tensor slots back) in the order the batches came. On a
            CPU this is the throughput mode of ONNX Runtime's and OpenVINO's performance guides:
            several single-threaded runs keep every core busy through the single-threaded
            operators and need no barrier between a parallel operator's threads (2 cores,
            bundled detector: 46.7 frames/s for two 1-thread runs of batch 1 against 40 for one
            2-thread run of batch 4; docs/pipeline.md). Not with ``device_batches``.

    Raises:
        StageError: if ``more_engines`` is given with ``device_batches``.
    """

    name = StageName.ENGINE

    def __init__(self, *, engine: Engine, card: ModelCard, batches_in: zmq.Socket[Any],
                 results_out: zmq.Socket[Any], tensor_credits_out: zmq.Socket[Any], status: StatusReporter,
                 flags: StageFlags, num_sources: int, warmup_batch: int = 0, device_batches: bool = False,
                 device_nms: Any = None, ledger: Ledger | None = None, ledger_chain: int = 0,
                 more_engines: tuple[Engine, ...] = (), output_pool: str | None = None) -> None:
        if more_engines and device_batches:
            raise StageError("engine: concurrent batches run on host tensors only, not with device batches")
        self.engine = engine
        self.more_engines = more_engines
        self._engines = (engine, *more_engines)
        self._free: list[Engine] = []
        self._inflight: deque[_Pending] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._wake_r = self._wake_w = -1
        self._poller = zmq.Poller()  # the batch socket and the wake-up pipe, with more_engines
        self.warmup_batch = warmup_batch
        self.card = card
        self.batches_in = batches_in
        self.results_out = results_out
        self.tensor_credits_out = tensor_credits_out
        self.status = status
        self.flags = flags
        self.num_sources = num_sources
        self._pools = PoolCache()
        self._order: list[int] = []
        self._started = False
        self.device_batches = device_batches
        self.device_nms = device_nms
        self._device_pools: Any = None  # DeviceTensorPoolCache once a PoolHandleMsg arrived
        self._device_engine: DeviceEngine | None = None  # the engine, once start() checked it runs device batches
        self.ledger = ledger
        self.generation = ledger.engine_gen(ledger_chain) if ledger is not None else 0
        self.stale_batches = 0
        self.ledger_chain = ledger_chain
        self.output_pool_name = output_pool
        self.outputs: OutputPool | None = None  # created in start()
        self._reader_seen = ledger.postprocess_gen if ledger is not None else 0
        self.reclaimed_outputs = 0

    def start(self) -> None:
        """Load the model, map the card's output names onto its outputs, run the warm-up batch.

        Raises:
            EngineError: if the model cannot be loaded.
            ModelCardError: if the card names outputs the model lacks.
            StageError: if device batches are expected and the engine has no ``infer_device``.
        """
        if self.device_batches:
            if not isinstance(self.engine, DeviceEngine):
                raise StageError(f"engine: {type(self.engine).__name__} cannot run device batches (no infer_device); "
                                 "use --backend cuda or tensorrt, or set preprocess.on_device false")
            self._device_engine = self.engine
        self._started = True
        for eng in self._engines:
            eng.start()
        names = list(self.engine.output_names)
        missing = [n for n in self.card.head.outputs if n not in names]
        if missing:
            raise ModelCardError(f"model card names outputs {missing} that the model lacks (it has {names})")
        self._order = [names.index(n) for n in self.card.head.outputs]
        if self.warmup_batch > 0:
            iw, ih = self.card.input_wh
            zeros = np.zeros((self.warmup_batch, 3, ih, iw), dtype=np.dtype(self.card.input.dtype))
            for eng in self._engines:
                warm = eng.infer(zeros)
            if self.output_pool_name is not None and self.ledger is not None and self.device_nms is None:
                self._create_output_pool([np.asarray(warm[i]).nbytes for i in self._order])
        if self.more_engines:
            self._free = list(self._engines)
            self._executor = ThreadPoolExecutor(max_workers=len(self._free), thread_name_prefix="engine")
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            self._poller.register(self.batches_in, zmq.POLLIN)
            self._poller.register(self._wake_r, zmq.POLLIN)

    def run(self) -> None:
        """Infer every batch until every source has sent EOS (supervised: until the run finished)."""
        ended: set[str] = set()
        while len(ended) < self.num_sources or (self.ledger is not None and not self.ledger.finished):
            got = self._next() if self._executor is not None else receive(self.batches_in, self.flags)
            if got is None:
                continue
            msg, parts = got
            if isinstance(msg, BatchMsg):
                if msg.generation < self.generation:  # made for a dead engine: its frames are replayed
                    self.stale_batches += 1
                    continue
                try:
                    if self.device_batches:
                        self._infer_device(msg, parts)
                    elif self._executor is not None:
                        self._submit(msg, parts)
                    else:
                        self._infer(msg, parts)
                except StalePoolError:  # from a preprocess stage that has restarted since
                    self.stale_batches += 1
            elif isinstance(msg, PoolHandleMsg):
                self._open_device_pool(msg)
            elif isinstance(msg, EndOfStream):
                while self._inflight:  # the source's last results go before its EOS
                    self._finish(self._inflight.popleft())
                send_parts(self.results_out, [msg.encode()], self.flags.alive)
                ended.add(msg.source_id)
            else:
                raise StageError(f"engine: expected BatchMsg, PoolHandleMsg or EndOfStream, got {type(msg).__name__}")

    def _host_tensor(self, msg: BatchMsg, parts: list[Any]) -> tuple[Any, list[Any]]:
        """The batch's input tensor (a view of its slot, or of the inline part) and its pixel parts."""
        dtype = np.dtype(msg.tensor_dtype)
        if msg.tensor_slot == INLINE_SLOT:
            return np.frombuffer(parts[1].buffer, dtype=dtype).reshape(msg.tensor_shape), parts[2:]
        return self._pools.get(msg.tensor_pool).view(msg.tensor_slot, msg.tensor_shape, dtype), parts[1:]

    def _create_output_pool(self, warm_nbytes: list[int]) -> None:
        """Create the output pool, a slot holding one warm-up batch's outputs (the largest a batch has).

        At most an eighth of the free shared memory, so that the frame and tensor pools still fit.
        """
        assert self.output_pool_name is not None
        slot_bytes = outputs_bytes(warm_nbytes)
        free = shm_free_bytes()
        cap = MAX_POOL_BYTES if free is None else min(MAX_POOL_BYTES, free // 8)
        slots = OutputPool.plan(slot_bytes, 2 * len(self._engines) + 2, cap)
        if slots == 0:
            return
        try:
            self.outputs = OutputPool.create(name=self.output_pool_name, num_slots=slots, slot_bytes=slot_bytes)
        except SlotPoolError as e:
            say(f"warning: engine: model outputs travel inline in the messages ({e})")

    def _send_result(self, frames: tuple[FrameRecord, ...], engine_ms: float, names: tuple[str, ...],
                     outputs: list[Any], pixel_parts: list[Any]) -> None:
        """Send a batch's outputs to the postprocess stage: in an output pool slot if one is free, else inline."""
        outputs = [np.ascontiguousarray(o) for o in outputs]
        specs = tuple(TensorSpec.of(name, arr) for name, arr in zip(names, outputs, strict=True))
        lent = None
        if self.outputs is not None:
            assert self.ledger is not None  # (the pool is only created with one)
            reader = self.ledger.postprocess_gen
            if reader != self._reader_seen:  # the postprocess stage died: what it held never comes back
                self._reader_seen = reader
                self.reclaimed_outputs += self.outputs.reclaim()
            lent = self.outputs.put(outputs)
        if lent is None:
            send_parts(self.results_out, [ResultMsg(frames, engine_ms, specs).encode(), *outputs, *pixel_parts],
                       self.flags.alive)
        else:
            assert self.outputs is not None
            result = ResultMsg(frames, engine_ms, specs, lent[0], self.outputs.name, lent[1])
            send_parts(self.results_out, [result.encode(), *pixel_parts], self.flags.alive)

    def _publish(self, msg: BatchMsg, raw: list[Any], engine_ms: float, pixel_parts: list[Any]) -> None:
        """Hand the tensor slot back, send the batch's real rows to the postprocess stage."""
        if msg.tensor_slot != INLINE_SLOT:
            credit = CreditMsg(msg.tensor_pool, msg.tensor_slot, msg.tag)
            send_parts(self.tensor_credits_out, [credit.encode()], self.flags.alive)
        n = len(msg.frames)
        self._send_result(msg.frames, engine_ms, tuple(self.card.head.outputs), [raw[i][:n] for i in self._order],
                          pixel_parts)

    def _next(self) -> tuple[Any, list[Any]] | None:
        """With concurrent batches: publish finished batches in order, then wait for a batch or a finish.

        Returns:
            The next message and its parts, or None when a batch finished or the wait timed out.
        """
        while self._inflight and self._inflight[0].future.done():
            self._finish(self._inflight.popleft())
        if not self._free:  # every instance busy: wait for the oldest batch
            self._finish(self._inflight.popleft())
            return None
        ready = dict(self._poller.poll(POLL_MS))
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 64):
                    pass
            except BlockingIOError:
                pass
        if self.batches_in in ready:
            return receive(self.batches_in, self.flags, 0)
        if not ready:
            check_alive(self.flags)
        return None

    def _submit(self, msg: BatchMsg, parts: list[Any]) -> None:
        """Start a host batch on a free engine instance (its thread); it is published by :meth:`_finish`."""
        assert self._executor is not None and self._free  # _next waits until an instance is free
        tensor, pixel_parts = self._host_tensor(msg, parts)
        engine = self._free.pop()
        future = self._executor.submit(self._run_one, engine, tensor)
        self._inflight.append(_Pending(msg, pixel_parts, engine, future))

    def _run_one(self, engine: Engine, tensor: Any) -> tuple[list[Any], float]:
        """On an engine thread: infer, then wake the stage's loop."""
        try:
            t0 = time.perf_counter()
            raw = engine.infer(tensor)
            return raw, (time.perf_counter() - t0) * 1000.0
        finally:
            os.write(self._wake_w, b"x")

    def _finish(self, pending: _Pending) -> None:
        """Wait for a batch's engine run (re-raising its error), give its instance back, publish it."""
        raw, engine_ms = pending.future.result()
        self._free.append(pending.engine)
        self._publish(pending.msg, raw, engine_ms, pending.pixel_parts)

    def _infer(self, msg: BatchMsg, parts: list[Any]) -> None:
        tensor, pixel_parts = self._host_tensor(msg, parts)
        t0 = time.perf_counter()
        raw = self.engine.infer(tensor)
        engine_ms = (time.perf_counter() - t0) * 1000.0
        del tensor
        self._publish(msg, raw, engine_ms, pixel_parts)

    def _open_device_pool(self, msg: PoolHandleMsg) -> None:
        if not self.device_batches:
            raise StageError(f"engine: got a device tensor pool {msg.pool} but was not set up for device batches")
        from pipeline.gpu.tensor_pool import DeviceTensorPoolCache, DeviceTensorPoolHandle

        if self._device_pools is None:
            self._device_pools = DeviceTensorPoolCache()
        try:
            handle = DeviceTensorPoolHandle.decode(msg.handle)
        except ValueError as e:
            raise StageError(f"engine: tensor pool {msg.pool}: bad handle ({e})") from e
        self._device_pools.open(handle)

    def _infer_device(self, msg: BatchMsg, parts: list[Any]) -> None:
        """Run a batch held in a device tensor pool slot; device NMS when configured."""
        from pipeline.gpu.tensor_pool import synchronize

        if self._device_pools is None or msg.tensor_pool not in self._device_pools:
            raise StageError(f"engine: batch in tensor pool {msg.tensor_pool!r} before its PoolHandleMsg")
        tensor = self._device_pools.batch(msg.tensor_pool, msg.tensor_slot, msg.tensor_shape[0])
        if tuple(tensor.shape) != msg.tensor_shape:
            raise StageError(f"engine: batch shape {msg.tensor_shape} does not fit tensor pool {msg.tensor_pool} "
                             f"(slot rows {tuple(tensor.shape)})")
        n = len(msg.frames)
        t0 = time.perf_counter()
        assert self._device_engine is not None  # set in start()
        raw = self._device_engine.infer_device(tensor)
        ordered = [raw[i][:n] for i in self._order]
        if self.device_nms is not None:
            from pipeline.gpu.gpu_nms import postprocess_detect_torch
            from streamdet.postprocess import KEPT_OUTPUTS, pack_detections

            dets = postprocess_detect_torch(ordered[0], [r.letterbox for r in msg.frames],
                                            num_classes=self.card.head.num_classes, cfg=self.device_nms)
            outputs = list(pack_detections(dets))
            names: tuple[str, ...] = KEPT_OUTPUTS
        else:
            outputs = [o.detach().float().cpu().numpy() for o in ordered]
            names = tuple(self.card.head.outputs)
        synchronize(tensor.device)  # done reading the slot before handing it back
        engine_ms = (time.perf_counter() - t0) * 1000.0
        del tensor, raw, ordered
        credit = CreditMsg(msg.tensor_pool, msg.tensor_slot, msg.tag)
        send_parts(self.tensor_credits_out, [credit.encode()], self.flags.alive)
        self._send_result(msg.frames, engine_ms, names, outputs, parts[1:])

    def stop(self) -> None:
        """Wait for the engine threads, stop the engines, detach the tensor pool, close the sockets."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._inflight.clear()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        if self._started:
            for eng in self._engines:
                eng.stop()
            self._started = False
        self._pools.close()
        if self.outputs is not None:
            self.outputs.close()
            self.outputs = None
        if self._device_pools is not None:
            self._device_pools.close()
            self._device_pools = None
        close_sockets(self.flags, outputs=(self.results_out, self.tensor_credits_out), inputs=(self.batches_in,))
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
