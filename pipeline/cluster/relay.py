"""The driver's side of a cluster run: the units' messages to the driver's sinks, exactly once.

Each unit yields its messages in order (:mod:`pipeline.cluster.worker`). A file unit that failed
is run again from its start, so its first frames arrive a second time: the relay keeps, per file
source, the index of the next frame to publish, drops what was published already and refuses a
gap. A source's EOS is published once. Cameras publish what arrives (a shard that moved to
another node starts counting its frames from 0 again; its ``status`` message with state
``moved`` comes first). A shard's placement becomes a ``status.<source_id>`` message per camera
with the ``node`` it runs on (state ``placed``, then ``moved`` when it changes node).

No Ray import: the relay is plain Python over the sinks of :mod:`pipeline.stages.sinks`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.cluster.worker import Message
from pipeline.stages.forward_sink import KIND_DETECTIONS, KIND_EOS, KIND_STATS, KIND_STATUS
from pipeline.stages.payloads import STATUS_SCHEMA
from pipeline.stages.sink_base import Sink
from streamdet.messages import EndOfStream, EosReason

__all__ = ["Relay", "SourceTally", "placement_status"]


@dataclass
class SourceTally:
    """What the driver published for one source.

    Attributes:
        live: a camera (published as it comes) rather than a file (exactly once, in order).
        next_index: a file's next frame index to publish.
        frames: detections messages published.
        detections: detections in them.
        duplicates: frames dropped because they were published already (a retried unit).
        eos: the EOS payload once published, else None.
        node: the node the source last ran on ("" before its first placement).
    """

    live: bool
    next_index: int = 0
    frames: int = 0
    detections: int = 0
    duplicates: int = 0
    eos: dict[str, Any] | None = None
    node: str = ""


def placement_status(source_id: str, node: dict[str, Any], *, moved: bool, previous: str = "") -> dict[str, Any]:
    """The ``status.<source_id>`` payload saying where a source runs (schema ``streamdet.status/1``).

    Args:
        source_id: the source.
        node: the placement (``{node_id, node_ip, pid, attempt}``).
        moved: it ran on another node before.
        previous: that node's id.

    Returns:
        The status object with state ``placed`` or ``moved`` and the extra fields ``node``
        (Ray node id), ``node_ip`` and ``previous_node``.
    """
    node_id = str(node.get("node_id", ""))
    where = f"{node.get('node_ip', '?')} (node {node_id[:12]})"
    return {"schema": STATUS_SCHEMA, "source_id": source_id, "state": "moved" if moved else "placed",
            "attempt": int(node.get("attempt", 0)), "next_delay_s": 0.0,
            "message": f"moved to {where}" if moved else f"running on {where}", "time": round(time.time(), 6),
            "dropped": 0, "node": node_id, "node_ip": str(node.get("node_ip", "")),
            "previous_node": previous or None}


class Relay:
    """Publishes the units' messages on the driver's sinks.

    Args:
        sinks: the driver's opened sinks, for every message.
        worker_published: sinks among ``sinks`` that cameras publish to from their workers
            themselves (the MQTT sink): they get the cameras' placement status from the relay,
            none of their other messages.
        sources: ``(source_id, live)`` of every source.
        on_frames: called with the number of frames published by each :meth:`feed` (progress).
    """

    def __init__(self, *, sinks: Sequence[Sink], worker_published: Sequence[Sink] = (),
                 sources: Sequence[tuple[str, bool]], on_frames: Callable[[int], None] | None = None) -> None:
        self.sinks = list(sinks)
        self.camera_sinks = [sk for sk in sinks if sk not in worker_published]
        self.tally = {sid: SourceTally(live=live) for sid, live in sources}
        self.on_frames = on_frames
        self.errors: list[str] = []

    def ended(self, source_ids: Sequence[str]) -> bool:
        """Whether every one of these sources has had its EOS published."""
        return all(self.tally[sid].eos is not None for sid in source_ids)

    def feed(self, batch: Sequence[Message]) -> None:
        """Publish one batch of a unit's messages (see the module docstring for what is dropped).

        Raises:
            ValueError: a file's frame arrived ahead of its next index (a unit skipped frames).
        """
        frames = 0
        for kind, sid, payload, index in batch:
            if kind == KIND_DETECTIONS:
                frames += self._frame(sid, payload, index)
            elif kind == KIND_EOS:
                self._eos(sid, payload)
            elif kind == KIND_STATUS:
                obj = json.loads(payload)
                for sink in self._sinks(sid):
                    sink.status(obj)
            elif kind == KIND_STATS:
                obj = json.loads(payload)
                for sink in self._sinks(next(iter(obj.get("sources", {})), "")):
                    sink.stats(obj)
            # KIND_SUMMARY and KIND_PLACED are the driver's (see place()): nothing to publish
        if frames and self.on_frames is not None:
            self.on_frames(frames)

    def place(self, source_ids: Sequence[str], node: dict[str, Any]) -> None:
        """A shard (re)started somewhere: publish each camera's ``placed`` / ``moved`` status."""
        node_id = str(node.get("node_id", ""))
        for sid in source_ids:
            t = self.tally[sid]
            moved = bool(t.node) and t.node != node_id
            if t.node == node_id and not moved and int(node.get("attempt", 0)) == 0:
                continue
            payload = placement_status(sid, node, moved=moved, previous=t.node)
            t.node = node_id
            for sink in self.sinks:
                sink.status(payload)

    def _sinks(self, source_id: str) -> list[Sink]:
        t = self.tally.get(source_id)
        return self.camera_sinks if t is not None and t.live else self.sinks

    def _frame(self, sid: str, payload: bytes, index: int) -> int:
        t = self.tally[sid]
        if t.eos is not None:
            t.duplicates += 1
            return 0
        if not t.live:
            if index < t.next_index:
                t.duplicates += 1
                return 0
            if index > t.next_index:
                raise ValueError(f"source {sid}: frame {index} arrived before frame {t.next_index}")
        t.next_index = index + 1
        for sink in self._sinks(sid):
            sink.write_json(sid, payload)
        t.frames += 1
        t.detections += payload.count(b'"box_xyxy"')  # one per detection (cheaper than parsing)
        return 1

    def _eos(self, sid: str, payload: bytes) -> None:
        t = self.tally[sid]
        if t.eos is not None:
            return
        obj = json.loads(payload)
        t.eos = obj
        eos = EndOfStream(sid, int(obj["frames"]), EosReason(obj["reason"]), obj.get("error") or "")
        for sink in self._sinks(sid):
            sink.end_of_stream(eos)

    def fail(self, source_id: str, error: str) -> None:
        """A file failed for good: publish its EOS with reason ``error`` (once) and record the error."""
        t = self.tally[source_id]
        if error not in self.errors:  # a shard's cameras share their pipeline's error
            self.errors.append(error)
        if t.eos is None:
            eos = EndOfStream(source_id, t.next_index if not t.live else t.frames, EosReason.ERROR, error)
            t.eos = {"frames": eos.frames, "reason": "error", "error": error}
            for sink in self.sinks:
                sink.end_of_stream(eos)

