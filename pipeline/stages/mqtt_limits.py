"""What an MQTT v5 broker announces in its CONNACK, and the size of a PUBLISH packet checked against it.

A broker that limits its packets (Mosquitto's ``max_packet_size``) closes the connection of a client
that sends a larger one. The MQTT sink learns the limit from the CONNACK (Maximum Packet Size) and
drops a message that would exceed it, instead of sending it: paho would send it again after every
reconnection, and the broker would cut every connection, blocking all the messages behind it.

The broker's Receive Maximum (how many QoS 1/2 messages it accepts unacknowledged; Mosquitto's
``max_inflight_messages``, 20 by default) bounds the sink's window of messages in flight: beyond
it Mosquitto refuses QoS 2 messages in a PUBREC that paho does not read, and they are lost unseen.

paho-mqtt is imported only by :func:`set_window`, once connected (every postprocess process imports the sink).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_INFLIGHT = 100
"""QoS 1/2 messages sent and not yet acknowledged at a time, at most (the rest wait in the buffer)."""

DEFAULT_INFLIGHT = 20
"""The window until the broker announced its Receive Maximum (and with an MQTT 3.1.1 broker, which
announces none): Mosquitto's default ``max_inflight_messages``."""


def publish_packet_size(topic: str, payload_len: int, qos: int, *, v5: bool) -> int:
    """Bytes of the PUBLISH packet paho sends for this message (no properties), fixed header included.

    Fixed header (1 byte + the remaining length, 1 to 4 bytes), then the topic (2 + its UTF-8
    bytes), the packet id (QoS 1/2: 2), the properties' length (MQTT v5: 1, there are none) and
    the payload. The MQTT v5 Maximum Packet Size counts all of it.
    """
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + (1 if v5 else 0) + payload_len
    header = 2 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return header + remaining


@dataclass(frozen=True)
class BrokerLimits:
    """What the broker's CONNACK announced.

    Attributes:
        max_packet: Maximum Packet Size in bytes, or None (no limit announced).
        inflight: the window of QoS 1/2 messages in flight: ``min(MAX_INFLIGHT, Receive Maximum)``
            (MQTT v5 without one: 65 535), :data:`DEFAULT_INFLIGHT` with MQTT 3.1.1.
    """

    max_packet: int | None = None
    inflight: int = DEFAULT_INFLIGHT

    @classmethod
    def from_connack(cls, properties: Any, *, v5: bool) -> BrokerLimits:
        """The limits of a CONNACK's properties (paho's ``Properties``; none with MQTT 3.1.1)."""
        if not v5:
            return cls()
        size = getattr(properties, "MaximumPacketSize", None)
        receive = getattr(properties, "ReceiveMaximum", 65_535)
        return cls(max_packet=int(size) if size else None, inflight=max(1, min(MAX_INFLIGHT, int(receive))))


@contextlib.contextmanager
def held_messages(client: Any) -> Iterator[None]:
    """Hold paho's lock on its queue of QoS 1/2 messages (taken before the sink's own lock, as paho does)."""
    with getattr(client, "_out_message_mutex", None) or threading.Lock():
        yield


def forget_held(client: Any, mids: Iterable[int]) -> list[int]:
    """Take the QoS 1/2 messages ``mids`` out of paho's queue so that they are never sent (in :func:`held_messages`).

    Meant for :meth:`MqttSink._on_connect`: paho calls it after resetting its messages for the new
    connection and before sending them again. This reaches into paho's private queue
    (``_out_messages``, the same in paho 1.x and 2.x); without it, nothing is taken out.

    Returns:
        The message ids taken out.
    """
    queue = getattr(client, "_out_messages", None)
    if not isinstance(queue, dict):
        return []
    return [mid for mid in mids if queue.pop(mid, None) is not None]


def set_window(client: Any, inflight: int) -> None:
    """Make ``inflight`` paho's window of QoS 1/2 messages in flight, from :meth:`MqttSink._on_connect`.

    paho's setter refuses once a connection is open, so this sets its private attribute
    (``_max_inflight_messages``, the same in paho 1.x and 2.x), and holds back the messages beyond
    the window that paho marked for sending again when it reconnected: paho sends them as the
    broker acknowledges the others. Call inside :func:`held_messages`; without these attributes
    nothing changes (the window stays :data:`DEFAULT_INFLIGHT`).
    """
    queue = getattr(client, "_out_messages", None)
    if not isinstance(getattr(client, "_max_inflight_messages", None), int) or not isinstance(queue, dict):
        return
    from paho.mqtt.client import mqtt_ms_publish, mqtt_ms_queued

    client._max_inflight_messages = inflight
    sending = 0
    for message in queue.values():
        if message.qos > 0 and message.state == mqtt_ms_publish:
            sending += 1
            if sending > inflight:
                message.state = mqtt_ms_queued
