"""The forward sink: every message, in order and without loss, to one ZeroMQ PULL socket.

A cluster worker (:mod:`pipeline.cluster.worker`) runs a whole pipeline and hands its messages to
Ray; the pipeline's postprocess stage pushes them to the worker's PULL socket with this sink.
Unlike the PUB sink it never drops: when the receiver falls :data:`FORWARD_HWM` messages behind,
the stage waits (back-pressure up to the decoders), as it would for a slow disk.

Wire format, one ZeroMQ multipart message per published message::

    [kind (1 byte), source_id (UTF-8), payload (JSON, UTF-8), frame_index (int64 little-endian; -1)]

kinds: :data:`KIND_DETECTIONS` (payload exactly the bytes other sinks publish),
:data:`KIND_EOS`, :data:`KIND_STATUS`, :data:`KIND_STATS`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import zmq

from pipeline.stages.payloads import dumps, eos_payload
from pipeline.stages.sink_base import FrameResult, Sink
from streamdet.messages import EndOfStream

__all__ = ["FORWARD_HWM", "KIND_DETECTIONS", "KIND_EOS", "KIND_STATS", "KIND_STATUS", "ForwardSink", "unpack"]

FORWARD_HWM = 1000
"""Messages queued towards the receiver before the stage waits."""

FORWARD_LINGER_MS = 30_000
"""At close, longest wait for the queued messages to reach the receiver."""

KIND_DETECTIONS = b"d"
KIND_EOS = b"e"
KIND_STATUS = b"s"
KIND_STATS = b"t"

_INDEX = struct.Struct("<q")


def unpack(parts: list[bytes]) -> tuple[bytes, str, bytes, int]:
    """Decode one forwarded message.

    Returns:
        ``(kind, source_id, payload_json, frame_index)`` (``frame_index`` -1 except for detections).

    Raises:
        ValueError: if the message is not four parts of the documented form.
    """
    if len(parts) != 4 or len(parts[0]) != 1 or len(parts[3]) != _INDEX.size:
        raise ValueError(f"forwarded message: expected 4 parts [kind, source_id, payload, index], got {len(parts)}")
    return parts[0], parts[1].decode(), parts[2], _INDEX.unpack(parts[3])[0]


class ForwardSink(Sink):
    """Pushes every message to ``endpoint`` (connects a PUSH socket; blocking send: never drops).

    Args:
        ctx: the process's ZeroMQ context.
        endpoint: the receiver's PULL endpoint (``ipc://...``).
    """

    def __init__(self, *, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.messages = 0
        self._sock: zmq.Socket[Any] | None = None

    def describe(self) -> str:
        """``forwarded: N messages``."""
        return f"forwarded to the cluster driver: {self.messages} messages"

    def open(self) -> None:
        """Connect the PUSH socket."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, FORWARD_HWM)
        sock.setsockopt(zmq.LINGER, FORWARD_LINGER_MS)
        sock.connect(self.endpoint)
        self._sock = sock

    def _send(self, kind: bytes, source_id: str, payload: bytes, index: int = -1) -> None:
        if self._sock is not None:
            self._sock.send_multipart([kind, source_id.encode(), payload, _INDEX.pack(index)])
            self.messages += 1

    def write(self, result: FrameResult) -> None:
        """Forward the frame's detections payload (the same bytes the other sinks publish)."""
        self._send(KIND_DETECTIONS, result.record.frame.source_id, result.json(), result.record.frame.frame_index)

    def write_json(self, source_id: str, payload_json: bytes) -> None:
        """Not used: a forward sink sits in a worker's pipeline, never in the driver."""
        raise NotImplementedError("ForwardSink takes frames, not relayed messages")

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Forward the EOS payload."""
        self._send(KIND_EOS, eos.source_id, dumps(eos_payload(eos)))

    def status(self, payload: Mapping[str, Any]) -> None:
        """Forward a status payload."""
        self._send(KIND_STATUS, str(payload["source_id"]), dumps(payload))

    def stats(self, payload: Mapping[str, Any]) -> None:
        """Forward the stats payload."""
        self._send(KIND_STATS, "", dumps(payload))

    def close(self) -> None:
        """Close the socket (lingering up to :data:`FORWARD_LINGER_MS` for the receiver)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
