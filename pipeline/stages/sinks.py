"""Sinks: where detections go. ZeroMQ PUB (the external stream), JSONL file, annotated video.

Sinks run in the postprocess process (see :mod:`pipeline.stages.postprocess`); each implements
:class:`Sink` so one could run in a process of its own later. The published JSON is the public,
versioned schema documented in ``docs/schema.md`` (built in :mod:`pipeline.stages.payloads`, re-exported here):

* topic ``detections.<source_id>``: :func:`detections_payload` (schema :data:`DETECTIONS_SCHEMA`);
* topic ``eos.<source_id>``: :func:`eos_payload` (schema :data:`EOS_SCHEMA`), once, after the
  source's last frame;
* topic ``status.<source_id>``: :func:`status_payload` (schema :data:`STATUS_SCHEMA`), a live
  source's state changes (connected, stalled, reconnecting, eos, error);
* topic ``stats``: the periodic per-source statistics (schema ``streamdet.stats/1``, see
  :mod:`pipeline.stages.stats`), with live sources only.

PUB semantics: a subscriber receives only what is published after its subscription reached the
socket. The PUB sink is an XPUB socket, so it can wait at start-up until
``publish_wait_subscribers`` subscriptions have arrived (then no message is lost to them); a
subscriber that falls :data:`~pipeline.transport.PUB_HWM` messages behind loses messages.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import zmq

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
from pipeline.transport import PUB_HWM, PUB_LINGER_MS, TransportError, redact_url
from streamdet.messages import EndOfStream, FrameRecord

__all__ = [
    "DETECTIONS_SCHEMA",
    "DETECTIONS_TOPIC",
    "EOS_SCHEMA",
    "EOS_TOPIC",
    "STATS_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "FrameResult",
    "JsonlSink",
    "PubSink",
    "Sink",
    "VideoSink",
    "detections_payload",
    "dumps",
    "eos_payload",
    "status_payload",
    "topic",
]

VIDEO_CODEC = "libx264"
VIDEO_OPTIONS = {"preset": "veryfast", "crf": "23"}
"""H.264 encoder settings of the annotated-video sink (speed over size: it shares the CPU)."""


@dataclass(frozen=True, eq=False)
class FrameResult:
    """One frame's detections on its way to the sinks.

    Attributes:
        record: the frame's record (ids, PTS, letterbox, stage timings).
        detections: a ``streamdet.postprocess.Detections`` in frame pixels.
        payload: the published JSON object (:func:`detections_payload`).
        pixels: ``(H, W, 3)`` uint8 RGB frame when a sink needs pixels, else None.
    """

    record: FrameRecord
    detections: Any
    payload: dict[str, Any]
    pixels: npt.NDArray[np.uint8] | None = None


class Sink(ABC):
    """Where results go; lifecycle ``open()`` -> ``write()``/``end_of_stream()``... -> ``close()``."""

    needs_pixels: bool = False
    """Whether :meth:`write` needs ``FrameResult.pixels`` (keeps frame slots until it is done)."""

    @abstractmethod
    def describe(self) -> str:
        """Where this sink's output went, for the run summary."""

    @abstractmethod
    def open(self) -> None:
        """Acquire the output (bind, create a file).

        Raises:
            TransportError: for a socket that cannot be bound.
            OSError: for a file that cannot be created.
        """

    @abstractmethod
    def write(self, result: FrameResult) -> None:
        """Consume one frame's result."""

    @abstractmethod
    def end_of_stream(self, eos: EndOfStream) -> None:
        """A source ended (after its last :meth:`write`)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release everything (idempotent)."""

    def status(self, payload: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """A live source's status event (:func:`status_payload`); ignored unless the sink publishes it."""

    def stats(self, payload: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """The periodic statistics; ignored unless the sink publishes them."""


class PubSink(Sink):
    """Publishes results on a ZeroMQ XPUB socket as ``[topic, JSON]`` multipart messages.

    Args:
        ctx: the process's ZeroMQ context.
        endpoint: where to bind, e.g. ``tcp://127.0.0.1:5556``.
        wait_subscribers: at :meth:`open`, wait until this many subscriptions arrived (0: don't wait).
        wait_timeout_s: give up waiting after this long (then publish anyway).
    """

    def __init__(self, *, ctx: zmq.Context[Any], endpoint: str, wait_subscribers: int = 0,
                 wait_timeout_s: float = 10.0) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.wait_subscribers = wait_subscribers
        self.wait_timeout_s = wait_timeout_s
        self.subscriptions = 0
        self.messages = 0
        self._sock: zmq.Socket[Any] | None = None

    def describe(self) -> str:
        """``zmq PUB <endpoint> (...)``."""
        return (f"zmq PUB {redact_url(self.endpoint)}: {self.messages} messages "
                "(topics detections.<source_id>, eos.<source_id>, status.<source_id>, stats)")

    def open(self) -> None:
        """Bind the socket and wait for the configured number of subscriptions.

        Raises:
            TransportError: if the endpoint cannot be bound (e.g. the port is in use).
        """
        sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, PUB_HWM)
        sock.setsockopt(zmq.LINGER, PUB_LINGER_MS)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            problem = zmq.strerror(e.errno or 0)
            raise TransportError(f"{redact_url(self.endpoint)}: cannot bind the publish socket ({problem})") from e
        self._sock = sock
        deadline = time.monotonic() + self.wait_timeout_s
        while self.subscriptions < self.wait_subscribers:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            if sock.poll(min(left_ms, 100), zmq.POLLIN):
                self._read_subscriptions()

    def _read_subscriptions(self) -> None:
        assert self._sock is not None
        while True:
            try:
                event = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[:1] == b"\x01":
                self.subscriptions += 1

    def _send(self, topic_bytes: bytes, payload: Mapping[str, Any]) -> None:
        assert self._sock is not None
        self._sock.send_multipart([topic_bytes, dumps(payload)])
        self.messages += 1

    def write(self, result: FrameResult) -> None:
        """Publish ``detections.<source_id>``."""
        if self._sock is None:
            return
        self._read_subscriptions()
        self._send(topic(DETECTIONS_TOPIC, result.record.frame.source_id), result.payload)

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
            self._sock.close()
            self._sock = None


class _AtomicFile:
    """A file written under a temporary name and renamed into place when done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")

    def commit(self) -> None:
        os.replace(self.tmp, self.path)


class JsonlSink(Sink):
    """Writes every published object (detections and EOS) as one JSON line.

    The file is written under a temporary name and renamed into place when the sink closes, so
    a run that dies leaves no file posing as complete. A finished run's file ends with one EOS line
    per source.

    Args:
        path: the ``.jsonl`` file.
    """

    def __init__(self, *, path: str | os.PathLike[str]) -> None:
        self._file = _AtomicFile(Path(path))
        self._fh: IO[str] | None = None
        self.lines = 0

    def describe(self) -> str:
        """``jsonl <path> (N lines)``."""
        return f"jsonl {self._file.path}: {self.lines} lines"

    def open(self) -> None:
        """Create the temporary file.

        Raises:
            OSError: if it cannot be created.
        """
        self._file.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self._file.tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _line(self, payload: Mapping[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(payload, separators=(",", ":"), allow_nan=False))
        self._fh.write("\n")
        self.lines += 1

    def write(self, result: FrameResult) -> None:
        """Append the frame's payload."""
        self._line(result.payload)

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Append the EOS payload."""
        self._line(eos_payload(eos))

    def close(self) -> None:
        """Flush, close and rename into place."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._file.commit()


class _VideoOut:
    def __init__(self, path: Path, fps: float, frame_hw: tuple[int, int]) -> None:
        import av

        self.file = _AtomicFile(path)
        self.container = av.open(str(self.file.tmp), mode="w", format=_container_format(path))
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        stream = self.container.add_stream(VIDEO_CODEC, rate=rate, options=dict(VIDEO_OPTIONS))
        assert isinstance(stream, av.VideoStream)
        h, w = frame_hw
        stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        self.stream: av.VideoStream = stream
        self.frames = 0

    def write(self, image_rgb: npt.NDArray[np.uint8]) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(image_rgb, format="rgb24")
        frame.pts = self.frames
        frame.time_base = self.stream.codec_context.time_base or Fraction(1, 25)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        self.file.commit()


def _container_format(path: Path) -> str | None:
    return {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".avi": "avi"}.get(path.suffix.lower())


class VideoSink(Sink):
    """Writes annotated frames (boxes, labels, masks, class maps drawn with OpenCV) as H.264 video through PyAV.

    One file per source: ``path`` for the first source, ``<stem>-<source_id><suffix>`` for the
    others. Files are written under a temporary name and renamed into place when closed.

    Args:
        path: the output video file (container from its suffix: ``.mp4``, ``.mkv``, ``.mov``...).
        fps_by_source: each source's frame rate (0: unknown, 25 is used).
        class_names: names by class id for the labels.
        class_names_by_source: per-source names (sources served by another model), overriding
            ``class_names``.
    """

    needs_pixels = True

    def __init__(self, *, path: str | os.PathLike[str], fps_by_source: Mapping[str, float],
                 class_names: Sequence[str],
                 class_names_by_source: Mapping[str, Sequence[str]] | None = None) -> None:
        self.path = Path(path)
        self.fps_by_source = dict(fps_by_source)
        self.class_names = tuple(class_names)
        self.class_names_by_source = {k: tuple(v) for k, v in (class_names_by_source or {}).items()}
        self._outs: dict[str, _VideoOut] = {}
        self._done: list[tuple[Path, int]] = []

    def describe(self) -> str:
        """``video <path> (N frames)`` per file."""
        parts = [f"{p} ({n} frames)" for p, n in self._done + [(o.file.path, o.frames) for o in self._outs.values()]]
        return "video " + (", ".join(parts) if parts else f"{self.path} (no frames)")

    def open(self) -> None:
        """Check the output directory exists (files are created on the first frame).

        Raises:
            OSError: if the directory cannot be created.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _path_for(self, source_id: str) -> Path:
        if not self._outs and not self._done:
            return self.path
        return self.path.with_name(f"{self.path.stem}-{source_id}{self.path.suffix}")

    def write(self, result: FrameResult) -> None:
        """Draw and encode the frame."""
        from pipeline.annotate import draw_detections

        if result.pixels is None:
            return
        sid = result.record.frame.source_id
        out = self._outs.get(sid)
        if out is None:
            out = _VideoOut(self._path_for(sid), self.fps_by_source.get(sid, 0.0), result.record.frame.frame_hw)
            self._outs[sid] = out
        image = result.pixels if result.pixels.flags.writeable else result.pixels.copy()
        d = result.detections
        names = self.class_names_by_source.get(sid, self.class_names)
        semantic = getattr(d, "semantic", None)
        if semantic is not None and semantic.shape == image.shape[:2]:
            from pipeline.annotate import draw_semantic

            bg = 0 if names and names[0].lower() in ("background", "bg", "__background__") else None
            draw_semantic(image, semantic, background_id=bg)
        masks = getattr(d, "masks", None)
        rles = getattr(d, "mask_rles", None)
        if masks is None and rles:
            from streamdet.masks import rle_to_masks

            masks = rle_to_masks(rles)
        draw_detections(image, d.boxes_xyxy, d.scores, d.class_ids, names, masks=masks)
        out.write(image)

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Finish the source's file."""
        out = self._outs.pop(eos.source_id, None)
        if out is not None:
            out.close()
            self._done.append((out.file.path, out.frames))

    def close(self) -> None:
        """Finish every open file."""
        for sid in list(self._outs):
            out = self._outs.pop(sid)
            out.close()
            self._done.append((out.file.path, out.frames))
