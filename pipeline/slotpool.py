"""Shared-memory slot pools: a fixed number of fixed-size slots, handed around by credits.

The decoder of each source preallocates one pool (``multiprocessing.shared_memory``) and writes
every frame straight into a free slot; only the slot id travels over ZeroMQ. The last stage that
needs the pixels hands the slot back (a :class:`~streamdet.messages.CreditMsg` to the owner's
credit socket), and the owner reuses it. A producer with no free slot waits: memory stays
bounded and a slow consumer slows the producer (backpressure). The preprocess stage owns a second
pool of input tensors for the engine the same way.

Layout of a pool: a 64-byte header (magic, slot count, slot size), then ``num_slots`` slots of
``slot_bytes`` bytes each, every slot aligned to :data:`SLOT_ALIGN` bytes. The header makes a
pool self-describing, so a consumer attaches by name alone.

Cleanup: the owner unlinks the pool when its stream ends; all processes of a pipeline share the
runner's ``multiprocessing`` resource tracker (spawn start method), which unlinks any pool left
behind by a crashed owner, and the runner unlinks leftovers by name as well. A run whose
processes were all killed at once leaves its pools behind; the next run on the host removes them
at start (:func:`reap_orphan_pools`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import struct
import time
from collections import deque
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"SDPOOL01"
HEADER_BYTES = 64
SLOT_ALIGN = 64
_HEADER = struct.Struct("<8sQQ")


class SlotPoolError(RuntimeError):
    """A slot pool cannot be created or attached, or a slot is misused."""


class StalePoolError(SlotPoolError):
    """A message points into an older generation of a pool than one already seen (its owner restarted)."""


GENERATION_SEP = "."
"""Separator between a pool's base name and its generation (``sd-1a2b-f0.3``)."""


def pool_name(base: str, generation: int) -> str:
    """The shared-memory name of generation ``generation`` of pool ``base``."""
    return f"{base}{GENERATION_SEP}{generation}"


def split_pool_name(name: str) -> tuple[str, int]:
    """``(base, generation)`` of a pool name; a name without a generation is generation 0."""
    base, sep, gen = name.rpartition(GENERATION_SEP)
    if sep and gen.isdigit():
        return base, int(gen)
    return name, 0


def align(n: int, a: int = SLOT_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a`` (slot strides, offsets inside a slot)."""
    return (n + a - 1) // a * a


def pool_bytes(num_slots: int, slot_bytes: int) -> int:
    """Size of a pool's shared-memory block: the header and ``num_slots`` aligned slots."""
    return HEADER_BYTES + num_slots * align(slot_bytes)


SHM_ADVICE = ("a larger /dev/shm (docker run --shm-size=...) or fewer slots (decode.slots, decode.live_slots, "
              "preprocess.tensor_slots)")
"""What to do when shared memory runs out (every such error line ends with it)."""


class SlotPool:
    """A fixed number of fixed-size byte slots in one shared-memory block.

    Build it with :meth:`create` (owner) or :meth:`attach` (consumer).

    Attributes:
        name: the shared-memory name.
        num_slots: number of slots.
        slot_bytes: usable bytes per slot.
        owner: whether this handle created the block (and unlinks it).
    """

    def __init__(self, *, shm: shared_memory.SharedMemory, num_slots: int, slot_bytes: int, owner: bool) -> None:
        _release_fd(shm)
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.owner = owner
        self._stride = align(slot_bytes)

    @classmethod
    def create(cls, *, name: str, num_slots: int, slot_bytes: int) -> SlotPool:
        """Allocate a new pool.

        Args:
            name: shared-memory name (unique on the host).
            num_slots: number of slots (>= 1).
            slot_bytes: bytes per slot (>= 1).

        Returns:
            The owning :class:`SlotPool`.

        The block's pages are reserved at once (``posix_fallocate`` on Linux): a ``/dev/shm`` too
        small for it (docker's default is 64 MiB) fails here, with :class:`SlotPoolError`, instead
        of killing a process with SIGBUS at its first write past the room left.

        Raises:
            ValueError: on non-positive sizes.
            SlotPoolError: if the block cannot be created (name taken) or reserved (out of memory).
        """
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError(f"expected num_slots >= 1 and slot_bytes >= 1, got {num_slots} and {slot_bytes}")
        size = pool_bytes(num_slots, slot_bytes)
        free = shm_free_bytes()
        if free is not None and free < size:
            raise SlotPoolError(f"shared memory {name!r}: needs {size / 2**20:.1f} MiB but {shm_free_text(free)}: "
                                f"{SHM_ADVICE}")
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except (OSError, ValueError) as e:
            raise SlotPoolError(f"shared memory {name!r}: cannot create {size} bytes ({e})") from e
        try:
            _reserve(shm, size)
        except OSError as e:
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
            room = shm_free_text(shm_free_bytes())
            room = f" ({room})" if room else ""
            raise SlotPoolError(f"shared memory {name!r}: cannot reserve {size / 2**20:.1f} MiB{room}: "
                                f"{e.strerror or e}: {SHM_ADVICE}") from e
        assert shm.buf is not None
        _HEADER.pack_into(shm.buf, 0, MAGIC, num_slots, slot_bytes)
        return cls(shm=shm, num_slots=num_slots, slot_bytes=slot_bytes, owner=True)

    @classmethod
    def attach(cls, name: str) -> SlotPool:
        """Attach to an existing pool by name (sizes come from its header).

        Raises:
            SlotPoolError: if no such pool exists or the block is not a slot pool.
        """
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except (OSError, ValueError) as e:
            raise SlotPoolError(f"shared memory {name!r}: cannot attach ({e})") from e
        assert shm.buf is not None
        if shm.size < HEADER_BYTES:
            shm.close()
            raise SlotPoolError(f"shared memory {name!r}: too small for a slot pool ({shm.size} bytes)")
        magic, num_slots, slot_bytes = _HEADER.unpack_from(shm.buf, 0)
        if magic != MAGIC or shm.size < pool_bytes(num_slots, slot_bytes):
            shm.close()
            raise SlotPoolError(f"shared memory {name!r}: not a streamdet slot pool")
        return cls(shm=shm, num_slots=int(num_slots), slot_bytes=int(slot_bytes), owner=False)

    def _check(self, slot: int, nbytes: int) -> int:
        if self._shm is None:
            raise SlotPoolError(f"slot pool {self.name!r} is closed")
        if not 0 <= slot < self.num_slots:
            raise SlotPoolError(f"slot pool {self.name!r}: expected slot in [0, {self.num_slots}), got {slot}")
        if not 0 <= nbytes <= self.slot_bytes:
            raise SlotPoolError(f"slot pool {self.name!r}: expected at most {self.slot_bytes} bytes, got {nbytes}")
        return HEADER_BYTES + slot * self._stride

    def buffer(self, slot: int, nbytes: int | None = None) -> memoryview:
        """The first ``nbytes`` bytes of a slot (all of it by default), as a writable memoryview.

        Raises:
            SlotPoolError: on a bad slot, a size over ``slot_bytes``, or a closed pool.
        """
        n = self.slot_bytes if nbytes is None else nbytes
        off = self._check(slot, n)
        assert self._shm is not None and self._shm.buf is not None
        return self._shm.buf[off : off + n]

    def view(self, slot: int, shape: tuple[int, ...], dtype: Any = np.uint8) -> npt.NDArray[Any]:
        """A numpy view of a slot (no copy), C order.

        Args:
            slot: the slot index.
            shape: array shape; its size in bytes must fit in a slot.
            dtype: array dtype.

        Returns:
            A writable array aliasing the slot.

        Raises:
            SlotPoolError: on a bad slot, an array larger than a slot, or a closed pool.
        """
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        return np.frombuffer(self.buffer(slot, nbytes), dtype=dt).reshape(shape)

    def close(self) -> None:
        """Unmap the block (views must be dropped first); the owner also unlinks it."""
        shm, self._shm = self._shm, None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:  # a view is still alive; the mapping goes when the process exits
            pass
        if self.owner:
            try:
                shm.unlink()  # also unregisters it from the resource tracker
            except FileNotFoundError:
                pass

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SHM_DIR = "/dev/shm"
"""Where POSIX shared memory lives on Linux (a tmpfs; writing past its size kills with SIGBUS)."""


def _fd(shm: shared_memory.SharedMemory) -> int:
    """``SharedMemory``'s own descriptor of the block (CPython's ``_fd``), or -1 where it keeps none."""
    fd = getattr(shm, "_fd", -1)
    return fd if isinstance(fd, int) else -1


def _release_fd(shm: shared_memory.SharedMemory) -> None:
    """Close a mapped block's file descriptor; the mapping stays.

    ``SharedMemory`` keeps one open per handle until ``close()``, and a preprocess process with
    its sources' decoders held 16 descriptors per source, 6 of them for blocks (the ledger and the
    frame pools, each attached by several parts), so 64 sources passed the usual limit of 1024.
    Nothing needs the descriptor once the block is mapped (``close()`` skips a closed one).
    """
    fd = _fd(shm)
    if fd >= 0:
        os.close(fd)
        shm._fd = -1  # type: ignore[attr-defined]


def _reserve(shm: shared_memory.SharedMemory, size: int) -> None:
    """Allocate every page of a new block now, where the system can (Linux tmpfs).

    ``ftruncate`` (all ``SharedMemory`` does) makes a sparse file; tmpfs then finds a page at
    each first write, and when none is left it kills the writer with SIGBUS.

    Raises:
        OSError: ENOSPC (or ENOMEM) when the room is not there. Other failures (a file system
            without ``fallocate``, a sandbox refusing it) leave the block sparse, as before.
    """
    fd = _fd(shm)
    if not hasattr(os, "posix_fallocate") or fd < 0:  # (other systems)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise


def shm_free_text(free: int | None) -> str:
    """``/dev/shm has 12.3 MiB free`` for ``free`` bytes (:func:`shm_free_bytes`), or "" for None."""
    return "" if free is None else f"{SHM_DIR} has {free / 2**20:.1f} MiB free"


def shm_free_bytes() -> int | None:
    """Free bytes in :data:`SHM_DIR`, or None where it does not exist (other systems)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_bytes_by_run() -> dict[str, int]:
    """Bytes of :data:`SHM_DIR` that each run's blocks take, by run prefix (``sd-<token>-``), in one scan.

    The pages given to them (``st_blocks``), which is what counts towards a memory limit; empty
    without ``/dev/shm``.
    """
    by_run: dict[str, int] = {}
    try:
        with os.scandir(SHM_DIR) as it:
            for e in it:
                end = e.name.find("-", len(RUN_PREFIX)) + 1  # (past the token; 0: not a run's block)
                if not e.name.startswith(RUN_PREFIX) or end == 0:
                    continue
                try:
                    size = e.stat(follow_symlinks=False).st_blocks * 512
                except OSError:  # (removed meanwhile)
                    continue
                by_run[e.name[:end]] = by_run.get(e.name[:end], 0) + size
    except OSError:
        pass
    return by_run


def unlink_pool(name: str) -> bool:
    """Remove a pool's shared-memory name if it still exists (cleanup after a crash).

    Returns:
        Whether a block was removed.
    """
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
    except (OSError, ValueError):
        return False
    shm.close()
    try:
        shm.unlink()  # also unregisters it from the resource tracker
    except FileNotFoundError:
        return False
    return True


RUN_PREFIX = "sd-"
"""Every shared-memory block of a run is named ``sd-<token>-...``; its ledger ``sd-<token>-ledger``."""


def _mapped_shm_names() -> set[str] | None:
    """Names of the :data:`SHM_DIR` blocks some process maps (``/proc/*/maps``), or None without ``/proc``."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    prefix = f"{SHM_DIR}/"
    names: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        names.add(line[at + len(prefix):].split(" (deleted)")[0].strip())
        except OSError:  # gone meanwhile, or another user's (it cannot map our 0600 blocks)
            continue
    return names


def reap_orphan_pools(min_age_s: float = 60.0) -> tuple[int, int]:
    """Unlink the shared memory of runs whose every process died without cleaning up (SIGKILL, OOM).

    A run is dead when no process this one can see maps its ledger (the runner and every stage
    map it while they live) and its ledger was last modified more than ``min_age_s`` ago (the
    runner touches it every :data:`~pipeline.runner.RSS_SAMPLE_S` while it lives, so that a run
    in another PID namespace sharing ``/dev/shm``, invisible in ``/proc``, is not taken for
    dead). Only this user's blocks are looked at. Without ``/proc`` nothing is done.

    Returns:
        ``(blocks, bytes)`` unlinked.
    """
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return 0, 0
    ledgers = [e for e in entries if e.startswith(RUN_PREFIX) and e.endswith("-ledger")]
    if not ledgers:
        return 0, 0
    mapped = _mapped_shm_names()
    if mapped is None:
        return 0, 0
    now = time.time()
    blocks = nbytes = 0
    for ledger in ledgers:
        try:
            st = os.stat(f"{SHM_DIR}/{ledger}")
        except OSError:
            continue
        if ledger in mapped or st.st_uid != os.getuid() or now - st.st_mtime < min_age_s:
            continue
        run = ledger[: -len("ledger")]  # "sd-<token>-"
        for e in sorted(entries, key=lambda x: x == ledger):  # the ledger last: a retry finds the rest
            if not e.startswith(run) or e in mapped:
                continue
            try:
                size = os.stat(f"{SHM_DIR}/{e}").st_size
                os.unlink(f"{SHM_DIR}/{e}")
            except OSError:
                continue
            blocks += 1
            nbytes += size
    return blocks, nbytes


class SlotCredits:
    """The owner's bookkeeping: which slots are free.

    Slots are handed out oldest-freed first. Releasing a slot that is not in use is an error (it
    would let two frames share a slot).
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"expected num_slots >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._in_use: set[int] = set()

    def acquire(self) -> int | None:
        """Take a free slot, or ``None`` when all are in use."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self._in_use.add(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back.

        Raises:
            SlotPoolError: if the slot is not in use.
        """
        if slot not in self._in_use:
            raise SlotPoolError(f"expected a slot in use, got {slot} (in use: {sorted(self._in_use)})")
        self._in_use.remove(slot)
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        """Number of slots handed out and not yet given back."""
        return len(self._in_use)

    @property
    def all_free(self) -> bool:
        """Whether every slot is back."""
        return not self._in_use


class PoolCache:
    """A consumer's attached pools, by name (each attached once, on first use)."""

    def __init__(self) -> None:
        self._pools: dict[str, SlotPool] = {}
        self._newest: dict[str, tuple[int, str]] = {}

    def get(self, name: str) -> SlotPool:
        """The pool called ``name``, attaching it the first time.

        Pool names may end with a generation (:func:`pool_name`): a restarted owner creates the
        next one. Seeing a newer generation detaches the older one; asking for an older generation
        than the newest seen raises :class:`StalePoolError` (the caller drops that message).

        Raises:
            StalePoolError: for an older generation than one already attached.
            SlotPoolError: if it cannot be attached.
        """
        pool = self._pools.get(name)
        if pool is not None:
            return pool
        base, gen = split_pool_name(name)
        newest = self._newest.get(base)
        if newest is not None and newest[0] > gen:
            raise StalePoolError(f"shared memory {name!r}: generation {gen} is stale (generation {newest[0]} exists)")
        pool = SlotPool.attach(name)
        if newest is not None:
            old = self._pools.pop(newest[1], None)
            if old is not None:
                old.close()
        self._pools[name] = pool
        self._newest[base] = (gen, name)
        return pool

    def drop(self, name: str) -> None:
        """Detach every generation of a pool (by its base name or any generation's name), e.g. once its source ended."""
        base = split_pool_name(name)[0]
        for key in [k for k in self._pools if split_pool_name(k)[0] == base]:
            self._pools.pop(key).close()
        self._newest.pop(base, None)

    def close(self) -> None:
        """Detach every pool."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
