"""CUDA-IPC frame pool: the same code on CPU shared-memory tensors, across a spawned process over ZeroMQ."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

torch = pytest.importorskip("torch")

from pipeline.gpu.cuda_slotpool import (  # noqa: E402
    CudaFramePool,
    CudaIpcStorage,
    CudaPoolCache,
    CudaPoolHandle,
    SharedMemStorage,
    check_allocator_for_ipc,
)
from pipeline.slotpool import SlotPoolError  # noqa: E402
from streamdet.messages import CreditMsg  # noqa: E402

HW = (48, 64)


def frame_for(seq: int) -> np.ndarray:
    return np.random.default_rng(seq).integers(0, 256, (*HW, 3), dtype=np.uint8)


def consumer(frames_ep: str, credits_ep: str) -> None:
    """Receive the handle once, then slot ids; hash each slot's bytes and send it back with the credit."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(frames_ep)
    push = ctx.socket(zmq.PUSH)
    push.connect(credits_ep)
    cache = CudaPoolCache()
    try:
        while True:
            kind, payload = pull.recv_multipart()
            if kind == b"handle":
                cache.open(CudaPoolHandle.decode(payload))
                continue
            if kind == b"eos":
                push.send_multipart([b"opens", str(cache.opens).encode()])
                return
            pool, slot, seq = msgpack.unpackb(payload)
            view = cache.frame(pool, slot)
            digest = hashlib.sha256(view.cpu().numpy().tobytes()).hexdigest()
            CudaPoolCache.done_reading(view.device)
            push.send_multipart([CreditMsg(pool, slot).encode(), msgpack.packb([seq, digest])])
    finally:
        cache.close()
        ctx.destroy(linger=100)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_frames_cross_a_spawned_process_with_credits(tmp_path: Path, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    mp = torch.multiprocessing.get_context("spawn")
    ctx = zmq.Context()
    frames_ep, credits_ep = f"ipc://{tmp_path}/frames", f"ipc://{tmp_path}/credits"
    push = ctx.socket(zmq.PUSH)
    push.bind(frames_ep)
    pull = ctx.socket(zmq.PULL)
    pull.bind(credits_ep)
    pull.setsockopt(zmq.RCVTIMEO, 30_000)
    proc = mp.Process(target=consumer, args=(frames_ep, credits_ep), daemon=True)
    proc.start()
    pool = CudaFramePool.create(name="src0", num_slots=3, frame_hw=HW, device=device)
    try:
        push.send_multipart([b"handle", pool.handle().encode()])
        sent = 0
        digests: dict[int, str] = {}
        total = 10  # more frames than slots: slots must come back as credits
        while len(digests) < total:
            slot = pool.acquire() if sent < total else None
            if slot is not None:
                pool.write(slot, frame_for(sent))
                push.send_multipart([b"frame", msgpack.packb(["src0", slot, sent])])
                sent += 1
                continue
            credit, body = pull.recv_multipart()
            c = CreditMsg.decode(credit)
            seq, digest = msgpack.unpackb(body)
            digests[seq] = digest
            pool.release(c.slot)
        assert pool.credits.all_free
        for seq, digest in digests.items():
            assert digest == hashlib.sha256(frame_for(seq).tobytes()).hexdigest(), seq
        push.send_multipart([b"eos", b""])
        kind, opens = pull.recv_multipart()
        assert kind == b"opens" and opens == b"1"  # the handle was opened once
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
        pool.close()
        ctx.destroy(linger=100)
    assert proc.exitcode == 0


def test_write_checks_and_credit_misuse() -> None:
    pool = CudaFramePool.create(name="p", num_slots=2, frame_hw=HW, device="cpu")
    s = pool.acquire()
    assert s is not None
    with pytest.raises(ValueError, match="expected a"):
        pool.write(s, np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SlotPoolError, match="out of range"):
        pool.write(5, frame_for(0))
    assert pool.acquire() is not None and pool.acquire() is None  # both out: the producer waits
    pool.release(s)
    with pytest.raises(SlotPoolError):
        pool.release(s)  # released twice
    cache = CudaPoolCache()
    with pytest.raises(SlotPoolError, match="not opened"):
        cache.frame("p", 0)
    with pytest.raises(ValueError, match="num_slots >= 2"):
        CudaFramePool.create(name="q", num_slots=1, frame_hw=HW, device="cpu")


def test_in_process_open_is_cached() -> None:
    pool = CudaFramePool.create(name="p", num_slots=2, frame_hw=HW, device="cpu")
    pool.write(1, frame_for(7))
    cache = CudaPoolCache()
    ring = cache.open(pool.handle())
    assert cache.open(pool.handle()) is ring and cache.opens == 1
    np.testing.assert_array_equal(cache.frame("p", 1).numpy(), frame_for(7))
    pool.write(0, frame_for(8))  # the consumer's mapping is the producer's memory, not a copy
    np.testing.assert_array_equal(cache.frame("p", 0).numpy(), frame_for(8))


def test_cpu_handle_is_plain_data_and_survives_the_wire() -> None:
    pool = CudaFramePool.create(name="p", num_slots=2, frame_hw=HW, device="cpu")
    h = pool.handle()
    assert isinstance(h.storage, SharedMemStorage) and h.device == "cpu"
    assert (h.num_slots, h.frame_hw, h.shape, h.dtype) == (2, HW, (2, *HW, 3), "uint8")
    assert h.stride == (HW[0] * HW[1] * 3, HW[1] * 3, 3, 1) and h.storage_offset == 0
    assert CudaPoolHandle.decode(h.encode()) == h
    assert pool.handle().storage.key == h.storage.key  # the same segment for every consumer


def test_open_refuses_another_ring_under_an_open_name() -> None:
    a = CudaFramePool.create(name="p", num_slots=2, frame_hw=HW, device="cpu")
    b = CudaFramePool.create(name="p", num_slots=2, frame_hw=HW, device="cpu")
    cache = CudaPoolCache()
    cache.open(a.handle())
    with pytest.raises(SlotPoolError, match="another ring"):
        cache.open(b.handle())


def test_unopenable_handle_is_a_slot_pool_error() -> None:
    pool = CudaFramePool.create(name="p", num_slots=2, frame_hw=HW, device="cpu")
    h = pool.handle()
    assert isinstance(h.storage, SharedMemStorage)
    gone = replace(h, storage=replace(h.storage, handle=b"/streamdet_no_such_segment"))
    with pytest.raises(SlotPoolError, match="pool p: cannot open the shared ring on cpu"):
        CudaPoolCache().open(gone)


@pytest.mark.gpu
def test_cuda_handle_fields_come_from_share_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pool = CudaFramePool.create(name="g", num_slots=2, frame_hw=HW, device="cuda")
    try:
        h = pool.handle()
        assert isinstance(h.storage, CudaIpcStorage) and h.device.startswith("cuda:")
        assert h.storage.size_bytes >= 2 * HW[0] * HW[1] * 3
        assert CudaPoolHandle.decode(h.encode()) == h
    finally:
        pool.close()


@pytest.mark.parametrize("conf, bad", [
    ("expandable_segments:True", True),
    ("max_split_size_mb:128", False),
    ("garbage_collection_threshold:0.6,expandable_segments:true", True),
    ("", False),
])
def test_expandable_segments_refused(monkeypatch: pytest.MonkeyPatch, conf: str, bad: bool) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    if bad:
        with pytest.raises(SlotPoolError, match="expandable_segments"):
            check_allocator_for_ipc()
    else:
        check_allocator_for_ipc()
