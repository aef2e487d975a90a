"""What runs on a cluster worker: one whole pipeline, its messages collected in order.

A unit of work is one file source (a Ray task) or a shard of cameras (a Ray actor). Either way
the worker runs the ordinary :class:`~pipeline.runner.Pipeline` (its stage processes, slot pools,
self-healing) for those sources only, with no sink of its own but the forward sink
(:mod:`pipeline.stages.forward_sink`) and, for cameras, the MQTT sink: every message comes back
to :class:`UnitRun` over a private ``ipc://`` socket, in order and without loss, and the Ray
side yields them to the driver in small batches (:data:`BATCH_MAX`, :data:`BATCH_WAIT_S`).

Nothing here imports Ray (the Ray wrappers are in :mod:`pipeline.cluster.remote`), so a unit can
be run and tested on its own.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from pipeline.settings import Settings, SourceEntry
from pipeline.stages.forward_sink import KIND_EOS, unpack
from pipeline.transport import private_run_dir

__all__ = ["BATCH_MAX", "BATCH_WAIT_S", "KIND_SUMMARY", "Message", "UnitRun", "UnitSpec", "unit_settings"]

BATCH_MAX = 64
"""Most messages per yielded batch."""

BATCH_WAIT_S = 0.05
"""Longest a message waits on the worker before its batch is yielded."""

TAIL_QUIET_S = 0.5
"""Once the pipeline has ended, how long the receiver waits for stragglers if an EOS is missing."""

KIND_SUMMARY = b"S"
"""The last message of a unit: its run summary as JSON (``frames``, ``detections``, ``exit_code``,
``errors``, ``warnings``, ``outputs``, ``seconds``)."""

KIND_PLACED = b"P"
"""The first message of a unit or shard run: where it runs, JSON ``{node_id, node_ip, pid, attempt}``."""

Message = tuple[bytes, str, bytes, int]
"""``(kind, source_id, payload_json, frame_index)`` (see :mod:`pipeline.stages.forward_sink`)."""


@dataclass(frozen=True, kw_only=True)
class UnitSpec:
    """One unit of work: the run's settings restricted to some sources (picklable).

    Attributes:
        settings: the driver's settings as plain data (:func:`unit_settings` made them).
        source_ids: the unit's sources, for messages.
        live: whether these are cameras (a shard) rather than one file.
    """

    settings: dict[str, Any] = field(repr=False)
    source_ids: tuple[str, ...]
    live: bool = False


def unit_settings(settings: Settings, sources: list[SourceEntry], *, keep_mqtt: bool) -> dict[str, Any]:
    """The settings of a unit: the driver's, with only these sources and only the forward sink.

    Args:
        settings: the driver's settings.
        sources: the unit's sources, each with its id set (as the driver numbered them).
        keep_mqtt: keep the MQTT sink (cameras publish to the broker from wherever they run).

    Returns:
        Plain data for ``Settings(**data)`` on the worker (the MQTT password included in clear:
        it travels inside the cluster, never into a log); file paths made absolute (a worker
        runs in another directory: every node must see the inputs at the same paths).
    """
    data = settings.model_dump(mode="json")

    def absolute(path: str | None) -> str | None:  # workers run in another directory
        return str(Path(path).resolve()) if path and "://" not in path else path

    data["model"], data["card"] = absolute(data["model"]), absolute(data["card"])
    data["sources"] = []
    for src in sources:
        entry = src.model_dump(mode="json", exclude_none=True)
        for key in ("url", "model", "card"):
            if key in entry:
                entry[key] = absolute(entry[key])
        data["sources"].append(entry)
    data["quiet"] = True
    data["cluster"] = {**data["cluster"], "ray_address": None}
    sinks = data["sinks"]
    sinks.update(publish=None, jsonl=None, video_out=None, metrics_port=None, publish_wait_subscribers=0)
    if keep_mqtt and settings.sinks.mqtt_password is not None:
        sinks["mqtt_password"] = settings.sinks.mqtt_password.get_secret_value()
    elif not keep_mqtt:
        sinks.update(mqtt=None, mqtt_password=None)
    return data


class UnitRun:
    """Runs one unit's pipeline in a thread and yields its messages in order.

    Args:
        spec: the unit.

    Use: ``for batch in unit.batches(): ...``; :meth:`stop` (from another thread) ends it
    gracefully (the decoders send EOS, the pipeline drains).
    """

    def __init__(self, spec: UnitSpec) -> None:
        self.spec = spec
        self._pipeline: Any = None
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the pipeline to stop (as SIGINT would: inputs close, everything drains)."""
        self._stop.set()
        if self._pipeline is not None:
            self._pipeline.request_stop(signal.SIGINT)

    def batches(self) -> Iterator[list[Message]]:
        """Run the pipeline; yield its messages in batches, then the summary (:data:`KIND_SUMMARY`) last."""
        from pipeline.runner import Pipeline, PipelineError

        tmp = Path(private_run_dir("streamdet-unit-"))
        endpoint = f"ipc://{tmp / 'forward'}"
        ctx: zmq.Context[Any] = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(endpoint)
        settings = Settings(**self.spec.settings)
        pipeline = Pipeline(settings=settings, progress=False, forward=endpoint)
        self._pipeline = pipeline
        if self._stop.is_set():
            pipeline.request_stop(signal.SIGINT)
        outcome: dict[str, Any] = {"frames": 0, "detections": 0, "exit_code": 1, "errors": [], "warnings": [],
                                   "outputs": [], "seconds": 0.0, "restarts": {}}

        def run() -> None:
            try:
                s = pipeline.run(handle_signals=False)
                outcome.update(frames=s.frames, detections=s.detections, exit_code=s.exit_code, errors=s.errors,
                               warnings=s.warnings, outputs=s.outputs, seconds=s.seconds, restarts=s.restarts)
            except PipelineError as e:
                outcome.update(exit_code=e.exit_code, errors=[str(e)])
            except BaseException as e:  # reported in the summary, never lost in a thread
                outcome.update(errors=[f"{type(e).__name__}: {e}"])

        thread = threading.Thread(target=run, name="streamdet-unit", daemon=True)
        thread.start()
        try:
            batch: list[Message] = []
            first_at = 0.0
            ended: set[str] = set()
            quiet_since: float | None = None
            while True:
                done = not thread.is_alive()
                wait_ms = 10 if not batch else max(1, int((first_at + BATCH_WAIT_S - time.monotonic()) * 1000))
                if pull.poll(wait_ms):
                    quiet_since = None
                    while len(batch) < BATCH_MAX:
                        try:
                            parts = pull.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if not batch:
                            first_at = time.monotonic()
                        msg = unpack(parts)
                        if msg[0] == KIND_EOS:
                            ended.add(msg[1])
                        batch.append(msg)
                if batch and (len(batch) >= BATCH_MAX or time.monotonic() >= first_at + BATCH_WAIT_S or done):
                    yield batch
                    batch = []
                    continue
                if done:  # the last messages may still be on their way from the stopped stage
                    now = time.monotonic()
                    quiet_since = quiet_since or now
                    if ended >= set(self.spec.source_ids) or now - quiet_since > TAIL_QUIET_S:
                        break
            thread.join()
            yield [(KIND_SUMMARY, "", json.dumps(outcome).encode(), -1)]
        finally:
            if thread.is_alive():  # the consumer went away: stop the pipeline and wait for it
                pipeline.request_stop(signal.SIGINT)
                pipeline.request_stop(signal.SIGINT)
                thread.join(30.0)
            pull.close(0)
            ctx.term()
            shutil.rmtree(tmp, ignore_errors=True)
