"""Sinks: where detections go. ZeroMQ PUB (the external stream), JSONL file, annotated video.

Sinks run in the postprocess process (see :mod:`pipeline.stages.postprocess`); each implements
:class:`Sink` so one could run in a process of its own later. This module holds the PUB sink and
re-exports the others: :class:`JsonlSink` (:mod:`pipeline.stages.jsonl_sink`), :class:`VideoSink`
(:mod:`pipeline.stages.video_sink`), and the shared :class:`Sink` and :class:`FrameResult`
(:mod:`pipeline.stages.sink_base`). The published JSON is the public, versioned schema documented
in ``docs/schema.md`` (built in :mod:`pipeline.stages.payloads`, re-exported here):

* topic ``detections.<source_id>``: :func:`detections_payload` (schema :data:`DETECTIONS_SCHEMA`);
* topic ``eos.<source_id>``: :func:`eos_payload` (schema :data:`EOS_SCHEMA`), once, after the
  source's last frame;
* topic ``status.<source_id>``: :func:`status_payload` (schema :data:`STATUS_SCHEMA`), a live
  source's state changes (connected, stalled, reconnecting, eos, error);
* topic ``stats``: the periodic per-source statistics (schema ``streamdet.stats/1``, see
  :mod:`pipeline.stages.stats`), with live sources only.

PUB semantics: a subscriber receives only what is published after its subscription reached the
socket. The PUB sink is an XPUB socket, so it can wait at start-up until
``publish_wait_subscribers`` subscribers have subscribed (then no message is lost to them); a
subscriber that falls :data:`~pipeline.transport.PUB_HWM` messages behind loses messages.

A subscriber is a connection (a peer) with at least one subscription, however many topics it
subscribed to: each subscription message names its connection (its file descriptor, ZeroMQ's
``SRCFD``), and a socket monitor tells which connection went away (``EVENT_DISCONNECTED``; a
connection's unsubscriptions on its way out name none). The monitor is read only when
subscriptions changed, so publishing costs what it did.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from pipeline.stages.jsonl_sink import JsonlRotate, JsonlSink, parse_rotate
from pipeline.stages.payloads import (
    DETECTIONS_SCHEMA,
    DETECTIONS_TOPIC,
    EOS_SCHEMA,
    EOS_TOPIC,
    STATS_TOPIC,
    STATUS_SCHEMA,
    STATUS_TOPIC,
    detections_payload,
    dumps,
    eos_payload,
    status_payload,
    topic,
)
from pipeline.stages.sink_base import FrameResult, Sink
from pipeline.stages.video_sink import VideoSink
from pipeline.supervise import Ledger
from pipeline.transport import PUB_HWM, PUB_LINGER_MS, TransportError, redact_url
from streamdet.messages import EndOfStream

__all__ = [
    "DETECTIONS_SCHEMA",
    "DETECTIONS_TOPIC",
    "EOS_SCHEMA",
    "EOS_TOPIC",
    "STATS_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "FrameResult",
    "JsonlRotate",
    "JsonlSink",
    "PubSink",
    "Sink",
    "VideoSink",
    "detections_payload",
    "dumps",
    "eos_payload",
    "parse_rotate",
    "status_payload",
    "topic",
]


_PEER_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
"""The publish socket's monitor events: a subscriber's connection made and gone (value: its file descriptor)."""


def _source_fd(frame: zmq.Frame) -> int:
    """The file descriptor of the connection a subscription message came on (-1: made by the socket itself)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except zmq.ZMQError:  # (EINVAL: the unsubscriptions XPUB makes for a connection that went away)
        return -1


class PubSink(Sink):
    """Publishes results on a ZeroMQ XPUB socket as ``[topic, JSON]`` multipart messages.

    Args:
        ctx: the process's ZeroMQ context.
        endpoint: where to bind, e.g. ``tcp://127.0.0.1:5556``.
        wait_subscribers: at :meth:`open`, wait until this many subscribers are subscribed (0: don't
            wait); a subscriber counts once however many topics it subscribed to, and no longer
            once it has disconnected.
        wait_timeout_s: give up waiting after this long (then publish anyway).
        on_subscribers: called with the number of current subscribers whenever it changes (a
            restarted postprocess stage waits for as many before it publishes again).
        ledger: the run's ledger (None: no supervision): the message count lives there, so the
            sink of a restarted postprocess stage counts on from the dead one's (a PUB socket has
            no file to recount) and :meth:`describe` gives the run's total.

    Attributes:
        messages: messages sent in the run (with a ledger: by every process of the stage).
    """

    def __init__(self, *, ctx: zmq.Context[Any], endpoint: str, wait_subscribers: int = 0,
                 wait_timeout_s: float = 10.0, on_subscribers: Callable[[int], None] | None = None,
                 ledger: Ledger | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.wait_subscribers = wait_subscribers
        self.wait_timeout_s = wait_timeout_s
        self.on_subscribers = on_subscribers
        self._ledger = ledger
        self.messages = ledger.pub_messages if ledger is not None else 0
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._peers: dict[int, int] = {}  # a connection's file descriptor: its subscriptions (1 or more)

    @property
    def subscribers(self) -> int:
        """Connections with at least one subscription now (as of the last look at the socket)."""
        return len(self._peers)

    def describe(self) -> str:
        """``zmq PUB <endpoint> (...)``."""
        return (f"zmq PUB {redact_url(self.endpoint)}: {self.messages} messages "
                "(topics detections.<source_id>, eos.<source_id>, status.<source_id>, stats)")

    def open(self) -> None:
        """Bind the socket and wait for the configured number of subscribers.

        Raises:
            TransportError: if the endpoint cannot be bound (e.g. the port is in use).
        """
        sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, PUB_HWM)
        sock.setsockopt(zmq.LINGER, PUB_LINGER_MS)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe (a subscriber gone: unsubscribe)
        monitor = sock.get_monitor_socket(_PEER_EVENTS)  # (before the bind: every connection is seen)
        monitor.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            problem = zmq.strerror(e.errno or 0)
            raise TransportError(f"{redact_url(self.endpoint)}: cannot bind the publish socket ({problem})") from e
        self._sock, self._monitor = sock, monitor
        deadline = time.monotonic() + self.wait_timeout_s
        while self.subscribers < self.wait_subscribers:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            if sock.poll(min(left_ms, 100), zmq.POLLIN):
                self._read_subscriptions()

    def _read_subscriptions(self) -> None:
        """Take in the subscriptions that arrived, and (only then) the connections that came and went."""
        assert self._sock is not None
        changes: list[tuple[int, int]] = []  # (connection, +1 subscribed / -1 unsubscribed)
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            kind = frame.bytes[:1]
            if kind in (b"\x01", b"\x00"):
                changes.append((_source_fd(frame), 1 if kind == b"\x01" else -1))
        if not changes:
            return
        before = self.subscribers
        # The monitor after the messages: a connection's ACCEPTED is queued before its first
        # subscription arrives, its DISCONNECTED before the unsubscriptions made for it.
        last: dict[int, int] = {}
        for event, fd in self._monitor_events():
            last[fd] = event
            if event == zmq.EVENT_DISCONNECTED:
                self._peers.pop(fd, None)
        for fd, delta in changes:
            if fd < 0 or last.get(fd) == zmq.EVENT_DISCONNECTED:
                continue  # a gone connection's unsubscriptions (the monitor removed it), or its last words
            n = self._peers.get(fd, 0) + delta
            if n > 0:
                self._peers[fd] = n
            else:
                self._peers.pop(fd, None)
        if self.on_subscribers is not None and self.subscribers != before:
            self.on_subscribers(self.subscribers)

    def _monitor_events(self) -> list[tuple[int, int]]:
        """The monitor's queued ``(event, file descriptor)`` pairs, oldest first."""
        assert self._monitor is not None
        events: list[tuple[int, int]] = []
        while True:
            try:
                parts = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return events
            if len(parts) == 2 and len(parts[0]) == 6:
                event, value = struct.unpack("=Hi", parts[0])
                events.append((event, value))

    def _send(self, topic_bytes: bytes, payload: Mapping[str, Any] | bytes) -> None:
        assert self._sock is not None
        self._sock.send_multipart([topic_bytes, payload if isinstance(payload, bytes) else dumps(payload)])
        self.messages += 1
        if self._ledger is not None:  # (a SIGKILL in between costs the count this one message)
            self._ledger.set_pub_messages(self.messages)

    def write(self, result: FrameResult) -> None:
        """Publish ``detections.<source_id>``."""
        self.write_json(result.record.frame.source_id, result.json())

    def write_json(self, source_id: str, payload_json: bytes) -> None:
        """Publish ``detections.<source_id>`` with an already encoded payload."""
        if self._sock is None:
            return
        self._read_subscriptions()
        self._send(topic(DETECTIONS_TOPIC, source_id), payload_json)

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Publish ``eos.<source_id>``."""
        if self._sock is not None:
            self._send(topic(EOS_TOPIC, eos.source_id), eos_payload(eos))

    def status(self, payload: Mapping[str, Any]) -> None:
        """Publish ``status.<source_id>``."""
        if self._sock is not None:
            self._read_subscriptions()
            self._send(topic(STATUS_TOPIC, str(payload["source_id"])), payload)

    def stats(self, payload: Mapping[str, Any]) -> None:
        """Publish ``stats``."""
        if self._sock is not None:
            self._send(STATS_TOPIC, payload)

    def close(self) -> None:
        """Close the socket (lingering up to :data:`PUB_LINGER_MS` to deliver the last messages)."""
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close()
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None
