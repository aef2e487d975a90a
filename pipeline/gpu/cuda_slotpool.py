"""CUDA-IPC frame slots: a fixed ring of device frames shared across processes, handed around by credits.

The GPU twin of :mod:`pipeline.slotpool`. The producer (the decoder of a source) allocates ONE
``(num_slots, H, W, 3)`` uint8 tensor on the GPU at start and never frees or grows it. Each
consumer process receives the ring's CUDA IPC handle once (:class:`CudaPoolHandle`, sent over
ZeroMQ when it connects), opens it once and caches it (:class:`CudaPoolCache`); after that only slot
ids travel, in the pipeline's ordinary frame messages, and slots come back as
:class:`~streamdet.messages.CreditMsg` credits to the producer, which reuses them (bookkeeping by
:class:`~pipeline.slotpool.SlotCredits`). A producer with no free slot waits for a credit: GPU
memory stays fixed and a slow consumer slows the producer (backpressure).

The handle is plain data, never a pickle: :class:`CudaIpcStorage` holds the fields of
``torch.UntypedStorage._share_cuda_()`` (device index, IPC memory handle, storage size and offset
within its allocation, the producer's reference-counter file and slot, IPC event handle), and
:class:`CudaPoolHandle` adds the ring's shape, stride, storage offset and dtype; it travels as
msgpack and is validated field by field when built. The consumer rebuilds the ring with
``torch.multiprocessing.reductions.rebuild_cuda_tensor``, the function PyTorch's own reducer
names, from those fields.

Why this shape (PyTorch CUDA IPC traps):

* Only the ``spawn`` / ``forkserver`` start methods work with CUDA (a forked child cannot use CUDA).
* An IPC handle names a whole caching-allocator block, not a tensor: the handle carries the
  storage's offset and size within the block, so the consumer's view starts at the right byte.
* Opening a handle is expensive and every open maps memory again (consumer memory growth, pytorch
  #27975): each ring is opened once per consumer and cached; a repeated handle for an open ring
  only releases its producer-side reference count.
* The producer must keep the block alive while any consumer holds it; the ring lives as long as
  the producer. A consumer that crashes while holding the ring leaks the mapping until the
  producer exits, never a growing amount.
* ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` breaks CUDA IPC (pytorch #179220):
  :meth:`CudaFramePool.create` refuses to run with it.
* Writes must be complete before a consumer reads: :meth:`CudaFramePool.write` synchronizes its
  copy stream before returning, so the slot id may be sent right after. A consumer must likewise
  finish reading a slot (synchronize the stream of the kernels that read it) before sending the
  credit (:meth:`CudaPoolCache.done_reading`).

The same code runs on CPU tensors (``device="cpu"``: the ring goes to PyTorch's ``file_system``
shared memory, described by :class:`SharedMemStorage`) so the tests exercise it without a GPU.

Reference: PyTorch docs, "Multiprocessing best practices" (CUDA tensors, ``spawn``, keeping the
producer's tensor alive) and ``torch/multiprocessing/reductions.py`` (``reduce_tensor``,
``rebuild_cuda_tensor``, ``rebuild_storage_filename``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import msgpack
import numpy as np
import numpy.typing as npt

from pipeline.slotpool import SlotCredits, SlotPoolError

if TYPE_CHECKING:
    import torch

HANDLE_FORMAT = "streamdet.cuda-pool/2"
"""Tag of an encoded :class:`CudaPoolHandle` (``/1`` carried pickled bytes and is refused)."""

RING_DTYPE = "uint8"
"""The ring's element type (RGB pixels)."""


def check_allocator_for_ipc() -> None:
    """Refuse an allocator configuration that breaks CUDA IPC.

    Raises:
        SlotPoolError: if ``PYTORCH_CUDA_ALLOC_CONF`` enables ``expandable_segments``.
    """
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    opts = {kv.split(":", 1)[0].strip(): kv.split(":", 1)[1].strip() for kv in conf.split(",") if ":" in kv}
    if opts.get("expandable_segments", "").lower() in ("true", "1"):
        raise SlotPoolError("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which breaks CUDA IPC "
                            "(pytorch #179220); unset it for --device cuda")


def _check_int(value: object, what: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected {what} as an int >= {minimum}, got {value!r}")


def _check_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes) or not value:
        raise ValueError(f"expected {what} as non-empty bytes, got {_short(value)}")


def _check_ints(value: object, what: str, n: int, minimum: int) -> None:
    if not isinstance(value, tuple) or len(value) != n:
        raise ValueError(f"expected {what} as a tuple of {n} ints, got {_short(value)}")
    for v in value:
        _check_int(v, f"every {what} entry", minimum)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class CudaIpcStorage:
    """A CUDA storage as another process opens it: the fields of ``UntypedStorage._share_cuda_()``.

    Attributes:
        device_index: CUDA device ordinal of the storage.
        handle: PyTorch's shareable handle of the caching-allocator block holding the storage
            (a type byte and the ``cudaIpcMemHandle_t``).
        size_bytes: size of the storage, bytes.
        offset_bytes: start of the storage within the block, bytes.
        ref_counter_handle: name of the producer's shared reference-counter file.
        ref_counter_offset: this handle's counter within that file.
        event_handle: ``cudaIpcEventHandle_t`` of the producer's last write to the block
            (meaningful only when ``event_sync_required``).
        event_sync_required: whether the consumer waits for that event before first use.
    """

    device_index: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool

    def __post_init__(self) -> None:
        _check_int(self.device_index, "device_index")
        _check_bytes(self.handle, "an IPC memory handle")
        _check_int(self.size_bytes, "size_bytes", 1)
        _check_int(self.offset_bytes, "offset_bytes")
        _check_bytes(self.ref_counter_handle, "a ref-counter handle")
        _check_int(self.ref_counter_offset, "ref_counter_offset")
        _check_bytes(self.event_handle, "an IPC event handle")
        if not isinstance(self.event_sync_required, bool):
            raise ValueError(f"expected event_sync_required as a bool, got {self.event_sync_required!r}")

    @property
    def key(self) -> tuple[bytes, int]:
        """What identifies the storage (PyTorch's ``shared_cache`` key): the block handle and offset."""
        return (self.handle, self.offset_bytes)

    def _fields(self) -> list[Any]:
        return [self.device_index, self.handle, self.size_bytes, self.offset_bytes, self.ref_counter_handle,
                self.ref_counter_offset, self.event_handle, self.event_sync_required]


@dataclass(frozen=True, slots=True)
class SharedMemStorage:
    """A CPU storage in PyTorch's ``file_system`` shared memory: ``UntypedStorage._share_filename_cpu_()``.

    Used for ``device="cpu"`` rings (tests, CPU smoke runs).

    Attributes:
        manager_handle: socket path of the ``torch_shm_manager`` that tracks the segment.
        handle: the shared-memory segment's name.
        size_bytes: size of the storage, bytes.
    """

    manager_handle: bytes
    handle: bytes
    size_bytes: int

    def __post_init__(self) -> None:
        _check_bytes(self.manager_handle, "a shm manager handle")
        _check_bytes(self.handle, "a shared-memory name")
        _check_int(self.size_bytes, "size_bytes", 1)

    @property
    def key(self) -> tuple[bytes, int]:
        """What identifies the storage: the segment name."""
        return (self.handle, 0)

    def _fields(self) -> list[Any]:
        return [self.manager_handle, self.handle, self.size_bytes]


_STORAGE_KINDS: dict[str, type[CudaIpcStorage] | type[SharedMemStorage]] = {
    "cuda": CudaIpcStorage, "shm": SharedMemStorage,
}


@dataclass(frozen=True, slots=True)
class RingHandle:
    """What a consumer needs to open a shared ring (one tensor in one storage), sent to it once.

    The fields, their checks, ``device`` and the msgpack encoding are common to every ring; each
    subclass sets the class constants (and ``format``'s default).

    Attributes:
        pool: the pool's name (the pool named by the messages and credits that use the ring).
        shape: the ring's shape, :attr:`RANK` sizes laid out as :attr:`LAYOUT`.
        stride: the ring's strides, elements.
        storage_offset: where the ring starts in its storage, elements.
        dtype: one of :attr:`ITEMSIZE`'s keys.
        storage: where the storage is (:class:`CudaIpcStorage`, or :class:`SharedMemStorage` on the CPU).
        format: :attr:`FORMAT`.

    Raises:
        ValueError: on a field of the wrong type or value.
    """

    FORMAT: ClassVar[str]
    """The format tag the handle is encoded with."""
    RANK: ClassVar[int]
    """Number of ring dimensions."""
    LAYOUT: ClassVar[str]
    """The shape's layout in error messages, e.g. ``(num_slots, H, W, 3)``."""
    CHANNEL_AXIS: ClassVar[int]
    """The axis whose size must be 3."""
    ITEMSIZE: ClassVar[dict[str, int]]
    """Bytes per element of each allowed dtype."""
    WHAT: ClassVar[str]
    """The handle's name in decode errors."""

    pool: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: str
    storage: CudaIpcStorage | SharedMemStorage
    format: str = ""

    def __post_init__(self) -> None:
        if self.format != self.FORMAT:
            raise ValueError(f"expected format {self.FORMAT}, got {_short(self.format)}")
        if not isinstance(self.pool, str) or not self.pool:
            raise ValueError(f"expected a pool name, got {_short(self.pool)}")
        _check_ints(self.shape, "shape", self.RANK, 1)
        if self.shape[self.CHANNEL_AXIS] != 3:
            raise ValueError(f"expected shape {self.LAYOUT}, got {self.shape}")
        _check_ints(self.stride, "stride", self.RANK, 0)
        _check_int(self.storage_offset, "storage_offset")
        if self.dtype not in self.ITEMSIZE:
            allowed = next(iter(self.ITEMSIZE)) if len(self.ITEMSIZE) == 1 else f"in {tuple(self.ITEMSIZE)}"
            raise ValueError(f"expected dtype {allowed}, got {_short(self.dtype)}")
        if not isinstance(self.storage, CudaIpcStorage | SharedMemStorage):
            raise ValueError(f"expected storage as CudaIpcStorage or SharedMemStorage, got "
                             f"{type(self.storage).__name__}")
        end = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) + 1
        need = end * self.ITEMSIZE[self.dtype]
        if need > self.storage.size_bytes:
            raise ValueError(f"expected a storage of at least {need} bytes for shape {self.shape} stride "
                             f"{self.stride} offset {self.storage_offset}, got {self.storage.size_bytes}")

    @property
    def device(self) -> str:
        """The device the ring lives on: ``"cuda:N"``, or ``"cpu"``."""
        s = self.storage
        return f"cuda:{s.device_index}" if isinstance(s, CudaIpcStorage) else "cpu"

    def encode(self) -> bytes:
        """Encode as msgpack (see :func:`encode_ring_handle`)."""
        return encode_ring_handle(self.format, self.pool, self.shape, self.stride, self.storage_offset, self.dtype,
                                  self.storage)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        """Inverse of :meth:`encode`.

        Raises:
            ValueError: on undecodable bytes, another format, or a field of the wrong type or value.
        """
        pool, shape, stride, offset, dtype, storage, fmt = decode_ring_handle(data, cls.FORMAT, cls.WHAT)
        return cls(pool, _ints_from_list(shape, "shape", cls.RANK), _ints_from_list(stride, "stride", cls.RANK),
                   offset, dtype, storage, fmt)


@dataclass(frozen=True, slots=True)
class CudaPoolHandle(RingHandle):
    """What a consumer needs to open a frame ring, sent to it once (msgpack, see :meth:`encode`).

    Attributes:
        pool: the pool's name (the ``pool`` of frame messages and credits).
        shape: the ring's ``(num_slots, H, W, 3)``.
        stride: the ring's strides, elements.
        storage_offset: where the ring starts in its storage, elements.
        dtype: :data:`RING_DTYPE`.
        storage: where the storage is (:class:`CudaIpcStorage`, or :class:`SharedMemStorage` on the CPU).
        format: :data:`HANDLE_FORMAT`.

    Raises:
        ValueError: on a field of the wrong type or value.
    """

    FORMAT: ClassVar[str] = HANDLE_FORMAT
    RANK: ClassVar[int] = 4
    LAYOUT: ClassVar[str] = "(num_slots, H, W, 3)"
    CHANNEL_AXIS: ClassVar[int] = 3
    ITEMSIZE: ClassVar[dict[str, int]] = {RING_DTYPE: 1}
    WHAT: ClassVar[str] = "pool handle"

    format: str = HANDLE_FORMAT

    @property
    def num_slots(self) -> int:
        """Number of slots."""
        return self.shape[0]

    @property
    def frame_hw(self) -> tuple[int, int]:
        """``(height, width)`` of every slot, pixels."""
        return (self.shape[1], self.shape[2])


def encode_ring_handle(fmt: str, pool: str, shape: tuple[int, ...], stride: tuple[int, ...], storage_offset: int,
                       dtype: str, storage: CudaIpcStorage | SharedMemStorage) -> bytes:
    """Msgpack ``[format, pool, shape, stride, storage_offset, dtype, kind, [storage fields]]`` of a shared ring.

    ``kind`` is ``"cuda"`` (:class:`CudaIpcStorage` fields in declaration order) or ``"shm"``
    (:class:`SharedMemStorage`); handles travel as msgpack bin, everything else as ints, strings and
    booleans. Shared by the frame rings here and :mod:`pipeline.gpu.tensor_pool`'s tensor rings.
    """
    kind = "cuda" if isinstance(storage, CudaIpcStorage) else "shm"
    return bytes(msgpack.packb([fmt, pool, list(shape), list(stride), storage_offset, dtype, kind, storage._fields()],
                               use_bin_type=True))


def decode_ring_handle(data: bytes | memoryview, expected_format: str, what: str) -> tuple[
        Any, Any, Any, Any, Any, CudaIpcStorage | SharedMemStorage, str]:
    """Inverse of :func:`encode_ring_handle`, up to the fields' own checks.

    Args:
        data: the encoded handle.
        expected_format: the format tag the caller accepts.
        what: the handle's name in error messages.

    Returns:
        ``(pool, shape, stride, storage_offset, dtype, storage, format)``; ``shape`` and ``stride``
        as decoded (lists), the rest unchecked: the handle classes validate them when built.

    Raises:
        ValueError: on undecodable bytes, another format, an unknown storage kind or a wrong field count.
    """
    try:
        f = msgpack.unpackb(bytes(data), raw=False)
    except (ValueError, msgpack.exceptions.ExtraData) as e:
        raise ValueError(f"expected a msgpack {what}, got undecodable bytes ({e})") from e
    if not isinstance(f, list) or len(f) != 8:
        raise ValueError(f"expected an 8-field {what}, got {_short(f)}")
    fmt, pool, shape, stride, offset, dtype, kind, fields = f
    if fmt != expected_format:
        raise ValueError(f"expected format {expected_format}, got {_short(fmt)}")
    storage_cls = _STORAGE_KINDS.get(kind) if isinstance(kind, str) else None
    if storage_cls is None:
        raise ValueError(f"expected storage kind in {sorted(_STORAGE_KINDS)}, got {_short(kind)}")
    n_fields = len(storage_cls.__dataclass_fields__)
    if not isinstance(fields, list) or len(fields) != n_fields:
        raise ValueError(f"expected {n_fields} {kind} storage fields, got {_short(fields)}")
    return pool, shape, stride, offset, dtype, storage_cls(*fields), fmt


def _ints_from_list(value: object, what: str, n: int) -> tuple[int, ...]:
    """A decoded list of ``n`` entries as a tuple (its entries are checked by the handle)."""
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(f"expected {what} as a list of {n} ints, got {_short(value)}")
    return tuple(value)


def share_storage(tensor: torch.Tensor) -> CudaIpcStorage | SharedMemStorage:
    """Describe a tensor's storage so that another process can open it (each call counts one CUDA reference).

    Args:
        tensor: a CUDA tensor, or a CPU tensor whose storage is in ``file_system`` shared memory
            (``untyped_storage()._share_filename_cpu_()`` called once by its owner).

    Returns:
        A :class:`CudaIpcStorage` (CUDA) or :class:`SharedMemStorage` (CPU).
    """
    st = tensor.untyped_storage()
    if tensor.device.type == "cuda":
        dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = st._share_cuda_()
        return CudaIpcStorage(int(dev), bytes(handle), int(size), int(offset), bytes(rc_handle), int(rc_offset),
                              bytes(ev_handle), bool(ev_sync))
    manager, name, size = st._share_filename_cpu_()
    return SharedMemStorage(bytes(manager), bytes(name), int(size))


def open_shared_tensor(storage: CudaIpcStorage | SharedMemStorage, shape: tuple[int, ...], stride: tuple[int, ...],
                       storage_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Map a tensor another process shared (:func:`share_storage`) into this process (no caching).

    Args:
        storage: where its storage is.
        shape: the tensor's shape.
        stride: its strides, elements.
        storage_offset: where it starts in its storage, elements.
        dtype: its element type.

    Returns:
        The tensor, on the producer's device (``cuda:N``) or in CPU shared memory.
    """
    import torch

    if isinstance(storage, CudaIpcStorage):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        s = storage
        mapped: torch.Tensor = rebuild_cuda_tensor(
            torch.Tensor, shape, stride, storage_offset, torch.storage.TypedStorage, dtype, s.device_index,
            s.handle, s.size_bytes, s.offset_bytes, False, s.ref_counter_handle, s.ref_counter_offset,
            s.event_handle, s.event_sync_required)
        return mapped
    st = torch.UntypedStorage._new_shared_filename_cpu(storage.manager_handle, storage.handle, storage.size_bytes)
    return torch.empty((0,), dtype=dtype).set_(st, storage_offset, shape, stride)


def release_unopened(storage: CudaIpcStorage | SharedMemStorage) -> None:
    """Release the producer-side reference count a CUDA handle for an already open storage carries.

    ``_share_cuda_`` counts one reference per handle, which the consumer's mapping gives back when
    it is dropped. A handle that is not mapped (the storage is cached) gives it back here, as
    ``rebuild_cuda_tensor`` does when it finds a storage cached; otherwise the producer would
    keep the block referenced after every mapping is gone (and PyTorch warns about it at exit).
    A no-op for shared-memory storages.
    """
    if isinstance(storage, CudaIpcStorage):
        import torch

        torch.storage.TypedStorage._release_ipc_counter(storage.ref_counter_handle, storage.ref_counter_offset,
                                                        device=storage.device_index)


def _open_ring(handle: CudaPoolHandle) -> torch.Tensor:
    """Map the ring a handle describes into this process (no caching: see :class:`CudaPoolCache`)."""
    import torch

    return open_shared_tensor(handle.storage, handle.shape, handle.stride, handle.storage_offset, torch.uint8)


class CudaFramePool:
    """The producer's ring of frame slots on one device.

    Build it with :meth:`create`.

    Attributes:
        name: the pool's name.
        ring: the ``(num_slots, H, W, 3)`` uint8 tensor.
        credits: the free-slot bookkeeping.
    """

    def __init__(self, *, name: str, ring: torch.Tensor) -> None:
        self.name = name
        self.ring: torch.Tensor | None = ring
        self.num_slots = int(ring.shape[0])
        self.frame_hw = (int(ring.shape[1]), int(ring.shape[2]))
        self.device = ring.device
        self.credits = SlotCredits(self.num_slots)
        self._staging: torch.Tensor | None = None
        self._stream: Any = None

    @classmethod
    def create(cls, *, name: str, num_slots: int, frame_hw: tuple[int, int], device: str = "cuda") -> CudaFramePool:
        """Allocate the ring (once, for the producer's lifetime).

        Args:
            name: pool name (unique within the pipeline).
            num_slots: slots in the ring (>= 2: one written while another is read).
            frame_hw: ``(height, width)`` of the frames.
            device: ``"cuda"``, ``"cuda:N"``, or ``"cpu"`` (shared memory; tests).

        Returns:
            The pool.

        Raises:
            ValueError: on bad sizes.
            SlotPoolError: no such device, an IPC-breaking allocator setting, or out of memory.
        """
        import torch

        if num_slots < 2 or min(frame_hw) < 1:
            raise ValueError(f"expected num_slots >= 2 and positive frame_hw, got {num_slots} and {frame_hw}")
        dev = torch.device(device)
        if dev.type == "cuda":
            check_allocator_for_ipc()
            if not torch.cuda.is_available():
                raise SlotPoolError(f"pool {name}: --device {device} needs a CUDA GPU")
        try:
            ring = torch.empty((num_slots, frame_hw[0], frame_hw[1], 3), dtype=torch.uint8, device=dev)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            raise SlotPoolError(f"pool {name}: cannot allocate {num_slots} frames of {frame_hw} on {dev} ({e})") from e
        if dev.type == "cpu":
            ring.untyped_storage()._share_filename_cpu_()  # file_system shared memory, named in the handle
        return cls(name=name, ring=ring)

    def handle(self) -> CudaPoolHandle:
        """A :class:`CudaPoolHandle` for one consumer (make one per consumer: each counts one reference).

        Raises:
            SlotPoolError: if the pool is closed.
        """
        ring = self._ring()
        storage = share_storage(ring)
        n, h, w, c = (int(v) for v in ring.shape)
        s0, s1, s2, s3 = (int(v) for v in ring.stride())
        return CudaPoolHandle(self.name, (n, h, w, c), (s0, s1, s2, s3), int(ring.storage_offset()), RING_DTYPE,
                              storage)

    def _ring(self) -> torch.Tensor:
        if self.ring is None:
            raise SlotPoolError(f"pool {self.name}: closed")
        return self.ring

    def acquire(self) -> int | None:
        """A free slot id, or ``None`` when all are out (wait for a credit)."""
        return self.credits.acquire()

    def release(self, slot: int) -> None:
        """Take a slot back (a credit arrived).

        Raises:
            SlotPoolError: if the slot was not handed out.
        """
        self.credits.release(slot)

    def write(self, slot: int, frame_rgb: npt.NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        """Copy one frame into a slot and wait until the copy is complete.

        A host frame goes through a pinned staging buffer (one asynchronous host-to-device copy);
        a device frame is copied on the device.

        Args:
            slot: a slot from :meth:`acquire`.
            frame_rgb: ``(H, W, 3)`` uint8 RGB, numpy or torch.

        Returns:
            The slot's ``(H, W, 3)`` view.

        Raises:
            ValueError: if the frame's shape or dtype differs from the pool's.
            SlotPoolError: if the slot is out of range or the pool is closed.
        """
        import torch

        ring = self._ring()
        if not 0 <= slot < self.num_slots:
            raise SlotPoolError(f"pool {self.name}: slot {slot} out of range 0..{self.num_slots - 1}")
        h, w = self.frame_hw
        src = torch.from_numpy(np.ascontiguousarray(frame_rgb)) if isinstance(frame_rgb, np.ndarray) else frame_rgb
        if tuple(src.shape) != (h, w, 3) or src.dtype != torch.uint8:
            raise ValueError(f"expected a ({h}, {w}, 3) uint8 frame, got {tuple(src.shape)} {src.dtype}")
        dst = ring[slot]
        if self.device.type != "cuda":
            dst.copy_(src)
            return dst
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
            self._staging = torch.empty((h, w, 3), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self._stream):
            if src.device.type == "cpu":
                assert self._staging is not None
                self._staging.copy_(src)
                dst.copy_(self._staging, non_blocking=True)
            else:
                dst.copy_(src)
        self._stream.synchronize()  # the consumer reads in another process: the bytes must be there
        return dst

    def close(self) -> None:
        """Drop the ring (after every consumer is done with it)."""
        self.ring = None
        self._staging = None
        self._stream = None


class CudaPoolCache:
    """A consumer's opened rings, by pool name (each ring opened once)."""

    def __init__(self) -> None:
        self._rings: dict[str, tuple[torch.Tensor, tuple[bytes, int]]] = {}
        self.opens = 0

    def open(self, handle: CudaPoolHandle) -> torch.Tensor:
        """Open a pool's ring, or return the one already open under that name.

        Args:
            handle: the producer's handle (:meth:`CudaPoolHandle.decode` of what it sent).

        Returns:
            The ``(num_slots, H, W, 3)`` uint8 ring on the producer's device.

        Raises:
            SlotPoolError: if the handle cannot be opened (another machine's GPU, a dead producer),
                or names an open pool with a different ring.
        """
        cached = self._rings.get(handle.pool)
        if cached is not None:
            ring, key = cached
            if key != handle.storage.key:
                raise SlotPoolError(f"pool {handle.pool}: the handle names another ring than the one already open "
                                    "under that name")
            release_unopened(handle.storage)
            return ring
        try:
            ring = _open_ring(handle)
        except Exception as e:  # CUDA and shared-memory errors surface as assorted types
            raise SlotPoolError(f"pool {handle.pool}: cannot open the shared ring on {handle.device} "
                                f"({type(e).__name__}: {e})") from e
        self._rings[handle.pool] = (ring, handle.storage.key)
        self.opens += 1
        return ring

    def frame(self, pool: str, slot: int) -> torch.Tensor:
        """The ``(H, W, 3)`` uint8 view of a slot of an opened pool.

        Raises:
            SlotPoolError: if the pool was not opened or the slot is out of range.
        """
        cached = self._rings.get(pool)
        if cached is None:
            raise SlotPoolError(f"pool {pool}: not opened (no handle received)")
        ring = cached[0]
        if not 0 <= slot < ring.shape[0]:
            raise SlotPoolError(f"pool {pool}: slot {slot} out of range 0..{ring.shape[0] - 1}")
        return ring[slot]

    @staticmethod
    def done_reading(device: torch.device) -> None:
        """Wait until the kernels queued on ``device``'s current stream (which read slots) are done.

        Call before sending the credits of the slots they read; a no-op on the CPU.
        """
        import torch

        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def close(self) -> None:
        """Forget every ring (the producer frees the memory)."""
        self._rings.clear()
