"""The publish sink counts subscribers (connections), not their topic subscriptions."""

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from pipeline.stages.sinks import PubSink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request, tmp_path) -> str:
    return f"tcp://127.0.0.1:{free_port()}" if request.param == "tcp" else f"ipc://{tmp_path / 'pub'}"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.term()


class Subs:
    """SUB sockets connected to the sink (closed at the end)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx, self.endpoint, self.socks = ctx, endpoint, []

    def add(self, *topics: bytes) -> zmq.Socket:
        s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        for t in topics:
            s.setsockopt(zmq.SUBSCRIBE, t)
        s.connect(self.endpoint)
        self.socks.append(s)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close(0)


@pytest.fixture
def subs(ctx, endpoint) -> Iterator[Subs]:
    made = Subs(ctx, endpoint)
    yield made
    made.close()


def until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def opening(sink: PubSink) -> threading.Thread:
    """Open the sink in a thread (open() waits for its subscribers)."""
    t = threading.Thread(target=sink.open, daemon=True)
    t.start()
    return t


def receive(sock: zmq.Socket, timeout_s: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000), zmq.POLLIN), "nothing received"
    return sock.recv_multipart()


def test_a_subscriber_with_two_topics_counts_once(ctx, endpoint, subs):
    """--wait-subscribers 2: one subscriber with two topics is not enough; the second one is."""
    counts: list[int] = []
    sink = PubSink(ctx=ctx, endpoint=endpoint, wait_subscribers=2, wait_timeout_s=30, on_subscribers=counts.append)
    a = subs.add(b"eos.", b"detections.")
    t = opening(sink)
    try:
        until(lambda: counts == [1], "the first subscriber")
        t.join(1.0)
        assert t.is_alive(), "the sink stopped waiting with one subscriber (two topics) of two"
        assert counts == [1] and sink.subscribers == 1
        b = subs.add(b"")
        t.join(10)
        assert not t.is_alive(), "the sink kept waiting with two subscribers"
        assert counts == [1, 2] and sink.subscribers == 2
        sink.write_json("cam", b"{}")
        assert receive(a) == [b"detections.cam", b"{}"]
        assert receive(b) == [b"detections.cam", b"{}"]
    finally:
        t.join(30)
        sink.close()


def test_a_subscriber_that_left_no_longer_counts(ctx, endpoint, subs):
    """A subscriber that came and went while the sink waits is not one of the subscribers waited for."""
    counts: list[int] = []
    sink = PubSink(ctx=ctx, endpoint=endpoint, wait_subscribers=2, wait_timeout_s=30, on_subscribers=counts.append)
    t = opening(sink)
    try:
        gone = subs.add(b"eos.", b"detections.")
        until(lambda: counts == [1], "the first subscriber")
        gone.close(0)
        until(lambda: counts == [1, 0], "the first subscriber gone")
        subs.add(b"eos.", b"detections.", b"status.")
        until(lambda: counts == [1, 0, 1], "the second subscriber")
        t.join(0.5)
        assert t.is_alive(), "the sink counted a subscriber that had left"
        subs.add(b"stats")
        t.join(10)
        assert not t.is_alive() and counts == [1, 0, 1, 2]
    finally:
        t.join(30)
        sink.close()


def test_subscribers_counted_while_publishing(ctx, endpoint, subs):
    """After the start: subscribers come and go, unsubscribing everything stops counting too."""
    counts: list[int] = []
    sink = PubSink(ctx=ctx, endpoint=endpoint, on_subscribers=counts.append)
    sink.open()
    try:
        def publish_until(n: int) -> None:
            def look() -> bool:
                sink.write_json("cam", b"{}")  # (publishing is when the sink takes in subscriptions)
                return sink.subscribers == n
            until(look, f"{n} subscribers")

        a = subs.add(b"eos.", b"detections.")
        publish_until(1)
        b = subs.add(b"detections.cam")
        publish_until(2)
        subs.add()  # connected, subscribed to nothing: no subscriber
        a.setsockopt(zmq.UNSUBSCRIBE, b"eos.")  # one of two topics left: still a subscriber
        time.sleep(0.3)
        publish_until(2)
        a.setsockopt(zmq.UNSUBSCRIBE, b"detections.")
        publish_until(1)
        b.close(0)
        publish_until(0)
        assert counts == [1, 2, 1, 0]
    finally:
        sink.close()


def test_a_restarted_sink_waits_for_the_subscribers_to_reconnect(ctx, endpoint, subs):
    """The count a restarted postprocess stage waits for (the ledger's) is reached when they resubscribe."""
    recorded: list[int] = []
    dead = zmq.Context()  # (the dead process's)
    first = PubSink(ctx=dead, endpoint=endpoint, wait_subscribers=2, wait_timeout_s=30, on_subscribers=recorded.append)
    socks = subs.add(b"eos.", b"detections."), subs.add(b"eos.", b"status.", b"detections.")
    first.open()
    assert first.subscribers == 2 and recorded[-1] == 2
    first.close()
    dead.term()  # (the port is free again once the socket is really closed)
    received: list[list[bytes]] = []

    def receive_one(sock: zmq.Socket) -> None:  # (a SUB resubscribes while its owner waits on it)
        if sock.poll(30_000, zmq.POLLIN):
            received.append(sock.recv_multipart())

    readers = [threading.Thread(target=receive_one, args=(s,), daemon=True) for s in socks]
    for r in readers:
        r.start()
    again: list[int] = []
    second = PubSink(ctx=ctx, endpoint=endpoint, wait_subscribers=recorded[-1], wait_timeout_s=30,
                     on_subscribers=again.append)
    t0 = time.monotonic()
    second.open()
    try:
        assert second.subscribers == 2 and again[-1] == 2
        assert time.monotonic() - t0 < 10
        second.write_json("cam", b"{}")
        for r in readers:
            r.join(10)
        assert received == [[b"detections.cam", b"{}"]] * 2
    finally:
        second.close()


def test_waiting_gives_up_after_the_timeout(ctx, endpoint, subs):
    sink = PubSink(ctx=ctx, endpoint=endpoint, wait_subscribers=2, wait_timeout_s=0.8)
    subs.add(b"eos.", b"detections.", b"status.")
    t0 = time.monotonic()
    sink.open()
    try:
        assert 0.7 <= time.monotonic() - t0 < 5 and sink.subscribers == 1
    finally:
        sink.close()
