"""Which sinks the postprocess stage opens (:class:`SinkConfig`), and opening one with a clear error line.

Split from :mod:`pipeline.stages.postprocess` (which re-exports these names).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from pipeline.stages.base import StageError
from pipeline.stages.forward_sink import ForwardSink
from pipeline.stages.mqtt_sink import MqttConfig, MqttSink
from pipeline.stages.sinks import JsonlSink, PubSink, Sink, VideoSink
from pipeline.supervise import Ledger

__all__ = ["RESUME_SUBSCRIBERS_WAIT_S", "SinkConfig", "check_outputs_apart", "finish_left_outputs", "open_sink"]

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
        publish_wait_subscribers: wait for this many subscribers before the run starts.
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

        With a ledger the publish sink records its subscriber count there; resuming, it first waits
        (up to :data:`RESUME_SUBSCRIBERS_WAIT_S`) until the dead sink's subscribers have reconnected.
        """
        sinks: list[Sink] = []
        if self.publish:
            wait, timeout = self.publish_wait_subscribers, self.publish_wait_timeout_s
            if self.resume and ledger is not None:
                wait, timeout = ledger.subscribers, RESUME_SUBSCRIBERS_WAIT_S
            sinks.append(PubSink(ctx=ctx, endpoint=self.publish, wait_subscribers=wait, wait_timeout_s=timeout,
                                 on_subscribers=ledger.set_subscribers if ledger is not None else None, ledger=ledger))
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


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # (a hard link)
    except OSError:
        return False


def check_outputs_apart(*, jsonl: str | os.PathLike[str] | None, video_out: str | os.PathLike[str] | None,
                        sources: Sequence[tuple[str, str]], jsonl_rotate: str | None = None) -> None:
    """Check that no two outputs are one file and that no output is a source file, before anything is written.

    Args:
        jsonl: the JSONL file (not checked with ``jsonl_rotate``: the files are named by time).
        video_out: the annotated video of the first source; the others get ``<stem>-<source_id><suffix>``.
        sources: ``(source_id, url)`` in the run's order (URLs with ``://`` are not files).
        jsonl_rotate: the JSONL rotation, if any.

    Raises:
        ValueError: naming the two settings and the file (the run would write over its own input,
            or two sinks would write one file under the same temporary name).
    """
    outputs: list[tuple[str, str]] = []
    if jsonl is not None and jsonl_rotate is None:
        outputs.append(("sinks.jsonl", str(jsonl)))
    if video_out is not None:
        video = Path(video_out)
        for k, (sid, _) in enumerate(sources):
            named = video if k == 0 else video.with_name(f"{video.stem}-{sid}{video.suffix}")
            outputs.append(("sinks.video_out" + ("" if k == 0 else f" (source {sid})"), str(named)))
    for i, (name, path) in enumerate(outputs):
        for other, other_path in outputs[i + 1:]:
            if _same_file(path, other_path):
                raise ValueError(f"{name} and {other} name the same file ({path})")
        for sid, url in sources:
            if "://" not in url and _same_file(path, url):
                raise ValueError(f"{name} {path}: is the input of source {sid}; the run would write over it")

