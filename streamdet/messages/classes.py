"""The frozen message classes at the stage boundaries and their ``__post_init__`` checks.

Their wire form is the generic one of :mod:`streamdet.messages.codec` (fields in declaration
order): adding, removing or reordering a field changes the wire format (bump ``WIRE_VERSION``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from streamdet.constants import TENSOR_DTYPES
from streamdet.letterbox import LetterboxParams
from streamdet.messages.codec import MsgKind, WireMessage, decode_wire, wire
from streamdet.messages.enums import (
    INLINE_SLOT,
    NO_SLOT,
    EosReason,
    SourceState,
    StageName,
    StatusKind,
    check_count,
    check_hw,
    check_nonneg,
    check_slot,
    check_source_id,
)


@wire(MsgKind.FRAME)
@dataclass(frozen=True, slots=True)
class FrameMsg(WireMessage):
    """One decoded frame (decode -> preprocess).

    Attributes:
        source_id: the source it came from (topic-safe id).
        frame_index: 0-based index of the frame in its source.
        pts_s: presentation time in seconds (``frame.pts * time_base``).
        frame_hw: frame size ``(height, width)`` in pixels; pixels are ``(H, W, 3)`` uint8 RGB.
        slot: shared-memory slot holding the pixels, :data:`INLINE_SLOT` (pixels in the next
            message part) or :data:`NO_SLOT` (pixels no longer available).
        pool: name of the source's slot pool (empty unless ``slot >= 0``).
        capture_time: ``time.monotonic()`` seconds when the decoder produced the frame.
        decode_ms: milliseconds spent demuxing, decoding and converting the frame.
    """

    source_id: str
    frame_index: int
    pts_s: float
    frame_hw: tuple[int, int]
    slot: int
    pool: str
    capture_time: float
    decode_ms: float

    def __post_init__(self) -> None:
        check_source_id(self.source_id)
        check_count(self.frame_index, "frame_index")
        if not math.isfinite(self.pts_s):
            raise ValueError(f"expected finite pts_s, got {self.pts_s!r}")
        object.__setattr__(self, "frame_hw", check_hw(self.frame_hw, "frame_hw"))
        check_slot(self.slot, self.pool, "slot")
        check_nonneg(self.capture_time, "capture_time")
        check_nonneg(self.decode_ms, "decode_ms")

    @property
    def nbytes(self) -> int:
        """Size of the frame's RGB24 pixels in bytes."""
        return self.frame_hw[0] * self.frame_hw[1] * 3


@wire()
@dataclass(frozen=True, slots=True)
class FrameRecord:
    """A frame (or a crop of it) on its way through preprocess, engine and postprocess.

    Attributes:
        frame: the decoder's :class:`FrameMsg` (its ``slot`` becomes :data:`NO_SLOT` once handed back).
        letterbox: how the frame (or the crop) was letterboxed into the model input.
        preprocess_ms: milliseconds spent letterboxing and normalising this frame (or crop).
        crop: empty for a whole frame; for a crop of it sent to a secondary model,
            ``(parent, x0, y0)``: the index of the primary detection it was cut around and the
            crop's top-left corner in frame pixels (the letterbox's ``frame_hw`` is then the crop's
            size, inside the frame).
    """

    frame: FrameMsg
    letterbox: LetterboxParams
    preprocess_ms: float
    crop: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.frame, FrameMsg):
            raise ValueError(f"expected a FrameMsg, got {type(self.frame).__name__}")
        if not isinstance(self.letterbox, LetterboxParams):
            raise ValueError(f"expected LetterboxParams, got {type(self.letterbox).__name__}")
        if self.crop:
            crop = tuple(int(v) for v in self.crop)
            (fh, fw), (ch, cw) = self.frame.frame_hw, self.letterbox.frame_hw
            if len(crop) != 3 or min(crop) < 0 or crop[1] + cw > fw or crop[2] + ch > fh:
                raise ValueError(f"expected crop (parent, x0, y0) with the {ch}x{cw} crop inside the {fh}x{fw} "
                                 f"frame, got {self.crop!r}")
            object.__setattr__(self, "crop", crop)
        elif self.letterbox.frame_hw != self.frame.frame_hw:
            raise ValueError(f"expected letterbox frame_hw {self.frame.frame_hw}, got {self.letterbox.frame_hw}")
        check_nonneg(self.preprocess_ms, "preprocess_ms")


def _check_records(frames: tuple[FrameRecord, ...]) -> tuple[FrameRecord, ...]:
    frames = tuple(frames)
    if not frames:
        raise ValueError("expected at least one frame in a batch, got 0")
    for r in frames:
        if not isinstance(r, FrameRecord):
            raise ValueError(f"expected FrameRecord items, got {type(r).__name__}")
    return frames


@wire(MsgKind.BATCH)
@dataclass(frozen=True, slots=True)
class BatchMsg(WireMessage):
    """A batch of preprocessed frames (preprocess -> engine).

    Attributes:
        frames: one :class:`FrameRecord` per real image, in batch order.
        tensor_slot: slot of the preprocess tensor pool holding the input, or :data:`INLINE_SLOT`
            (tensor bytes in the next message part).
        tensor_pool: name of the tensor pool (empty when inline).
        tensor_shape: ``(B, 3, H, W)`` of the input tensor; ``B >= len(frames)`` (a model with a
            static batch size gets padded batches; rows past ``len(frames)`` are padding).
        tensor_dtype: ``float32`` or ``float16``.
        generation: the engine generation the batch was made for (the runner counts engine
            restarts; an engine drops batches stamped with an older generation, whose tensor slots
            the preprocess stage has already reclaimed).
        tag: the batch's sequence number in the preprocess stage, handed back in the tensor
            slot's :class:`CreditMsg` (a credit whose tag does not match is stale and ignored).
    """

    frames: tuple[FrameRecord, ...]
    tensor_slot: int
    tensor_pool: str
    tensor_shape: tuple[int, int, int, int]
    tensor_dtype: str = "float32"
    generation: int = 0
    tag: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", _check_records(self.frames))
        check_slot(self.tensor_slot, self.tensor_pool, "tensor_slot")
        if self.tensor_slot == NO_SLOT:
            raise ValueError("expected a tensor slot or INLINE_SLOT, got NO_SLOT")
        shape = tuple(int(v) for v in self.tensor_shape)
        if len(shape) != 4 or min(shape) <= 0 or shape[1] != 3:
            raise ValueError(f"expected tensor_shape (B, 3, H, W), got {self.tensor_shape!r}")
        if shape[0] < len(self.frames):
            raise ValueError(f"expected batch size >= {len(self.frames)} frames, got {shape[0]}")
        object.__setattr__(self, "tensor_shape", shape)
        if self.tensor_dtype not in TENSOR_DTYPES:
            raise ValueError(f"expected tensor_dtype in {TENSOR_DTYPES}, got {self.tensor_dtype!r}")
        check_count(self.generation, "generation")
        if not isinstance(self.tag, int) or self.tag < -1:
            raise ValueError(f"expected tag >= -1, got {self.tag!r}")

    @property
    def tensor_nbytes(self) -> int:
        """Size of the input tensor in bytes."""
        return math.prod(self.tensor_shape) * np.dtype(self.tensor_dtype).itemsize


@wire()
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one array travelling as a raw message part.

    Attributes:
        name: the model output name.
        dtype: numpy dtype name (e.g. ``float32``).
        shape: array shape.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            np.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"expected a numpy dtype name, got {self.dtype!r}") from e
        shape = tuple(int(v) for v in self.shape)
        if any(v < 0 for v in shape):
            raise ValueError(f"expected a non-negative shape, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)

    @property
    def nbytes(self) -> int:
        """Size of the array in bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, name: str, array: npt.NDArray[Any]) -> TensorSpec:
        """The spec of ``array``."""
        return cls(name, array.dtype.name, tuple(array.shape))

    def array_from(self, buffer: bytes | memoryview) -> npt.NDArray[Any]:
        """View ``buffer`` as this array (no copy; read-only if the buffer is).

        Raises:
            ValueError: if the buffer size does not match.
        """
        mv = memoryview(buffer)
        if mv.nbytes != self.nbytes:
            raise ValueError(f"expected {self.nbytes} bytes for output {self.name} {self.shape}, got {mv.nbytes}")
        return np.frombuffer(mv, dtype=np.dtype(self.dtype)).reshape(self.shape)


@wire(MsgKind.RESULT)
@dataclass(frozen=True, slots=True)
class ResultMsg(WireMessage):
    """Raw model outputs of one batch (engine -> postprocess).

    Attributes:
        frames: the batch's :class:`FrameRecord` list (real images only).
        engine_ms: milliseconds the engine spent on the whole batch.
        outputs: one :class:`TensorSpec` per model output, in the card's output order; each array
            has leading dimension ``len(frames)`` and travels as one extra message part, in order,
            unless it is in an output pool slot.
        outputs_slot: slot of the engine's output pool holding the arrays, one after the other
            (each at a 64-byte aligned offset), or :data:`INLINE_SLOT` (extra message parts).
        outputs_pool: name of that pool (empty when inline).
        outputs_tag: the engine's sequence number for this use of the slot (>= 1 with a slot): the
            reader checks the slot still holds it after copying the arrays out, then hands it back
            (``pipeline.output_pool``).
    """

    frames: tuple[FrameRecord, ...]
    engine_ms: float
    outputs: tuple[TensorSpec, ...]
    outputs_slot: int = INLINE_SLOT
    outputs_pool: str = ""
    outputs_tag: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", _check_records(self.frames))
        check_nonneg(self.engine_ms, "engine_ms")
        check_slot(self.outputs_slot, self.outputs_pool, "outputs_slot")
        if self.outputs_slot == NO_SLOT:
            raise ValueError("expected an outputs slot or INLINE_SLOT, got NO_SLOT")
        if not isinstance(self.outputs_tag, int) or self.outputs_tag < (1 if self.outputs_slot >= 0 else 0):
            raise ValueError(f"expected outputs_tag >= 1 with a slot (else 0), got {self.outputs_tag!r}")
        outputs = tuple(self.outputs)
        if not outputs:
            raise ValueError("expected at least one output, got 0")
        for o in outputs:
            if not isinstance(o, TensorSpec):
                raise ValueError(f"expected TensorSpec outputs, got {type(o).__name__}")
            if not o.shape or o.shape[0] != len(self.frames):
                raise ValueError(f"expected output {o.name} with leading dim {len(self.frames)}, got {o.shape}")
        object.__setattr__(self, "outputs", outputs)


@wire(MsgKind.EOS)
@dataclass(frozen=True, slots=True)
class EndOfStream(WireMessage):
    """The last message of one source on a stage boundary.

    Attributes:
        source_id: the source that ended.
        frames: number of frames the source produced (all of which precede this message).
        reason: why it ended.
        error: the problem when ``reason`` is :attr:`EosReason.ERROR` (credentials redacted), else empty.
    """

    source_id: str
    frames: int
    reason: EosReason
    error: str = ""

    def __post_init__(self) -> None:
        check_source_id(self.source_id)
        check_count(self.frames, "frames")
        object.__setattr__(self, "reason", EosReason(self.reason))
        if self.reason is EosReason.ERROR and not self.error:
            raise ValueError("expected an error message for reason 'error', got none")


@wire(MsgKind.CREDIT)
@dataclass(frozen=True, slots=True)
class CreditMsg(WireMessage):
    """A shared-memory slot handed back to the pool's owner (consumer -> producer).

    Attributes:
        pool: the slot pool's name.
        slot: the slot index.
        tag: what the slot held when it was lent: the frame index for a frame slot, the batch
            sequence number for a tensor slot (-1: any). The owner releases the slot only if the
            tag matches, so a late or repeated credit (a frame sent twice after a stage restart)
            can never free a slot that already holds something else.
    """

    pool: str
    slot: int
    tag: int = -1

    def __post_init__(self) -> None:
        if not self.pool:
            raise ValueError("expected a pool name, got an empty one")
        check_count(self.slot, "slot")
        if not isinstance(self.tag, int) or self.tag < -1:
            raise ValueError(f"expected tag >= -1, got {self.tag!r}")


@wire(MsgKind.STATUS)
@dataclass(frozen=True, slots=True)
class StatusMsg(WireMessage):
    """A stage's report to the runner (stage -> runner control socket).

    Attributes:
        stage: which stage.
        kind: what happened.
        source_id: the source concerned (empty if none).
        message: human-readable detail (errors: the problem, credentials redacted).
        counts: counters, e.g. ``frames``, ``detections``, ``published`` (non-negative ints).
    """

    stage: StageName
    kind: StatusKind
    source_id: str = ""
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", StageName(self.stage))
        object.__setattr__(self, "kind", StatusKind(self.kind))
        if self.source_id:
            check_source_id(self.source_id)
        for k, v in self.counts.items():
            if not isinstance(k, str) or not isinstance(v, int) or v < 0:
                raise ValueError(f"expected counts of str -> int >= 0, got {k!r}: {v!r}")
        if self.kind in (StatusKind.SOURCE_ERROR, StatusKind.STAGE_ERROR) and not self.message:
            raise ValueError(f"expected a message for status {self.kind.value}, got none")


@wire(MsgKind.SOURCE_STATUS)
@dataclass(frozen=True, slots=True)
class SourceStatusMsg(WireMessage):
    """A decoder's report on its source (decode -> postprocess events socket).

    Attributes:
        source_id: the source.
        state: its state.
        attempt: reconnection attempt number (0 while connected or before the first retry).
        next_delay_s: seconds until the next attempt (``reconnecting`` only, else 0).
        message: detail (errors: the problem; URLs with credentials redacted).
        time: wall-clock time of the event, Unix seconds.
        dropped: frames dropped so far because downstream was busy (live sources; cumulative).
        skipped: frames skipped so far to respect ``max_fps`` (cumulative).
        received: frames received from the source so far (cumulative).
        publish: whether the event is a state change to publish (False: a periodic counters update).
    """

    source_id: str
    state: SourceState
    attempt: int = 0
    next_delay_s: float = 0.0
    message: str = ""
    time: float = 0.0
    dropped: int = 0
    skipped: int = 0
    received: int = 0
    publish: bool = True

    def __post_init__(self) -> None:
        check_source_id(self.source_id)
        object.__setattr__(self, "state", SourceState(self.state))
        for name in ("attempt", "dropped", "skipped", "received"):
            check_count(getattr(self, name), name)
        check_nonneg(self.next_delay_s, "next_delay_s")
        check_nonneg(self.time, "time")


@wire(MsgKind.POOL_HANDLE)
@dataclass(frozen=True, slots=True)
class PoolHandleMsg(WireMessage):
    """How to open a device tensor pool (preprocess -> engine, once, before the pool's first batch).

    A :class:`BatchMsg` whose ``tensor_pool`` was announced this way has its input tensor in that
    device ring (``--device cuda`` with ``preprocess.on_device``), not in host shared memory.

    Attributes:
        pool: the pool's name (the ``tensor_pool`` of the batches and credits that follow).
        handle: the msgpack-encoded :class:`pipeline.gpu.tensor_pool.DeviceTensorPoolHandle`.
    """

    pool: str
    handle: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.pool, str) or not self.pool:
            raise ValueError(f"expected a pool name, got {self.pool!r:.80}")
        if not isinstance(self.handle, bytes) or not self.handle:
            raise ValueError(f"expected the handle as non-empty bytes, got {type(self.handle).__name__}")


@wire(MsgKind.STAGE_RESTART)
@dataclass(frozen=True, slots=True)
class StageRestartMsg(WireMessage):
    """The runner restarted a stage process (runner -> postprocess events socket).

    The postprocess stage publishes it as ``status.<source_id>`` (state ``stage_restarted``) for
    every source the stage serves, and counts it in the stats line and Prometheus metrics.

    Attributes:
        stage: the restarted stage.
        source_id: the source of a restarted decoder; empty for a shared stage (every source).
        attempt: restarts of this stage within the supervision window, this one included (1, 2, ...).
        reason: why it died (its last error line, or the exit code / signal).
        time: when the restart happened, Unix seconds.
        down_s: seconds from noticing the death to the new process reporting ready.
        total: restarts of every stage in the run so far, this one included.
    """

    stage: StageName
    source_id: str = ""
    attempt: int = 1
    reason: str = ""
    time: float = 0.0
    down_s: float = 0.0
    total: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", StageName(self.stage))
        if self.source_id:
            check_source_id(self.source_id)
        check_count(self.attempt, "attempt")
        check_count(self.total, "total")
        for name in ("time", "down_s"):
            check_nonneg(getattr(self, name), name)


Message = (FrameMsg | BatchMsg | ResultMsg | EndOfStream | CreditMsg | StatusMsg | SourceStatusMsg | PoolHandleMsg
           | StageRestartMsg)
"""Any message that crosses a stage boundary."""


def decode_message(data: bytes | memoryview) -> Message:
    """Decode the first part of a message into its typed class.

    Args:
        data: msgpack bytes written by one of the classes' ``encode``.

    Returns:
        The message (validated).

    Raises:
        ValueError: if the bytes are not msgpack, the version is not :data:`WIRE_VERSION`, the kind
            is unknown or a field is invalid.
    """
    return cast(Message, decode_wire(data))


