"""Slot constants, enums and field checks shared by the message classes."""

from __future__ import annotations

import math
import re
from enum import Enum

INLINE_SLOT = -1
"""``slot`` value meaning the bytes travel inline as an extra message part (tcp:// transport)."""

NO_SLOT = -2
"""``slot`` value meaning the frame's pixels are no longer available (its slot was handed back)."""

SOURCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Source ids are topic-safe: letters, digits, ``_`` and ``-`` (no ``.``, the topic separator)."""


class EosReason(str, Enum):
    """Why a source ended."""

    FINISHED = "finished"
    MAX_FRAMES = "max_frames"
    INTERRUPTED = "interrupted"
    ERROR = "error"
    REMOVED = "removed"  # taken out through the control API (DELETE /sources/{id})


class StageName(str, Enum):
    """The pipeline's stages (each runs in its own process)."""

    DECODE = "decode"
    PREPROCESS = "preprocess"
    ENGINE = "engine"
    POSTPROCESS = "postprocess"
    SECONDARY = "secondary"  # the engine of a secondary model, fed with crops by the postprocess stage


class SourceState(str, Enum):
    """State of a source as published on ``status.<source_id>``."""

    CONNECTING = "connecting"  # opening (first attempt)
    CONNECTED = "connected"  # frames arrive
    STALLED = "stalled"  # no frame for ``stall_timeout_s``: counted as lost, reconnecting next
    RECONNECTING = "reconnecting"  # waiting ``next_delay_s`` before attempt ``attempt``
    EOS = "eos"  # the source ended (file end, stop signal, attempts exhausted)
    ERROR = "error"  # a problem (message says which); followed by ``reconnecting`` or ``eos``


class StatusKind(str, Enum):
    """What a :class:`~streamdet.messages.StatusMsg` reports to the runner."""

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


def check_slot(slot: int, pool: str, what: str) -> None:
    """Validate a slot index and its pool name.

    Args:
        slot: a slot index, :data:`INLINE_SLOT` or :data:`NO_SLOT`.
        pool: the pool's name (needed when ``slot >= 0``).
        what: the field's name, for the error.

    Raises:
        ValueError: if ``slot`` is not an int ``>= NO_SLOT`` or a real slot has no pool name.
    """
    if not isinstance(slot, int) or slot < NO_SLOT:
        raise ValueError(f"expected {what} >= {NO_SLOT}, got {slot!r}")
    if slot >= 0 and not pool:
        raise ValueError(f"expected a pool name for {what} {slot}, got an empty one")


def check_hw(hw: tuple[int, int], what: str) -> tuple[int, int]:
    """Validate a ``(height, width)`` pair.

    Args:
        hw: the pair.
        what: the field's name, for the error.

    Returns:
        The pair as a tuple of two ints.

    Raises:
        ValueError: unless it is two positive ints.
    """
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise ValueError(f"expected {what} as two positive ints, got {hw!r}")
    return (int(hw[0]), int(hw[1]))


def check_nonneg(value: float, what: str) -> None:
    """Validate a finite, non-negative number.

    Args:
        value: the number.
        what: the field's name, for the error.

    Raises:
        ValueError: if it is NaN, infinite or negative.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected finite {what} >= 0, got {value!r}")


def check_count(value: int, what: str) -> None:
    """Validate a count or index: an int ``>= 0``.

    Args:
        value: the number.
        what: the field's name, for the error.

    Raises:
        ValueError: if it is not an int ``>= 0``.
    """
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"expected {what} >= 0, got {value!r}")
