"""Concurrent batches in the engine stage (``engine.concurrent_batches``).

Several engine instances run batches at once on their own threads; results, tensor credits and
EOS still leave in the order the batches came, an instance's error fails the stage after the
batches before it were published, the setting resolves per backend and core count, and a real
run gives the same detections with one batch at a time and with two.
"""

import json
import threading

import numpy as np
import pytest

from engines.base import Backend, EngineError
from pipeline.chains import engine_parallelism, prepare_run, stage_specs
from pipeline.runner import Pipeline
from pipeline.settings import DEFAULT_MODEL
from pipeline.stages.base import StageError
from pipeline.stages.engine import EngineSpec
from pipeline.stages.preprocess import PreprocessSpec
from pipeline.summary import PipelineError
from pipeline.transport import ipc_endpoints
from streamdet.messages import BatchMsg, CreditMsg, EndOfStream, ResultMsg, decode_message
from tests.helpers.durable_sinks import record
from tests.helpers.engine_stage import SHAPE, EngineHarness
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path


class _Engine:
    """A stand-in engine: its output is the batch's mean value per image; hooks run inside ``infer``."""

    output_names = ("output0",)

    def __init__(self, hook=None):
        self.hook = hook
        self.calls = 0
        self.running = 0
        self.overlapped = False  # set if this instance ever ran two batches at once
        self.lock = threading.Lock()
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def infer(self, batch):
        with self.lock:
            self.calls += 1
            self.running += 1
            self.overlapped |= self.running > 1
        try:
            value = float(batch[0, 0, 0, 0])
            if self.hook is not None:
                self.hook(value)
            return [np.full((batch.shape[0], 1), value, np.float32)]
        finally:
            with self.lock:
                self.running -= 1


def test_two_instances_run_batches_at_once_and_results_keep_their_order():
    second_done = threading.Event()

    def hook(value):  # batch 0 waits for batch 1 to finish: only possible if both run at once
        if value == 0:
            assert second_done.wait(10), "batch 1 did not run while batch 0 was running"
        elif value == 1:
            second_done.set()

    engines = [_Engine(hook), _Engine(hook)]
    h = EngineHarness(engines)
    try:
        h.stage.start()
        h.thread.start()
        for k in range(5):
            h.send_batch(k)
        h.send_eos()
        got = h.received(6)
        h.thread.join(10)
        assert h.error is None and not h.thread.is_alive()
    finally:
        h.close()
    results = [(m, parts) for m, parts in got if isinstance(m, ResultMsg)]
    assert isinstance(got[-1][0], EndOfStream) and len(results) == 5
    for k, (m, parts) in enumerate(results):
        assert [r.frame.frame_index for r in m.frames] == [2 * k, 2 * k + 1]
        assert np.frombuffer(parts[0], np.float32).tolist() == [k, k]  # each batch's own output
    assert sum(e.calls for e in engines) == 5 and all(e.calls for e in engines)
    assert not any(e.overlapped for e in engines)  # an instance runs one batch at a time
    assert all(e.started and e.stopped for e in engines)


def test_credits_go_back_in_batch_order_with_concurrent_batches(monkeypatch):
    """Slot batches: the stage reads the slot, runs it on an instance and hands the slot back in order."""
    order: list[int] = []
    slots: dict[int, np.ndarray] = {}

    class _Pool:
        def view(self, slot, shape, dtype):
            return slots[slot]

    class _Pools:
        def get(self, name):
            return _Pool()

        def close(self):
            pass

    release = threading.Event()

    def hook(value):
        if value == 0:
            assert release.wait(10)
        else:
            release.set()

    h = EngineHarness([_Engine(hook), _Engine(hook)])
    monkeypatch.setattr(h.stage, "_pools", _Pools())
    try:
        h.stage.start()
        h.thread.start()
        for k in range(3):
            slots[k] = np.full(SHAPE, k, np.float32)
            msg = BatchMsg((record(i=2 * k), record(i=2 * k + 1)), k, "pool", SHAPE, "float32", tag=k)
            h.feed.send_multipart([msg.encode()])
        h.send_eos()
        h.received(4)
        for _ in range(3):
            assert h.credits.poll(5000)
            credit = decode_message(h.credits.recv_multipart()[0])
            assert isinstance(credit, CreditMsg)
            order.append(credit.slot)
    finally:
        h.close()
    assert order == [0, 1, 2]


def test_an_instance_error_fails_the_stage_after_the_earlier_batches_were_published():
    def hook(value):
        if value == 2:
            raise EngineError("model.onnx: bad batch 2")

    h = EngineHarness([_Engine(hook), _Engine(hook)])
    try:
        h.stage.start()
        h.thread.start()
        for k in range(4):
            h.send_batch(k)
        got = h.received(2)
        h.thread.join(10)
    finally:
        h.close()
    assert [np.frombuffer(p[0], np.float32)[0] for _, p in got] == [0, 1]
    assert isinstance(h.error, EngineError) and "bad batch 2" in str(h.error)


def test_concurrent_batches_are_refused_with_device_batches():
    with pytest.raises(StageError, match="host tensors only"):
        EngineHarness([_Engine(), _Engine()], device_batches=True)


@pytest.mark.parametrize(
    ("concurrent", "threads", "backend", "device", "device_batches", "cores", "expected"),
    [
        (0, 0, Backend.ONNXRUNTIME, "cpu", False, 2, (2, 1)),  # auto on the 2-core machine
        (0, 0, Backend.ONNXRUNTIME, "cpu", False, 16, (2, 8)),
        (0, 0, Backend.ONNXRUNTIME, "cpu", False, 1, (1, 0)),  # one core: one batch, ORT's default threads
        (1, 0, Backend.ONNXRUNTIME, "cpu", False, 16, (1, 0)),
        (4, 0, Backend.ONNXRUNTIME, "cpu", False, 16, (4, 4)),
        (3, 0, Backend.ONNXRUNTIME, "cpu", False, 2, (3, 1)),  # never fewer than one thread a run
        (2, 3, Backend.ONNXRUNTIME, "cpu", False, 2, (2, 3)),  # explicit threads are kept
        (0, 1, Backend.ONNXRUNTIME, "cpu", False, 2, (1, 1)),  # threads set by hand: one batch at a time
        (0, 0, Backend.TENSORRT, "cuda", False, 16, (1, 0)),
        (0, 0, Backend.CUDA, "cuda:0", True, 16, (1, 0)),
        (0, 4, Backend.CUDA, "cpu", False, 16, (1, 4)),
        (2, 0, Backend.TENSORRT, "cuda", False, 16, "tensorrt on cuda"),
        (2, 0, Backend.CUDA, "cpu", False, 16, "cuda on cpu"),
        (2, 0, Backend.ONNXRUNTIME, "cpu", True, 16, "device batches"),
    ],
)
def test_engine_parallelism(concurrent, threads, backend, device, device_batches, cores, expected):
    s = settings_with({}, engine__concurrent_batches=concurrent, engine__intra_op_threads=threads)
    if isinstance(expected, str):
        with pytest.raises(PipelineError, match=f"concurrent_batches={concurrent}: .*{expected}.*set it to 0 or 1"):
            engine_parallelism(s, backend, device, device_batches=device_batches, cores=cores, host_cores=cores)
    else:
        assert engine_parallelism(s, backend, device, device_batches=device_batches, cores=cores,
                                  host_cores=cores) == expected


@pytest.mark.parametrize(
    ("concurrent", "threads", "backend", "device", "cores", "expected"),
    [  # the run may use fewer cores than the host has (a container's CPU quota): 64 cores, quota `cores`
        (0, 0, Backend.ONNXRUNTIME, "cpu", 1, (1, 1)),  # not ORT's default: 64 threads on one core's quota
        (1, 0, Backend.ONNXRUNTIME, "cpu", 4, (1, 4)),
        (0, 0, Backend.ONNXRUNTIME, "cpu", 4, (2, 2)),
        (0, 3, Backend.ONNXRUNTIME, "cpu", 1, (1, 3)),  # set by hand: kept
        (0, 0, Backend.CUDA, "cpu", 2, (1, 2)),
    ],
)
def test_engine_threads_follow_a_cpu_quota(concurrent, threads, backend, device, cores, expected):
    s = settings_with({}, engine__concurrent_batches=concurrent, engine__intra_op_threads=threads)
    assert engine_parallelism(s, backend, device, cores=cores, host_cores=64) == expected


def test_the_preprocess_gets_a_tensor_slot_more_than_the_batches_in_flight(tmp_path):
    s = settings_with({"sources": [str(bikes_path())], "model": str(DEFAULT_MODEL)},
                      engine__concurrent_batches=4, preprocess__tensor_slots=2)
    prepared = prepare_run(s)
    specs = stage_specs(s, prepared, ipc_endpoints(tmp_path, ["pool"]), ["pool"], ["tensors"])
    engine = next(sp for sp in specs if isinstance(sp, EngineSpec))
    assert engine.concurrent_batches == 4
    pre = [sp for sp in specs if isinstance(sp, PreprocessSpec)]
    pre += [sp.preprocess for sp in specs if hasattr(sp, "preprocess")]
    assert [p.tensor_slots for p in pre] == [5]


def _detections(tmp_path, concurrent: int) -> list[tuple]:
    out = tmp_path / f"c{concurrent}.jsonl"
    s = settings_with({"sources": [str(bikes_path())], "model": str(DEFAULT_MODEL), "quiet": True, "max_frames": 48,
                       "sinks": {"publish": None, "jsonl": str(out)}}, engine__concurrent_batches=concurrent)
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.frames == 48
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    return [(d["frame_index"], json.dumps(d["detections"], sort_keys=True)) for d in lines if "detections" in d]


def test_two_concurrent_batches_give_the_same_detections_as_one(tmp_path):
    one = _detections(tmp_path, 1)
    two = _detections(tmp_path, 2)
    assert len(one) == 48 and [i for i, _ in one] == list(range(48))
    assert two == one
