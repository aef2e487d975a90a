"""The engine's output pool: outputs through shared memory, slots handed back, taken back after a restart."""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import zmq

from pipeline.chains import prepare_run, stage_specs
from pipeline.output_pool import MIN_POOLED_BYTES, OutputPool, OutputReader, outputs_bytes
from pipeline.settings import DEFAULT_MODEL
from pipeline.slotpool import SLOT_ALIGN, SlotPoolError, pool_name, unlink_pool
from pipeline.stages.engine import EngineSpec
from pipeline.transport import ipc_endpoints, tcp_endpoints
from streamdet.letterbox import letterbox_params
from streamdet.messages import INLINE_SLOT, NO_SLOT, FrameMsg, FrameRecord, ResultMsg, TensorSpec, decode_message
from tests.helpers.engine_stage import EngineHarness
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path


def _arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((2, 14, 8190), dtype=np.float32),  # a detect head, 2 frames
            rng.random((2, 3, 5), dtype=np.float32).astype(np.float16),  # an odd size: the next is realigned
            rng.integers(0, 9, (2, 7), dtype=np.int64)]


def _specs(arrays: list[np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec.of(f"o{i}", a) for i, a in enumerate(arrays)]


def _put(pool: OutputPool, arrays: list[np.ndarray]) -> tuple[int, int]:
    lent = pool.put(arrays)
    assert lent is not None
    return lent


@pytest.fixture
def pool():
    p = OutputPool.create(name=f"sd-test-{uuid.uuid4().hex[:8]}-o.0", num_slots=3,
                          slot_bytes=outputs_bytes([a.nbytes for a in _arrays()]))
    yield p
    p.close()


@pytest.fixture
def reader():
    r = OutputReader()
    yield r
    r.close()


def test_arrays_go_through_a_slot_and_come_out_equal(pool, reader):
    arrays = _arrays()
    slot, tag = pool.put(arrays)
    assert pool.in_use == 1
    got = reader.take(pool.name, slot, tag, _specs(arrays))
    assert got is not None
    for a, b in zip(arrays, got, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
        assert b.flags.owndata  # a copy: the slot is the engine's again
    assert pool.in_use == 0


def test_slots_are_handed_out_until_none_is_free_then_outputs_go_inline(pool, reader):
    arrays = _arrays()
    lent = [pool.put(arrays) for _ in range(3)]
    assert len({slot for slot, _ in lent}) == 3 and len({tag for _, tag in lent}) == 3
    assert pool.put(arrays) is None  # none free: the caller sends them inline
    slot, tag = lent[1]
    assert reader.take(pool.name, slot, tag, _specs(arrays)) is not None
    again = pool.put(_arrays(1))
    assert again is not None and again[0] == slot and again[1] > max(t for _, t in lent)


def test_outputs_larger_than_a_slot_go_inline(pool):
    big = [np.zeros((4, 14, 8190), np.float32)]
    assert pool.put(big) is None
    assert pool.in_use == 0


def test_a_slot_taken_back_and_written_again_is_not_read(pool, reader):
    """After a restart the engine takes back every lent slot; a result still queued for one is dropped."""
    arrays = _arrays()
    slot, tag = pool.put(arrays)
    assert pool.reclaim() == 1
    assert pool.in_use == 0
    slots = {pool.put(_arrays(2))[0] for _ in range(3)}  # every slot written again, the reclaimed one too
    assert slot in slots
    assert reader.take(pool.name, slot, tag, _specs(arrays)) is None


def test_a_late_hand_back_of_an_old_lend_does_not_free_the_slot_again(pool, reader):
    arrays = _arrays()
    slot, tag = pool.put(arrays)
    pool.reclaim()
    lent = [pool.put(arrays) for _ in range(3)]
    assert pool.put(arrays) is None
    assert reader.take(pool.name, slot, tag, _specs(arrays)) is None  # (slot rewritten: nothing handed back)
    assert pool.put(arrays) is None  # still all lent
    new_tag = next(t for s, t in lent if s == slot)
    assert reader.take(pool.name, slot, new_tag, _specs(arrays)) is not None
    assert pool.put(arrays) is not None


def test_a_pool_that_is_gone_or_of_a_replaced_engine_gives_nothing(reader):
    arrays = _arrays()
    specs = _specs(arrays)
    base = f"sd-test-{uuid.uuid4().hex[:8]}-o"
    assert reader.take(pool_name(base, 0), 0, 1, specs) is None  # never existed (unlinked before it was mapped)
    old = OutputPool.create(name=pool_name(base, 0), num_slots=2, slot_bytes=outputs_bytes([a.nbytes for a in arrays]))
    new = OutputPool.create(name=pool_name(base, 1), num_slots=2, slot_bytes=outputs_bytes([a.nbytes for a in arrays]))
    try:
        slot_new, tag_new = _put(new, arrays)
        assert reader.take(new.name, slot_new, tag_new, specs) is not None
        slot_old, tag_old = _put(old, arrays)
        assert reader.take(old.name, slot_old, tag_old, specs) is None  # an older generation than one seen
    finally:
        old.close()
        new.close()


def test_a_pool_that_cannot_be_mapped_for_another_reason_is_an_error(monkeypatch, reader):
    """Out of descriptors or memory is not a restart: the stage fails (and restarts), rather than lose the result."""
    import pipeline.slotpool

    def refuse(name):
        try:
            raise PermissionError(13, "Permission denied")
        except PermissionError as e:
            raise SlotPoolError(f"shared memory {name!r}: cannot attach ({e})") from e

    monkeypatch.setattr(pipeline.slotpool.SlotPool, "attach", staticmethod(refuse))
    with pytest.raises(SlotPoolError, match="Permission denied"):
        reader.take("sd-x-o0.0", 0, 1, _specs(_arrays()))


def test_a_bad_slot_is_an_error(pool, reader):
    arrays = _arrays()
    with pytest.raises(SlotPoolError, match=r"expected slot in \[0, 3\), got 3"):
        reader.take(pool.name, 3, 1, _specs(arrays))


def test_each_array_starts_at_an_aligned_offset():
    assert outputs_bytes([1, SLOT_ALIGN, SLOT_ALIGN + 1]) == SLOT_ALIGN * 4
    assert outputs_bytes([]) == 0


@pytest.mark.parametrize(("slot_bytes", "wanted", "max_bytes", "expected"), [
    (458_688, 6, 256 * 2**20, 6),  # the bundled detector, batch 1
    (MIN_POOLED_BYTES - 1, 6, 256 * 2**20, 0),  # small outputs travel inline
    (80 * 2**20, 6, 256 * 2**20, 2),  # large batches: as many slots as the cap allows, with the control slot
    (100 * 2**20, 6, 256 * 2**20, 0),  # fewer than 2 fit beside the control slot: no pool
])
def test_plan(slot_bytes, wanted, max_bytes, expected):
    assert OutputPool.plan(slot_bytes, wanted, max_bytes) == expected


def _record(i: int) -> FrameRecord:
    frame = FrameMsg("cam", i, 0.04 * i, (272, 640), 2, "sd-x-f0.0", 1.0, 0.5)
    return FrameRecord(frame, letterbox_params((272, 640), (832, 480)), 0.7)


def test_result_messages_name_their_output_slot_and_round_trip():
    specs = (TensorSpec("output0", "float32", (1, 14, 8190)),)
    msg = ResultMsg((_record(0),), 12.5, specs, 3, "sd-x-o0.1", 7)
    back = decode_message(msg.encode())
    assert back == msg and back.outputs_slot == 3 and back.outputs_pool == "sd-x-o0.1" and back.outputs_tag == 7
    assert ResultMsg((_record(0),), 1.0, specs).outputs_slot == INLINE_SLOT


@pytest.mark.parametrize(("slot", "pool", "tag", "error"), [
    (0, "", 1, "expected a pool name for outputs_slot 0"),
    (NO_SLOT, "", 0, "expected an outputs slot or INLINE_SLOT, got NO_SLOT"),
    (0, "sd-x-o0.0", 0, "expected outputs_tag >= 1 with a slot"),
    (INLINE_SLOT, "", -1, "expected outputs_tag >= 1 with a slot \\(else 0\\), got -1"),
    (-3, "", 0, "expected outputs_slot >= -2"),
])
def test_result_messages_with_a_bad_output_slot_are_refused(slot, pool, tag, error):
    with pytest.raises(ValueError, match=error):
        ResultMsg((_record(0),), 1.0, (TensorSpec("output0", "float32", (1, 14, 8190)),), slot, pool, tag)


def test_inline_results_give_views_of_their_parts_and_the_pixel_parts_after_them(reader):
    arrays = _arrays()
    msg = ResultMsg((_record(0), _record(1)), 1.0, tuple(_specs(arrays)))
    parts = [zmq.Frame(p) for p in [msg.encode(), *(a.tobytes() for a in arrays), b"pixels0", b"pixels1"]]
    got = reader.arrays(msg, parts)
    assert got is not None
    for a, b in zip(arrays, got[0], strict=True):
        np.testing.assert_array_equal(b, a)
    assert got[1] == parts[4:]


def test_pooled_results_give_copies_and_every_part_after_the_header(pool, reader):
    arrays = _arrays()
    slot, tag = pool.put(arrays)
    msg = ResultMsg((_record(0), _record(1)), 1.0, tuple(_specs(arrays)), slot, pool.name, tag)
    got = reader.arrays(msg, [msg.encode(), b"pixels0"])
    assert got is not None and got[1] == [b"pixels0"]
    np.testing.assert_array_equal(got[0][0], arrays[0])


@pytest.mark.parametrize(("transport", "supervised", "pooled"), [
    ("ipc", True, True), ("tcp", True, False), ("ipc", False, False)])
def test_the_engine_gets_an_output_pool_on_ipc_with_a_ledger(tmp_path, transport, supervised, pooled):
    s = settings_with({"sources": [str(bikes_path())], "model": str(DEFAULT_MODEL)})
    ep = ipc_endpoints(tmp_path, ["pool"]) if transport == "ipc" else tcp_endpoints("127.0.0.1", 5570, ["pool"])
    specs = stage_specs(s, prepare_run(s), ep, ["pool"], ["tensors"], ledger="sd-x-ledger" if supervised else None,
                        output_pools=["sd-x-o0"])
    engine = next(sp for sp in specs if isinstance(sp, EngineSpec))
    assert engine.output_pool == ("sd-x-o0.0" if pooled else None)


def test_a_pipeline_run_leaves_no_output_pool_behind(tmp_path):
    from pipeline.runner import Pipeline

    s = settings_with({"sources": [str(bikes_path())], "model": str(DEFAULT_MODEL), "quiet": True, "max_frames": 12,
                       "sinks": {"publish": None}})
    p = Pipeline(settings=s)
    summary = p.run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    names = [n for n in p._pool_names if re.search(r"-o\d+\.\d+$", n)]
    assert names and not any(unlink_pool(n) for n in names)  # the engine unlinked it (nothing left to remove)


class _BigEngine:
    """A stand-in engine with a detector-sized head: every value of a frame's output is its batch's first pixel."""

    output_names = ("output0",)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        return [np.full((batch.shape[0], 14, 8190), batch[0, 0, 0, 0], np.float32)]


def _engine_harness(**kw) -> EngineHarness:
    """An engine stage with a ledger and an output pool, started, its thread running."""
    from pipeline.supervise import Ledger

    tag = uuid.uuid4().hex[:8]
    ledger = Ledger.create(name=f"sd-test-{tag}-ledger", num_sources=1, num_chains=1)  # (the stage closes it)
    h = EngineHarness([_BigEngine()], warmup_batch=2, ledger=ledger, output_pool=f"sd-test-{tag}-o0.0", **kw)
    h.stage.start()
    h.thread.start()
    return h


def _result(h: EngineHarness, k: int) -> tuple[ResultMsg, list[bytes]]:
    """Send batch ``k`` and return its result and the message parts after the header."""
    h.send_batch(k)
    [(msg, parts)] = h.received(1)
    assert isinstance(msg, ResultMsg)
    return msg, parts


@pytest.fixture
def engine_run():
    runs: list[EngineHarness] = []

    def make(**kw):
        runs.append(_engine_harness(**kw))
        return runs[-1]

    yield make
    for r in runs:
        r.close()


def test_the_engine_stage_lends_slots_goes_inline_when_none_is_free_and_takes_them_back_when_the_reader_dies(
        engine_run, reader):
    run = engine_run()
    pool = run.stage.outputs
    assert pool is not None and pool.num_slots == 4  # 2 per engine instance, and 2
    assert pool.slot_bytes == outputs_bytes([2 * 14 * 8190 * 4])  # the warm-up batch's outputs
    held = [_result(run, k) for k in range(4)]
    assert [m.outputs_slot for m, _ in held] == [0, 1, 2, 3] and all(p == [] for _, p in held)
    inline, parts = _result(run, 4)  # none free: inline, as on tcp://
    assert inline.outputs_slot == INLINE_SLOT and len(parts) == 1
    got = reader.arrays(held[1][0], [b"", *held[1][1]])
    assert got is not None and np.all(got[0][0] == 1.0) and got[0][0].shape == (2, 14, 8190)
    assert _result(run, 5)[0].outputs_slot == 1  # the slot handed back is lent again
    run.stage.ledger.bump_replay_gen(0)  # another stage restarted: the postprocess stage still holds its slots
    assert _result(run, 6)[0].outputs_slot == INLINE_SLOT and run.stage.reclaimed_outputs == 0
    run.stage.ledger.bump_postprocess_gen()  # the postprocess stage died: what it held never comes back
    again = [_result(run, 7 + k)[0].outputs_slot for k in range(4)]
    assert sorted(again) == [0, 1, 2, 3] and run.stage.reclaimed_outputs == 4
    assert reader.arrays(held[0][0], [b"", *held[0][1]]) is None  # its slot was written again: dropped, replayed


@pytest.mark.parametrize(("kw", "free", "pooled"), [
    ({}, None, True),
    ({"device_nms": object()}, None, False),  # NMS on the device: the kept detections are small
    ({}, 8 * 2**20, False),  # an eighth of 8 MiB of /dev/shm holds fewer than 2 slots of 917 KB
])
def test_when_the_engine_stage_makes_an_output_pool(monkeypatch, engine_run, kw, free, pooled):
    import pipeline.stages.engine

    monkeypatch.setattr(pipeline.stages.engine, "shm_free_bytes", lambda: free)
    assert (engine_run(**kw).stage.outputs is not None) is pooled
