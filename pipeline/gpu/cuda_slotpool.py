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

The ring itself (storage descriptions, handle encoding, allocation, the consumer's cache) is the
generic :mod:`pipeline.gpu.ring`, shared with the tensor rings of :mod:`pipeline.gpu.tensor_pool`;
this module holds the frame ring. The same code runs on CPU tensors (``device="cpu"``: the ring
goes to PyTorch's ``file_system`` shared memory, described by :class:`SharedMemStorage`) so the
tests exercise it without a GPU.

Reference: PyTorch docs, "Multiprocessing best practices" (CUDA tensors, ``spawn``, keeping the
producer's tensor alive) and ``torch/multiprocessing/reductions.py`` (``reduce_tensor``,
``rebuild_cuda_tensor``, ``rebuild_storage_filename``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from pipeline.gpu.ring import (
    CudaIpcStorage,
    RingCache,
    RingHandle,
    SharedMemStorage,
    allocate_ring,
    check_allocator_for_ipc,
    decode_ring_handle,
    encode_ring_handle,
    open_shared_tensor,
    release_unopened,
    share_storage,
    synchronize,
)
from pipeline.slotpool import SlotCredits, SlotPoolError

if TYPE_CHECKING:
    import torch

__all__ = [
    "HANDLE_FORMAT",
    "RING_DTYPE",
    "CudaFramePool",
    "CudaIpcStorage",
    "CudaPoolCache",
    "CudaPoolHandle",
    "RingHandle",
    "SharedMemStorage",
    "check_allocator_for_ipc",
    "decode_ring_handle",
    "encode_ring_handle",
    "open_shared_tensor",
    "release_unopened",
    "share_storage",
]

HANDLE_FORMAT = "streamdet.cuda-pool/2"
"""Tag of an encoded :class:`CudaPoolHandle` (``/1`` carried pickled bytes and is refused)."""

RING_DTYPE = "uint8"
"""The ring's element type (RGB pixels)."""


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
        ring = allocate_ring(name, (num_slots, frame_hw[0], frame_hw[1], 3), torch.uint8, device,
                             what=f"{num_slots} frames of {frame_hw}")
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


class CudaPoolCache(RingCache[CudaPoolHandle]):
    """A consumer's opened frame rings, by pool name (each ring opened once).

    :meth:`open` gives a pool's ``(num_slots, H, W, 3)`` uint8 ring on the producer's device
    (:class:`~pipeline.gpu.ring.RingCache`).
    """

    def _map(self, handle: CudaPoolHandle) -> torch.Tensor:
        import torch

        return open_shared_tensor(handle.storage, handle.shape, handle.stride, handle.storage_offset, torch.uint8)

    def frame(self, pool: str, slot: int) -> torch.Tensor:
        """The ``(H, W, 3)`` uint8 view of a slot of an opened pool.

        Raises:
            SlotPoolError: if the pool was not opened or the slot is out of range.
        """
        ring = self.ring(pool)
        if not 0 <= slot < ring.shape[0]:
            raise SlotPoolError(f"pool {pool}: slot {slot} out of range 0..{ring.shape[0] - 1}")
        return ring[slot]

    done_reading = staticmethod(synchronize)
    """Wait until the kernels queued on a device's current stream (which read slots) are done.

    Call before sending the credits of the slots they read; a no-op on the CPU.
    """
