"""The run's summary counts over the whole run: the PUB messages across postprocess restarts, a failed run's sources.

The PUB sink has no file to recount after a restart: its count lives in the ledger
(:attr:`pipeline.supervise.Ledger.pub_messages`). A source whose end report never came (the run
failed first) shows the frames the ledger says were published of it, not 0.
"""

import json
import os
import re
import signal
import threading
import time

import pytest
import zmq

import pipeline.runner
from pipeline.runner import Pipeline
from pipeline.stages.sinks import PubSink
from pipeline.subscribe import Published, Subscriber
from pipeline.summary import RunSummary, SourceReport, format_summary
from pipeline.supervise import Ledger
from streamdet.messages import EndOfStream, EosReason
from tests.helpers.cli import free_port
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path
from tests.pipeline.test_supervise import run_and_kill

FRAMES = 90


@pytest.fixture(autouse=True)
def _frequent_monitor(monkeypatch):
    """The kill monitors look every 0.05 s, not every RSS_SAMPLE_S (as in test_supervise)."""
    monkeypatch.setattr(pipeline.runner, "RSS_SAMPLE_S", 0.05)


def settings(model, tmp_path, **over):
    tree = {"sources": [str(bikes_path())], "model": str(model), "quiet": True, "max_frames": FRAMES,
            "sinks": {"publish": None, "jsonl": str(tmp_path / "o.jsonl")}}
    return settings_with(tree, **over)


def pub_count(summary: RunSummary) -> int:
    line = next(o for o in summary.outputs if o.startswith("zmq PUB"))
    m = re.search(r": (\d+) messages", line)
    assert m, line
    return int(m.group(1))


def detection_lines(path) -> int:
    return sum(1 for line in path.read_text().splitlines() if "frame_index" in json.loads(line))


def test_pub_count_after_a_postprocess_restart_is_what_a_subscriber_received(standin_model, tmp_path):
    """The dead process's messages count too: the summary's figure equals what a SUB socket got."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    received: list[Published] = []
    sub = Subscriber(endpoint)

    def receive() -> None:
        while not received or not received[-1].is_eos:
            received.append(sub.recv(timeout_s=60))

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    killed: list[int] = []

    def monitor(p: Pipeline) -> None:
        if killed or p.frames_done < 40:
            return
        pid = p.stage_pids()["postprocess"]
        os.kill(pid, signal.SIGSTOP)  # killed when quiet: no message half-way out (PUB would lose it)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # (before the kill the PUB messages are the frames' detections)
            if len(received) == p._ledger.frames_published(0):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGCONT)  # (try again at the next look)

    s = settings(standin_model, tmp_path, sinks__publish=endpoint, sinks__publish_wait_subscribers=1)
    summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    t.join(60)
    sub.close()
    assert killed, "the run ended before the postprocess stage could be killed"
    assert summary.exit_code == 0, summary.errors
    assert summary.restarts == {"postprocess": 1}
    frames = [m.payload["frame_index"] for m in received if m.topic == "detections.bikes"]
    assert frames == list(range(FRAMES))
    assert received[-1].topic == "eos.bikes"
    assert pub_count(summary) == len(received)  # detections, the restart's status, the EOS


def test_pub_sink_of_a_restarted_stage_counts_on_from_the_ledger(tmp_path):
    """Unit level: a second sink on the same ledger starts from the first one's count."""
    ledger = Ledger.create(name=f"sd-test-ledger-pub-{os.getpid()}", num_sources=1, num_chains=1)
    ctx = zmq.Context()
    try:
        for n in (3, 2):
            sink = PubSink(ctx=ctx, endpoint=f"ipc://{tmp_path / 'pub'}", ledger=ledger)
            sink.open()
            for _ in range(n - 1):
                sink.stats({"schema": "x"})
            sink.end_of_stream(EndOfStream("a", 7, EosReason.FINISHED))
            sink.close()
        assert ledger.pub_messages == 5
        assert ": 5 messages" in sink.describe()
        alone = PubSink(ctx=ctx, endpoint=f"ipc://{tmp_path / 'pub2'}")  # no ledger: its own count
        assert alone.messages == 0
    finally:
        ctx.term()
        ledger.close()


def test_a_failed_run_shows_the_frames_published_of_each_source(standin_model, tmp_path):
    """The engine dies with no restart allowed: the source line has the JSONL's frames, still not finished."""
    s = settings(standin_model, tmp_path, max_frames=250, supervise__max_restarts=0)
    summary, _ = run_and_kill(s, "engine", at_frame=30)
    assert summary.exit_code == 1
    published = detection_lines(tmp_path / "o.jsonl")
    assert published >= 30
    assert summary.frames == published
    (report,) = summary.sources
    assert (report.frames, report.reason) == (published, "")
    assert f"source bikes: {bikes_path()}: {published} frames (not finished)" in format_summary(summary)


def test_count_unfinished_leaves_finished_and_unknown_sources_alone():
    summary = RunSummary(model="m", sources=[SourceReport("a", "a.mp4", 10, "finished"), SourceReport("b", "b.mp4"),
                                             SourceReport("c", "c.mp4")])
    summary.count_unfinished({"a": 12, "b": 7})
    assert [(r.frames, r.reason) for r in summary.sources] == [(10, "finished"), (7, ""), (0, "")]
