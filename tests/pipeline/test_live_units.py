"""Live-source building blocks without a server: URLs, backoff, mailbox, status messages, stats, settings."""

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import SettingsError, SourceEntry, load_settings
from pipeline.sources.live_reader import LiveFrame, Mailbox
from pipeline.sources.options import LiveOptions, reconnect_delay
from pipeline.sources.probe import SourceError, check_live_url, probe_source
from pipeline.stages.sinks import status_payload
from pipeline.stages.stats import LiveStats, StatsConfig, percentiles_ms
from streamdet.messages import SourceState, SourceStatusMsg, decode_message


@pytest.mark.parametrize("url,ok", [
    ("rtsp://127.0.0.1:8554/cam", True),
    ("rtsp://user:pw@cam.local/stream1", True),
    ("rtsps://cam:322/x", True),
    ("rtsp://", False),
    ("rtsp://:554/x", False),
    ("rtsp://host:99999/x", False),
    ("rtsp://host:port/x", False),
    ("foo://host/x", False),
    ("rtsp://ho st/x", False),
])
def test_check_live_url(url, ok):
    if ok:
        check_live_url(url)
    else:
        with pytest.raises(SourceError, match="malformed URL"):
            check_live_url(url)


def test_malformed_url_error_redacts_credentials():
    with pytest.raises(SourceError) as e:
        probe_source("rtsp://bob:s3cret@host:99999/x", "cam")
    assert "s3cret" not in str(e.value) and "rtsp://***@host" in str(e.value)


def test_live_probe_does_not_connect():
    info = probe_source("rtsp://127.0.0.1:1/unreachable", "cam", max_fps=5.0)
    assert info.is_live and info.frame_hw == (0, 0) and info.max_fps == 5.0


def test_reconnect_delay_grows_and_caps():
    rng = random.Random(0)
    for _ in range(200):
        d = [reconnect_delay(a, initial_s=0.5, max_s=8.0, rng=rng) for a in range(1, 9)]
        assert all(b > a for a, b in zip(d[:4], d[1:5], strict=True))  # doubling beats +-25 % jitter
        assert all(0.375 <= x <= 10.0 for x in d)
        assert 6.0 <= d[-1] <= 10.0
    with pytest.raises(ValueError, match="attempt"):
        reconnect_delay(0, initial_s=1, max_s=2)


def test_live_options():
    o = LiveOptions(read_timeout_s=2.5)
    assert o.av_options("rtsp://h/x") == {"rtsp_transport": "tcp", "timeout": "2500000"}
    assert o.av_options("http://h/x") == {}
    with pytest.raises(ValueError, match="stall_timeout_s"):
        LiveOptions(stall_timeout_s=0)


def test_mailbox_keeps_newest_and_counts_drops():
    box = Mailbox()
    assert box.take(0.0) is None
    for i in range(5):
        box.put(LiveFrame(frame=i, pts_s=i / 25, capture_mono=float(i), decode_ms=0.0))
    item = box.take(0.0)
    assert item is not None and item.frame == 4 and box.dropped == 4 and box.empty


def test_source_status_roundtrip_and_payload():
    m = SourceStatusMsg("cam1", SourceState.RECONNECTING, 3, 1.25, "rtsp://u:p@h/x: cannot connect", 1.7e9, 7)
    back = decode_message(m.encode())
    assert back == m
    p = status_payload(back)
    assert p == {"schema": "streamdet.status/1", "source_id": "cam1", "state": "reconnecting", "attempt": 3,
                 "next_delay_s": 1.25, "message": "rtsp://***@h/x: cannot connect", "time": 1.7e9, "dropped": 7}
    with pytest.raises(ValueError, match="attempt"):
        SourceStatusMsg("cam1", SourceState.CONNECTED, -1)
    with pytest.raises(ValueError):
        SourceStatusMsg("cam.1", SourceState.CONNECTED)


def test_stats_percentiles_and_report():
    assert percentiles_ms([]) != percentiles_ms([])  # NaN
    st = LiveStats(config=StatsConfig(sources=(("cam", True), ("file", False)), interval_s=1.0))
    lat = list(range(1, 101))
    for x in lat:
        st.on_frame("cam", float(x))
    st.on_status(SourceStatusMsg("cam", SourceState.CONNECTED, dropped=3, received=110))
    line, payload = st.report(now=st._last + 2.0)
    cam = payload["sources"]["cam"]
    import numpy as np

    assert cam["latency_p50_ms"] == pytest.approx(np.percentile(lat, 50))
    assert cam["latency_p99_ms"] == pytest.approx(np.percentile(lat, 99))
    assert cam["fps"] == pytest.approx(50.0) and cam["dropped"] == 3 and cam["state"] == "connected"
    assert payload["sources"]["file"]["latency_p50_ms"] is None
    assert "cam: connected 50.0 fps drops=3 p50=50ms p99=99ms" in line
    _, again = st.report(now=st._last + 1.0)
    assert again["sources"]["cam"]["fps"] == 0.0  # a new interval


def test_settings_source_entries(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources:\n  - {id: cam1, url: 'rtsp://h/x', max_fps: 10}\n  - b.mp4\n"
                   "decode: {rtsp_transport: udp, reconnect_max_attempts: 3}\n")
    s = load_settings(config_file=cfg)
    assert s.source_entries() == [SourceEntry(url="rtsp://h/x", id="cam1", max_fps=10.0), SourceEntry(url="b.mp4")]
    assert s.decode.live_options().rtsp_transport.value == "udp"
    bad = tmp_path / "d.yaml"
    bad.write_text("sources:\n  - {id: a, url: x}\n  - {id: a, url: y}\n")
    with pytest.raises(SettingsError, match="unique source ids"):
        load_settings(config_file=bad)
    with pytest.raises(SettingsError, match="id"):
        load_settings(overrides={"sources": [{"id": "a.b", "url": "x"}]})


def test_source_ids_keep_given_ids():
    from pipeline.runner import source_ids_for

    assert source_ids_for(["rtsp://h/cam", "rtsp://h/cam", "rtsp://h/x"], given=[None, "cam", None]) == [
        "cam-2", "cam", "x"]


class _FakeReader:
    """Stands in for ``LiveReader``: connected at once; the test pushes frames into its mailbox."""

    instances: list["_FakeReader"] = []

    def __init__(self, **kw):
        import threading

        self.mailbox = Mailbox()
        self.cancel, self.connected, self.done = threading.Event(), threading.Event(), threading.Event()
        self.frames, self.last_frame, self.outcome, self.problem = 0, 0.0, None, ""
        _FakeReader.instances.append(self)

    def describe(self):
        return "fake 16x16"

    def start(self):
        self.connected.set()
        self.push(range(30))

    def push(self, values):
        import time

        import av
        import numpy as np

        for v in values:
            f = av.VideoFrame.from_ndarray(np.full((16, 16, 3), v, np.uint8), format="rgb24")
            self.frames += 1
            self.last_frame = time.monotonic()
            self.mailbox.put(LiveFrame(frame=f, pts_s=v / 25, capture_mono=time.monotonic(), decode_ms=0.1))


@dataclass
class _LiveDecoder:
    """A live decoder stage running in a thread on a :class:`_FakeReader`, with the sockets a test drives."""

    frames_in: Any
    events_in: Any
    credits_out: Any
    stop: Any
    stage: Any
    thread: Any
    pools: Any

    def next_message(self) -> Any:
        from pipeline.transport import recv_parts

        return decode_message(recv_parts(self.frames_in, 10_000)[0].buffer)

    def events(self) -> list[Any]:
        out = []
        while self.events_in.poll(100):
            out.append(decode_message(self.events_in.recv()))
        return out


@contextlib.contextmanager
def _live_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, num_slots: int,
                  live: LiveOptions) -> Iterator[_LiveDecoder]:
    import os
    import threading
    import uuid

    import zmq

    import pipeline.stages.decode as decode
    from pipeline.slotpool import PoolCache
    from pipeline.stages.base import StatusReporter
    from pipeline.transport import StageFlags, ipc_endpoints, make_socket
    from streamdet.messages import StageName

    monkeypatch.setattr(decode, "LiveReader", _FakeReader)
    _FakeReader.instances.clear()
    pool_name = f"sd-test-{uuid.uuid4().hex[:8]}"
    ep = ipc_endpoints(tmp_path, [pool_name])
    ctx = zmq.Context()
    frames_in = make_socket(ctx, zmq.PULL, ep.frames, bind=True)
    events_in = make_socket(ctx, zmq.PULL, ep.events, bind=True)
    credits_out = make_socket(ctx, zmq.PUSH, ep.credit_endpoint(pool_name), bind=False)
    make_socket(ctx, zmq.PULL, ep.control, bind=True)
    go, stop, abort = threading.Event(), threading.Event(), threading.Event()
    flags = StageFlags(go=go, stop_input=stop, abort=abort, parent_pid=os.getppid())
    status = StatusReporter(socket=make_socket(ctx, zmq.PUSH, ep.control, bind=False), stage=StageName.DECODE)
    stage = decode.DecodeStage(source=probe_source("rtsp://127.0.0.1:1/cam", "cam"), pool=None, pool_name=pool_name,
                               num_slots=num_slots, flags=flags, status=status, live=live,
                               credits_in=make_socket(ctx, zmq.PULL, ep.credit_endpoint(pool_name), bind=True),
                               frames_out=make_socket(ctx, zmq.PUSH, ep.frames, bind=False),
                               events_out=make_socket(ctx, zmq.PUSH, ep.events, bind=False))
    t = threading.Thread(target=stage.run)
    t.start()
    go.set()
    pools = PoolCache()
    try:
        yield _LiveDecoder(frames_in, events_in, credits_out, stop, stage, t, pools)
    finally:
        abort.set()
        t.join(5)
        pools.close()
        stage.stop()
        status.close()
        ctx.destroy(linger=0)


def test_live_decoder_keeps_the_newest_frame_and_counts_drops(tmp_path, monkeypatch):
    """One slot, never handed back: the decoder sends the newest frame only; the others are dropped."""
    from pipeline.transport import recv_parts
    from streamdet.messages import CreditMsg, EndOfStream, EosReason, FrameMsg

    with _live_decoder(tmp_path, monkeypatch, num_slots=1, live=LiveOptions(stall_timeout_s=60)) as d:
        first = d.next_message()
        assert isinstance(first, FrameMsg) and first.frame_index == 0
        assert d.pools.get(first.pool).view(first.slot, (16, 16, 3))[0, 0, 0] == 29  # the newest of 30
        _FakeReader.instances[0].push(range(30, 40))
        assert recv_parts(d.frames_in, 300) is None  # no free slot: nothing queues
        d.credits_out.send(CreditMsg(first.pool, first.slot).encode())
        second = d.next_message()
        assert isinstance(second, FrameMsg) and second.frame_index == 1
        assert d.pools.get(second.pool).view(second.slot, (16, 16, 3))[0, 0, 0] == 39
        d.stop.set()
        assert d.next_message() == EndOfStream("cam", 2, EosReason.INTERRUPTED)
        d.credits_out.send(CreditMsg(second.pool, second.slot).encode())
        d.thread.join(10)
        assert not d.thread.is_alive()
        assert d.stage.dropped == 38
        events = d.events()
        assert [e.state.value for e in events if e.publish] == ["connecting", "connected", "eos"]
        assert events[-1].dropped == 38


def test_a_live_source_without_room_for_its_pool_says_so_and_tries_again(tmp_path, monkeypatch):
    """/dev/shm full at the first frame: an error status, a reconnection after the backoff, then frames."""
    import pipeline.stages.decode as decode
    from pipeline.slotpool import SlotPool, SlotPoolError
    from streamdet.messages import CreditMsg, EndOfStream, FrameMsg

    real_create, refusals = SlotPool.create, [1]

    def create(**kw):
        if refusals:
            refusals.pop()
            raise SlotPoolError(f"shared memory {kw['name']!r}: needs 0.0 MiB but /dev/shm has 0.0 MiB free")
        return real_create(**kw)

    monkeypatch.setattr(decode.SlotPool, "create", staticmethod(create))
    live = LiveOptions(stall_timeout_s=60, reconnect_initial_s=0.05)
    with _live_decoder(tmp_path, monkeypatch, num_slots=2, live=live) as d:
        first = d.next_message()
        assert isinstance(first, FrameMsg) and first.frame_index == 0
        assert len(_FakeReader.instances) == 2  # a second connection
        d.stop.set()
        msg = first
        while not isinstance(msg, EndOfStream):  # every slot back, as the postprocess stage would
            if isinstance(msg, FrameMsg):
                d.credits_out.send(CreditMsg(msg.pool, msg.slot).encode())
            msg = d.next_message()
        d.thread.join(10)
        assert not d.thread.is_alive()
        states = [(e.state.value, e.message) for e in d.events()]
        assert [s for s, _ in states][:5] == ["connecting", "connected", "error", "reconnecting", "connected"]
        assert "cam: shared memory" in states[2][1] and "/dev/shm has 0.0 MiB free" in states[2][1]


@contextlib.contextmanager
def _fake_camera(answer: bytes | None) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that takes connections and never answers (``answer`` None) or answers garbage."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                held.append(conn)
                if answer is not None:
                    conn.recv(4096)
                    conn.sendall(answer)
                    conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("answer,open_s,read_s,outcome,problem", [
    (None, 1.0, 5.0, "LOST", "no answer within 1 s"),  # a hung camera, a black hole: reconnect, no error
    (None, 3.0, 1.0, "LOST", "no answer within 1 s"),  # (the RTSP socket's read timeout comes first)
    (b"HELLO\r\n\r\n", 2.0, 2.0, "REFUSED", "refused (Invalid data found when processing input)"),  # not RTSP
])
def test_a_camera_that_never_answers_is_lost_not_refused(answer, open_s, read_s, outcome, problem):
    from pipeline.sources.live_reader import LiveOutcome, LiveReader
    from pipeline.sources.options import DecodeThreads

    with _fake_camera(answer) as port:
        reader = LiveReader(url=f"rtsp://u:secret@127.0.0.1:{port}/cam", threads=DecodeThreads.AUTO,
                            live=LiveOptions(open_timeout_s=open_s, read_timeout_s=read_s))
        reader.run()  # (in this thread)
    assert reader.outcome is LiveOutcome[outcome] and reader.problem == problem


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_drops_the_stats_line_and_keeps_the_stats_payload(tmp_path, quiet):
    """``--quiet`` is "no progress bar"; the ``stats`` payloads are data (subscribers, MQTT): it had stopped them."""
    from pipeline.chains import prepare_run, stage_specs
    from pipeline.settings import DEFAULT_MODEL
    from pipeline.stages.postprocess import PostprocessSpec
    from pipeline.transport import ipc_endpoints
    from tests.helpers.settings import settings_with
    from tests.helpers.standin import bikes_path

    s = settings_with({"sources": [str(bikes_path())], "model": str(DEFAULT_MODEL), "quiet": quiet},
                      sinks__stats_interval_s=2.0)
    specs = stage_specs(s, prepare_run(s), ipc_endpoints(tmp_path, ["pool"]), ["pool"], ["tensors"])
    config = next(sp for sp in specs if isinstance(sp, PostprocessSpec)).stats
    assert (config.interval_s, config.console) == (2.0, not quiet)
    st = LiveStats(config=StatsConfig(sources=(("cam", True),), interval_s=1.0, console=config.console))
    line, payload = st.report(now=st._last + 1.0)
    assert "cam" in payload["sources"]
    assert (line == "") is quiet
