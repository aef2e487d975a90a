"""Unit tests of the runtime control API's building blocks, without subprocesses or pipeline runs.

Covers the ledger's per-source control fields and its layout, publication order for sources added
at runtime, the stats' control-API side (snapshot, metrics, sources coming and going), the preview
hub, the readiness rule, the control plane's request checks and its stop (a real ``ControlPlane``
stepped by the test, no stage), the FastAPI app against a fake control plane (``TestClient``, no
socket) and the ``pipeline.ctl`` client against that app (``test_ctl_client.py``: against scripted answers).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import zmq
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import pipeline.control.plane as plane_mod
import pipeline.stages.stats as stats_mod
from pipeline import ctl
from pipeline.control.app import MAX_BODY_BYTES, MAX_CLOSE_REASON_BYTES, close_reason, create_app
from pipeline.control.plane import ControlError, ControlPlane, readiness
from pipeline.control.preview import PreviewHub
from pipeline.slotpool import unlink_pool
from pipeline.sources.probe import SourceError, SourceInfo, probe_source
from pipeline.stages.ordering import PublishOrder, Verdict
from pipeline.stages.stats import SNAPSHOT_WINDOW_S, LiveStats, StatsConfig
from pipeline.summary import RunSummary, StatusBook
from pipeline.supervise import Ledger
from streamdet.messages import EndOfStream, EosReason, SourceState, SourceStatusMsg, StageName
from tests.helpers.cli import ROOT
from tests.helpers.control import DEMO

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _wait_for(cond: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll ``cond`` until it holds or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------------------------------------- Ledger


@pytest.fixture
def make_ledger() -> Iterator[Callable[[int, int], Ledger]]:
    """Ledgers with unique names, closed and unlinked after the test."""
    made: list[Ledger] = []

    def make(num_sources: int, num_chains: int) -> Ledger:
        ledger = Ledger.create(name=f"sd-test-{uuid.uuid4().hex[:12]}", num_sources=num_sources,
                               num_chains=num_chains)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        try:
            ledger.close()
        finally:
            unlink_pool(ledger.name)


def _source_fields(ledger: Ledger, i: int) -> tuple[Any, ...]:
    return (ledger.published(i), ledger.eos_done(i), ledger.sent(i), ledger.stop_requested(i), ledger.active(i),
            ledger.preview_viewers(i))


def _chain_fields(ledger: Ledger, k: int) -> tuple[int, int, int]:
    return ledger.engine_gen(k), ledger.preprocess_ack(k), ledger.replay_gen(k)


FRESH_SOURCE = (-1, False, 0, False, False, 0)

LAYOUTS = pytest.mark.parametrize("num_sources,num_chains", [(1, 1), (2, 3), (3, 2), (5, 1)],
                                  ids=["1src-1chain", "2src-3chain", "3src-2chain", "5src-1chain"])


@LAYOUTS
def test_ledger_fresh_slots(make_ledger, num_sources, num_chains):
    ledger = make_ledger(num_sources, num_chains)
    assert (ledger.num_sources, ledger.num_chains) == (num_sources, num_chains)
    assert [_source_fields(ledger, i) for i in range(num_sources)] == [FRESH_SOURCE] * num_sources
    assert ledger.free_slots() == list(range(num_sources))
    assert ledger.published_totals() == (0, 0)
    assert [_chain_fields(ledger, k) for k in range(num_chains)] == [(0, 0, 0)] * num_chains
    assert not ledger.finished and ledger.subscribers == 0


@LAYOUTS
def test_ledger_per_source_writes_touch_only_their_slot(make_ledger, num_sources, num_chains):
    ledger = make_ledger(num_sources, num_chains)
    for k in range(num_chains):  # distinct per-chain values that per-source writes must not disturb
        for _ in range(k + 1):
            ledger.bump_engine_gen(k)
        ledger.set_preprocess_ack(k, 10 + k)
        for _ in range(k + 2):
            ledger.bump_replay_gen(k)
    ledger.set_subscribers(7)
    chains = [_chain_fields(ledger, k) for k in range(num_chains)]
    assert chains == [(k + 1, 10 + k, k + 2) for k in range(num_chains)]

    for i in range(num_sources):
        ledger.set_published(i, 100 + i)
        ledger.set_eos_done(i)
        ledger.set_sent(i, 200 + i)
        ledger.count_published(i, 3 + i)
        ledger.request_stop(i)
        ledger.set_active(i, True)
        ledger.set_preview_viewers(i, 4 + i)
        assert _source_fields(ledger, i) == (100 + i, True, 200 + i, True, True, 4 + i)
        for j in range(i + 1, num_sources):
            assert _source_fields(ledger, j) == FRESH_SOURCE, f"writing slot {i} changed slot {j}"
        assert [_chain_fields(ledger, k) for k in range(num_chains)] == chains
        assert not ledger.finished and ledger.subscribers == 7
    assert ledger.published_totals() == (num_sources, sum(3 + i for i in range(num_sources)))
    assert ledger.free_slots() == []


@LAYOUTS
def test_ledger_run_and_chain_writes_leave_sources_alone(make_ledger, num_sources, num_chains):
    ledger = make_ledger(num_sources, num_chains)
    ledger.set_finished()
    ledger.set_subscribers(3)
    for k in range(num_chains):
        ledger.bump_engine_gen(k)
        ledger.set_preprocess_ack(k, 9)
        ledger.bump_replay_gen(k)
    assert [_source_fields(ledger, i) for i in range(num_sources)] == [FRESH_SOURCE] * num_sources
    assert ledger.finished and ledger.subscribers == 3


def test_ledger_control_fields_are_shared_by_name(make_ledger):
    ledger = make_ledger(2, 1)
    other = Ledger.attach(ledger.name)
    try:
        ledger.request_stop(1)
        ledger.set_active(0, True)
        other.set_preview_viewers(1, 2)
        assert (other.stop_requested(0), other.stop_requested(1)) == (False, True)
        assert other.free_slots() == [1]
        assert ledger.preview_viewers(1) == 2
    finally:
        other.close()


@pytest.mark.parametrize("given,stored", [(0, 0), (1, 1), (5, 5), (-1, 0), (-7, 0)],
                         ids=["zero", "one", "five", "minus-one-clamped", "negative-clamped"])
def test_ledger_preview_viewers_never_negative(make_ledger, given, stored):
    ledger = make_ledger(1, 1)
    ledger.set_preview_viewers(0, given)
    assert ledger.preview_viewers(0) == stored


def test_ledger_active_and_free_slots_lowest_first(make_ledger):
    ledger = make_ledger(4, 1)
    for i in (0, 2, 3):
        ledger.set_active(i, True)
    assert ledger.free_slots() == [1]
    ledger.set_active(2, False)
    assert ledger.free_slots() == [1, 2]
    assert (ledger.active(2), ledger.active(3)) == (False, True)


def test_ledger_reset_source_returns_totals_and_resets_only_that_slot(make_ledger):
    ledger = make_ledger(3, 2)
    for i in range(3):
        ledger.set_published(i, 50 + i)
        ledger.set_eos_done(i)
        ledger.set_sent(i, 60 + i)
        for _ in range(4 + i):
            ledger.count_published(i, 2)
        ledger.request_stop(i)
        ledger.set_active(i, True)
        ledger.set_preview_viewers(i, 1)
    ledger.bump_engine_gen(1)
    ledger.set_subscribers(2)
    before = [_source_fields(ledger, i) for i in range(3)]

    assert ledger.reset_source(1) == (5, 10)
    assert _source_fields(ledger, 1) == FRESH_SOURCE
    assert [_source_fields(ledger, i) for i in (0, 2)] == [before[0], before[2]]
    assert ledger.published_totals() == (4 + 6, 2 * (4 + 6))  # its frames and detections counters are 0 too
    assert ledger.free_slots() == [1]
    assert ledger.engine_gen(1) == 1 and ledger.subscribers == 2
    assert ledger.reset_source(1) == (0, 0)  # a fresh slot has nothing to report


@pytest.mark.parametrize("call", [
    lambda ledger, i: ledger.stop_requested(i),
    lambda ledger, i: ledger.request_stop(i),
    lambda ledger, i: ledger.active(i),
    lambda ledger, i: ledger.set_active(i, True),
    lambda ledger, i: ledger.preview_viewers(i),
    lambda ledger, i: ledger.set_preview_viewers(i, 1),
    lambda ledger, i: ledger.reset_source(i),
], ids=["stop_requested", "request_stop", "active", "set_active", "preview_viewers", "set_preview_viewers",
        "reset_source"])
@pytest.mark.parametrize("index", [-1, 2], ids=["negative", "past-end"])
def test_ledger_control_fields_check_the_source_index(make_ledger, call, index):
    ledger = make_ledger(2, 1)
    with pytest.raises(IndexError, match=r"source index in \[0, 2\)"):
        call(ledger, index)
    assert [_source_fields(ledger, i) for i in range(2)] == [FRESH_SOURCE] * 2


# ---------------------------------------------------------------------------------------------- PublishOrder


def test_order_indices_are_ledger_slots_not_positions():
    order = PublishOrder(sources=(("a", False), ("b", True)), indices=(5, 2))
    assert (order.index("a"), order.index("b"), order.index("nobody")) == (5, 2, -1)
    order.add("c", False, 0)
    assert order.index("c") == 0
    order.forget("a")
    assert order.index("a") == -1
    order.forget("never-added")  # no error
    assert order.index("b") == 2


@pytest.mark.parametrize("live", [True, False], ids=["live", "file"])
def test_order_late_copies_of_a_forgotten_source_are_duplicates(live):
    o = PublishOrder(sources=(("cam", live),))
    assert o.frame("cam", 0, None)[0] is Verdict.PUBLISH
    o.published("cam", 0)
    o.eos_published("cam")
    o.forget("cam")
    assert o.frame("cam", 0, None)[0] is Verdict.DUPLICATE  # a replayed copy after the source was forgotten
    assert o.frame("cam", 5, None)[0] is Verdict.DUPLICATE  # never held forever
    assert o.eos(EndOfStream("cam", 1, EosReason.FINISHED)) == (False, 0)
    o.add("cam", live, 0)  # a new source with the same id starts afresh
    assert o.frame("cam", 0, None)[0] is Verdict.PUBLISH


def test_order_without_indices_uses_positions():
    order = PublishOrder(sources=(("a", False), ("b", False), ("c", True)))
    assert [order.index(s) for s in "abc"] == [0, 1, 2]


def test_order_writes_the_ledger_slot_of_each_source(make_ledger):
    ledger = make_ledger(4, 1)
    order = PublishOrder(sources=(("a", False), ("b", True)), ledger=ledger, indices=(3, 1))
    assert order.frame("a", 0, "x") == (Verdict.PUBLISH, 0)
    order.published("a", 0, detections=2)
    assert order.frame("b", 4, "y") == (Verdict.PUBLISH, 4)
    order.published("b", 4, detections=1)
    assert [ledger.published(i) for i in range(4)] == [-1, 4, -1, 0]
    assert ledger.published_totals() == (2, 3)
    order.eos_published("b")
    assert [ledger.eos_done(i) for i in range(4)] == [False, True, False, False]


def test_order_added_source_takes_its_slot_state_from_the_ledger(make_ledger):
    ledger = make_ledger(3, 1)
    order = PublishOrder(sources=(("a", False),), ledger=ledger)
    ledger.set_published(2, 9)  # a restarted postprocess stage re-announces a file source mid-stream
    order.add("x", False, 2)
    assert order.next_index("x") == 10 and not order.ended("x")
    assert order.frame("x", 9, None)[0] is Verdict.DUPLICATE
    assert order.frame("x", 11, "held")[0] is Verdict.HOLD
    assert order.frame("x", 10, "now") == (Verdict.PUBLISH, 0)

    ledger.set_published(1, 3)
    ledger.set_eos_done(1)
    order.add("y", True, 1)
    assert order.ended("y") and order.next_index("y") == 4
    assert order.frame("y", 20, None)[0] is Verdict.DUPLICATE
    assert not order.all_ended  # "a" and "x" still run


def test_order_source_added_to_a_reset_slot_starts_fresh(make_ledger):
    ledger = make_ledger(2, 1)
    order = PublishOrder(sources=(("old", False),), ledger=ledger)
    order.published("old", 0)
    order.published("old", 1)
    assert order.eos(EndOfStream("old", 2, EosReason.REMOVED)) == (True, 0)
    order.eos_published("old")
    order.forget("old")
    assert ledger.reset_source(0) == (2, 0)
    order.add("new", True, 0)  # the runner gave the freed slot to the next source
    assert order.index("new") == 0 and order.next_index("new") == 0 and not order.ended("new")
    assert order.frame("new", 0, None) == (Verdict.PUBLISH, 0)


def test_order_added_live_source_counts_lost_frames_and_non_strict_treats_files_as_live():
    order = PublishOrder(sources=(), strict=True)
    order.add("cam", True, 0)
    assert order.frame("cam", 3, None) == (Verdict.PUBLISH, 3)
    order.published("cam", 3)
    assert order.frame("cam", 2, None) == (Verdict.DUPLICATE, 0) and order.lost("cam") == 3
    loose = PublishOrder(sources=(), strict=False)
    loose.add("file", False, 0)
    assert loose.frame("file", 2, None) == (Verdict.PUBLISH, 2)


# ---------------------------------------------------------------------------------------------- LiveStats


@pytest.fixture
def control_stats() -> Iterator[LiveStats]:
    """LiveStats in a control API run (registry built, no HTTP server), a file source and a live one."""
    stats = LiveStats(config=StatsConfig(sources=(("clip", False), ("cam", True)), control=True))
    stats.open()
    yield stats
    stats.close()


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    """A settable monotonic clock for the stats module only."""
    c = _Clock(1000.0)
    monkeypatch.setattr(stats_mod, "time", SimpleNamespace(monotonic=c.monotonic, time=time.time))
    return c


def test_stats_registry_without_port_and_frames_metric(control_stats):
    assert control_stats.config.metrics_port is None
    assert control_stats._server is None  # control=True builds the registry only
    text = control_stats.metrics_text().decode()
    assert text and "# HELP streamdet_frames_total" in text
    control_stats.on_frame("cam", 40.0)
    control_stats.on_frame("cam", 60.0)
    text = control_stats.metrics_text().decode()
    assert 'streamdet_frames_total{source="cam"} 2.0' in text
    assert 'streamdet_latency_seconds_count{source="cam"} 2.0' in text


def test_stats_metrics_text_empty_without_registry():
    stats = LiveStats(config=StatsConfig(sources=(("cam", True),)))
    stats.open()
    try:
        assert stats.metrics_text() == b""
    finally:
        stats.close()


def test_stats_add_and_remove_source_with_its_metric_series(control_stats):
    control_stats.add_source("cam2", True)
    for sid in ("cam", "cam2"):
        control_stats.on_frame(sid, 10.0)
        control_stats.on_status(SourceStatusMsg(sid, SourceState.RECONNECTING, 1, 0.5, "", 0.0, 3))
        control_stats.on_lost(sid, 2)
    text = control_stats.metrics_text().decode()
    assert 'streamdet_frames_total{source="cam2"} 1.0' in text and 'source="cam2"' in text

    control_stats.remove_source("cam2")
    assert "cam2" not in control_stats.sources
    text = control_stats.metrics_text().decode()
    assert "cam2" not in text
    assert 'streamdet_frames_total{source="cam"} 1.0' in text  # the other source keeps its series
    assert "cam2" not in json.loads(control_stats.snapshot())

    control_stats.remove_source("cam2")  # twice, or never added: no error
    control_stats.remove_source("nobody")
    control_stats.add_source("quiet", True)
    control_stats.remove_source("quiet")  # no series yet

    control_stats.add_source("cam2", True)  # an id reused later starts from zero
    control_stats.on_frame("cam2", 10.0)
    assert 'streamdet_frames_total{source="cam2"} 1.0' in control_stats.metrics_text().decode()
    assert json.loads(control_stats.snapshot())["cam2"]["frames"] == 1


def test_stats_frames_of_unknown_sources_are_ignored(control_stats):
    control_stats.on_frame("ghost", 5.0)
    assert "ghost" not in control_stats.metrics_text().decode()
    assert "ghost" not in json.loads(control_stats.snapshot())


def test_stats_live_source_added_at_runtime_makes_stats_due():
    stats = LiveStats(config=StatsConfig(sources=(("clip", False),), interval_s=1.0, control=True))
    stats.open()
    try:
        later = time.monotonic() + 3600.0
        assert not stats.due(later)  # file sources only: no stats lines
        stats.add_source("clip2", False)
        assert not stats.due(later)
        stats.add_source("cam", True)
        assert stats.due(later)
        stats.remove_source("cam")
        assert not stats.due(later)
    finally:
        stats.close()


SNAPSHOT_RECENT_MS = [12.0, 3.5, 7.25, 40.0, 9.0, 11.0, 5.5, 100.0, 8.0, 6.0]


@pytest.mark.parametrize("offset_s,kept", [
    (0.9, slice(0, None)),  # at the last frame: every frame within the window
    (SNAPSHOT_WINDOW_S, slice(0, None)),  # the first frame exactly at the window's edge is kept
    (SNAPSHOT_WINDOW_S + 0.15, slice(2, None)),  # the first two fell out
    (SNAPSHOT_WINDOW_S + 0.85, slice(9, None)),  # only the last one is left
    (SNAPSHOT_WINDOW_S + 10.0, slice(0, 0)),  # nothing recent
], ids=["all", "edge-kept", "oldest-two-dropped", "one-left", "none"])
def test_stats_snapshot_window(clock, offset_s, kept):
    """Frames every 0.1 s from ``start``; the snapshot at ``start + offset_s`` (margins of 0.05 s)."""
    stats = LiveStats(config=StatsConfig(sources=(("cam", True), ("clip", False)), control=True))
    stats.open()
    try:
        start = clock.t
        clock.t = start - 10.0  # a frame long before: always outside the window
        stats.on_frame("clip", 999.0)
        for i, ms in enumerate(SNAPSHOT_RECENT_MS):
            clock.t = start + i * 0.1
            stats.on_frame("cam", ms)
        snap = json.loads(stats.snapshot(start + offset_s))
        cam = snap["cam"]
        recent = SNAPSHOT_RECENT_MS[kept]
        assert cam["frames"] == len(SNAPSHOT_RECENT_MS)  # totals are not windowed
        assert cam["fps"] == round(len(recent) / SNAPSHOT_WINDOW_S, 2)
        if recent:
            p50, p99 = np.percentile(np.asarray(recent), [50.0, 99.0])
            assert cam["latency_p50_ms"] == round(float(p50), 3)
            assert cam["latency_p99_ms"] == round(float(p99), 3)
        else:
            assert cam["latency_p50_ms"] is None and cam["latency_p99_ms"] is None
        assert len(stats.sources["cam"].recent) == len(recent)  # old entries dropped, not just skipped
        assert snap["clip"]["fps"] == 0.0 and snap["clip"]["latency_p50_ms"] is None
        assert snap["clip"]["frames"] == 1 and snap["clip"]["state"] == "file"
        assert cam["state"] is None  # live, no status yet
    finally:
        stats.close()


def test_stats_snapshot_drops_old_entries_for_good(clock, control_stats):
    control_stats.on_frame("cam", 1.0)
    clock.t += SNAPSHOT_WINDOW_S + 1.0
    assert json.loads(control_stats.snapshot())["cam"]["fps"] == 0.0
    assert len(control_stats.sources["cam"].recent) == 0
    clock.t -= SNAPSHOT_WINDOW_S + 1.0  # even looking back later: it is gone
    assert json.loads(control_stats.snapshot())["cam"]["latency_p50_ms"] is None


def test_stats_snapshot_state_and_counters(control_stats):
    control_stats.on_status(SourceStatusMsg("cam", SourceState.CONNECTED, 0, 0.0, "", 0.0, 4, publish=True))
    control_stats.on_lost("cam", 3)
    cam = json.loads(control_stats.snapshot())["cam"]
    assert (cam["state"], cam["dropped"], cam["lost"]) == ("connected", 4, 3)
    assert set(cam) == {"state", "fps", "frames", "dropped", "skipped", "received", "reconnects", "lost",
                        "latency_p50_ms", "latency_p99_ms"}


# ---------------------------------------------------------------------------------------------- PreviewHub


def test_preview_hub_latest_after_sequence():
    hub = PreviewHub()
    assert hub.latest("cam") is None
    hub.put("cam", b"one")
    assert hub.latest("cam") == (1, b"one")
    assert hub.latest("cam", after=1) is None
    hub.put("cam", b"two")
    hub.put("other", b"x")
    assert hub.latest("cam", after=1) == (2, b"two")
    assert hub.latest("cam", after=2) is None
    assert hub.latest("other") == (1, b"x")
    assert hub.received == 3
    hub.forget("cam")
    assert hub.latest("cam") is None and hub.latest("other") == (1, b"x")
    hub.forget("cam")  # twice: no error
    hub.put("cam", b"again")  # a source that comes back starts its sequence again
    assert hub.latest("cam") == (1, b"again")


def test_preview_hub_watching_counts_nested_viewers():
    hub = PreviewHub()
    assert hub.viewers("cam") == 0
    with hub.watching("cam"):
        assert hub.viewers("cam") == 1
        with hub.watching("cam"), hub.watching("other"):
            assert (hub.viewers("cam"), hub.viewers("other")) == (2, 1)
        assert (hub.viewers("cam"), hub.viewers("other")) == (1, 0)
    assert hub.viewers("cam") == 0


def test_preview_hub_watching_released_on_exception():
    hub = PreviewHub()
    with pytest.raises(RuntimeError, match="viewer gone"):
        with hub.watching("cam"):
            assert hub.viewers("cam") == 1
            raise RuntimeError("viewer gone")
    assert hub.viewers("cam") == 0


def test_preview_hub_close():
    hub = PreviewHub()
    hub.put("cam", b"x")
    assert not hub.closed
    hub.close()
    assert hub.closed
    hub.close()
    assert hub.closed and hub.latest("cam") == (1, b"x")


# ---------------------------------------------------------------------------------------------- plane


@pytest.mark.parametrize("started,missing,restarting,stopping,expected", [
    (True, [], [], False, None),
    (True, ["engine"], [], False, None),  # missing only matters before the start
    (False, [], [], False, "stages not ready yet: starting"),
    (False, ["engine"], [], False, "stages not ready yet: engine"),
    (False, ["preprocess", "engine"], [], False, "stages not ready yet: preprocess, engine"),
    (True, [], ["engine"], False, "restarting: engine"),
    (True, [], ["engine", "decode:cam"], False, "restarting: engine, decode:cam"),
    (False, ["engine"], ["engine"], False, "stages not ready yet: engine"),
    (True, [], ["engine"], True, "the pipeline is stopping"),
    (False, ["engine"], [], True, "the pipeline is stopping"),
], ids=["ready", "ready-missing-ignored", "starting", "one-missing", "two-missing", "restarting",
        "two-restarting", "not-started-wins-over-restarting", "stopping-wins", "stopping-before-start"])
def test_readiness(started, missing, restarting, stopping, expected):
    assert readiness(started=started, missing=missing, restarting=restarting, stopping=stopping) == expected


def test_control_error_carries_status_and_reason():
    e = ControlError(409, "id 'x' is already in use")
    assert isinstance(e, Exception)
    assert (e.status, e.reason, str(e)) == (409, "id 'x' is already in use", "id 'x' is already in use")


@pytest.fixture
def real_plane(make_ledger, monkeypatch) -> Iterator[ControlPlane]:
    """A :class:`ControlPlane` following a run of one camera ``cam`` (no stage runs; the test steps it as the runner).

    Commands time out after 2 s (not 10) so that a request nobody takes fails fast.
    """
    monkeypatch.setattr(plane_mod, "COMMAND_TIMEOUT_S", 2.0)
    cam = SourceInfo(source_id="cam", url="rtsp://cam/x", is_file=False, frame_hw=(0, 0), fps=0.0, frames=0)
    chain = SimpleNamespace(source_ids=("cam",), card=SimpleNamespace(name="detector"),
                            model=SimpleNamespace(path=Path("det.onnx")))
    ctx = zmq.Context()
    plane = ControlPlane(
        settings=SimpleNamespace(decode=SimpleNamespace(hwaccel_options=lambda: None)),  # type: ignore[arg-type]
        prepared=SimpleNamespace(sources=[cam], chains=[chain]),  # type: ignore[arg-type]
        endpoints=SimpleNamespace(live=f"inproc://live-{uuid.uuid4().hex}",  # type: ignore[arg-type]
                                  frame_credits=(("sd-test-pool", "ipc:///nowhere"),)),
        run_dir="/nowhere", token="t", ledger=make_ledger(2, 1), ctx=ctx, events=None,
        spawn=lambda spec, label: pytest.fail("no source should start"), forget_child=lambda child: None,
        pool_names=set())
    summary = RunSummary(model="detector", sources=[])
    postprocess = SimpleNamespace(label="postprocess", stage=StageName.POSTPROCESS, spec=None)
    plane.attach(summary=summary, book=StatusBook(summary, threading.Event()), children=[postprocess])  # type: ignore[list-item]
    yield plane
    plane.close()
    ctx.term()


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a thread (an HTTP request); the dict gets its ``result`` or ``error``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except ControlError as e:
            out["error"] = (e.status, e.reason)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


CLOSED_PLANE_REQUESTS = [
    ("add", lambda plane: plane.add_source(url="rtsp://cam2/x", source_id="cam2")),
    ("add-default-id", lambda plane: plane.add_source(url="rtsp://cam2/x")),
    ("remove", lambda plane: plane.remove_source("cam")),
]


@pytest.mark.parametrize("request_", [c[1] for c in CLOSED_PLANE_REQUESTS], ids=[c[0] for c in CLOSED_PLANE_REQUESTS])
def test_plane_refuses_requests_once_closed(real_plane, request_):
    real_plane.close()  # the run stops: the runner no longer steps the plane
    t0 = time.monotonic()
    with pytest.raises(ControlError) as e:
        request_(real_plane)
    assert (e.value.status, e.value.reason) == (503, "the pipeline is stopping")
    assert time.monotonic() - t0 < 1.0  # at once, not after a wait that outlives the server's graceful shutdown
    assert real_plane.is_running("cam") and not real_plane.is_running("cam2")


def test_plane_delete_waiting_for_its_source_when_the_run_stops_is_503(real_plane):
    thread, out = _in_thread(lambda: real_plane.remove_source("cam"))

    def removing() -> bool:  # the runner takes the command: the decoder is asked to stop
        real_plane.step()
        return real_plane.source("cam")["state"] == "removing"

    assert _wait_for(removing)
    assert real_plane.ledger.stop_requested(0)
    real_plane.close()  # SIGTERM before the source's EOS was published
    thread.join(5)
    assert out == {"error": (503, "the pipeline is stopping")}


def test_plane_request_queued_before_close_is_503(real_plane):
    thread, out = _in_thread(lambda: real_plane.add_source(url="rtsp://cam2/x", source_id="cam2"))
    time.sleep(0.3)  # (queued: nobody steps the plane)
    real_plane.close()
    thread.join(5)
    assert out == {"error": (503, "the pipeline is stopping")}


LONG_NAME = "/tmp/" + "y" * 256 + ".mp4"
PLANE_URLS = [
    # (id, url, status, error): what POST /sources answers for a url (the start-up check's line for files)
    ("blank", "   ", 422, "url '   ': expected a file path or a URL"),
    ("url-with-space", "rtsp://cam one/x", 422, "url 'rtsp://cam one/x': malformed (expected a URL without spaces)"),
    ("url-with-tab", "rtsp://cam/x\ty", 422, "url 'rtsp://cam/x\\ty': malformed (expected a URL without spaces)"),
    ("url-leading-space", " rtsp://cam/x", 422, "url ' rtsp://cam/x': malformed (expected a URL without spaces)"),
    ("password-with-space", "rtsp://admin:pa ss@10.0.0.5/stream", 422,
     "url 'rtsp://***@10.0.0.5/stream': malformed (expected a URL without spaces)"),
    ("no-host", "rtsp://", 422, "url 'rtsp://': malformed (expected SCHEME://HOST[:PORT]/...)"),
    ("path-with-spaces-missing", "/no/such dir/cam 1.mp4", 422, "/no/such dir/cam 1.mp4: no such file"),
    ("name-too-long", LONG_NAME, 422, LONG_NAME[:200] + "…: not a readable path (File name too long)"),
    ("path-too-long", "/tmp/" + "d/" * 3000 + "x.mp4", 422,
     ("/tmp/" + "d/" * 3000)[:200] + "…: not a readable path (File name too long)"),
    ("not-a-video", str(ROOT / "pyproject.toml"), 422, f"{ROOT / 'pyproject.toml'}: no video stream"),
]


@pytest.mark.parametrize(("url", "status", "error"), [c[1:] for c in PLANE_URLS], ids=[c[0] for c in PLANE_URLS])
def test_plane_add_source_checks_the_url(real_plane, url, status, error):
    with pytest.raises(ControlError) as e:
        real_plane.add_source(url=url, source_id="new")
    assert (e.value.status, e.value.reason) == (status, error)
    assert [s["id"] for s in real_plane.list_sources()] == ["cam"]


@pytest.mark.parametrize("name", ["cam 1.mp4", " lead.mp4", "trail .mp4", "tab\there.mp4"],
                         ids=["inner-space", "leading-space", "trailing-space", "tab"])
def test_plane_add_source_takes_a_file_path_with_spaces(real_plane, tmp_path, name):
    """As ``--source`` at start-up: the probe passes and the source goes to the runner (here: stopping)."""
    path = tmp_path / name
    shutil.copyfile(DEMO, path)
    real_plane.close()  # nobody would start it: the answer shows the request got past every check
    with pytest.raises(ControlError) as e:
        real_plane.add_source(url=str(path), source_id="spaced")
    assert (e.value.status, e.value.reason) == (503, "the pipeline is stopping")
    assert probe_source(str(path), "spaced").frame_hw == (720, 1280)


@pytest.mark.parametrize("url,error", [
    (LONG_NAME, LONG_NAME[:200] + "…: not a readable path (File name too long)"),
    ("/tmp/a\x00b.mp4", "/tmp/a\\0b.mp4: not a readable path (embedded null byte)"),
], ids=["name-too-long", "nul-byte"])
def test_probe_path_check_is_one_error(url, error):
    """The start-up check (``--source``) that ``POST /sources`` shares: a SourceError, never an OSError."""
    with pytest.raises(SourceError) as e:
        probe_source(url, "x")
    assert str(e.value) == error


# ---------------------------------------------------------------------------------------------- app


def _view(source_id: str, **over: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"id": source_id, "url": f"rtsp://***@cam/{source_id}", "kind": "live", "state": "running",
                         "model": "detector", "fps": 12.5, "dropped": 1, "latency_p50_ms": 20.0,
                         "latency_p99_ms": 35.5, "frames": 42, "restarts": 0, "reason": None, "error": None}
    v.update(over)
    return v


class FakePlane:
    """What the app calls on a :class:`~pipeline.control.plane.ControlPlane`, scripted."""

    def __init__(self) -> None:
        self.preview = PreviewHub()
        self.ready: str | None = None
        self.sources: dict[str, dict[str, Any]] = {"cam": _view("cam")}
        self.add_calls: list[dict[str, Any]] = []
        self.remove_calls: list[str] = []
        self.add_error: ControlError | None = None
        self.remove_error: ControlError | None = None

    def readiness(self) -> str | None:
        return self.ready

    def metrics(self) -> bytes:
        return b'# TYPE streamdet_frames_total counter\nstreamdet_frames_total{source="cam"} 42.0\n'

    def list_sources(self) -> list[dict[str, Any]]:
        return list(self.sources.values())

    def source(self, source_id: str) -> dict[str, Any] | None:
        return self.sources.get(source_id)

    def add_source(self, *, url: str, source_id: str | None = None, max_fps: float | None = None,
                   model: str | None = None) -> dict[str, Any]:
        self.add_calls.append({"url": url, "source_id": source_id, "max_fps": max_fps, "model": model})
        if self.add_error is not None:
            raise self.add_error
        v = _view(source_id or "auto", url=url)
        self.sources[v["id"]] = v
        return v

    def remove_source(self, source_id: str) -> None:
        self.remove_calls.append(source_id)
        if self.remove_error is not None:
            raise self.remove_error

    def is_running(self, source_id: str) -> bool:
        return source_id in self.sources


@pytest.fixture
def plane() -> FakePlane:
    return FakePlane()


@pytest.fixture
def client(plane) -> Iterator[TestClient]:
    """The app with a token, over the fake plane."""
    with TestClient(create_app(plane, token=TOKEN)) as c:  # type: ignore[arg-type]
        yield c


@pytest.fixture
def open_client(plane) -> Iterator[TestClient]:
    """The app without a token."""
    with TestClient(create_app(plane)) as c:  # type: ignore[arg-type]
        yield c


def _one_line_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert body["error"] and "\n" not in body["error"]
    return body["error"]


WRONG_AUTH = {
    "no-header": {}, "wrong-token": {"Authorization": "Bearer wrong"},
    "basic-scheme": {"Authorization": f"Basic {TOKEN}"}, "empty-bearer": {"Authorization": "Bearer "},
    "no-scheme": {"Authorization": TOKEN},
    "token-in-query-only": {},  # only the preview streams take ?token=
}


@pytest.mark.parametrize("method,path", [
    ("GET", "/sources"), ("GET", "/sources/cam"), ("GET", "/metrics"), ("DELETE", "/sources/cam"),
    ("POST", "/sources"),
], ids=["list", "get", "metrics", "delete", "post"])
def test_app_token_required(client, plane, method, path):
    for case, headers in WRONG_AUTH.items():
        url = f"{path}?token={TOKEN}" if case == "token-in-query-only" else path
        r = client.request(method, url, headers=headers, json={"url": "rtsp://cam2/x"} if method == "POST" else None)
        assert r.status_code == 401, case
        assert r.headers["www-authenticate"] == "Bearer", case
        assert "token" in _one_line_error(r), case
    assert plane.add_calls == [] and plane.remove_calls == []


def test_app_mjpeg_token_required(client):
    for case, headers in WRONG_AUTH.items():
        if case == "token-in-query-only":
            continue
        r = client.get("/sources/cam/preview.mjpg", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", case
        _one_line_error(r)


@pytest.mark.parametrize("headers", [
    AUTH, {"Authorization": f"bearer {TOKEN}"}, {"Authorization": f"Bearer  {TOKEN} "},
], ids=["exact", "lowercase-scheme", "extra-spaces"])
def test_app_right_token(client, plane, headers):
    r = client.get("/sources", headers=headers)
    assert r.status_code == 200
    assert r.json() == [plane.sources["cam"]]
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200 and 'streamdet_frames_total{source="cam"} 42.0' in r.text
    assert r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/openapi.json", "/docs"])
def test_app_open_endpoints_need_no_token(client, path):
    assert client.get(path).status_code == 200


def test_app_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("reason", [None, "stages not ready yet: engine", "restarting: postprocess"],
                         ids=["ready", "starting", "restarting"])
def test_app_readyz(client, plane, reason):
    plane.ready = reason
    r = client.get("/readyz")
    if reason is None:
        assert (r.status_code, r.json()) == (200, {"ready": True})
    else:
        assert (r.status_code, r.json()) == (503, {"ready": False, "reason": reason})


def test_app_without_token_is_open(open_client):
    assert open_client.get("/sources").status_code == 200
    assert open_client.get("/metrics").status_code == 200


JSON_HEADERS = {**AUTH, "Content-Type": "application/json"}


@pytest.mark.parametrize("kwargs,status,error", [
    ({"content": b"{url:"}, 400, "body is not valid JSON"),
    ({"content": b'{"url": "a.mp4"'}, 400, "body is not valid JSON"),
    ({"json": ["rtsp://cam2/x"]}, 400, None),
    ({"json": "rtsp://cam2/x"}, 400, None),
    ({"json": 3}, 400, None),
    ({"json": {}}, 422, "url"),
    ({"json": {"id": "cam2"}}, 422, "url"),
    ({"json": {"url": ""}}, 422, "url"),
    ({"json": {"url": 5}}, 422, "url"),
    ({"json": {"url": "rtsp://cam2/x", "fps": 5}}, 422, "'fps'"),
    ({"json": {"url": "rtsp://cam2/x", "max_fps": -1}}, 422, "max_fps"),
    ({"json": {"url": "rtsp://cam2/x", "max_fps": 0}}, 422, "max_fps"),
    ({"json": {"url": "rtsp://cam2/x", "max_fps": "fast"}}, 422, "max_fps"),
    ({"content": b""}, 422, None),
], ids=["not-json", "truncated-json", "json-array", "json-string", "json-number", "empty-object", "missing-url",
        "empty-url", "url-not-string", "unknown-field", "negative-max-fps", "zero-max-fps", "max-fps-not-number",
        "empty-body"])
def test_app_post_bad_bodies(client, plane, kwargs, status, error):
    r = client.post("/sources", headers=JSON_HEADERS, **kwargs)
    assert r.status_code == status, r.text
    line = _one_line_error(r)
    if error is not None:
        assert error in line
    assert plane.add_calls == []


def _body_of(size: int) -> bytes:
    """A JSON body of exactly ``size`` bytes (a valid request, its URL padded)."""
    head, tail = b'{"url": "rtsp://cam2/x?', b'", "id": "cam2"}'
    return head + b"p" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("size,chunked,status", [
    (MAX_BODY_BYTES, False, 201),
    (MAX_BODY_BYTES + 1, False, 413),
    (10 * MAX_BODY_BYTES, False, 413),
    (MAX_BODY_BYTES, True, 201),
    (MAX_BODY_BYTES + 1, True, 413),
], ids=["at-limit", "one-over", "ten-times", "chunked-at-limit", "chunked-one-over"])
def test_app_post_body_size_limit(client, plane, size, chunked, status):
    body = _body_of(size)
    content: Any = iter([body[:1000], body[1000:]]) if chunked else body
    r = client.post("/sources", headers=JSON_HEADERS, content=content)
    assert r.status_code == status, r.text[:200]
    if status == 413:
        assert _one_line_error(r) == "body is larger than 64 KiB"
        assert plane.add_calls == []
    else:
        assert [c["source_id"] for c in plane.add_calls] == ["cam2"]


def test_app_post_unknown_field_names_the_field(client):
    line = _one_line_error(client.post("/sources", headers=AUTH, json={"url": "rtsp://cam2/x", "colour": "red"}))
    assert line.startswith("unknown field 'colour'")


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"],
                         ids=["none", "form", "text"])
def test_app_post_json_body_whatever_its_content_type(client, plane, content_type):
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    r = client.post("/sources", headers=headers, content=b'{"url": "rtsp://cam2/x", "id": "cam2"}')
    assert r.status_code == 201, r.text  # curl -d sends a form content type
    assert plane.add_calls[-1]["source_id"] == "cam2"


def test_app_post_ok(client, plane):
    r = client.post("/sources", headers=AUTH, json={"url": "rtsp://cam2/x", "id": "cam2", "max_fps": 5,
                                                   "model": "detector"})
    assert r.status_code == 201
    assert r.json() == plane.sources["cam2"] == _view("cam2", url="rtsp://cam2/x")
    assert plane.add_calls == [{"url": "rtsp://cam2/x", "source_id": "cam2", "max_fps": 5.0, "model": "detector"}]


def test_app_post_defaults(client, plane):
    assert client.post("/sources", headers=AUTH, json={"url": "clip.mp4"}).status_code == 201
    assert plane.add_calls == [{"url": "clip.mp4", "source_id": None, "max_fps": None, "model": None}]


@pytest.mark.parametrize("status,reason", [
    (409, "id 'x' is already in use"),
    (409, "no room for source x: 4 sources run (control.max_sources=4)"),
    (422, "model 'nope' is not loaded (loaded: detector (det.onnx))"),
    (503, "the pipeline is stopping"),
], ids=["id-in-use", "no-room", "unknown-model", "stopping"])
def test_app_post_refused(client, plane, status, reason):
    plane.add_error = ControlError(status, reason)
    r = client.post("/sources", headers=AUTH, json={"url": "rtsp://cam2/x", "id": "x"})
    assert (r.status_code, r.json()) == (status, {"error": reason})
    assert len(plane.add_calls) == 1


def test_app_delete(client, plane):
    r = client.delete("/sources/cam", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert plane.remove_calls == ["cam"]


def test_app_delete_refused(client, plane):
    plane.remove_error = ControlError(404, "no running source 'gone'")
    r = client.delete("/sources/gone", headers=AUTH)
    assert (r.status_code, r.json()) == (404, {"error": "no running source 'gone'"})


def test_app_get_one_source(client):
    assert client.get("/sources/cam", headers=AUTH).json()["id"] == "cam"
    r = client.get("/sources/nope", headers=AUTH)
    assert r.status_code == 404 and "nope" in _one_line_error(r)


def test_app_unknown_route_is_a_json_error(client):
    r = client.get("/nowhere", headers=AUTH)
    assert r.status_code == 404
    _one_line_error(r)


def test_app_index_page(client):
    r = client.get("/")
    assert r.status_code == 200
    assert "streamdet" in r.text and r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-store"


def test_app_openapi_lists_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sources", "/sources/{source_id}", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert {"get", "post"} <= set(paths["/sources"])


def _ws_refusal(client: TestClient, path: str, headers: dict[str, str]) -> int:
    """The close code of a refused preview WebSocket, whether it is closed before or right after the accept."""
    with pytest.raises(WebSocketDisconnect) as e:
        with client.websocket_connect(path, headers=headers) as ws:
            ws.receive_bytes()  # no frame ever comes: the close
    return e.value.code


@pytest.mark.parametrize("path,headers", [
    ("/sources/cam/preview", {}),
    ("/sources/cam/preview", {"Authorization": "Bearer wrong"}),
    ("/sources/cam/preview?token=wrong", {}),
    ("/sources/cam/preview?token=", {}),
], ids=["no-token", "wrong-header", "wrong-query", "empty-query"])
def test_app_preview_ws_wants_the_token(client, plane, path, headers):
    plane.preview.put("cam", b"jpeg")
    assert _ws_refusal(client, path, headers) == 4401
    assert plane.preview.viewers("cam") == 0


def test_app_preview_ws_unknown_source(client, plane):
    assert _ws_refusal(client, "/sources/nope/preview", AUTH) == 4404


@pytest.mark.parametrize("path,headers", [
    ("/sources/cam/preview", AUTH),
    (f"/sources/cam/preview?token={TOKEN}", {}),
], ids=["header", "query"])
def test_app_preview_ws_streams_frames_and_counts_the_viewer(client, plane, path, headers):
    hub = plane.preview
    hub.put("cam", b"\xff\xd8old")
    hub.put("cam", b"\xff\xd8first\xff\xd9")
    with client.websocket_connect(path, headers=headers) as ws:
        assert ws.receive_bytes() == b"\xff\xd8first\xff\xd9"  # the newest frame, never an older one
        assert hub.viewers("cam") == 1
        hub.put("cam", b"\xff\xd8second\xff\xd9")
        assert ws.receive_bytes() == b"\xff\xd8second\xff\xd9"
        assert hub.viewers("cam") == 1
    assert _wait_for(lambda: hub.viewers("cam") == 0), f"viewer still counted: {hub.viewers('cam')}"


def test_app_preview_ws_ends_when_the_source_ends(client, plane):
    hub = plane.preview
    hub.put("cam", b"last")
    with client.websocket_connect("/sources/cam/preview", headers=AUTH) as ws:
        assert ws.receive_bytes() == b"last"
        del plane.sources["cam"]  # the source ended: no newer frame will come
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_bytes()
        assert e.value.code == 1000
    assert _wait_for(lambda: hub.viewers("cam") == 0)


def test_app_mjpeg_unknown_source(client):
    r = client.get("/sources/nope/preview.mjpg", headers=AUTH)
    assert r.status_code == 404 and "nope" in _one_line_error(r)


# ---------------------------------------------------------------------------------------------- ctl


def test_ctl_format_table():
    rows = ctl.format_table([
        _view("cam1", fps=12.345, latency_p50_ms=None, latency_p99_ms=3.26, dropped=0, frames=10),
        {"id": "clip-with-a-long-id", "kind": "file", "state": "starting", "fps": None, "frames": 0},
    ])
    assert len(rows) == 3
    header = rows[0]
    assert header.split() == list(ctl._COLUMNS)
    starts = [header.index(c) for c in ctl._COLUMNS]
    expected = [
        ["cam1", "live", "running", "detector", "12.3", "10", "0", "-", "3.3", "0", "rtsp://***@cam/cam1"],
        ["clip-with-a-long-id", "file", "starting", "-", "-", "0", "-", "-", "-", "-", "-"],
    ]
    for row, values in zip(rows[1:], expected, strict=True):
        assert row.split() == values
        assert [row[s:].split()[0] for s in starts] == values  # every value starts under its header
    assert all(r == r.rstrip() for r in rows)


def test_ctl_format_table_empty():
    assert ctl.format_table([]) == ["  ".join(ctl._COLUMNS)]


@pytest.mark.parametrize("argv", [
    ["list"], ["list", "--json"], ["add", "rtsp://cam2/x", "--id", "cam2"], ["remove", "cam"], ["health"],
], ids=["list", "list-json", "add", "remove", "health"])
def test_ctl_unreachable(capsys, monkeypatch, argv):
    monkeypatch.delenv(ctl.TOKEN_ENV, raising=False)
    assert ctl.main(["--url", "http://127.0.0.1:1", *argv]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot reach the control API" in lines[0]
    assert out == ""


@pytest.fixture
def ctl_to_app(monkeypatch, client) -> TestClient:
    """Route ``pipeline.ctl``'s HTTP requests to the in-process app (no socket)."""

    def request(method: str, url: str, *, json: Any = None, headers: Any = None, timeout: Any = None) -> Any:
        path = url.removeprefix("http://ctl.test")
        return client.request(method, path, json=json, headers=headers)

    monkeypatch.setattr(httpx, "request", request)
    monkeypatch.delenv(ctl.TOKEN_ENV, raising=False)
    return client


def test_ctl_against_the_app(ctl_to_app, plane, capsys):
    base = ["--url", "http://ctl.test", "--token", TOKEN]
    assert ctl.main([*base, "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == list(ctl._COLUMNS) and out[1].split()[0] == "cam"

    assert ctl.main([*base, "add", "rtsp://cam2/x", "--id", "cam2", "--max-fps", "5"]) == 0
    assert capsys.readouterr().out == "added cam2 (live, model detector): rtsp://cam2/x\n"
    assert plane.add_calls[-1] == {"url": "rtsp://cam2/x", "source_id": "cam2", "max_fps": 5.0, "model": None}

    plane.add_error = ControlError(409, "id 'cam2' is already in use")
    assert ctl.main([*base, "add", "rtsp://cam2/x", "--id", "cam2"]) == 1
    assert capsys.readouterr().err == "error: POST /sources: 409 id 'cam2' is already in use\n"

    assert ctl.main([*base, "remove", "cam"]) == 0
    assert capsys.readouterr().out == "removed cam\n"

    plane.ready = "restarting: engine"
    assert ctl.main([*base, "health"]) == 1
    assert capsys.readouterr().out == "alive, not ready (GET /readyz: 503 restarting: engine)\n"


def test_ctl_wrong_token(ctl_to_app, capsys):
    assert ctl.main(["--url", "http://ctl.test", "--token", "wrong", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: GET /sources: 401 ") and err.count("\n") == 1


# ---------------------------------------------------------------- cross-site requests
CROSS_SITE = [
    ("foreign-origin", "127.0.0.1:8090", "https://evil.example", 403),
    ("null-origin", "127.0.0.1:8090", "null", 403),
    ("rebound-host", "attacker.example:8090", "", 403),
    ("same-origin", "127.0.0.1:8090", "http://127.0.0.1:8090", 201),
    ("no-origin", "localhost:8090", "", 201),
]


@pytest.mark.parametrize(("host", "origin", "status"), [c[1:] for c in CROSS_SITE], ids=[c[0] for c in CROSS_SITE])
def test_app_refuses_cross_site_posts(plane, host, origin, status):
    with TestClient(create_app(plane, host="127.0.0.1")) as c:  # type: ignore[arg-type]
        headers = {"Host": host, "Content-Type": "text/plain", **({"Origin": origin} if origin else {})}
        r = c.post("/sources", content=b'{"url": "rtsp://cam2/x", "id": "cam2"}', headers=headers)
    assert r.status_code == status, r.text
    assert (plane.add_calls != []) == (status == 201)
    if status == 403:
        assert "refused" in r.json()["error"]


def test_app_any_host_when_listening_beyond_loopback(plane):
    with TestClient(create_app(plane, host="0.0.0.0")) as c:  # type: ignore[arg-type]
        assert c.get("/healthz", headers={"Host": "camera-box.lan:8090"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "camera-box.lan:8090", "Origin": "http://evil.example"}
                     ).status_code == 403


def test_app_refuses_cross_origin_websockets(plane):
    """Accepted, then closed with 4403 (uvicorn answers a close before the accept with HTTP 403: test_preview_ws.py)."""
    plane.preview.put("cam", b"\xff\xd8jpeg")
    with TestClient(create_app(plane, host="127.0.0.1")) as c:  # type: ignore[arg-type]
        headers = {"Host": "127.0.0.1:8090", "Origin": "https://evil.example"}
        with c.websocket_connect("/sources/cam/preview", headers=headers) as ws:  # (the accept)
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_bytes()
    assert info.value.code == 4403 and info.value.reason == "cross-origin request from 'https://evil.example' refused"
    assert plane.preview.viewers("cam") == 0


CLOSE_REASONS = [  # (template, value, expected) ; "…" marks a cut, the reason's UTF-8 is at most 123 bytes
    ("no running source {}", "a" * 105, "no running source " + "a" * 105),
    ("no running source {}", "a" * 106, "no running source " + "a" * 102 + "…"),
    ("no running source {}", "é" * 60, "no running source " + "é" * 51 + "…"),
    ("no running source {}", "🎥" * 40, "no running source " + "🎥" * 25 + "…"),
    ("no running source {}", "\udcff" * 200, "no running source " + "?" * 102 + "…"),  # (not UTF-8: replaced)
    ("cross-origin request from {!r} refused", "https://" + "e" * 200, "cross-origin request from 'https://"
     + "e" * 76 + "…' refused"),
    ("no running source {}", "", "no running source "),
]


@pytest.mark.parametrize(("template", "value", "expected"), CLOSE_REASONS)
def test_close_reason_fits_a_close_frame(template, value, expected):
    reason = close_reason(template, value)
    assert reason == expected
    assert len(reason.encode()) <= MAX_CLOSE_REASON_BYTES
