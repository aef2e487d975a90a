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
* decode -> postprocess (events socket): :class:`SourceStatusMsg` (a live source's state, drops);
* the control plane (:mod:`~streamdet.messages.control`): :class:`SourceAddedMsg`,
  :class:`PreviewFrameMsg`, :class:`StatsSnapshotMsg`.

Wire format: the first ZeroMQ message part is the msgpack encoding of a message (an array
``[WIRE_VERSION, MsgKind, field, ...]``, the fields in declaration order through the one generic
codec of :mod:`streamdet.messages.codec`; never pickle). Bulk data follows as extra raw parts: the
frame pixels when ``slot == INLINE_SLOT`` (``(H, W, 3)`` uint8 RGB, C order), the input tensor
when a batch's ``tensor_slot == INLINE_SLOT``, and one part per model output after a
:class:`ResultMsg` whose ``outputs_slot == INLINE_SLOT`` (described by its :class:`TensorSpec`
list; otherwise they are in the engine's output pool). :func:`decode_message` turns the
first part back into the typed message and checks the version.

Modules: :mod:`~streamdet.messages.enums` (slot constants, enums, field checks),
:mod:`~streamdet.messages.codec` (the generic codec, ``WIRE_VERSION``, ``MsgKind``),
:mod:`~streamdet.messages.classes` (the message classes).
"""

from streamdet.messages.classes import (
    BatchMsg,
    CreditMsg,
    EndOfStream,
    FrameMsg,
    FrameRecord,
    Message,
    PoolHandleMsg,
    ResultMsg,
    SourceStatusMsg,
    StageRestartMsg,
    StatusMsg,
    TensorSpec,
    decode_message,
)
from streamdet.messages.codec import WIRE_VERSION, MsgKind, WireMessage, wire
from streamdet.messages.control import PreviewFrameMsg, SourceAddedMsg, StatsSnapshotMsg
from streamdet.messages.enums import (
    INLINE_SLOT,
    NO_SLOT,
    SOURCE_ID_PATTERN,
    EosReason,
    SourceState,
    StageName,
    StatusKind,
    check_source_id,
)

__all__ = [
    "INLINE_SLOT",
    "NO_SLOT",
    "SOURCE_ID_PATTERN",
    "WIRE_VERSION",
    "BatchMsg",
    "CreditMsg",
    "EndOfStream",
    "EosReason",
    "FrameMsg",
    "FrameRecord",
    "Message",
    "MsgKind",
    "PoolHandleMsg",
    "PreviewFrameMsg",
    "ResultMsg",
    "SourceAddedMsg",
    "SourceState",
    "SourceStatusMsg",
    "StageName",
    "StageRestartMsg",
    "StatusKind",
    "StatsSnapshotMsg",
    "StatusMsg",
    "TensorSpec",
    "WireMessage",
    "check_source_id",
    "decode_message",
    "wire",
]
