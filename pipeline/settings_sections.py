"""Settings sections for outputs and operations: sinks, supervision, cluster (see :mod:`pipeline.settings`).

Split from :mod:`pipeline.settings`, which assembles them into the one settings tree and
re-exports them; import them from there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

if TYPE_CHECKING:
    from pipeline.stages.mqtt_sink import MqttConfig
    from pipeline.stages.postprocess import SinkConfig

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
"""Default endpoint of the detections PUB socket (localhost only)."""

_ENDPOINT = re.compile(r"^(tcp://[^:/\s]+:\d{1,5}|ipc://\S+)$")


def _off(value: Any) -> bool:
    """Whether an optional setting's raw value means "none" (null, empty, ``none``, ``null``, ``off``)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "off"))


class Section(BaseModel):
    """A frozen settings section that refuses unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SinkSettings(Section):
    """Outputs.

    Attributes:
        publish: ZeroMQ PUB endpoint (``tcp://host:port`` or ``ipc://path``), or null for none.
        publish_wait_subscribers: before decoding starts, wait until this many subscribers have
            subscribed (so they miss nothing; PUB drops what is sent before a subscriber joins).
        publish_wait_timeout_s: longest wait for them; the run then starts anyway.
        jsonl: write every published message to this JSON Lines file.
        jsonl_flush_ms: flush the JSONL file after every line (0, the default) or at most every
            this many milliseconds: a killed sink process loses at most that window of lines.
        jsonl_rotate: start a new JSONL file every period (``30m``, ``1h``, ``1d``) or at a size
            (``100MB``, ``1GB``); files are named ``<stem>-<UTC start time><suffix>`` (null: one file).
        video_out: write the annotated video here (H.264; ``.mp4``, ``.mkv``, ``.mov`` or ``.avi``).
        stats_interval_s: print a stats line (per source: fps, drops, p50/p99 latency, state) and
            publish it on topic ``stats`` this often, seconds (0: never; printed only with live sources).
        metrics_port: serve Prometheus metrics on ``http://metrics_host:PORT/metrics`` (null: off).
        metrics_host: interface of the metrics endpoint.
        mqtt: MQTT broker to publish to, ``mqtt://HOST[:PORT]`` (TLS: ``mqtts://HOST[:PORT]``; ports
            1883 / 8883 by default), or null for none. Topics ``<mqtt_topic_prefix>/<source_id>/detections``,
            ``.../status`` (retained) and ``.../eos``; payloads are the JSON objects of docs/schema.md.
        mqtt_username: broker login (also ``user:pass@`` in the URL; never logged).
        mqtt_password: broker password (environment ``STREAMDET_SINKS__MQTT_PASSWORD``; never logged).
        mqtt_qos: MQTT QoS of every message (0 at most once, 1 at least once, 2 exactly once).
        mqtt_topic_prefix: first level of every topic.
        mqtt_buffer: messages held for the broker while it is away or slow; beyond it messages are
            dropped and counted (the pipeline never waits for the broker).
        mqtt_flush_timeout_s: at the end of the run, longest wait for the buffered messages to reach
            the broker (the rest are counted as dropped).
        mqtt_ca_file: ``mqtts://``: CA certificates to verify the broker with (default: the system's).
    """

    publish: str | None = DEFAULT_PUBLISH
    publish_wait_subscribers: int = Field(default=0, ge=0)
    publish_wait_timeout_s: float = Field(default=10.0, ge=0.0)
    jsonl: Path | None = None
    jsonl_flush_ms: float = Field(default=0.0, ge=0.0)
    jsonl_rotate: str | None = None
    video_out: Path | None = None
    stats_interval_s: float = Field(default=5.0, ge=0.0)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    mqtt: str | None = None
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_qos: int = Field(default=1, ge=0, le=2)
    mqtt_topic_prefix: str = Field(default="streamdet", pattern=r"^[A-Za-z0-9_/-]{1,64}$")
    mqtt_buffer: int = Field(default=10_000, ge=1, le=10_000_000)
    mqtt_flush_timeout_s: float = Field(default=5.0, ge=0.0, le=600.0)
    mqtt_ca_file: Path | None = None

    @model_validator(mode="after")
    def _subscribers_need_publishing(self) -> SinkSettings:
        if self.publish is None and self.publish_wait_subscribers > 0:  # (the run would wait for nobody, silently)
            raise ValueError(f"publish_wait_subscribers={self.publish_wait_subscribers} needs a publish endpoint, "
                             "and sinks.publish is none")
        return self

    def sink_config(self, *, fps_by_source: tuple[tuple[str, float], ...] = (),
                    forward: str | None = None) -> SinkConfig:
        """Which sinks to open, for the postprocess stage (or a cluster driver).

        Args:
            fps_by_source: frame rate per source id (for the annotated video).
            forward: the forward sink's endpoint (a cluster worker's receiver), or None.
        """
        from pipeline.stages.postprocess import SinkConfig

        return SinkConfig(publish=self.publish, publish_wait_subscribers=self.publish_wait_subscribers,
                          publish_wait_timeout_s=self.publish_wait_timeout_s,
                          jsonl=str(self.jsonl) if self.jsonl else None,
                          video_out=str(self.video_out) if self.video_out else None, fps_by_source=fps_by_source,
                          jsonl_flush_ms=self.jsonl_flush_ms, jsonl_rotate=self.jsonl_rotate,
                          mqtt=self.mqtt_config(), forward=forward)

    def mqtt_config(self) -> MqttConfig | None:
        """The MQTT sink's configuration (None without ``mqtt``)."""
        if self.mqtt is None:
            return None
        from pipeline.stages.mqtt_sink import MqttConfig

        return MqttConfig(url=self.mqtt, username=self.mqtt_username,
                          password=self.mqtt_password.get_secret_value() if self.mqtt_password else None,
                          qos=self.mqtt_qos, topic_prefix=self.mqtt_topic_prefix, buffer=self.mqtt_buffer,
                          flush_timeout_s=self.mqtt_flush_timeout_s,
                          ca_file=str(self.mqtt_ca_file) if self.mqtt_ca_file else None)

    @field_validator("mqtt", mode="before")
    @classmethod
    def _mqtt(cls, v: Any) -> Any:
        if _off(v):
            return None
        from pipeline.stages.mqtt_sink import parse_mqtt_url

        parse_mqtt_url(str(v))  # ValueError names the (redacted) URL and what is wrong
        return str(v)

    @field_validator("jsonl", mode="before")
    @classmethod
    def _jsonl(cls, v: Any) -> Any:
        return None if _off(v) else v  # (none, off, empty: no JSONL, as for video_out; not a file named "none")

    @field_validator("video_out", mode="before")
    @classmethod
    def _video_out(cls, v: Any) -> Any:
        if _off(v):
            return None
        from pipeline.stages.video_sink import check_video_path

        return check_video_path(str(v))  # ValueError names the path and the suffixes accepted

    @field_validator("jsonl_rotate", mode="before")
    @classmethod
    def _jsonl_rotate(cls, v: Any) -> Any:
        if _off(v):
            return None
        from pipeline.stages.jsonl_sink import parse_rotate

        parse_rotate(str(v))  # ValueError names the value and the accepted forms
        return str(v)

    @field_validator("publish", mode="before")
    @classmethod
    def _publish(cls, v: Any) -> Any:
        if _off(v):
            return None
        if not isinstance(v, str) or not _ENDPOINT.match(v):
            raise ValueError(f"expected tcp://HOST:PORT or ipc://PATH (or none), got {v!r}")
        if v.startswith("tcp://") and not 1 <= int(v.rsplit(":", 1)[1]) <= 65535:
            raise ValueError(f"expected a port in 1..65535, got {v!r}")
        return v


class SuperviseSettings(Section):
    """Self-healing: restarting a stage process that died (see :mod:`pipeline.supervise`).

    Attributes:
        max_restarts: restarts allowed per stage within ``window_s`` (0: never restart; a dead
            stage ends the run as before). One more death within the window ends the run with
            one error line naming the stage and its last error.
        window_s: the sliding window of the restart bound, seconds (> 0).
        backoff_initial_s: wait before the second restart of a stage within the window (the first
            one is immediate); doubles for each further one.
        backoff_max_s: longest wait before a restart.
        fork_server: fork the stage processes (and restarted ones) from a server process that
            has the stage modules imported (Linux; started with the run): the stages import them
            once instead of once each, and a restart takes about 0.2-0.3 s instead of 0.6-0.8 s,
            for one more process. False: each stage is spawned (a fresh interpreter).
        hang_timeout_s: a running stage that has not looked at its flags for this long (it
            does between messages and at least every 0.1 s while it waits) is taken as hung (a
            deadlock, a stopped process, a call that never returns), killed and restarted as if
            it had died; it must exceed the longest inference of one batch. 0: never.
    """

    max_restarts: int = Field(default=5, ge=0, le=1000)
    window_s: float = Field(default=60.0, gt=0.0)
    backoff_initial_s: float = Field(default=0.5, ge=0.0)
    backoff_max_s: float = Field(default=5.0, ge=0.0)
    fork_server: bool = True
    hang_timeout_s: float = Field(default=60.0, ge=0.0)


class ClusterSettings(Section):
    """Running over a Ray cluster (see docs/cluster.md); off unless ``ray_address`` is set.

    Attributes:
        ray_address: the cluster to run on: ``HOST:PORT`` of its head (``ray start --head``
            prints it), or ``auto`` for the cluster this host belongs to; null: run on this host
            only (Ray is not imported).
        max_retries: a file whose worker or node died is run again up to this many times (its
            frames published once all the same); then it is reported as failed and the others go on.
        cameras_per_shard: live sources run together in one pipeline (a shard, one Ray actor).
        unit_cpus: CPUs Ray reserves for each file's pipeline (fractions allowed; the engine's
            threads are still ``engine.intra_op_threads``).
        shard_cpus: CPUs Ray reserves for each shard of cameras.
        gpus: GPUs Ray reserves for each unit or shard when ``engine.device`` is a CUDA device.
        connect_timeout_s: longest wait to reach the cluster at start-up.
    """

    ray_address: str | None = None
    max_retries: int = Field(default=3, ge=0, le=100)
    cameras_per_shard: int = Field(default=4, ge=1, le=1024)
    unit_cpus: float = Field(default=1.0, gt=0.0)
    shard_cpus: float = Field(default=1.0, gt=0.0)
    gpus: float = Field(default=1.0, gt=0.0)
    connect_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)

    @field_validator("ray_address", mode="before")
    @classmethod
    def _ray_address(cls, v: Any) -> Any:
        if _off(v):
            return None
        v = str(v).strip()
        m = re.match(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:(\d{1,5})$", v)
        if v != "auto" and (m is None or not 0 < int(m.group(2)) < 65536):
            raise ValueError(f"expected HOST:PORT of the Ray head (port 1..65535) or 'auto', got {v!r}")
        return v


class ControlSettings(Section):
    """The runtime control API and live preview page (see docs/control.md); off unless ``port`` is set.

    Attributes:
        port: serve the control API (``/sources``, ``/healthz``, ``/readyz``, ``/metrics``, ``/docs``)
            and the preview page (``/``) on this TCP port (null: off; the run then ends when its
            sources end, as without it). With it on, the run keeps going when the last source ends
            or is removed, waiting for new ones, until SIGINT/SIGTERM.
        host: interface to serve on. The default keeps the API on this host; any other address must
            be set explicitly (and should come with a ``token``).
        token: a bearer token every request but ``/healthz``, ``/readyz``, ``/`` and the OpenAPI pages must carry
            (``Authorization: Bearer TOKEN``; the preview streams also accept ``?token=``); null: none.
            Environment ``STREAMDET_CONTROL__TOKEN``; never logged.
        preview_fps: at most this many preview frames per second and source, encoded only while
            someone watches.
        preview_width: preview frames are scaled down to at most this width, pixels.
        preview_quality: JPEG quality of the preview frames (1-100).
        max_sources: most sources running at once (the ledger in shared memory is sized for it).
    """

    port: int | None = Field(default=None, ge=1, le=65535)
    host: str = "127.0.0.1"
    token: SecretStr | None = None
    preview_fps: float = Field(default=5.0, gt=0.0, le=60.0)
    preview_width: int = Field(default=640, ge=64, le=7680)
    preview_quality: int = Field(default=75, ge=1, le=100)
    max_sources: int = Field(default=32, ge=1, le=4096)

    @field_validator("port", "token", mode="before")
    @classmethod
    def _optional(cls, v: Any) -> Any:
        return None if _off(v) else v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c.isspace() for c in v) or "/" in v:
            raise ValueError(f"expected an interface address such as 127.0.0.1 or 0.0.0.0, got {v!r}")
        return v


class SecondarySettings(Section):
    """A secondary model run on crops of the primary model's detections (a cascade; see docs/pipeline.md).

    Attributes:
        model: the secondary model's ONNX file.
        card: its model card (default: ``MODEL.json`` beside it, else its ultralytics metadata).
        classes: names of the primary model's classes whose detections feed it (at least one).
        min_side_px: detections whose box is smaller than this on its shorter side (frame pixels)
            are not cropped; they are counted (``crops_too_small``), not an error.
        pad: each crop is the detection's box grown by this fraction of its width and height on
            each side (clipped to the frame).
        max_crops: most crops per frame (the highest-scoring detections; the rest are counted).
        max_batch: most crops per secondary engine batch (crops of several frames and sources share batches).
        max_wait_ms: send a partial batch this long after its first crop.
        tensor_slots: secondary input tensors in flight.
        intra_op_threads: CPU threads per operator of its engine (ONNX Runtime; 0 = one per core;
            default 1: its crops are small and the primary engine has the cores).
        read_text: read the children's class names left to right as text (a character model: every
            class name is one character); published as the parent's ``text`` and ``text_score``.
        score_threshold: keep the secondary's detections scoring above this.
        iou_threshold: its NMS IoU threshold.
        class_agnostic: its NMS across classes (two characters cannot share one glyph).
        max_detections: most children per crop.
        masks: publish the children's instance masks (segment models).
    """

    model: Path
    card: Path | None = None
    classes: tuple[str, ...] = Field(min_length=1)
    min_side_px: float = Field(default=12.0, ge=1.0)
    pad: float = Field(default=0.1, ge=0.0, le=1.0)
    max_crops: int = Field(default=8, ge=1, le=256)
    max_batch: int = Field(default=16, ge=1, le=256)
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    tensor_slots: int = Field(default=3, ge=1, le=32)
    intra_op_threads: int = Field(default=1, ge=0)
    read_text: bool = False
    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    class_agnostic: bool = True
    max_detections: int = Field(default=32, ge=1)
    masks: bool = True
