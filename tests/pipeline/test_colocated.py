"""Decoders in the preprocess process (``decode.placement: with_preprocess``).

The same detections as with a process per decoder, no decoder process, a failing decoder fails
its process with the decoder's error, and the placement's resolution and refusals. The restart of
the shared process is tested with the other restarts (tests/pipeline/test_supervise.py).
"""

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

import pipeline.runner
from pipeline.chains import decode_placement, prepare_run
from pipeline.runner import Pipeline
from pipeline.settings import DEFAULT_MODEL, DEFAULT_SOURCE
from pipeline.sources.options import DecodePlacement
from pipeline.stages.base import StageError
from pipeline.stages.colocated import ColocatedStage
from pipeline.summary import PipelineError
from pipeline.transport import StageFlags, Stopped
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path

FRAMES = 40
TIMING_FIELDS = {"latency_ms", "timing_ms", "capture_time", "time"}


def run(tmp_path, name, placement, monkeypatch):
    """Run demo.mp4 and bikes.mp4 through the default detector; the JSONL lines and the stage labels seen."""
    monkeypatch.setattr(pipeline.runner, "RSS_SAMPLE_S", 0.05)
    out = tmp_path / f"{name}.jsonl"
    s = settings_with({"sources": [str(DEFAULT_SOURCE), str(bikes_path())], "model": str(DEFAULT_MODEL),
                       "quiet": True, "max_frames": FRAMES, "sinks": {"publish": None, "jsonl": str(out)}},
                      decode__placement=placement)
    labels: set[str] = set()
    summary = Pipeline(settings=s, monitor=lambda p: labels.update(p.stage_pids())).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return lines, labels


def detections(lines):
    """The frame messages without timings, by (source, frame)."""
    return {(m["source_id"], m["frame_index"]): {k: v for k, v in m.items() if k not in TIMING_FIELDS}
            for m in lines if "frame_index" in m}


def test_decoders_in_the_preprocess_process_give_the_same_detections(tmp_path, monkeypatch):
    apart, apart_labels = run(tmp_path, "separate", "separate", monkeypatch)
    together, labels = run(tmp_path, "together", "with_preprocess", monkeypatch)
    assert {"decode:demo", "decode:bikes"} <= apart_labels
    assert not any(label.startswith("decode") for label in labels)  # no decoder process
    assert {"preprocess", "engine", "postprocess"} <= labels
    want = detections(apart)
    assert len(want) == 2 * FRAMES
    assert detections(together) == want
    for source in ("demo", "bikes"):  # each source's frames in order, then its EOS
        frames = [m["frame_index"] for m in together if m.get("source_id") == source and "frame_index" in m]
        assert frames == list(range(FRAMES))


class FakeStatus:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class FakeDecoder:
    """Runs ``behaviour`` as its ``run``; records stop."""

    def __init__(self, flags, behaviour):
        self.flags = flags
        self.status = FakeStatus()
        self.source = SimpleNamespace(source_id="cam")
        self.behaviour = behaviour
        self.stopped = False

    def start(self):
        pass

    def run(self):
        self.behaviour(self.flags)

    def stop(self):
        self.stopped = True


class FakePreprocess:
    """Waits until its flags say stop (as the preprocess stage does while frames are due), or ends at once."""

    def __init__(self, flags, wait=True):
        self.flags = flags
        self.wait = wait
        self.stopped = False

    def start(self):
        pass

    def run(self):
        deadline = time.monotonic() + 10
        while self.wait and time.monotonic() < deadline:
            if not self.flags.alive():
                raise Stopped()
            time.sleep(0.005)

    def stop(self):
        self.stopped = True


def process_flags():
    return StageFlags(go=threading.Event(), stop_input=threading.Event(), abort=threading.Event(),
                      parent_pid=os.getppid())


def fail(flags):
    raise RuntimeError("boom")


def finish(flags):
    pass


def wait_for_stop(flags):
    while flags.alive():
        time.sleep(0.005)
    raise Stopped()


@pytest.mark.parametrize(("behaviours", "pre_waits", "error"), [
    ([finish], False, None),
    ([finish, finish], False, None),
    ([fail], True, "internal error in the decode stage: RuntimeError: boom"),
    ([finish, fail], True, "internal error in the decode stage: RuntimeError: boom"),
    ([wait_for_stop, fail], True, "internal error in the decode stage: RuntimeError: boom"),
])
def test_a_failing_decoder_fails_its_process_with_its_error(behaviours, pre_waits, error):
    flags = process_flags()
    pre_flags = flags.derive()
    pre = FakePreprocess(pre_flags, wait=pre_waits)
    decoders = [FakeDecoder(flags.derive(), b) for b in behaviours]
    stage = ColocatedStage(preprocess=pre, decoders=decoders, preprocess_flags=pre_flags)  # type: ignore[arg-type]
    stage.start()
    if error is None:
        stage.run()
    else:
        with pytest.raises(StageError, match=error):
            stage.run()
    stage.stop()
    assert pre.stopped
    assert all(d.stopped and d.status.closed for d in decoders)


def test_sigterm_to_the_process_stops_every_stage_in_it():
    flags = process_flags()
    a, b = flags.derive(), flags.derive()
    b.terminated = True  # one stage's own stop leaves the others running
    assert a.alive() and flags.alive() and not b.alive()
    flags.terminated = True  # the process's SIGTERM handler
    assert not a.alive()


@pytest.mark.parametrize(("placement", "cores", "control_port", "expected"), [
    ("separate", 1, None, DecodePlacement.SEPARATE),
    ("with_preprocess", 64, None, DecodePlacement.WITH_PREPROCESS),
    ("auto", 1, None, DecodePlacement.WITH_PREPROCESS),
    ("auto", 2, None, DecodePlacement.WITH_PREPROCESS),
    ("auto", 3, None, DecodePlacement.SEPARATE),
    ("auto", 16, None, DecodePlacement.SEPARATE),
    ("auto", 2, 8080, DecodePlacement.SEPARATE),  # sources added at runtime get processes of their own
])
def test_auto_placement_puts_decoders_with_preprocess_on_small_machines(placement, cores, control_port, expected):
    s = settings_with({"decode": {"placement": placement}, "control": {"port": control_port}})
    assert decode_placement(s, cpu_count=cores) is expected


def test_with_preprocess_and_the_control_api_are_refused_at_startup():
    s = settings_with({"decode": {"placement": "with_preprocess"}, "control": {"port": 8080}})
    with pytest.raises(PipelineError, match="decode.placement with_preprocess cannot be used with control.port"):
        prepare_run(s)
