"""CUDA-IPC pool handle: plain typed fields as msgpack, validated; no torch, no GPU, no pickle needed."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pipeline.gpu.cuda_slotpool import HANDLE_FORMAT, CudaIpcStorage, CudaPoolHandle, SharedMemStorage

ROOT = Path(__file__).resolve().parents[2]
N, H, W = 4, 720, 1280
RING_BYTES = N * H * W * 3

CUDA = CudaIpcStorage(
    device_index=1,
    handle=b"\x00" + bytes(range(64)),  # torch's type byte + a cudaIpcMemHandle_t
    size_bytes=RING_BYTES,
    offset_bytes=2 * 1024 * 1024,
    ref_counter_handle=b"/torch_4242_1234567890_0",
    ref_counter_offset=3,
    event_handle=bytes(range(64, 128)),
    event_sync_required=True,
)
SHM = SharedMemStorage(manager_handle=b"/tmp/torch-shm-dir-x/manager.sock", handle=b"/torch_4242_99_0",
                       size_bytes=RING_BYTES)
STRIDE = (H * W * 3, W * 3, 3, 1)


def handle(storage: CudaIpcStorage | SharedMemStorage = CUDA, **kw: Any) -> CudaPoolHandle:
    fields: dict[str, Any] = dict(pool="sd-1-f0", shape=(N, H, W, 3), stride=STRIDE, storage_offset=0,
                                  dtype="uint8", storage=storage)
    fields.update(kw)
    return CudaPoolHandle(**fields)


@pytest.mark.parametrize("storage", [CUDA, SHM], ids=["cuda", "shm"])
def test_roundtrip(storage: CudaIpcStorage | SharedMemStorage) -> None:
    h = handle(storage)
    data = h.encode()
    back = CudaPoolHandle.decode(data)
    assert back == h and type(back.storage) is type(storage)
    assert CudaPoolHandle.decode(memoryview(data)) == h
    assert (back.num_slots, back.frame_hw) == (N, (H, W))
    assert back.device == ("cuda:1" if storage is CUDA else "cpu")


def test_wire_form_is_plain_msgpack() -> None:
    """Only ints, strings, booleans, bytes and lists: nothing a peer must unpickle or import."""
    f = msgpack.unpackb(handle().encode(), raw=False)

    def plain(v: object) -> bool:
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return isinstance(v, (int, str, bytes, bool))

    assert plain(f)
    assert f == [HANDLE_FORMAT, "sd-1-f0", [N, H, W, 3], list(STRIDE), 0, "uint8", "cuda",
                 [1, CUDA.handle, RING_BYTES, 2 * 1024 * 1024, CUDA.ref_counter_handle, 3, CUDA.event_handle, True]]


def test_key_names_the_storage() -> None:
    assert CUDA.key == (CUDA.handle, CUDA.offset_bytes)
    assert replace(CUDA, ref_counter_offset=9).key == CUDA.key  # another consumer's handle: same storage
    assert replace(CUDA, offset_bytes=0).key != CUDA.key  # another storage in the same block
    assert SHM.key == (SHM.handle, 0)


@pytest.mark.parametrize("kw, message", [
    (dict(device_index=-1), "expected device_index as an int >= 0, got -1"),
    (dict(device_index=True), "expected device_index as an int >= 0, got True"),
    (dict(handle=b""), "expected an IPC memory handle as non-empty bytes, got b''"),
    (dict(handle="abc"), "expected an IPC memory handle as non-empty bytes, got 'abc'"),
    (dict(size_bytes=0), "expected size_bytes as an int >= 1, got 0"),
    (dict(offset_bytes=1.5), "expected offset_bytes as an int >= 0, got 1.5"),
    (dict(ref_counter_handle=None), "expected a ref-counter handle as non-empty bytes, got None"),
    (dict(ref_counter_offset=-3), "expected ref_counter_offset as an int >= 0, got -3"),
    (dict(event_handle=b""), "expected an IPC event handle as non-empty bytes, got b''"),
    (dict(event_sync_required=1), "expected event_sync_required as a bool, got 1"),
])
def test_cuda_storage_validation(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(CUDA, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(manager_handle=b""), "expected a shm manager handle as non-empty bytes"),
    (dict(handle=bytearray(b"x")), "expected a shared-memory name as non-empty bytes"),
    (dict(size_bytes=-1), "expected size_bytes as an int >= 1, got -1"),
])
def test_shm_storage_validation(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(SHM, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(pool=""), "expected a pool name, got ''"),
    (dict(shape=(N, H, W)), "expected shape as a tuple of 4 ints, got (4, 720, 1280)"),
    (dict(shape=[N, H, W, 3]), "expected shape as a tuple of 4 ints"),
    (dict(shape=(0, H, W, 3)), "expected every shape entry as an int >= 1, got 0"),
    (dict(shape=(N, H, W, 4)), "expected shape (num_slots, H, W, 3), got (4, 720, 1280, 4)"),
    (dict(stride=(1, 1, 1, -1)), "expected every stride entry as an int >= 0, got -1"),
    (dict(storage_offset=-1), "expected storage_offset as an int >= 0, got -1"),
    (dict(dtype="float32"), "expected dtype uint8, got 'float32'"),
    (dict(storage=b"\x80pickled"), "expected storage as CudaIpcStorage or SharedMemStorage, got bytes"),
    (dict(storage_offset=1), f"expected a storage of at least {RING_BYTES + 1} bytes"),
    (dict(storage=replace(CUDA, size_bytes=RING_BYTES - 1)), f"expected a storage of at least {RING_BYTES} bytes"),
    (dict(format="streamdet.cuda-pool/1"), "expected format streamdet.cuda-pool/2, got 'streamdet.cuda-pool/1'"),
])
def test_handle_validation(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        handle(**kw)


def _wire(**change: Any) -> bytes:
    f = msgpack.unpackb(handle().encode(), raw=False)
    names = ["format", "pool", "shape", "stride", "storage_offset", "dtype", "kind", "storage"]
    for k, v in change.items():
        f[names.index(k)] = v
    return bytes(msgpack.packb(f, use_bin_type=True))


@pytest.mark.parametrize("data, message", [
    (b"\xc1", "expected a msgpack pool handle, got undecodable bytes"),
    (bytes(msgpack.packb([1, 2])), "expected an 8-field pool handle, got [1, 2]"),
    (bytes(msgpack.packb({"pool": "p"})), "expected an 8-field pool handle"),
    (b"\x80\x04\x95\x10\x00", "expected a msgpack pool handle, got undecodable bytes"),  # a pickle: never loaded
    (_wire(format="streamdet.cuda-pool/1"), "expected format streamdet.cuda-pool/2, got 'streamdet.cuda-pool/1'"),
    (_wire(kind="pickle"), "expected storage kind in ['cuda', 'shm'], got 'pickle'"),
    (_wire(kind="shm"), "expected 3 shm storage fields, got"),
    (_wire(storage=b"blob"), "expected 8 cuda storage fields, got b'blob'"),
    (_wire(shape=[N, H, W]), "expected shape as a list of 4 ints, got [4, 720, 1280]"),
    (_wire(stride="x"), "expected stride as a list of 4 ints, got 'x'"),
    (_wire(shape=[N, "720", W, 3]), "expected every shape entry as an int >= 1, got '720'"),
    (_wire(storage_offset=None), "expected storage_offset as an int >= 0, got None"),
    (_wire(pool=7), "expected a pool name, got 7"),
    (_wire(storage=[1, "not bytes", RING_BYTES, 0, b"r", 0, b"e", False]),
     "expected an IPC memory handle as non-empty bytes, got 'not bytes'"),
])
def test_decode_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CudaPoolHandle.decode(data)


def test_no_pickle_in_runtime_packages() -> None:
    """Project rule: nothing is pickled onto a socket; the runtime packages do not even import pickle."""
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle)\b|ForkingPickler|pickle\.loads?\(",
                         re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for pkg in ("pipeline", "engines") for p in sorted((ROOT / pkg).rglob("*.py"))
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
