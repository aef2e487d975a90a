"""The MQTT sink: every published message also goes to an MQTT broker (paho-mqtt client).

Topics (``<prefix>`` is ``sinks.mqtt_topic_prefix``, ``streamdet`` by default):

* ``<prefix>/<source_id>/detections``: one message per frame, in frame order;
* ``<prefix>/<source_id>/eos``: once per source, after its last frame;
* ``<prefix>/<source_id>/status``: a live source's state changes, **retained** (a client that
  subscribes later gets the latest state at once);
* ``<prefix>/stats``: the periodic statistics (live runs).

The payloads are byte for byte the JSON the ZeroMQ PUB sink publishes and the JSONL sink writes
(``docs/schema.md``). Every message has the QoS of ``MqttConfig.qos`` (1 by default).

The broker never stalls the pipeline. paho-mqtt runs the connection in a thread of its own
(``loop_start``) and reconnects by itself (1 s, doubling up to 30 s). With QoS 1 or 2, messages
published while the broker is away are held (paho keeps them and sends them once it is back,
QoS 1 ones possibly twice: at least once); at most ``MqttConfig.buffer`` messages are held, the
ones beyond are dropped. With QoS 0 a message published while disconnected, or lost with the
connection before it was written, is dropped. Every dropped message is counted in
:attr:`MqttSink.dropped` (and shows in the stats as ``sink_dropped``); at :meth:`MqttSink.close`
the sink waits up to ``flush_timeout_s`` for the held messages to be acknowledged and counts the
rest as dropped.

Credentials (``mqtt://user:pass@host``, or ``MqttConfig.username`` / ``password``) are never shown:
errors, warnings and :meth:`MqttSink.describe` name the broker as ``mqtt://***@HOST:PORT`` or
``mqtt://HOST:PORT``.

paho-mqtt is imported by :meth:`MqttSink.open` only (every postprocess process imports this module).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.stages.base import StageError, say
from pipeline.stages.payloads import dumps, eos_payload
from pipeline.stages.sink_base import FrameResult, Sink
from streamdet.messages import EndOfStream

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["MqttConfig", "MqttSink", "MqttUrl", "parse_mqtt_url"]

DEFAULT_PORT = 1883
"""Port of ``mqtt://`` URLs without one."""

DEFAULT_TLS_PORT = 8883
"""Port of ``mqtts://`` URLs without one."""

RECONNECT_MIN_S = 1
"""First delay before reconnecting after a failed attempt or a lost connection, seconds (then doubled)."""

RECONNECT_MAX_S = 30
"""Longest delay between reconnection attempts, seconds."""

LOGIN_WAIT_S = 3.0
"""At :meth:`MqttSink.open`, longest wait for the first connection attempt (a refused login fails the run)."""

KEEPALIVE_S = 20
"""MQTT keep-alive, seconds (a silent broker is found out after about 1.5 times this)."""

MAX_INFLIGHT = 100
"""QoS 1/2 messages sent and not yet acknowledged at a time (the rest wait in the buffer)."""

STOP_WAIT_S = 0.5
"""At close, longest wait for paho's network thread to end (a daemon thread; told to stop, it ends within 1 s)."""

_FATAL_REFUSALS = {
    "Client identifier not valid",
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
}
"""CONNACK refusals that retrying will not cure: they fail :meth:`MqttSink.open`."""

_LOGIN_REFUSALS = {"Bad user name or password", "Not authorized", "Banned", "Bad authentication method"}

_HOSTPORT_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]*))(?::(?P<port>.*))?")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def _redact(url: str) -> str:
    """``url`` with any userinfo hidden (``mqtt://***@host``) and control characters escaped (one line)."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    text = f"{head}{sep}{rest}"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


@dataclass(frozen=True)
class MqttUrl:
    """A parsed broker URL.

    Attributes:
        tls: ``mqtts://``.
        host: broker host.
        port: broker port (default 1883, or 8883 with TLS).
        username: login from the URL's userinfo, or None (never printed: ``repr=False``).
        password: password from the URL's userinfo, or None (never printed: ``repr=False``).
    """

    tls: bool
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        """``mqtt://HOST:PORT`` without credentials (for messages and logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse ``mqtt[s]://[user[:pass]@]HOST[:PORT]``.

    ``HOST`` is a name, an IPv4 address or a bracketed IPv6 address; the port defaults to 1883
    (``mqtt://``) or 8883 (``mqtts://``). User and password may be percent-encoded. A trailing
    ``/`` is allowed; any other path, a query or a fragment is not.

    Args:
        url: the broker URL, e.g. ``mqtt://127.0.0.1:1883`` or ``mqtts://user:pass@broker.example``.

    Returns:
        The parsed URL.

    Raises:
        ValueError: one line naming the URL (credentials redacted) and what is wrong.
    """
    from urllib.parse import unquote

    shown = _redact(url)

    def bad(problem: str) -> ValueError:
        return ValueError(f"MQTT URL {shown!r}: {problem}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mqtt", "mqtts"):
        raise bad("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise bad("expected no blanks or control characters")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/"):
        raise bad("expected nothing after HOST[:PORT] (no path, query or fragment)")
    userinfo, at, hostport = authority.rpartition("@")
    m = _HOSTPORT_RE.fullmatch(hostport)
    if m is None:
        raise bad("invalid host (expected a name, an IPv4 address or [an IPv6 address])")
    host = m["v6"] or m["name"]
    if not host:
        raise bad("no host")
    if m["name"] is not None and not _NAME_RE.fullmatch(host):
        raise bad(f"invalid host {host!r}")
    tls = scheme.lower() == "mqtts"
    port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if m["port"] is not None:
        if not m["port"].isdigit() or not 1 <= int(m["port"]) <= 65535:
            raise bad(f"invalid port {m['port']!r} (expected 1-65535)")
        port = int(m["port"])
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if not user:
            raise bad("empty user name before '@'")
        username = unquote(user)
        password = unquote(pw) if colon else None
    return MqttUrl(tls=tls, host=host, port=port, username=username, password=password)


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """What the MQTT sink needs (picklable; the credentials are never printed).

    Attributes:
        url: the broker URL as given (may hold credentials).
        username: login (overrides the URL's), or None.
        password: password (overrides the URL's), or None.
        qos: QoS of every message (0, 1 or 2).
        topic_prefix: first topic level (``streamdet``).
        buffer: most messages held while the broker is away or slow (beyond: dropped, counted).
        flush_timeout_s: at close, longest wait for buffered messages to go out.
        ca_file: CA certificates for ``mqtts://`` (None: the system's).
        client_id: MQTT client id (empty: generated).
    """

    url: str = field(repr=False)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    qos: int = 1
    topic_prefix: str = "streamdet"
    buffer: int = 10_000
    flush_timeout_s: float = 5.0
    ca_file: str | None = None
    client_id: str = ""


def _oserror_text(e: BaseException | None) -> str:
    """A short reason for a failed connection attempt (``Connection refused``, ``timed out``...)."""
    if e is None:
        return "connection failed"
    if isinstance(e, TimeoutError):
        return "timed out"
    text = getattr(e, "verify_message", None) or getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
    return " ".join(str(text).split()) or type(e).__name__


class MqttSink(Sink):
    """Publishes every message to an MQTT broker (topics ``<prefix>/<source_id>/{detections,status,eos}``).

    :meth:`open` starts paho's network thread and returns once the first connection attempt is
    answered (at most :data:`LOGIN_WAIT_S`); an unreachable broker is reported by one warning line
    on stderr and retried in the background, a refused login fails :meth:`open`. After that no
    method raises or blocks for the broker: a lost connection is reported once (``warning: ...``)
    and again when it is back (``mqtt URL: connected``), and messages that cannot be held are
    counted in :attr:`dropped`.

    Args:
        config: the broker, login, QoS, topic prefix and buffer.

    Attributes:
        messages: messages handed to the sink (detections, eos, status, stats).
        delivered: messages the broker acknowledged (QoS 0: written to the connection).
        dropped: messages not delivered: refused by a full buffer, QoS 0 while disconnected or
            lost with the connection, or still unacknowledged when :meth:`close` gave up waiting.

    Raises:
        ValueError: if ``config.url`` is not a valid broker URL (see :func:`parse_mqtt_url`).
    """

    dropped: int = 0

    def __init__(self, *, config: MqttConfig) -> None:
        self.config = config
        self.url = parse_mqtt_url(config.url)
        self.messages = 0
        self.delivered = 0
        self.dropped = 0
        self._client: mqtt.Client | None = None
        self._lock = threading.Condition()
        self._pending: dict[int, Any] = {}  # mid -> MQTTMessageInfo, handed to paho and not yet acknowledged
        self._acked_early: set[int] = set()  # acknowledged before publish() returned its mid
        self._opening = False  # open() waits for the first connection attempt
        self._first_done = threading.Event()
        self._refused: str | None = None  # a login refused during open()
        self._up = False  # connected (CONNACK accepted)
        self._warned = False  # an episode of unreachable / lost / refused was reported
        self._closing = False

    # ---------------------------------------------------------------- naming
    def _shown(self) -> str:
        """The broker as printed: ``mqtt://HOST:PORT``, ``mqtt://***@HOST:PORT`` with a login."""
        text = self.url.display()
        if self._username() is not None or self._password() is not None:
            scheme, _, rest = text.partition("://")
            text = f"{scheme}://***@{rest}"
        return text

    def _username(self) -> str | None:
        return self.config.username if self.config.username is not None else self.url.username

    def _password(self) -> str | None:
        return self.config.password if self.config.password is not None else self.url.password

    def topic(self, kind: str, source_id: str | None = None) -> str:
        """The MQTT topic ``<prefix>/<source_id>/<kind>`` (``<prefix>/<kind>`` without a source)."""
        prefix = self.config.topic_prefix.rstrip("/")
        return f"{prefix}/{kind}" if source_id is None else f"{prefix}/{source_id}/{kind}"

    def describe(self) -> str:
        """``mqtt mqtt://HOST:PORT: N messages, D dropped (topics ...)`` (credentials hidden)."""
        p = self.config.topic_prefix.rstrip("/")
        return (f"mqtt {self._shown()}: {self.messages} messages, {self.dropped} dropped "
                f"(topics {p}/<source_id>/detections, .../status, .../eos, {p}/stats)")

    def __repr__(self) -> str:
        return f"MqttSink({self._shown()}, qos={self.config.qos}, prefix={self.config.topic_prefix!r})"

    # ---------------------------------------------------------------- connection
    def open(self) -> None:
        """Start the connection in paho's network thread; wait up to :data:`LOGIN_WAIT_S` for its first answer.

        Raises:
            StageError: if the broker refused the login (or the client id), or the CA file of
                ``mqtts://`` cannot be used; one line, credentials redacted.
        """
        if self._client is not None:
            return
        import paho.mqtt.client as mqtt

        cfg = self.config
        client_id = cfg.client_id or f"streamdet-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        if self._username() is not None or self._password() is not None:
            client.username_pw_set(self._username() or "", self._password())
        if self.url.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file)
            except (OSError, ValueError) as e:
                problem = getattr(e, "strerror", None) or str(e)
                raise StageError(f"{self._shown()}: cannot use the CA certificates {cfg.ca_file or '(system)'} "
                                 f"({' '.join(str(problem).split())})") from e
        client.max_queued_messages_set(cfg.buffer)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        with self._lock:
            self._opening = True
        client.connect_async(self.url.host, self.url.port, keepalive=KEEPALIVE_S)
        client.loop_start()
        self._first_done.wait(LOGIN_WAIT_S)
        with self._lock:
            self._opening = False
            refused = self._refused
        if refused is not None:
            self._closing = True
            client.disconnect()
            _stop_loop(client)
            raise StageError(f"{self._shown()}: the broker refused the "
                             f"{'login' if refused in _LOGIN_REFUSALS else 'connection'} ({refused})")
        self._client = client

    def _episode(self, problem: str) -> None:
        """Report the start of a disconnected episode (once until connected again)."""
        with self._lock:
            if self._warned or self._closing:
                return
            self._warned = True
        say(f"warning: {self._shown()}: {problem}; retrying, holding up to {self.config.buffer} messages")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            text = str(reason)
            with self._lock:
                self._up = False
                fatal_now = self._opening and text in _FATAL_REFUSALS
                if fatal_now:
                    self._refused = text
            if not fatal_now:
                what = "login" if text in _LOGIN_REFUSALS else "connection"
                self._episode(f"the broker refused the {what} ({text})")
            self._first_done.set()
            return
        with self._lock:
            self._up = True
            was_warned, self._warned = self._warned, False
            self._sweep_lost()
        self._first_done.set()
        if was_warned and not self._closing:
            say(f"mqtt {self._shown()}: connected")

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is the current one
        problem = _oserror_text(sys.exc_info()[1])
        self._episode(f"broker unreachable ({problem})")
        self._first_done.set()  # after the warning: open() returns with it printed

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._lock:
            was_up, self._up = self._up, False
        if was_up:
            text = str(reason)
            self._episode("connection lost" + ("" if text in ("Unspecified error", "Success") else f" ({text})"))
        self._first_done.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            if self._pending.pop(mid, None) is not None:
                self.delivered += 1
                if not self._pending:
                    self._lock.notify_all()
            else:
                self._acked_early.add(mid)

    def _sweep_lost(self) -> None:
        """Count QoS 0 messages paho gave up with a lost connection (call with the lock held)."""
        if self.config.qos > 0 or not self._pending:
            return  # QoS 1/2 messages are kept by paho until acknowledged
        import paho.mqtt.client as mqtt

        lost = [mid for mid, info in self._pending.items() if info.rc == mqtt.MQTT_ERR_CONN_LOST]
        for mid in lost:
            del self._pending[mid]
        self.dropped += len(lost)

    # ---------------------------------------------------------------- messages
    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        client = self._client
        if client is None:
            return
        import paho.mqtt.client as mqtt

        qos = self.config.qos
        self.messages += 1
        with self._lock:
            if len(self._pending) >= self.config.buffer:
                self._sweep_lost()
            if len(self._pending) >= self.config.buffer:
                self.dropped += 1
                return
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError:  # an invalid topic (cannot happen with checked source ids)
            with self._lock:
                self.dropped += 1
            return
        # QoS 1/2: paho keeps every message it did not refuse for a full queue (MQTT_ERR_NO_CONN
        # included: sent after reconnecting); QoS 0: only those it could queue on a connection
        held = info.rc != mqtt.MQTT_ERR_QUEUE_SIZE if qos > 0 else info.rc == mqtt.MQTT_ERR_SUCCESS
        with self._lock:
            if not held:
                self.dropped += 1
            elif info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self.delivered += 1
            else:
                self._pending[info.mid] = info

    def write(self, result: FrameResult) -> None:
        """Publish ``<prefix>/<source_id>/detections``."""
        self.write_json(result.record.frame.source_id, result.json())

    def write_json(self, source_id: str, payload_json: bytes) -> None:
        """Publish ``<prefix>/<source_id>/detections`` with an already encoded payload."""
        self._publish(self.topic("detections", source_id), payload_json)

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Publish ``<prefix>/<source_id>/eos``."""
        self._publish(self.topic("eos", eos.source_id), dumps(eos_payload(eos)))

    def status(self, payload: Mapping[str, Any]) -> None:
        """Publish ``<prefix>/<source_id>/status`` (retained)."""
        self._publish(self.topic("status", str(payload["source_id"])), dumps(payload), retain=True)

    def stats(self, payload: Mapping[str, Any]) -> None:
        """Publish ``<prefix>/stats``."""
        self._publish(self.topic("stats"), dumps(payload))

    def close(self) -> None:
        """Wait up to ``flush_timeout_s`` for the held messages to be acknowledged, drop the rest, disconnect.

        Idempotent; returns within about ``flush_timeout_s`` + :data:`STOP_WAIT_S` whatever the broker does.
        """
        client, self._client = self._client, None
        if client is None:
            return
        deadline = time.monotonic() + self.config.flush_timeout_s
        with self._lock:
            while True:
                self._sweep_lost()
                left = deadline - time.monotonic()
                if not self._pending or left <= 0:
                    break
                self._lock.wait(min(left, 0.05))
            self.dropped += len(self._pending)
            self._pending.clear()
            self._closing = True
        client.disconnect()
        _stop_loop(client)


def _stop_loop(client: mqtt.Client) -> None:
    """``client.loop_stop()``, waiting at most :data:`STOP_WAIT_S` (a connection attempt may hang longer)."""
    t = threading.Thread(target=client.loop_stop, name="mqtt-loop-stop", daemon=True)
    t.start()
    t.join(STOP_WAIT_S)
