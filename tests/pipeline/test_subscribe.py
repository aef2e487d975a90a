import json
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from pipeline.stages.sinks import PubSink, detections_payload, eos_payload
from pipeline.subscribe import Published, Subscriber, SubscribeTimeout, format_line, main
from streamdet.letterbox import letterbox_params
from streamdet.messages import EndOfStream, EosReason, FrameMsg, FrameRecord
from streamdet.postprocess import Detections


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def payload(i: int, source: str = "cam"):
    rec = FrameRecord(FrameMsg(source, i, i * 0.04, (272, 640), -2, "", time.monotonic(), 1.0),
                      letterbox_params((272, 640), (640, 384)), 0.5)
    d = Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.8], np.float32), np.array([0], np.int64))
    return rec, d, detections_payload(rec, d, model="m", class_names=("person",), engine_ms=3, postprocess_ms=1)


def publish(endpoint, n, sources=("cam",), wait=1):
    """Publish n frames per source and their EOS through the real PubSink (waits for `wait` subscribers)."""
    from pipeline.stages.sinks import FrameResult

    ctx = zmq.Context()
    sink = PubSink(ctx=ctx, endpoint=endpoint, wait_subscribers=wait, wait_timeout_s=20)
    sink.open()
    for i in range(n):
        for s in sources:
            rec, d, p = payload(i, s)
            sink.write(FrameResult(rec, d, p))
    for s in sources:
        sink.end_of_stream(EndOfStream(s, n, EosReason.FINISHED))
    sink.close()
    ctx.term()
    return sink


def test_subscriber_receives_everything_after_xpub_wait():
    ep = free_endpoint()
    with Subscriber(ep) as sub:
        t = threading.Thread(target=publish, args=(ep, 300, ("a", "b")))
        t.start()
        msgs = list(sub.messages(until_eos=True, timeout_s=20))
        t.join()
    assert len(msgs) == 602
    for s in ("a", "b"):
        mine = [m for m in msgs if m.source_id == s]
        assert [m.payload.get("frame_index") for m in mine[:-1]] == list(range(300))
        assert mine[-1].is_eos and mine[-1].topic == f"eos.{s}"


def test_topic_filter_and_count():
    ep = free_endpoint()
    with Subscriber(ep, topics=["detections.b"]) as sub:
        t = threading.Thread(target=publish, args=(ep, 5, ("a", "b")))
        t.start()
        msgs = list(sub.messages(count=5, timeout_s=20))
        t.join()
    assert {m.topic for m in msgs} == {"detections.b"}


def test_timeout():
    with Subscriber(free_endpoint()) as sub, pytest.raises(SubscribeTimeout):
        sub.recv(0.1)


def test_format_line():
    _, _, p = payload(7)
    line = format_line(Published("detections.cam", p))
    assert line.startswith("detections.cam frame=7 pts=0.280s dets=1 [person 0.80]")
    eos = format_line(Published("eos.cam", eos_payload(EndOfStream("cam", 3, EosReason.ERROR, "bad file"))))
    assert eos == "eos.cam frames=3 reason=error error=bad file"


def test_main_json_until_eos(capsys):
    ep = free_endpoint()
    t = threading.Thread(target=publish, args=(ep, 3))
    t.start()
    code = main([ep, "--until-eos", "--json", "--timeout", "20"])
    t.join()
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["topic"] for x in lines] == ["detections.cam"] * 3 + ["eos.cam"]
    assert lines[0]["schema"] == "streamdet.detections/2"


def test_main_until_eos_ends_at_the_eos_when_stats_came(capsys):
    """A live run publishes ``stats`` (of no source): the EOS of every source seen still ends it."""
    ep = free_endpoint()
    ctx = zmq.Context()
    sink = PubSink(ctx=ctx, endpoint=ep, wait_subscribers=1, wait_timeout_s=20)
    done = threading.Event()

    def live_run() -> None:
        sink.open()
        sink.status({"schema": "streamdet.status/1", "source_id": "cam1", "state": "connected"})
        sink.stats({"schema": "streamdet.stats/1", "time": 0, "interval_s": 5, "sources": {}})
        _, _, p = payload(0, "cam1")
        sink.write_json("cam1", json.dumps(p).encode())
        sink.end_of_stream(EndOfStream("cam1", 1, EosReason.MAX_FRAMES))
        sink.stats({"schema": "streamdet.stats/1", "time": 5, "interval_s": 5, "sources": {}})
        done.wait(30)  # (the socket stays open: the subscriber must stop by itself)
        sink.close()

    t = threading.Thread(target=live_run)
    t.start()
    try:
        t0 = time.monotonic()
        code = main([ep, "--until-eos", "--json", "--timeout", "3"])  # (the old code: exit 1 after 3 s)
        took = time.monotonic() - t0
    finally:
        done.set()
        t.join()
        ctx.term()
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert [json.loads(x)["topic"] for x in out.splitlines()] == ["status.cam1", "stats", "detections.cam1",
                                                                  "eos.cam1"]
    assert took < 3


def test_main_timeout_is_one_error_line(capsys):
    assert main([free_endpoint(), "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


# ---------------------------------------------------------------- arguments and long timeouts


@pytest.mark.parametrize("argv, problem", [
    (["--timeout", "nan"], "argument --timeout: expected a number of seconds above 0, or inf, got 'nan'"),
    (["--timeout", "-1"], "argument --timeout: expected a number of seconds above 0, or inf, got '-1'"),
    (["--timeout", "0"], "argument --timeout: expected a number of seconds above 0, or inf, got '0'"),
    (["--timeout=-inf"], "argument --timeout: expected a number of seconds above 0, or inf, got '-inf'"),
    (["--timeout", "soon"], "argument --timeout: expected a number of seconds above 0, or inf, got 'soon'"),
    (["--count", "-1"], "argument --count: expected a positive integer, got '-1'"),
    (["--count", "0"], "argument --count: expected a positive integer, got '0'"),
    (["--count", "1.5"], "argument --count: expected a positive integer, got '1.5'"),
    (["--until-eos", "--sources", "0"], "argument --sources: expected a positive integer, got '0'"),
    (["--until-eos", "--sources", "-2"], "argument --sources: expected a positive integer, got '-2'"),
])
def test_main_bad_arguments_are_one_line_exit_2(capsys, argv, problem):
    with pytest.raises(SystemExit) as exc:
        main([free_endpoint(), "--timeout", "0.5", *argv])  # (the old code waited instead of refusing)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {problem} (see --help)"]


@pytest.mark.parametrize("endpoint, problem", [
    ("tcp://127.0.0.1:99999", "expected a port in 1..65535, got 'tcp://127.0.0.1:99999'"),
    ("tcp://127.0.0.1:0", "expected a port in 1..65535, got 'tcp://127.0.0.1:0'"),
    ("tcp://[::1:5556", "expected tcp://HOST:PORT or ipc://PATH, got 'tcp://[::1:5556'"),
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT or ipc://PATH, got 'tcp://127.0.0.1'"),
    ("127.0.0.1:5556", "expected tcp://HOST:PORT or ipc://PATH, got '127.0.0.1:5556'"),
    ("udp://127.0.0.1:5556", "expected tcp://HOST:PORT or ipc://PATH, got 'udp://127.0.0.1:5556'"),
    ("none", "expected tcp://HOST:PORT or ipc://PATH, got 'none'"),
    ("", "expected tcp://HOST:PORT or ipc://PATH, got ''"),
    ("tcp://nohost.invalid:5556", "expected a host name that resolves, got 'tcp://nohost.invalid:5556' "
                                  "(nohost.invalid: "),
])
def test_main_refuses_an_unusable_endpoint_at_once(capsys, endpoint, problem):
    """One line, exit status 2, at once (the old code waited: ZeroMQ connects asynchronously)."""
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main([endpoint, "--timeout", "0.5"])
    assert exc.value.code == 2 and time.monotonic() - t0 < 0.5 + 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument endpoint: {problem}"), err
    assert err[0].endswith(" (see --help)")


def test_main_refuses_what_zeromq_refuses_with_exit_2(capsys):
    assert main(["tcp://*:5556", "--timeout", "0.5"]) == 2  # (a wildcard: binds, never connects)
    assert capsys.readouterr().err.splitlines() == ["error: tcp://*:5556: cannot connect (Invalid argument)"]


@pytest.mark.parametrize("endpoint", ["tcp://localhost:{port}", "tcp://127.0.0.1:{port}", "ipc://{tmp}/pub"])
def test_main_accepts_a_usable_endpoint(capsys, tmp_path, endpoint):
    port = free_endpoint().rsplit(":", 1)[1]
    assert main([endpoint.format(port=port, tmp=tmp_path), "--timeout", "0.2"]) == 1  # (waited: nobody publishes)
    assert "no message within 0.2 s" in capsys.readouterr().err


def test_subscriber_refuses_a_port_out_of_range():
    with pytest.raises(ValueError, match=r"expected a port in 1\.\.65535, got 'tcp://127.0.0.1:65536'"):
        Subscriber("tcp://127.0.0.1:65536")


@pytest.mark.parametrize("timeout", ["inf", "Infinity", "1e30", "1e308"])
def test_main_waits_forever_or_for_huge_timeouts(capsys, timeout):
    ep = free_endpoint()
    t = threading.Thread(target=publish, args=(ep, 2))
    t.start()
    code = main([ep, "--until-eos", "--json", "--timeout", timeout])
    t.join()
    assert code == 0
    assert [json.loads(x)["topic"] for x in capsys.readouterr().out.splitlines()] == ["detections.cam"] * 2 + \
        ["eos.cam"]


def test_help_says_what_inf_means(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "inf: wait forever" in " ".join(capsys.readouterr().out.split())


class ReadyAfter:
    """A socket stand-in whose poll finds a message on call ``polls``; records each poll's timeout."""

    def __init__(self, polls: int) -> None:
        self.polls = polls
        self.timeouts: list[int] = []

    def poll(self, timeout: int, flags: int) -> bool:
        self.timeouts.append(timeout)
        return len(self.timeouts) >= self.polls

    def recv_multipart(self) -> list[bytes]:
        return [b"eos.cam", json.dumps(eos_payload(EndOfStream("cam", 1, EosReason.FINISHED))).encode()]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("timeout_s", [None, float("inf"), 1e30, 1e308, 3600.0])
def test_recv_polls_long_timeouts_in_bounded_chunks(timeout_s):
    from pipeline.subscribe import POLL_CHUNK_MS

    with Subscriber(free_endpoint()) as sub:
        sub._sock.close()
        sub._sock = fake = ReadyAfter(3)  # type: ignore[assignment]
        msg = sub.recv(timeout_s)
    assert msg.is_eos and msg.source_id == "cam"
    assert fake.timeouts == [POLL_CHUNK_MS] * 3 and all(type(t) is int for t in fake.timeouts)


@pytest.mark.parametrize("timeout_s, polls", [(0.0, [0]), (-1.0, [0]), (float("-inf"), [0])])
def test_recv_with_no_time_left_polls_once(timeout_s, polls):
    with Subscriber(free_endpoint()) as sub:
        sub._sock.close()
        sub._sock = fake = ReadyAfter(99)  # type: ignore[assignment]
        with pytest.raises(SubscribeTimeout) as exc:
            sub.recv(timeout_s)
    assert fake.timeouts == polls and str(exc.value) == f"{sub.endpoint}: no message within {timeout_s} s"


def test_recv_refuses_a_nan_timeout():
    with Subscriber(free_endpoint()) as sub, pytest.raises(ValueError) as exc:
        sub.recv(float("nan"))
    assert str(exc.value) == f"{sub.endpoint}: expected a timeout in seconds, got nan"


def test_a_timeout_longer_than_a_chunk_still_ends_on_time(monkeypatch):
    import pipeline.subscribe as subscribe

    monkeypatch.setattr(subscribe, "POLL_CHUNK_MS", 40)
    with Subscriber(free_endpoint()) as sub:
        t0 = time.monotonic()
        with pytest.raises(SubscribeTimeout):
            sub.recv(0.25)
        assert 0.25 <= time.monotonic() - t0 < 2.0
