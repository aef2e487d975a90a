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
open once per consumer) are those of :mod:`pipeline.gpu.cuda_slotpool`, whose storage description
(:class:`~pipeline.gpu.cuda_slotpool.CudaIpcStorage`, :class:`~pipeline.gpu.cuda_slotpool.SharedMemStorage`)
this module reuses. On ``device="cpu"`` the ring lives in PyTorch's ``file_system`` shared memory,
so the tests run the whole device path without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.gpu.cuda_slotpool import (
    RingHandle,
    check_allocator_for_ipc,
    open_shared_tensor,
    release_unopened,
    share_storage,
)
from pipeline.slotpool import SlotPoolError
from streamdet.constants import TENSOR_DTYPES, TENSOR_ITEMSIZE

if TYPE_CHECKING:
    import torch

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
        import torch

        if num_slots < 2 or len(batch_shape) != 4 or min(batch_shape) < 1 or batch_shape[1] != 3:
            raise ValueError(f"expected num_slots >= 2 and batch_shape (B, 3, H, W), got {num_slots} and "
                             f"{batch_shape}")
        if dtype not in TENSOR_DTYPES:
            raise ValueError(f"expected dtype in {TENSOR_DTYPES}, got {dtype!r}")
        dev = torch.device(device)
        if dev.type == "cuda":
            check_allocator_for_ipc()
            if not torch.cuda.is_available():
                raise SlotPoolError(f"pool {name}: --device {device} needs a CUDA GPU")
        try:
            ring = torch.zeros((num_slots, *batch_shape), dtype=_torch_dtype(dtype), device=dev)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            raise SlotPoolError(f"pool {name}: cannot allocate {num_slots} batches of {batch_shape} on {dev} "
                                f"({e})") from e
        if dev.type == "cpu":
            ring.untyped_storage()._share_filename_cpu_()  # file_system shared memory, named in the handle
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


class DeviceTensorPoolCache:
    """The engine's opened tensor rings, by pool name (each opened once)."""

    def __init__(self) -> None:
        self._rings: dict[str, tuple[torch.Tensor, Any]] = {}

    def open(self, handle: DeviceTensorPoolHandle) -> torch.Tensor:
        """Open a ring, or return the one already open under that name.

        Args:
            handle: the producer's handle.

        Returns:
            The ``(num_slots, max_batch, 3, H, W)`` ring on the producer's device.

        Raises:
            SlotPoolError: if the handle cannot be opened, or names an open pool with another ring.
        """
        cached = self._rings.get(handle.pool)
        if cached is not None:
            if cached[1] != handle.storage.key:
                raise SlotPoolError(f"pool {handle.pool}: the handle names another ring than the one already open "
                                    "under that name")
            release_unopened(handle.storage)
            return cached[0]
        try:
            ring = open_shared_tensor(handle.storage, handle.shape, handle.stride, handle.storage_offset,
                                      _torch_dtype(handle.dtype))
        except Exception as e:  # CUDA and shared-memory errors surface as assorted types
            raise SlotPoolError(f"pool {handle.pool}: cannot open the shared tensor ring on {handle.device} "
                                f"({type(e).__name__}: {e})") from e
        self._rings[handle.pool] = (ring, handle.storage.key)
        return ring

    def batch(self, pool: str, slot: int, rows: int) -> torch.Tensor:
        """The first ``rows`` rows ``(rows, 3, H, W)`` of a slot of an opened ring.

        Raises:
            SlotPoolError: if the pool was not opened, or the slot or row count is out of range.
        """
        cached = self._rings.get(pool)
        if cached is None:
            raise SlotPoolError(f"pool {pool}: not opened (no handle received)")
        ring = cached[0]
        if not 0 <= slot < ring.shape[0] or not 1 <= rows <= ring.shape[1]:
            raise SlotPoolError(f"pool {pool}: slot {slot} rows {rows} out of range (ring {tuple(ring.shape)})")
        return ring[slot, :rows]

    def __contains__(self, pool: object) -> bool:
        return pool in self._rings

    def close(self) -> None:
        """Forget every ring (the producer frees the memory)."""
        self._rings.clear()


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device``'s current stream is done (a no-op on the CPU).

    The producer calls it before sending a slot id (the consumer, another process, must see the
    written batch); the consumer before sending the slot's credit (its kernels must be done reading).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
