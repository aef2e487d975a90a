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
(``loop_start``), speaking MQTT v5 (3.1.1 with a broker that refuses v5 at start-up), and reconnects
by itself (1 s, doubling up to 30 s). With QoS 1 or 2, messages published while the broker is away
are held (paho keeps them and sends them once it is back, QoS 1 ones possibly twice: at least
once); at most ``MqttConfig.buffer`` messages are held, the ones beyond are dropped. With QoS 0 a
message published while disconnected, or lost with the connection before it was written, is
dropped. A message larger than the broker's Maximum Packet Size (announced in its MQTT v5 CONNACK)
is dropped instead of sent, and so is one the broker refuses in its PUBACK (an ACL denial, QoS 1);
one warning line for each kind, once per run (``pipeline/stages/mqtt_limits.py``). Every dropped
message is counted in :attr:`MqttSink.dropped` (and shows in the stats as ``sink_dropped``); at
:meth:`MqttSink.close` the sink waits up to ``flush_timeout_s`` for the held messages to be
acknowledged and counts the rest as dropped.

Credentials (``mqtt://user:pass@host``, or ``MqttConfig.username`` / ``password``) are never shown:
errors, warnings and :meth:`MqttSink.describe` name the broker as ``mqtt://***@HOST:PORT`` or
``mqtt://HOST:PORT``.

paho-mqtt is imported by :meth:`MqttSink.open` only (every postprocess process imports this module).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.stages.base import StageError, say
from pipeline.stages.mqtt_limits import BrokerLimits, forget_held, held_messages, publish_packet_size, set_window
from pipeline.stages.mqtt_url import MqttUrl, parse_mqtt_url
from pipeline.stages.payloads import dumps, eos_payload
from pipeline.stages.sink_base import FrameResult, Sink
from streamdet.messages import EndOfStream

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["MqttConfig", "MqttSink", "MqttUrl", "parse_mqtt_url"]

RECONNECT_MIN_S = 1
"""First delay before reconnecting after a failed attempt or a lost connection, seconds (then doubled)."""

RECONNECT_MAX_S = 30
"""Longest delay between reconnection attempts, seconds."""

LOGIN_WAIT_S = 3.0
"""At :meth:`MqttSink.open`, longest wait for the first connection attempt (a refused login fails the run)."""

KEEPALIVE_S = 20
"""MQTT keep-alive, seconds (a silent broker is found out after about 1.5 times this)."""

STOP_WAIT_S = 0.5
"""At close, longest wait for paho's network thread to end (a daemon thread; told to stop, it ends within 1 s)."""

_FATAL_REFUSALS = {
    "Client identifier not valid",
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
    "Unsupported protocol version",
}
"""CONNACK refusals that retrying will not cure: they fail :meth:`MqttSink.open` (the last one after trying 3.1.1)."""

_EVERY_SUCH = "every such message is dropped and counted; this warning is not repeated"

_LOGIN_REFUSALS = {"Bad user name or password", "Not authorized", "Banned", "Bad authentication method"}


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
            lost with the connection, larger than the broker's limit, refused by the broker
            (PUBACK), or still unacknowledged when :meth:`close` gave up waiting.
        too_large: of the dropped, those larger than the broker's Maximum Packet Size.

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
        self.too_large = 0
        self._client: mqtt.Client | None = None
        self._lock = threading.Condition()
        # mid -> (MQTTMessageInfo, topic, packet bytes), handed to paho and not yet acknowledged
        self._pending: dict[int, tuple[Any, str, int]] = {}
        self._acked_early: dict[int, str | None] = {}  # acknowledged before publish() returned: mid -> refusal
        self._v5 = True  # the protocol spoken: MQTT v5, else 3.1.1
        self._limits = BrokerLimits()  # as the last CONNACK announced them
        self._told: set[str] = set()  # the once-per-run warnings given
        self._opening = False  # open() waits for the first connection attempt
        self._first_done = threading.Event()  # the first connection attempt of self._attempt is answered
        self._attempt: Any = None  # the client open() started last
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
        """``mqtt mqtt://HOST:PORT: N messages, D dropped[, B of them too large for the broker] (topics ...)``.

        Credentials hidden.
        """
        p = self.config.topic_prefix.rstrip("/")
        big = f", {self.too_large} of them too large for the broker" if self.too_large else ""
        return (f"mqtt {self._shown()}: {self.messages} messages, {self.dropped} dropped{big} "
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

        for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
            client = self._start(protocol)
            self._first_done.wait(LOGIN_WAIT_S)
            with self._lock:
                self._opening = False
                refused, self._refused = self._refused, None
                self._closing = refused is not None
            if refused is None:
                self._client = client
                return
            client.disconnect()
            _stop_loop(client)
            if refused != "Unsupported protocol version" or protocol != mqtt.MQTTv5:
                break
            self._closing = False  # a broker without MQTT v5: try again with 3.1.1
        raise StageError(f"{self._shown()}: the broker refused the "
                         f"{'login' if refused in _LOGIN_REFUSALS else 'connection'} ({refused})")

    def _start(self, protocol: mqtt.MQTTProtocolVersion) -> mqtt.Client:
        """A paho client speaking ``protocol``, its network thread started and connecting."""
        import paho.mqtt.client as mqtt

        cfg = self.config
        self._v5 = protocol == mqtt.MQTTv5
        client_id = cfg.client_id or f"streamdet-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # a clean session at every connection (v5: clean start, and it ends with the connection)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                             clean_session=None if self._v5 else True)
        if self._username() is not None or self._password() is not None:
            client.username_pw_set(self._username() or "", self._password())
        if self.url.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file)
            except (OSError, ValueError) as e:
                problem = getattr(e, "strerror", None) or str(e)
                raise StageError(f"{self._shown()}: cannot use the CA certificates {cfg.ca_file or '(system)'} "
                                 f"({' '.join(str(problem).split())})") from e
        self._attempt = client
        self._first_done.clear()
        client.max_queued_messages_set(cfg.buffer)
        client.max_inflight_messages_set(self._limits.inflight)  # until the CONNACK tells the broker's
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        with self._lock:
            self._opening = True
        client.connect_async(self.url.host, self.url.port, keepalive=KEEPALIVE_S,
                             clean_start=True if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        client.loop_start()
        return client

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
            self._answered(client)
            return
        limits = BrokerLimits.from_connack(properties, v5=self._v5)
        with held_messages(client), self._lock:  # paho resends the held messages after this returns
            set_window(client, limits.inflight)
            self._up = True
            self._limits = limits
            was_warned, self._warned = self._warned, False
            self._sweep_lost()
            big = self._forget_too_large(client)
        self._answered(client)
        if big is not None:
            self._warn_too_large(*big)
        if was_warned and not self._closing:
            say(f"mqtt {self._shown()}: connected")

    def _answered(self, client: Any) -> None:
        if client is self._attempt:  # not a client open() gave up on
            self._first_done.set()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is the current one
        problem = _oserror_text(sys.exc_info()[1])
        self._episode(f"broker unreachable ({problem})")
        self._answered(client)  # after the warning: open() returns with it printed

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._lock:
            was_up, self._up = self._up, False
        if was_up:
            text = str(reason)
            self._episode("connection lost" + ("" if text in ("Unspecified error", "Success") else f" ({text})"))
        self._answered(client)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        refused = str(reason) if getattr(reason, "is_failure", False) else None  # v5 PUBACK: e.g. Not authorized
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._acked_early[mid] = refused
                return
            self._settle(refused)
            if not self._pending:
                self._lock.notify_all()
        if refused is not None:
            self._warn_refused(entry[1], refused)

    def _settle(self, refused: str | None) -> None:
        """Count an acknowledged message: delivered, or dropped if the broker refused it (lock held)."""
        if refused is None:
            self.delivered += 1
        else:
            self.dropped += 1

    def _forget_too_large(self, client: Any) -> tuple[str, int] | None:
        """Drop the held messages over the broker's limit (paho's queue and the sink's lock held).

        Returns:
            The topic and size of one of them, or None.
        """
        limit = self._limits.max_packet
        if limit is None:
            return None
        over = [mid for mid, (_, _, size) in self._pending.items() if size > limit]
        big = None
        for mid in forget_held(client, over):
            _, topic, size = self._pending.pop(mid)
            self.dropped += 1
            self.too_large += 1
            big = big or (topic, size)
        return big

    def _warn_once(self, key: str, text: str) -> None:
        with self._lock:
            if key in self._told or self._closing:
                return
            self._told.add(key)
        say(f"warning: {self._shown()}: {text}")

    def _warn_too_large(self, topic: str, size: int) -> None:
        self._warn_once("too large", f"a message on {topic} is {size} bytes, over the broker's limit of "
                        f"{self._limits.max_packet}: dropped ({_EVERY_SUCH})")

    def _warn_refused(self, topic: str, refused: str) -> None:
        self._warn_once(refused, f"the broker refused a message on {topic} ({refused}): dropped ({_EVERY_SUCH})")

    def _sweep_lost(self) -> None:
        """Count QoS 0 messages paho gave up with a lost connection (call with the lock held)."""
        if self.config.qos > 0 or not self._pending:
            return  # QoS 1/2 messages are kept by paho until acknowledged
        import paho.mqtt.client as mqtt

        lost = [mid for mid, (info, _, _) in self._pending.items() if info.rc == mqtt.MQTT_ERR_CONN_LOST]
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
        size = publish_packet_size(topic, len(payload), qos, v5=self._v5)
        with self._lock:
            limit = self._limits.max_packet
            big = limit is not None and size > limit  # sent, the broker would close the connection
            if not big and len(self._pending) >= self.config.buffer:
                self._sweep_lost()
            full = not big and len(self._pending) >= self.config.buffer
            self.dropped += big or full
            self.too_large += big
        if big:
            self._warn_too_large(topic, size)
        if big or full:
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
        refused = None
        with self._lock:
            if not held:
                self.dropped += 1
            elif info.mid in self._acked_early:
                refused = self._acked_early.pop(info.mid)
                self._settle(refused)
            else:
                self._pending[info.mid] = (info, topic, size)
            late = limit is None and self._limits.max_packet is not None  # connected meanwhile: check it
        if late:
            with held_messages(client), self._lock:
                gone = self._forget_too_large(client)
            if gone is not None:
                self._warn_too_large(*gone)
        if refused is not None:
            self._warn_refused(topic, refused)

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
