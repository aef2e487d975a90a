"""Device tensor slots: a fixed ring of model-input batches on the engine's device, shared across processes.

The device twin of the preprocess stage's shared-memory tensor pool. With ``--device cuda`` (and
``preprocess.on_device``) the preprocess stage allocates ONE ``(num_slots, max_batch, 3, H, W)``
float tensor on the GPU at start (:meth:`DeviceTensorPool.create`), letterboxes and normalises
each frame straight into a row of a slot (:class:`~pipeline.gpu.gpu_preprocess.GpuLetterbox`),
and sends the slot id in the ordinary :class:`~streamdet.messages.BatchMsg`. The engine stage
receives the ring's handle once (:class:`DeviceTensorPoolHandle`, msgpack bytes inside a
:class:`~streamdet.messages.PoolHandleMsg`, never a pickle), opens it once
(:class:`DeviceTensorPoolCache`), runs the model on the slot and hands the slot back as a
:class:`~streamdet.messages.CreditMsg` once its kernels are done reading it.

CUDA IPC details (one block per ring, the producer keeps it alive, ``expandable_segments`` refused,
open once per consumer) are those of :mod:`pipeline.gpu.cuda_slotpool`; the ring itself (storage
description, handle, allocation, the consumer's cache) is the generic :mod:`pipeline.gpu.ring`. On
``device="cpu"`` the ring lives in PyTorch's ``file_system`` shared memory, so the tests run the
whole device path without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pipeline.gpu.ring import RingCache, RingHandle, allocate_ring, open_shared_tensor, share_storage, synchronize
from pipeline.slotpool import SlotPoolError
from streamdet.constants import TENSOR_DTYPES, TENSOR_ITEMSIZE

if TYPE_CHECKING:
    import torch

__all__ = [
    "TENSOR_HANDLE_FORMAT",
    "DeviceTensorPool",
    "DeviceTensorPoolCache",
    "DeviceTensorPoolHandle",
    "synchronize",
]

TENSOR_HANDLE_FORMAT = "streamdet.device-tensor-pool/1"
"""Tag of an encoded :class:`DeviceTensorPoolHandle`."""


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return torch.float16 if name == "float16" else torch.float32


@dataclass(frozen=True, slots=True)
class DeviceTensorPoolHandle(RingHandle):
    """What the engine needs to open a preprocess stage's device tensor ring (sent once, msgpack).

    Attributes:
        pool: the pool's name (the ``tensor_pool`` of batch messages and credits).
        shape: the ring's ``(num_slots, max_batch, 3, H, W)``.
        stride: the ring's strides, elements.
        storage_offset: where the ring starts in its storage, elements.
        dtype: ``float32`` or ``float16``.
        storage: where the storage is (CUDA IPC, or shared memory on the CPU).
        format: :data:`TENSOR_HANDLE_FORMAT`.

    Raises:
        ValueError: on a field of the wrong type or value.
    """

    FORMAT: ClassVar[str] = TENSOR_HANDLE_FORMAT
    RANK: ClassVar[int] = 5
    LAYOUT: ClassVar[str] = "(num_slots, max_batch, 3, H, W)"
    CHANNEL_AXIS: ClassVar[int] = 2
    ITEMSIZE: ClassVar[dict[str, int]] = TENSOR_ITEMSIZE
    WHAT: ClassVar[str] = "tensor-pool handle"

    format: str = TENSOR_HANDLE_FORMAT


class DeviceTensorPool:
    """The preprocess stage's ring of input batches on one device; build it with :meth:`create`.

    Attributes:
        name: the pool's name.
        ring: the ``(num_slots, max_batch, 3, H, W)`` tensor (None once closed).
        num_slots: slots in the ring.
    """

    def __init__(self, *, name: str, ring: torch.Tensor) -> None:
        self.name = name
        self.ring: torch.Tensor | None = ring
        self.num_slots = int(ring.shape[0])

    @classmethod
    def create(cls, *, name: str, num_slots: int, batch_shape: tuple[int, int, int, int], dtype: str,
               device: str) -> DeviceTensorPool:
        """Allocate the ring once, for the producer's lifetime.

        Args:
            name: pool name (unique within the pipeline).
            num_slots: slots (>= 2: one filled while another is read).
            batch_shape: ``(max_batch, 3, H, W)`` of one slot.
            dtype: ``float32`` or ``float16``.
            device: ``"cuda"``, ``"cuda:N"``, or ``"cpu"`` (shared memory; tests).

        Returns:
            The pool.

        Raises:
            ValueError: on bad sizes or dtype.
            SlotPoolError: no such device, an IPC-breaking allocator setting, or out of memory.
        """
        if num_slots < 2 or len(batch_shape) != 4 or min(batch_shape) < 1 or batch_shape[1] != 3:
            raise ValueError(f"expected num_slots >= 2 and batch_shape (B, 3, H, W), got {num_slots} and "
                             f"{batch_shape}")
        if dtype not in TENSOR_DTYPES:
            raise ValueError(f"expected dtype in {TENSOR_DTYPES}, got {dtype!r}")
        ring = allocate_ring(name, (num_slots, *batch_shape), _torch_dtype(dtype), device,
                             what=f"{num_slots} batches of {batch_shape}", zeroed=True)
        return cls(name=name, ring=ring)

    def _ring(self) -> torch.Tensor:
        if self.ring is None:
            raise SlotPoolError(f"pool {self.name}: closed")
        return self.ring

    def slot(self, slot: int) -> torch.Tensor:
        """The ``(max_batch, 3, H, W)`` view of a slot.

        Raises:
            SlotPoolError: if the slot is out of range or the pool is closed.
        """
        ring = self._ring()
        if not 0 <= slot < self.num_slots:
            raise SlotPoolError(f"pool {self.name}: slot {slot} out of range 0..{self.num_slots - 1}")
        return ring[slot]

    def handle(self) -> DeviceTensorPoolHandle:
        """A handle for the (one) consumer; each call counts one CUDA reference.

        Raises:
            SlotPoolError: if the pool is closed.
        """
        ring = self._ring()
        n, b, c, h, w = (int(v) for v in ring.shape)
        s0, s1, s2, s3, s4 = (int(v) for v in ring.stride())
        dtype = "float16" if str(ring.dtype) == "torch.float16" else "float32"
        return DeviceTensorPoolHandle(self.name, (n, b, c, h, w), (s0, s1, s2, s3, s4), int(ring.storage_offset()),
                                      dtype, share_storage(ring))

    def close(self) -> None:
        """Drop the ring (after the consumer handed every slot back)."""
        self.ring = None


class DeviceTensorPoolCache(RingCache[DeviceTensorPoolHandle]):
    """The engine's opened tensor rings, by pool name (each opened once).

    :meth:`open` gives a pool's ``(num_slots, max_batch, 3, H, W)`` ring on the producer's device
    (:class:`~pipeline.gpu.ring.RingCache`).
    """

    KIND: ClassVar[str] = "shared tensor ring"

    def _map(self, handle: DeviceTensorPoolHandle) -> torch.Tensor:
        return open_shared_tensor(handle.storage, handle.shape, handle.stride, handle.storage_offset,
                                  _torch_dtype(handle.dtype))

    def batch(self, pool: str, slot: int, rows: int) -> torch.Tensor:
        """The first ``rows`` rows ``(rows, 3, H, W)`` of a slot of an opened ring.

        Raises:
            SlotPoolError: if the pool was not opened, or the slot or row count is out of range.
        """
        ring = self.ring(pool)
        if not 0 <= slot < ring.shape[0] or not 1 <= rows <= ring.shape[1]:
            raise SlotPoolError(f"pool {pool}: slot {slot} rows {rows} out of range (ring {tuple(ring.shape)})")
        return ring[slot, :rows]
