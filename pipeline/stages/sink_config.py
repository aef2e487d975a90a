"""Which sinks the postprocess stage opens (:class:`SinkConfig`), and opening one with a clear error line.

Split from :mod:`pipeline.stages.postprocess` (which re-exports these names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from pipeline.stages.base import StageError
from pipeline.stages.forward_sink import ForwardSink
from pipeline.stages.mqtt_sink import MqttConfig, MqttSink
from pipeline.stages.sinks import JsonlSink, PubSink, Sink, VideoSink
from pipeline.supervise import Ledger

__all__ = ["RESUME_SUBSCRIBERS_WAIT_S", "SinkConfig", "finish_left_outputs", "open_sink"]

RESUME_SUBSCRIBERS_WAIT_S = 5.0
"""Longest wait of a restarted postprocess stage for the subscribers of the dead one to reconnect
(ZeroMQ subscribers reconnect by themselves, every 100 ms by default); what is published before a
subscriber is back never reaches it (PUB semantics)."""



def open_sink(sink: Sink) -> None:
    """Open one sink; a file it cannot create becomes one line naming the file.

    Raises:
        TransportError: if a socket cannot be bound.
        StageError: ``<file>: cannot create output (<reason>)``, or the sink's own start-up error.
    """
    try:
        sink.open()
    except OSError as e:
        raise StageError(f"{getattr(e, 'filename', None) or sink.describe()}: cannot create output "
                         f"({e.strerror or e})") from e


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    """Which sinks to open (picklable; built in the postprocess process).

    Attributes:
        publish: ZeroMQ PUB endpoint, or None for no publishing.
        publish_wait_subscribers: wait for this many subscriptions before the run starts.
        publish_wait_timeout_s: longest wait for them.
        jsonl: JSONL output file, or None.
        video_out: annotated video file, or None.
        fps_by_source: frame rate per source id (for the video sink).
        resume: the stage was restarted after a crash: files written by the dead one are continued
            (JSONL appended to, video kept as a finished segment) instead of started afresh.
        jsonl_flush_ms: flush the JSONL file after every line (0) or at most this often, ms.
        jsonl_rotate: start a new JSONL file this often or at this size (``1h``, ``100MB``; None: one file).
        mqtt: the MQTT sink's configuration, or None.
        forward: a ZeroMQ endpoint the messages are also pushed to, in order and without loss
            (the pipeline waits when it is full): how a cluster worker hands them to Ray (see
            :mod:`pipeline.stages.forward_sink`); None: not forwarded.
    """

    publish: str | None
    publish_wait_subscribers: int = 0
    publish_wait_timeout_s: float = 10.0
    jsonl: str | None = None
    video_out: str | None = None
    fps_by_source: tuple[tuple[str, float], ...] = ()
    resume: bool = False
    jsonl_flush_ms: float = 0.0
    jsonl_rotate: str | None = None
    mqtt: MqttConfig | None = None
    forward: str | None = None

    @property
    def needs_pixels(self) -> bool:
        """Whether a sink needs the frame pixels (the annotated video)."""
        return self.video_out is not None

    def build(self, *, ctx: zmq.Context[Any], class_names: Sequence[str],
              class_names_by_source: dict[str, Sequence[str]] | None = None,
              ledger: Ledger | None = None) -> list[Sink]:
        """Create the sinks (not opened); ``class_names_by_source`` overrides the names per source.

        With a ledger the publish sink records its subscriptions there; resuming, it first waits
        (up to :data:`RESUME_SUBSCRIBERS_WAIT_S`) until the dead sink's subscribers have reconnected.
        """
        sinks: list[Sink] = []
        if self.publish:
            wait, timeout = self.publish_wait_subscribers, self.publish_wait_timeout_s
            if self.resume and ledger is not None:
                wait, timeout = ledger.subscribers, RESUME_SUBSCRIBERS_WAIT_S
            sinks.append(PubSink(ctx=ctx, endpoint=self.publish, wait_subscribers=wait, wait_timeout_s=timeout,
                                 on_subscribers=ledger.set_subscribers if ledger is not None else None))
        if self.jsonl:
            sinks.append(JsonlSink(path=self.jsonl, flush_ms=self.jsonl_flush_ms, rotate=self.jsonl_rotate,
                                   resume=self.resume, after_finish=ledger is not None and ledger.finished))
        if self.mqtt is not None:
            sinks.append(MqttSink(config=self.mqtt))
        if self.forward is not None:
            sinks.append(ForwardSink(ctx=ctx, endpoint=self.forward))
        if self.video_out:
            sinks.append(VideoSink(path=self.video_out, fps_by_source=dict(self.fps_by_source),
                                   class_names=class_names, class_names_by_source=class_names_by_source,
                                   resume=self.resume))
        return sinks


def finish_left_outputs(config: SinkConfig) -> list[str]:
    """Finish the files a postprocess stage that is not started again left under temporary names.

    The JSONL file is renamed into place (a torn last line cut), the annotated videos are kept as
    segments, as a restarted stage would have done (:meth:`JsonlSink.finish_left`,
    :meth:`VideoSink.finish_left`); PUB, MQTT and forwarding have nothing to finish. For the runner,
    once the stage died for good (its restarts used up, or not restartable). Never raises.

    Returns:
        One output line per finished file (as the stage reports its outputs), or a line saying why
        one could not be finished.
    """
    lines: list[str] = []
    sinks: list[JsonlSink | VideoSink] = []
    if config.jsonl:
        sinks.append(JsonlSink(path=config.jsonl, rotate=config.jsonl_rotate))
    if config.video_out:
        sinks.append(VideoSink(path=config.video_out, fps_by_source=dict(config.fps_by_source), class_names=()))
    for sink in sinks:
        try:
            if sink.finish_left():
                lines.append(f"{sink.describe()} (finished after the postprocess stage failed)")
        except Exception as e:  # (an FFmpeg error remuxing a segment too)
            lines.append(f"{sink.describe()}: cannot finish ({e})")
    return lines

