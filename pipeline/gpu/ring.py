"""A shared ring: one tensor allocated once by a producer and mapped once by each consumer process.

What the frame rings (:mod:`pipeline.gpu.cuda_slotpool`) and the tensor rings
(:mod:`pipeline.gpu.tensor_pool`) share: the storage descriptions (:class:`CudaIpcStorage` for CUDA
IPC, :class:`SharedMemStorage` for PyTorch's ``file_system`` shared memory on the CPU), the handle a
consumer opens a ring with (:class:`RingHandle`, plain msgpack, never a pickle), the producer's
allocation (:func:`allocate_ring`) and the consumer's cache of opened rings (:class:`RingCache`).
See :mod:`pipeline.gpu.cuda_slotpool` for the CUDA IPC traps this design avoids.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

import msgpack

from pipeline.slotpool import SlotPoolError

if TYPE_CHECKING:
    import torch


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


def _check_fields(obj: object, checks: tuple[tuple[str, str | int], ...]) -> None:
    """Check ``obj``'s fields: ``(name, minimum)`` an int >= minimum, ``(name, what)`` non-empty bytes."""
    for name, rule in checks:
        if isinstance(rule, int):
            _check_int(getattr(obj, name), name, rule)
        else:
            _check_bytes(getattr(obj, name), rule)


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

    _CHECKS: ClassVar[tuple[tuple[str, str | int], ...]] = (
        ("device_index", 0), ("handle", "an IPC memory handle"), ("size_bytes", 1), ("offset_bytes", 0),
        ("ref_counter_handle", "a ref-counter handle"), ("ref_counter_offset", 0),
        ("event_handle", "an IPC event handle"))

    def __post_init__(self) -> None:
        _check_fields(self, self._CHECKS)
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

    _CHECKS: ClassVar[tuple[tuple[str, str | int], ...]] = (
        ("manager_handle", "a shm manager handle"), ("handle", "a shared-memory name"), ("size_bytes", 1))

    def __post_init__(self) -> None:
        _check_fields(self, self._CHECKS)

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


def encode_ring_handle(fmt: str, pool: str, shape: tuple[int, ...], stride: tuple[int, ...], storage_offset: int,
                       dtype: str, storage: CudaIpcStorage | SharedMemStorage) -> bytes:
    """Msgpack ``[format, pool, shape, stride, storage_offset, dtype, kind, [storage fields]]`` of a shared ring.

    ``kind`` is ``"cuda"`` (:class:`CudaIpcStorage` fields in declaration order) or ``"shm"``
    (:class:`SharedMemStorage`); handles travel as msgpack bin, everything else as ints, strings and
    booleans. Shared by the frame rings (:mod:`pipeline.gpu.cuda_slotpool`) and the tensor rings
    (:mod:`pipeline.gpu.tensor_pool`).
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
    n_fields = len(dataclasses.fields(storage_cls))
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


def allocate_ring(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, *, what: str,
                  zeroed: bool = False) -> torch.Tensor:
    """Allocate a producer's ring once, shareable with other processes.

    Args:
        name: the pool's name (for error messages).
        shape: the ring's shape (slots first).
        dtype: its element type.
        device: ``"cuda"``, ``"cuda:N"``, or ``"cpu"`` (PyTorch ``file_system`` shared memory; tests).
        what: what the ring holds, for the out-of-memory message (e.g. ``"4 frames of (480, 640)"``).
        zeroed: fill it with zeros (else its contents are undefined).

    Returns:
        The ring tensor on ``device``.

    Raises:
        SlotPoolError: no such device, an IPC-breaking allocator setting, or out of memory.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        check_allocator_for_ipc()
        if not torch.cuda.is_available():
            raise SlotPoolError(f"pool {name}: --device {device} needs a CUDA GPU")
    try:
        ring = (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=dev)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        raise SlotPoolError(f"pool {name}: cannot allocate {what} on {dev} ({e})") from e
    if dev.type == "cpu":
        ring.untyped_storage()._share_filename_cpu_()  # file_system shared memory, named in the handle
    return ring


H = TypeVar("H", bound=RingHandle)


class RingCache(Generic[H]):
    """A consumer's opened rings, by pool name (each ring opened once); ``H`` is its handle class.

    Attributes:
        opens: rings actually mapped so far (a repeated handle for an open ring does not count).
    """

    KIND: ClassVar[str] = "shared ring"
    """The ring's name in the "cannot open" message."""

    def __init__(self) -> None:
        self._rings: dict[str, tuple[torch.Tensor, tuple[bytes, int]]] = {}
        self.opens = 0

    def _map(self, handle: H) -> torch.Tensor:
        """Map the ring a handle describes (no caching); subclasses give its dtype."""
        raise NotImplementedError

    def open(self, handle: H) -> torch.Tensor:
        """Open a pool's ring, or return the one already open under that name.

        Args:
            handle: the producer's handle.

        Returns:
            The ring on the producer's device.

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
            ring = self._map(handle)
        except Exception as e:  # CUDA and shared-memory errors surface as assorted types
            raise SlotPoolError(f"pool {handle.pool}: cannot open the {self.KIND} on {handle.device} "
                                f"({type(e).__name__}: {e})") from e
        self._rings[handle.pool] = (ring, handle.storage.key)
        self.opens += 1
        return ring

    def ring(self, pool: str) -> torch.Tensor:
        """The ring opened under ``pool``.

        Raises:
            SlotPoolError: if the pool was not opened.
        """
        cached = self._rings.get(pool)
        if cached is None:
            raise SlotPoolError(f"pool {pool}: not opened (no handle received)")
        return cached[0]

    def __contains__(self, pool: object) -> bool:
        return pool in self._rings

    def close(self) -> None:
        """Forget every ring (the producer frees the memory)."""
        self._rings.clear()


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device``'s current stream is done (a no-op on the CPU).

    The producer calls it before sending a slot id (the consumer, another process, must see the
    written slot); the consumer before sending the slot's credit (its kernels must be done reading).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
