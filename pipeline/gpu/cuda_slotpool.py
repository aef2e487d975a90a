"""CUDA-IPC frame slots: a fixed ring of device frames shared across processes, handed around by credits.

The GPU twin of :mod:`pipeline.slotpool`. The producer (the decoder of a source) allocates ONE
``(num_slots, H, W, 3)`` uint8 tensor on the GPU at start and never frees or grows it. Each
consumer process receives the ring's CUDA IPC handle once (:class:`CudaPoolHandle`, sent over
ZeroMQ when it connects), opens it once and caches it (:class:`CudaPoolCache`); after that only slot
ids travel, in the pipeline's ordinary frame messages, and slots come back as
:class:`~pipeline.messages.CreditMsg` credits to the producer, which reuses them (bookkeeping by
:class:`~pipeline.slotpool.SlotCredits`). A producer with no free slot waits for a credit: GPU
memory stays fixed and a slow consumer slows the producer (backpressure).

Why this shape (PyTorch CUDA IPC traps):

* Only the ``spawn`` / ``forkserver`` start methods work with CUDA (a forked child cannot use CUDA).
* An IPC handle names a whole caching-allocator block, not a tensor: the handle is serialized
  with PyTorch's own reduction (``torch.multiprocessing.reductions``), which carries the storage
  offset and size, so the consumer's view starts at the right byte.
* Opening a handle is expensive and every open maps memory again (consumer memory growth, pytorch
  #27975): each handle is opened once per consumer and cached.
* The producer must keep the block alive while any consumer holds it; the ring lives as long as
  the producer. A consumer that crashes while holding the ring leaks the mapping until the
  producer exits, never a growing amount.
* ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` breaks CUDA IPC (pytorch #179220):
  :meth:`CudaFramePool.create` refuses to run with it.
* Writes must be complete before a consumer reads: :meth:`CudaFramePool.write` synchronizes its
  copy stream before returning, so the slot id may be sent right after. A consumer must likewise
  finish reading a slot (synchronize the stream of the kernels that read it) before sending the
  credit (:meth:`CudaPoolCache.done_reading`).

The same code runs on CPU tensors (``device="cpu"``: the ring goes to shared memory) so the tests
exercise it without a GPU; there the handle carries a file descriptor that only a process started
by the same runner (same ``multiprocessing`` authkey) can open.

Reference: PyTorch docs, "Multiprocessing best practices" (CUDA tensors, ``spawn``, keeping the
producer's tensor alive) and ``torch/multiprocessing/reductions.py``.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import numpy.typing as npt

from pipeline.slotpool import SlotCredits, SlotPoolError

if TYPE_CHECKING:
    import torch

HANDLE_FORMAT = "streamdet.cuda-pool/1"


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


@dataclass(frozen=True, slots=True)
class CudaPoolHandle:
    """What a consumer needs to open a ring, sent to it once.

    Attributes:
        pool: the pool's name (the ``pool`` of frame messages and credits).
        num_slots: number of slots.
        frame_hw: ``(height, width)`` of every slot, pixels.
        device: the device the ring lives on (``"cuda:N"``, or ``"cpu"`` in tests).
        handle: the ring tensor serialized with ``torch.multiprocessing``'s reducer (IPC handle,
            storage offset and size).
        format: :data:`HANDLE_FORMAT`.
    """

    pool: str
    num_slots: int
    frame_hw: tuple[int, int]
    device: str
    handle: bytes
    format: str = HANDLE_FORMAT

    def __post_init__(self) -> None:
        if not self.pool:
            raise ValueError("expected a pool name, got an empty one")
        if self.num_slots < 1 or min(self.frame_hw) < 1:
            raise ValueError(f"expected num_slots >= 1 and positive frame_hw, got {self.num_slots}, {self.frame_hw}")
        if not self.handle:
            raise ValueError("expected a serialized handle, got empty bytes")
        if self.format != HANDLE_FORMAT:
            raise ValueError(f"expected format {HANDLE_FORMAT}, got {self.format}")

    def encode(self) -> bytes:
        """Encode as msgpack ``[format, pool, num_slots, [h, w], device, handle]``."""
        return bytes(msgpack.packb([self.format, self.pool, self.num_slots, list(self.frame_hw), self.device,
                                    self.handle], use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> CudaPoolHandle:
        """Inverse of :meth:`encode`.

        Raises:
            ValueError: on anything else.
        """
        try:
            f = msgpack.unpackb(bytes(data), raw=False)
        except (ValueError, msgpack.exceptions.ExtraData) as e:
            raise ValueError(f"expected a msgpack pool handle, got undecodable bytes ({e})") from e
        if not isinstance(f, list) or len(f) != 6:
            raise ValueError("expected a 6-field pool handle")
        fmt, pool, n, hw, device, handle = f
        return cls(str(pool), int(n), (int(hw[0]), int(hw[1])), str(device), bytes(handle), str(fmt))


def _dump_tensor(t: torch.Tensor) -> bytes:
    """Serialize a shared tensor with torch.multiprocessing's reducers (IPC handle + offset)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reducers with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(t)
    return buf.getvalue()


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
            ring.share_memory_()
        return cls(name=name, ring=ring)

    def handle(self) -> CudaPoolHandle:
        """A :class:`CudaPoolHandle` for one consumer (make one per consumer).

        Raises:
            SlotPoolError: if the pool is closed.
        """
        ring = self._ring()
        return CudaPoolHandle(self.name, self.num_slots, self.frame_hw, str(self.device), _dump_tensor(ring))

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
    """A consumer's opened rings, by pool name (each handle opened once)."""

    def __init__(self) -> None:
        self._rings: dict[str, torch.Tensor] = {}
        self.opens = 0

    def open(self, handle: CudaPoolHandle) -> torch.Tensor:
        """Open a pool's ring, or return the one already open under that name.

        Raises:
            SlotPoolError: if the handle cannot be opened (another machine's GPU, a dead producer).
        """
        ring = self._rings.get(handle.pool)
        if ring is not None:
            return ring
        try:
            obj = pickle.loads(handle.handle)
        except Exception as e:  # CUDA and fd-passing errors surface as assorted types
            raise SlotPoolError(f"pool {handle.pool}: cannot open the shared ring ({type(e).__name__}: {e})") from e
        shape = (handle.num_slots, handle.frame_hw[0], handle.frame_hw[1], 3)
        if tuple(obj.shape) != shape or str(obj.dtype) != "torch.uint8":
            raise SlotPoolError(f"pool {handle.pool}: expected a ring {shape} uint8, got {tuple(obj.shape)} "
                                f"{obj.dtype}")
        self._rings[handle.pool] = obj
        self.opens += 1
        return obj

    def frame(self, pool: str, slot: int) -> torch.Tensor:
        """The ``(H, W, 3)`` uint8 view of a slot of an opened pool.

        Raises:
            SlotPoolError: if the pool was not opened or the slot is out of range.
        """
        ring = self._rings.get(pool)
        if ring is None:
            raise SlotPoolError(f"pool {pool}: not opened (no handle received)")
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
