import multiprocessing as mp
import os
import time
import uuid

import numpy as np
import pytest

from pipeline.slotpool import PoolCache, SlotCredits, SlotPool, SlotPoolError, reap_orphan_pools, unlink_pool
from tests.helpers.cli import ROOT
from tests.helpers.small_shm import small_shm_prefix, small_shm_unavailable


def _name() -> str:
    return f"sd-test-{uuid.uuid4().hex[:8]}"


def _child_fill(name: str, slot: int, value: int) -> None:
    pool = SlotPool.attach(name)
    pool.view(slot, (4, 5, 3))[...] = value
    pool.close()


def test_create_attach_share_bytes():
    with SlotPool.create(name=_name(), num_slots=3, slot_bytes=60) as pool:
        other = SlotPool.attach(pool.name)
        assert (other.num_slots, other.slot_bytes, other.owner) == (3, 60, False)
        a = pool.view(1, (4, 5, 3))
        a[...] = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
        np.testing.assert_array_equal(other.view(1, (4, 5, 3)), a)
        # slots do not overlap
        pool.view(0, (60,))[...] = 7
        pool.view(2, (60,))[...] = 9
        np.testing.assert_array_equal(other.view(1, (60,)), np.arange(60, dtype=np.uint8))
        del a
        other.close()


def test_float_view_and_alignment():
    with SlotPool.create(name=_name(), num_slots=2, slot_bytes=2 * 3 * 4 * 4 * 4 + 1) as pool:
        t = pool.view(1, (2, 3, 4, 4), np.float32)
        assert t.ctypes.data % 64 == 0
        t[...] = 1.5
        assert float(t.sum()) == 1.5 * t.size
        del t  # views must go before the pool closes


def test_cross_process_spawn():
    with SlotPool.create(name=_name(), num_slots=2, slot_bytes=60) as pool:
        p = mp.get_context("spawn").Process(target=_child_fill, args=(pool.name, 1, 42))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert (pool.view(1, (60,)) == 42).all()
        assert (pool.view(0, (60,)) == 0).all()


@pytest.mark.parametrize("slot,shape", [(-1, (1,)), (3, (1,)), (0, (61,))])
def test_bad_slot_or_size(slot, shape):
    with SlotPool.create(name=_name(), num_slots=3, slot_bytes=60) as pool, pytest.raises(SlotPoolError):
        pool.view(slot, shape)


def test_errors_and_cleanup():
    name = _name()
    with pytest.raises(SlotPoolError, match="cannot attach"):
        SlotPool.attach(name)
    with pytest.raises(ValueError, match="num_slots"):
        SlotPool.create(name=name, num_slots=0, slot_bytes=1)
    pool = SlotPool.create(name=name, num_slots=1, slot_bytes=8)
    with pytest.raises(SlotPoolError, match="cannot create"):
        SlotPool.create(name=name, num_slots=1, slot_bytes=8)
    pool.close()
    with pytest.raises(SlotPoolError, match="closed"):
        pool.view(0, (1,))
    assert not unlink_pool(name)  # the owner unlinked it
    leftover = SlotPool.create(name=name, num_slots=1, slot_bytes=8)
    leftover._shm.close()  # type: ignore[union-attr]  # simulate a crashed owner
    assert unlink_pool(name)


def test_not_a_pool():
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=_name(), create=True, size=128)
    try:
        with pytest.raises(SlotPoolError, match="not a streamdet slot pool"):
            SlotPool.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()


def test_credits():
    c = SlotCredits(3)
    got = [c.acquire() for _ in range(4)]
    assert got == [0, 1, 2, None]
    assert c.in_use == 3 and not c.all_free
    c.release(1)
    assert c.acquire() == 1
    with pytest.raises(SlotPoolError, match="in use"):
        c.release(7)
    for s in (0, 1, 2):
        c.release(s)
    assert c.all_free
    with pytest.raises(SlotPoolError):
        c.release(0)


def test_pool_cache_attaches_once():
    with SlotPool.create(name=_name(), num_slots=1, slot_bytes=4) as pool:
        cache = PoolCache()
        a = cache.get(pool.name)
        assert cache.get(pool.name) is a
        cache.close()


def test_refuses_more_than_dev_shm_holds(monkeypatch):
    import pipeline.slotpool as sp

    monkeypatch.setattr(sp, "shm_free_bytes", lambda: 1000)
    with pytest.raises(SlotPoolError, match="free"):
        SlotPool.create(name=_name(), num_slots=2, slot_bytes=1000)


def test_create_reserves_every_page():
    # a sparse block would find its pages at first write, and kill the writer with SIGBUS when /dev/shm is full
    with SlotPool.create(name=_name(), num_slots=3, slot_bytes=1 << 20) as pool:
        st = os.stat(f"/dev/shm/{pool.name}")
        assert st.st_blocks * 512 >= st.st_size >= 3 << 20


def test_a_pool_handle_keeps_one_descriptor_its_mappings():
    # SharedMemory keeps its own descriptor beside the mapping's: two a handle, and the preprocess
    # process (every decoder's pools and ledger handle) reached the usual limit of 1024 at 64 sources
    with SlotPool.create(name=_name(), num_slots=2, slot_bytes=64) as pool:
        before = len(os.listdir("/proc/self/fd"))
        handles = [SlotPool.attach(pool.name) for _ in range(10)]
        assert len(os.listdir("/proc/self/fd")) - before == 10
        for h in handles:
            h.close()
        assert len(os.listdir("/proc/self/fd")) == before


def test_no_room_to_reserve_is_an_error_and_leaves_no_block(monkeypatch):
    import errno

    name = _name()

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SlotPoolError) as e:
        SlotPool.create(name=name, num_slots=2, slot_bytes=1000)
    assert str(e.value).startswith(f"shared memory {name!r}: cannot reserve 0.0 MiB (/dev/shm has ")
    assert "No space left on device: a larger /dev/shm (docker run --shm-size=...)" in str(e.value)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_a_file_system_that_cannot_reserve_leaves_the_pool_sparse_as_before(monkeypatch):
    import errno

    def refused(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", refused)
    with SlotPool.create(name=_name(), num_slots=2, slot_bytes=1000) as pool:
        pool.view(1, (1000,))[...] = 7
        other = SlotPool.attach(pool.name)
        assert int(other.view(1, (1000,))[999]) == 7
        other.close()


SECOND_POOL = """
from pipeline.slotpool import SlotPool, SlotPoolError
a = SlotPool.create(name="sd-test-a", num_slots=5, slot_bytes=1 << 20)
try:
    b = SlotPool.create(name="sd-test-b", num_slots=5, slot_bytes=1 << 20)
    for k in range(5):  # (unreserved, b would be made, and this would die of SIGBUS past 3 MiB)
        b.view(k, (1 << 20,))[...] = 1
except SlotPoolError as e:
    print(e)
for k in range(5):
    a.view(k, (1 << 20,))[...] = 1
print("written")
"""


@pytest.mark.skipif(bool(small_shm_unavailable()), reason=small_shm_unavailable())
def test_a_pool_that_does_not_fit_beside_another_is_refused():
    import subprocess
    import sys

    out = subprocess.run([*small_shm_prefix(8), sys.executable, "-c", SECOND_POOL], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "shared memory 'sd-test-b': needs 5.0 MiB but /dev/shm has 3.0 MiB free: a larger /dev/shm (docker run "
        "--shm-size=...) or fewer slots (decode.slots, decode.live_slots, preprocess.tensor_slots)", "written"]


def _leave_block(name: str, nbytes: int = 4096, age_s: float = 0.0) -> None:
    """A block in /dev/shm that no process maps, as a SIGKILLed run leaves it."""
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, nbytes)
    os.close(fd)
    if age_s:
        t = time.time() - age_s
        os.utime(f"/dev/shm/{name}", (t, t))


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_blocks_of_runs_whose_processes_all_died_are_reaped_and_live_ones_kept():
    dead, live, young = (f"sd-t{uuid.uuid4().hex[:7]}" for _ in range(3))
    for run in (dead, young):
        for part in ("f0.0", "t.0", "o0.1", "ledger"):
            _leave_block(f"{run}-{part}", age_s=120 if run == dead else 30)
    ledger = SlotPool.create(name=f"{live}-ledger", num_slots=1, slot_bytes=64)  # mapped by this process
    _leave_block(f"{live}-f0.0", age_s=120)
    try:
        blocks, nbytes = reap_orphan_pools()  # (untouched for 60 s)
        assert blocks >= 4 and nbytes >= 4 * 4096
        assert not any(_exists(f"{dead}-{p}") for p in ("f0.0", "t.0", "o0.1", "ledger"))
        assert all(_exists(f"{young}-{p}") for p in ("f0.0", "t.0", "o0.1", "ledger"))  # maybe a runner we cannot see
        assert _exists(f"{live}-ledger") and _exists(f"{live}-f0.0")  # its ledger is mapped: alive
    finally:
        ledger.close()
        for run in (dead, young, live):
            for p in ("f0.0", "t.0", "o0.1", "ledger"):
                unlink_pool(f"{run}-{p}")


def test_the_runners_heartbeat_touches_its_ledger():
    from pipeline.supervise import Ledger

    name = f"{_name()}-ledger"
    ledger = Ledger.create(name=name, num_sources=1, num_chains=1)
    try:
        old = time.time() - 300
        os.utime(f"/dev/shm/{name}", (old, old))
        ledger.touch()
        assert time.time() - os.stat(f"/dev/shm/{name}").st_mtime < 60
    finally:
        ledger.close()
