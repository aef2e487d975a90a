"""Pieces of the device-tensor path: the tensor ring and its handle (on CPU shared memory here), the handle
message, and the packed detections the engine sends after device NMS."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.gpu.tensor_pool import (  # noqa: E402
    TENSOR_HANDLE_FORMAT,
    DeviceTensorPool,
    DeviceTensorPoolCache,
    DeviceTensorPoolHandle,
)
from pipeline.slotpool import SlotPoolError  # noqa: E402
from streamdet.messages import PoolHandleMsg, decode_message  # noqa: E402
from streamdet.postprocess import Detections, pack_detections, unpack_detections  # noqa: E402

torch.set_num_threads(1)


def test_ring_handle_round_trip_and_shared_view() -> None:
    pool = DeviceTensorPool.create(name="t0", num_slots=2, batch_shape=(3, 3, 8, 16), dtype="float32", device="cpu")
    handle = DeviceTensorPoolHandle.decode(pool.handle().encode())
    assert handle.shape == (2, 3, 3, 8, 16) and handle.dtype == "float32" and handle.device == "cpu"
    cache = DeviceTensorPoolCache()
    ring = cache.open(handle)
    assert cache.open(handle) is ring and "t0" in cache  # opened once
    pool.slot(1)[2, 1, 3, 4] = 7.5
    view = cache.batch("t0", 1, 3)
    assert view.shape == (3, 3, 8, 16) and float(view[2, 1, 3, 4]) == 7.5  # the same memory
    with pytest.raises(SlotPoolError, match="out of range"):
        cache.batch("t0", 2, 1)
    with pytest.raises(SlotPoolError, match="not opened"):
        cache.batch("other", 0, 1)
    pool.close()
    with pytest.raises(SlotPoolError, match="closed"):
        pool.slot(0)


def test_float16_ring() -> None:
    pool = DeviceTensorPool.create(name="t1", num_slots=2, batch_shape=(1, 3, 4, 4), dtype="float16", device="cpu")
    ring = DeviceTensorPoolCache().open(DeviceTensorPoolHandle.decode(pool.handle().encode()))
    assert ring.dtype == torch.float16


@pytest.mark.parametrize("mutate, match", [
    (lambda f: [*f[:1], "", *f[2:]], "pool name"),
    (lambda f: [*f[:2], [2, 1, 4, 8, 8], *f[3:]], r"\(num_slots, max_batch, 3, H, W\)"),
    (lambda f: [*f[:5], "uint8", *f[6:]], "dtype"),
    (lambda f: ["streamdet.cuda-pool/2", *f[1:]], "format"),
    (lambda f: [*f[:6], "pickle", *f[7:]], "storage kind"),
])
def test_bad_handles_are_refused(mutate, match) -> None:  # type: ignore[no-untyped-def]
    pool = DeviceTensorPool.create(name="t2", num_slots=2, batch_shape=(1, 3, 4, 4), dtype="float32", device="cpu")
    fields = msgpack.unpackb(pool.handle().encode(), raw=False)
    assert fields[0] == TENSOR_HANDLE_FORMAT
    with pytest.raises(ValueError, match=match):
        DeviceTensorPoolHandle.decode(msgpack.packb(mutate(fields), use_bin_type=True))
    with pytest.raises(ValueError, match="undecodable"):
        DeviceTensorPoolHandle.decode(b"\xc1")


def test_pool_handle_message_round_trip() -> None:
    msg = PoolHandleMsg("sd-x-t", b"\x01\x02")
    assert decode_message(msg.encode()) == msg
    with pytest.raises(ValueError, match="non-empty bytes"):
        PoolHandleMsg("sd-x-t", b"")


def test_packed_detections_round_trip() -> None:
    dets = [Detections(np.array([[1.5, 2.25, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0]], np.float32),
                       np.array([0.9, 0.3], np.float32), np.array([2, 0], np.int64)),
            Detections.empty()]
    counts, rows = pack_detections(dets)
    assert counts.tolist() == [2, 0] and rows.shape == (2, 2, 6)
    back = unpack_detections(counts, rows)
    for a, b in zip(back, dets, strict=True):
        np.testing.assert_array_equal(a.boxes_xyxy, b.boxes_xyxy)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
    counts, rows = pack_detections([Detections.empty()])
    assert counts.tolist() == [0] and rows.shape == (1, 1, 6) and len(unpack_detections(counts, rows)[0]) == 0
    with pytest.raises(ValueError, match="counts <= K"):
        unpack_detections(np.array([3], np.int32), rows)
