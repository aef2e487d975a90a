"""Typed messages at the stage boundaries, and their msgpack wire format.

Every boundary between two stages carries ONE frozen message class, validated when built:

* decode -> preprocess: :class:`FrameMsg` (a decoded frame: where its pixels are, when it was shown);
* preprocess -> engine: :class:`BatchMsg` (a batch of letterboxed frames: where the input tensor is);
* engine -> postprocess: :class:`ResultMsg` (the raw model outputs of one batch);
* any data stage -> the next: :class:`EndOfStream` (the last message of one source);
* consumer -> producer: :class:`CreditMsg` (a shared-memory slot handed back);
* preprocess -> engine, once before the first batch of a device tensor pool: :class:`PoolHandleMsg`
  (how to open the pool's ring on the GPU, ``--device cuda``);
* stage -> runner: :class:`StatusMsg` (ready, progress, errors, done);
* decode -> postprocess (events socket): :class:`SourceStatusMsg` (a live source's state, drops).

Wire format: the first ZeroMQ message part is the msgpack encoding of a message (an array
``[WIRE_VERSION, MsgKind, field, ...]``; never pickle). Bulk data follows as extra raw parts: the
frame pixels when ``slot == INLINE_SLOT`` (``(H, W, 3)`` uint8 RGB, C order), the input tensor
when a batch's ``tensor_slot == INLINE_SLOT``, and one part per model output after a
:class:`ResultMsg` (described by its :class:`TensorSpec` list). :func:`decode_message` turns the
first part back into the typed message and checks the version.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Self

import msgpack
import numpy as np
import numpy.typing as npt

from streamdet.constants import TENSOR_DTYPES
from streamdet.letterbox import LetterboxParams

WIRE_VERSION = 1
"""Version of the internal msgpack wire format; bumped on any incompatible change."""

INLINE_SLOT = -1
"""``slot`` value meaning the bytes travel inline as an extra message part (tcp:// transport)."""

NO_SLOT = -2
"""``slot`` value meaning the frame's pixels are no longer available (its slot was handed back)."""

SOURCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Source ids are topic-safe: letters, digits, ``_`` and ``-`` (no ``.``, the topic separator)."""



class MsgKind(IntEnum):
    """Tag of a message on the wire (second element of the msgpack array)."""

    FRAME = 1
    BATCH = 2
    RESULT = 3
    EOS = 4
    CREDIT = 5
    STATUS = 6
    SOURCE_STATUS = 7
    POOL_HANDLE = 8


class EosReason(str, Enum):
    """Why a source ended."""

    FINISHED = "finished"
    MAX_FRAMES = "max_frames"
    INTERRUPTED = "interrupted"
    ERROR = "error"


class StageName(str, Enum):
    """The pipeline's stages (each runs in its own process)."""

    DECODE = "decode"
    PREPROCESS = "preprocess"
    ENGINE = "engine"
    POSTPROCESS = "postprocess"


class SourceState(str, Enum):
    """State of a source as published on ``status.<source_id>``."""

    CONNECTING = "connecting"  # opening (first attempt)
    CONNECTED = "connected"  # frames arrive
    STALLED = "stalled"  # no frame for ``stall_timeout_s``: counted as lost, reconnecting next
    RECONNECTING = "reconnecting"  # waiting ``next_delay_s`` before attempt ``attempt``
    EOS = "eos"  # the source ended (file end, stop signal, attempts exhausted)
    ERROR = "error"  # a problem (message says which); followed by ``reconnecting`` or ``eos``


class StatusKind(str, Enum):
    """What a :class:`StatusMsg` reports to the runner."""

    READY = "ready"  # set up (sockets bound, model loaded); waiting for the go signal
    PROGRESS = "progress"  # frames finished by the last stage
    SOURCE_ERROR = "source_error"  # a source failed (the pipeline goes on with what it decoded)
    STAGE_ERROR = "stage_error"  # a stage failed and stopped: the run fails
    SOURCE_END = "source_end"  # the last stage passed a source's EOS to the sinks (message: the reason)
    OUTPUT = "output"  # where a sink's output went (message), sent when the sink closes
    DONE = "done"  # the stage finished and is about to exit


def check_source_id(source_id: str) -> str:
    """Validate a source id (topic-safe, see :data:`SOURCE_ID_PATTERN`).

    Args:
        source_id: the id.

    Returns:
        The id, unchanged.

    Raises:
        ValueError: if it is not 1-64 characters of ``[A-Za-z0-9_-]``.
    """
    if not isinstance(source_id, str) or not SOURCE_ID_PATTERN.match(source_id):
        raise ValueError(f"expected source_id of 1-64 characters [A-Za-z0-9_-], got {source_id!r}")
    return source_id


def _check_slot(slot: int, pool: str, what: str) -> None:
    if not isinstance(slot, int) or slot < NO_SLOT:
        raise ValueError(f"expected {what} >= {NO_SLOT}, got {slot!r}")
    if slot >= 0 and not pool:
        raise ValueError(f"expected a pool name for {what} {slot}, got an empty one")


def _check_hw(hw: tuple[int, int], what: str) -> tuple[int, int]:
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise ValueError(f"expected {what} as two positive ints, got {hw!r}")
    return (int(hw[0]), int(hw[1]))


def _check_nonneg(value: float, what: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected finite {what} >= 0, got {value!r}")


class _Decodable:
    """``decode`` for every message class (its ``encode`` writes the kind that picks the class)."""

    __slots__ = ()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        """Inverse of ``encode``: decode one message and check it is of this class.

        Raises:
            ValueError: on a wrong version, kind or field, or a message of another class.
        """
        msg = decode_message(data)
        if not isinstance(msg, cls):
            raise ValueError(f"expected a {cls.__name__}, got {type(msg).__name__}")
        return msg


@dataclass(frozen=True, slots=True)
class FrameMsg(_Decodable):
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
        if not isinstance(self.frame_index, int) or self.frame_index < 0:
            raise ValueError(f"expected frame_index >= 0, got {self.frame_index!r}")
        if not math.isfinite(self.pts_s):
            raise ValueError(f"expected finite pts_s, got {self.pts_s!r}")
        object.__setattr__(self, "frame_hw", _check_hw(self.frame_hw, "frame_hw"))
        _check_slot(self.slot, self.pool, "slot")
        _check_nonneg(self.capture_time, "capture_time")
        _check_nonneg(self.decode_ms, "decode_ms")

    @property
    def nbytes(self) -> int:
        """Size of the frame's RGB24 pixels in bytes."""
        return self.frame_hw[0] * self.frame_hw[1] * 3

    def _fields(self) -> list[Any]:
        return [self.source_id, self.frame_index, float(self.pts_s), list(self.frame_hw), self.slot, self.pool,
                float(self.capture_time), float(self.decode_ms)]

    @classmethod
    def _from_fields(cls, f: list[Any]) -> FrameMsg:
        if len(f) != 8:
            raise ValueError(f"expected 8 FrameMsg fields, got {len(f)}")
        return cls(f[0], f[1], f[2], (f[3][0], f[3][1]), f[4], f[5], f[6], f[7])

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.FRAME, ...fields]``."""
        return _pack(MsgKind.FRAME, self._fields())


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """A frame on its way through preprocess, engine and postprocess.

    Attributes:
        frame: the decoder's :class:`FrameMsg` (its ``slot`` becomes :data:`NO_SLOT` once handed back).
        letterbox: how the frame was letterboxed into the model input.
        preprocess_ms: milliseconds spent letterboxing and normalising this frame.
    """

    frame: FrameMsg
    letterbox: LetterboxParams
    preprocess_ms: float

    def __post_init__(self) -> None:
        if not isinstance(self.frame, FrameMsg):
            raise ValueError(f"expected a FrameMsg, got {type(self.frame).__name__}")
        if not isinstance(self.letterbox, LetterboxParams):
            raise ValueError(f"expected LetterboxParams, got {type(self.letterbox).__name__}")
        if self.letterbox.frame_hw != self.frame.frame_hw:
            raise ValueError(f"expected letterbox frame_hw {self.frame.frame_hw}, got {self.letterbox.frame_hw}")
        _check_nonneg(self.preprocess_ms, "preprocess_ms")

    def _fields(self) -> list[Any]:
        return [self.frame._fields(), self.letterbox.to_list(), float(self.preprocess_ms)]

    @classmethod
    def _from_fields(cls, f: list[Any]) -> FrameRecord:
        if len(f) != 3:
            raise ValueError(f"expected 3 FrameRecord fields, got {len(f)}")
        return cls(FrameMsg._from_fields(f[0]), LetterboxParams.from_list(f[1]), f[2])


def _check_records(frames: tuple[FrameRecord, ...]) -> tuple[FrameRecord, ...]:
    frames = tuple(frames)
    if not frames:
        raise ValueError("expected at least one frame in a batch, got 0")
    for r in frames:
        if not isinstance(r, FrameRecord):
            raise ValueError(f"expected FrameRecord items, got {type(r).__name__}")
    return frames


@dataclass(frozen=True, slots=True)
class BatchMsg(_Decodable):
    """A batch of preprocessed frames (preprocess -> engine).

    Attributes:
        frames: one :class:`FrameRecord` per real image, in batch order.
        tensor_slot: slot of the preprocess tensor pool holding the input, or :data:`INLINE_SLOT`
            (tensor bytes in the next message part).
        tensor_pool: name of the tensor pool (empty when inline).
        tensor_shape: ``(B, 3, H, W)`` of the input tensor; ``B >= len(frames)`` (a model with a
            static batch size gets padded batches; rows past ``len(frames)`` are padding).
        tensor_dtype: ``float32`` or ``float16``.
    """

    frames: tuple[FrameRecord, ...]
    tensor_slot: int
    tensor_pool: str
    tensor_shape: tuple[int, int, int, int]
    tensor_dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", _check_records(self.frames))
        _check_slot(self.tensor_slot, self.tensor_pool, "tensor_slot")
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

    @property
    def tensor_nbytes(self) -> int:
        """Size of the input tensor in bytes."""
        return int(np.prod(self.tensor_shape)) * np.dtype(self.tensor_dtype).itemsize

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.BATCH, ...fields]``."""
        return _pack(MsgKind.BATCH, [[r._fields() for r in self.frames], self.tensor_slot, self.tensor_pool,
                                     list(self.tensor_shape), self.tensor_dtype])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> BatchMsg:
        if len(f) != 5:
            raise ValueError(f"expected 5 BatchMsg fields, got {len(f)}")
        return cls(tuple(FrameRecord._from_fields(r) for r in f[0]), f[1], f[2], tuple(f[3]), f[4])


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
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

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


@dataclass(frozen=True, slots=True)
class ResultMsg(_Decodable):
    """Raw model outputs of one batch (engine -> postprocess).

    Attributes:
        frames: the batch's :class:`FrameRecord` list (real images only).
        engine_ms: milliseconds the engine spent on the whole batch.
        outputs: one :class:`TensorSpec` per model output, in the card's output order; each array
            has leading dimension ``len(frames)`` and travels as one extra message part, in order.
    """

    frames: tuple[FrameRecord, ...]
    engine_ms: float
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", _check_records(self.frames))
        _check_nonneg(self.engine_ms, "engine_ms")
        outputs = tuple(self.outputs)
        if not outputs:
            raise ValueError("expected at least one output, got 0")
        for o in outputs:
            if not isinstance(o, TensorSpec):
                raise ValueError(f"expected TensorSpec outputs, got {type(o).__name__}")
            if not o.shape or o.shape[0] != len(self.frames):
                raise ValueError(f"expected output {o.name} with leading dim {len(self.frames)}, got {o.shape}")
        object.__setattr__(self, "outputs", outputs)

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.RESULT, ...fields]``."""
        return _pack(MsgKind.RESULT, [[r._fields() for r in self.frames], float(self.engine_ms),
                                      [[o.name, o.dtype, list(o.shape)] for o in self.outputs]])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> ResultMsg:
        if len(f) != 3:
            raise ValueError(f"expected 3 ResultMsg fields, got {len(f)}")
        return cls(tuple(FrameRecord._from_fields(r) for r in f[0]), f[1],
                   tuple(TensorSpec(o[0], o[1], tuple(o[2])) for o in f[2]))


@dataclass(frozen=True, slots=True)
class EndOfStream(_Decodable):
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
        if not isinstance(self.frames, int) or self.frames < 0:
            raise ValueError(f"expected frames >= 0, got {self.frames!r}")
        object.__setattr__(self, "reason", EosReason(self.reason))
        if self.reason is EosReason.ERROR and not self.error:
            raise ValueError("expected an error message for reason 'error', got none")

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.EOS, ...fields]``."""
        return _pack(MsgKind.EOS, [self.source_id, self.frames, self.reason.value, self.error])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> EndOfStream:
        if len(f) != 4:
            raise ValueError(f"expected 4 EndOfStream fields, got {len(f)}")
        return cls(f[0], f[1], EosReason(f[2]), f[3])


@dataclass(frozen=True, slots=True)
class CreditMsg(_Decodable):
    """A shared-memory slot handed back to the pool's owner (consumer -> producer).

    Attributes:
        pool: the slot pool's name.
        slot: the slot index.
    """

    pool: str
    slot: int

    def __post_init__(self) -> None:
        if not self.pool:
            raise ValueError("expected a pool name, got an empty one")
        if not isinstance(self.slot, int) or self.slot < 0:
            raise ValueError(f"expected slot >= 0, got {self.slot!r}")

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.CREDIT, pool, slot]``."""
        return _pack(MsgKind.CREDIT, [self.pool, self.slot])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> CreditMsg:
        if len(f) != 2:
            raise ValueError(f"expected 2 CreditMsg fields, got {len(f)}")
        return cls(f[0], f[1])


@dataclass(frozen=True, slots=True)
class StatusMsg(_Decodable):
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

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.STATUS, ...fields]``."""
        return _pack(MsgKind.STATUS, [self.stage.value, self.kind.value, self.source_id, self.message,
                                      dict(self.counts)])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> StatusMsg:
        if len(f) != 5:
            raise ValueError(f"expected 5 StatusMsg fields, got {len(f)}")
        return cls(StageName(f[0]), StatusKind(f[1]), f[2], f[3], dict(f[4]))


@dataclass(frozen=True, slots=True)
class SourceStatusMsg(_Decodable):
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
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"expected {name} >= 0, got {v!r}")
        _check_nonneg(self.next_delay_s, "next_delay_s")
        _check_nonneg(self.time, "time")

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.SOURCE_STATUS, ...fields]``."""
        return _pack(MsgKind.SOURCE_STATUS, [self.source_id, self.state.value, self.attempt,
                                             float(self.next_delay_s), self.message, float(self.time),
                                             self.dropped, self.skipped, self.received, bool(self.publish)])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> SourceStatusMsg:
        if len(f) != 10:
            raise ValueError(f"expected 10 SourceStatusMsg fields, got {len(f)}")
        return cls(f[0], SourceState(f[1]), f[2], f[3], f[4], f[5], f[6], f[7], f[8], bool(f[9]))


@dataclass(frozen=True, slots=True)
class PoolHandleMsg(_Decodable):
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

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, MsgKind.POOL_HANDLE, pool, handle]``."""
        return _pack(MsgKind.POOL_HANDLE, [self.pool, self.handle])

    @classmethod
    def _from_fields(cls, f: list[Any]) -> PoolHandleMsg:
        if len(f) != 2:
            raise ValueError(f"expected 2 PoolHandleMsg fields, got {len(f)}")
        return cls(f[0], f[1])


Message = FrameMsg | BatchMsg | ResultMsg | EndOfStream | CreditMsg | StatusMsg | SourceStatusMsg | PoolHandleMsg
"""Any message that crosses a stage boundary."""


def _pack(kind: MsgKind, fields: list[Any]) -> bytes:
    out = msgpack.packb([WIRE_VERSION, int(kind), *fields], use_bin_type=True)
    assert isinstance(out, bytes)
    return out


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
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"expected a msgpack message, got undecodable bytes ({e})") from e
    if not isinstance(obj, list) or len(obj) < 2:
        raise ValueError(f"expected [version, kind, ...], got {type(obj).__name__}")
    version, kind, fields = obj[0], obj[1], obj[2:]
    if version != WIRE_VERSION:
        raise ValueError(f"expected wire version {WIRE_VERSION}, got {version!r}")
    try:
        k = MsgKind(kind)
    except ValueError as e:
        raise ValueError(f"expected a message kind in {[m.value for m in MsgKind]}, got {kind!r}") from e
    try:
        match k:
            case MsgKind.FRAME:
                return FrameMsg._from_fields(fields)
            case MsgKind.BATCH:
                return BatchMsg._from_fields(fields)
            case MsgKind.RESULT:
                return ResultMsg._from_fields(fields)
            case MsgKind.EOS:
                return EndOfStream._from_fields(fields)
            case MsgKind.CREDIT:
                return CreditMsg._from_fields(fields)
            case MsgKind.STATUS:
                return StatusMsg._from_fields(fields)
            case MsgKind.SOURCE_STATUS:
                return SourceStatusMsg._from_fields(fields)
            case MsgKind.POOL_HANDLE:
                return PoolHandleMsg._from_fields(fields)
    except (TypeError, IndexError, KeyError) as e:
        raise ValueError(f"expected valid {k.name} fields, got {fields!r:.200} ({e})") from e
    raise AssertionError(f"unhandled kind {k}")  # pragma: no cover


