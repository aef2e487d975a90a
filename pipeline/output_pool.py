"""The engine's output pool: a batch's raw model outputs handed to the postprocess stage in shared memory.

Through ``ipc://`` ZeroMQ a message's bytes are copied twice by the kernel, in pieces, with the I/O
threads of both processes woken for each: 0.17-0.23 ms of CPU for the bundled detector's 447 KB
head per frame, 0.7-1.1 ms for an 80-class head at 640x640 (2.8 MB), more for a segmenter's
prototypes (docs/pipeline.md). Instead the engine copies the arrays into a slot of this pool and
sends only the slot's number; the postprocess stage copies them out and hands the slot back.

Protocol (one writer, the engine stage; one reader, the postprocess stage):

* The pool is a :class:`~pipeline.slotpool.SlotPool` of ``num_slots`` output slots and one control
  slot holding two int64 words per output slot: ``written`` and ``returned``.
* The engine takes a free slot (never lent, or ``returned`` equals the tag it was lent with), sets
  ``written = 0`` (being written), copies the arrays in (each at a 64-byte aligned offset), sets
  ``written`` to a new tag (a sequence number) and sends the
  :class:`~streamdet.messages.ResultMsg` naming the slot and the tag. With no free slot (the
  postprocess stage lags, or died) or outputs too large for a slot, the arrays travel inline as
  extra message parts, as they do on ``tcp://``: the pool never blocks the engine.
* The reader copies the arrays out, then checks that ``written`` still equals the tag; if not,
  the slot was taken back and written again meanwhile, and the result is dropped (see below).
  Then it sets ``returned`` to the tag.
* When the postprocess stage dies, the runner bumps the ledger's postprocess generation before it
  starts the new one (:mod:`pipeline.supervise`); at its next result the engine sees it and takes
  back every slot it had lent: a dead reader never hands them back. A result still queued for
  such a slot may then find it written again: the reader drops it. Its slot was lent before the
  engine saw the bump, so its frames were sent before the replay generation moved for that
  restart (later), and they are among those the decoders send again.

The check is a seqlock with the tag in the message as its first read. It relies, as the ledger
does, on aligned int64 stores being atomic and seen in program order (x86-64's memory model),
with a full fence on each side of the copy into the slot: a large ``memmove`` uses streaming
stores, which may otherwise become visible before the ``written = 0`` before them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.slotpool import PoolCache, SlotPool, SlotPoolError, StalePoolError, align
from streamdet.messages import INLINE_SLOT, ResultMsg, TensorSpec

MIN_POOLED_BYTES = 64 * 1024
"""Outputs smaller than this travel inline (ZeroMQ copies a 58 KB message for about 0.025 ms)."""

MAX_POOL_BYTES = 256 * 2**20
"""Most shared memory one output pool takes (fewer slots for large batches; no pool below 2 slots)."""

_WRITTEN, _RETURNED = 0, 1

_FENCE = threading.Lock()
"""Taken and released for its locked instruction: a full memory fence on x86-64 (uncontended: tens of ns)."""


def outputs_bytes(nbytes: Sequence[int]) -> int:
    """Bytes a slot needs for arrays of these sizes, each at a :data:`~pipeline.slotpool.SLOT_ALIGN` offset."""
    return sum(align(n) for n in nbytes)


class OutputPool:
    """The engine's side: lends slots holding a batch's outputs (see the module docstring).

    Build it with :meth:`create`.

    Attributes:
        name: the shared-memory name.
        num_slots: number of output slots.
        slot_bytes: bytes per output slot.
    """

    def __init__(self, pool: SlotPool, num_slots: int) -> None:
        self._pool = pool
        self.name = pool.name
        self.num_slots = num_slots
        self.slot_bytes = pool.slot_bytes
        self._control = pool.view(num_slots, (num_slots, 2), np.int64)
        self._free: deque[int] = deque(range(num_slots))
        self._lent: dict[int, int] = {}  # slot -> the tag it was lent with, oldest first
        self._next_tag = 1

    @classmethod
    def create(cls, *, name: str, num_slots: int, slot_bytes: int) -> OutputPool:
        """Allocate a pool of ``num_slots`` slots of ``slot_bytes`` bytes (plus its control slot).

        Raises:
            ValueError: on non-positive sizes.
            SlotPoolError: if the shared memory cannot be created (name taken, not enough room).
        """
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError(f"expected num_slots >= 1 and slot_bytes >= 1, got {num_slots} and {slot_bytes}")
        pool = SlotPool.create(name=name, num_slots=num_slots + 1, slot_bytes=max(slot_bytes, 16 * num_slots))
        pool.view(num_slots, (num_slots, 2), np.int64)[:] = 0
        return cls(pool, num_slots)

    @staticmethod
    def plan(slot_bytes: int, wanted_slots: int, max_bytes: int = MAX_POOL_BYTES) -> int:
        """How many slots of ``slot_bytes`` to create: ``wanted_slots``, fewer to stay within ``max_bytes``.

        The pool's control words take one more slot of the same size (:class:`SlotPool` slots
        are all alike), counted in ``max_bytes``.

        Returns:
            The number of slots, or 0 when fewer than 2 fit or the outputs are small enough to
            travel inline (:data:`MIN_POOLED_BYTES`).
        """
        if slot_bytes < MIN_POOLED_BYTES:
            return 0
        n = min(wanted_slots, max_bytes // align(slot_bytes) - 1)  # (the control words take a slot too)
        return n if n >= 2 else 0

    @property
    def in_use(self) -> int:
        """Slots lent and not yet seen handed back."""
        self._collect()
        return len(self._lent)

    def _collect(self) -> None:
        """Move the slots the reader has handed back to the free list."""
        for slot, tag in list(self._lent.items()):
            if self._control[slot, _RETURNED] == tag:
                del self._lent[slot]
                self._free.append(slot)

    def put(self, arrays: Sequence[npt.NDArray[Any]]) -> tuple[int, int] | None:
        """Copy ``arrays`` (C-contiguous) into a free slot and lend it.

        Returns:
            ``(slot, tag)`` for the :class:`~streamdet.messages.ResultMsg`, or None when no slot is
            free or the arrays do not fit in one (send them inline).

        Raises:
            SlotPoolError: if the pool is closed.
        """
        need = outputs_bytes([a.nbytes for a in arrays])
        if need > self.slot_bytes:
            return None
        if not self._free:
            self._collect()
            if not self._free:
                return None
        slot = self._free.popleft()
        tag = self._next_tag
        self._next_tag += 1
        control = self._control[slot]
        control[_WRITTEN] = 0
        with _FENCE:  # the reader must see "being written" before any of the new bytes
            pass
        buf = self._pool.buffer(slot, need)
        offset = 0
        for a in arrays:
            np.copyto(np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape), a)
            offset += align(a.nbytes)
        with _FENCE:  # ...and every new byte before the tag
            pass
        control[_WRITTEN] = tag
        self._lent[slot] = tag
        return slot, tag

    def reclaim(self) -> int:
        """Take back every lent slot (the postprocess stage died); returns how many."""
        n = len(self._lent)
        self._free.extend(self._lent)
        self._lent.clear()
        return n

    def close(self) -> None:
        """Unmap and unlink the pool (a reader that mapped it keeps its mapping)."""
        del self._control
        self._pool.close()


class OutputReader:
    """The postprocess stage's side: copies a result's arrays out of the engine's output pool."""

    def __init__(self) -> None:
        self._pools = PoolCache()

    def arrays(self, msg: ResultMsg, parts: Sequence[Any]) -> tuple[list[npt.NDArray[Any]], list[Any]] | None:
        """A result's output arrays, inline or in the pool, and the message parts after them (inline pixels).

        Args:
            msg: the decoded :class:`~streamdet.messages.ResultMsg`.
            parts: the message's ZeroMQ frames (``parts[0]`` is ``msg`` itself).

        Returns:
            ``(arrays, rest)``: inline arrays are views of their parts; pooled ones are copies
            (:meth:`take`). None when pooled arrays are gone.

        Raises:
            ValueError: if an inline part's size does not match its spec.
            SlotPoolError: if the message does not fit the pool.
        """
        if msg.outputs_slot == INLINE_SLOT:
            n = len(msg.outputs)
            return [spec.array_from(parts[1 + i].buffer) for i, spec in enumerate(msg.outputs)], list(parts[1 + n :])
        taken = self.take(msg.outputs_pool, msg.outputs_slot, msg.outputs_tag, msg.outputs)
        return None if taken is None else (taken, list(parts[1:]))

    def take(self, pool_name: str, slot: int, tag: int,
             specs: Sequence[TensorSpec]) -> list[npt.NDArray[Any]] | None:
        """Copy the arrays of ``specs`` out of ``slot`` and hand the slot back.

        Args:
            pool_name: the engine's output pool (a generation of it).
            slot: the slot, as the message says.
            tag: the slot's tag, as the message says.
            specs: the arrays, in the order they were put.

        Returns:
            The arrays (copies, owned by the caller), or None when they are gone: the pool is of
            an engine that was replaced, or the slot was taken back and written again.

        Raises:
            SlotPoolError: if the message does not fit the pool (bad slot or sizes), or the pool
                cannot be mapped for another reason than being gone.
        """
        try:
            pool = self._pools.get(pool_name)
        except StalePoolError:  # an older generation than one seen: its engine was replaced
            return None
        except SlotPoolError as e:
            if isinstance(e.__cause__, FileNotFoundError):  # unlinked (its engine replaced) before we mapped it
                return None
            raise  # (out of descriptors or memory: the stage fails and restarts, its frames are replayed)
        num_slots = pool.num_slots - 1
        if not 0 <= slot < num_slots:
            raise SlotPoolError(f"output pool {pool_name!r}: expected slot in [0, {num_slots}), got {slot}")
        need = outputs_bytes([s.nbytes for s in specs])
        buf = pool.buffer(slot, need)
        arrays = []
        offset = 0
        for s in specs:
            arrays.append(s.array_from(buf[offset : offset + s.nbytes]).copy())
            offset += align(s.nbytes)
        control = pool.view(num_slots, (num_slots, 2), np.int64)
        if control[slot, _WRITTEN] != tag:
            return None
        control[slot, _RETURNED] = tag
        return arrays

    def close(self) -> None:
        """Unmap every pool."""
        self._pools.close()
