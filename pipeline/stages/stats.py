"""Per-source run statistics in the postprocess stage: fps, drops, latency percentiles, state.

The postprocess stage feeds :class:`LiveStats` with every published frame (its capture→publish
latency) and with the decoders' :class:`~streamdet.messages.SourceStatusMsg` (state, drop and
receive counters). Every ``interval_s`` it yields one console line and one ``stats`` payload
(schema :data:`STATS_SCHEMA`), both over the frames of that interval, so a latency that grows
shows up as a growing p99. Optionally it serves the same figures as Prometheus metrics
(``prometheus-client``, own registry, ``http://host:port/metrics``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamdet.messages import SourceState, SourceStatusMsg

STATS_SCHEMA = "streamdet.stats/1"
"""Schema of the ``stats`` payload."""

LATENCY_WINDOW = 4096
"""Most latencies kept per source and interval (the newest win)."""

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
"""Histogram buckets of the Prometheus latency metric, seconds."""

SNAPSHOT_WINDOW_S = 2.0
"""The control API's per-source fps and latency percentiles are over this many recent seconds."""


@dataclass(frozen=True, kw_only=True)
class StatsConfig:
    """What the stats keep and where they go (picklable; built in the postprocess process).

    Attributes:
        sources: ``(source_id, is_live)`` of every source.
        interval_s: seconds between stats lines / payloads (0: never).
        metrics_port: Prometheus endpoint port (None: off).
        metrics_host: interface of the Prometheus endpoint.
        control: keep what the control API shows (:meth:`LiveStats.snapshot`, :meth:`LiveStats.metrics_text`:
            the Prometheus registry is built even without ``metrics_port``).
        console: print each interval's line on stderr; False (``--quiet``): the ``stats``
            payloads only (they are data: subscribers and MQTT read them).
    """

    sources: tuple[tuple[str, bool], ...] = ()
    interval_s: float = 5.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    control: bool = False
    console: bool = True


@dataclass
class _SourceStats:
    live: bool
    state: str = ""
    frames: int = 0
    dropped: int = 0
    skipped: int = 0
    received: int = 0
    reconnects: int = 0
    lost: int = 0
    interval_frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    recent: deque[tuple[float, float]] = field(default_factory=deque)  # (monotonic s, latency ms), control API


def percentiles_ms(latencies_ms: list[float]) -> tuple[float, float]:
    """``(p50, p99)`` of latencies in milliseconds (linear interpolation, ``numpy.percentile``); NaN if empty."""
    if not latencies_ms:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(latencies_ms, dtype=np.float64), [50.0, 99.0])
    return float(p50), float(p99)


def _figures(st: _SourceStats, fps: float, latencies_ms: list[float]) -> dict[str, Any]:
    """One source's figures as the ``stats`` payload and the control API show them (latencies null without any)."""
    p50, p99 = percentiles_ms(latencies_ms)
    return {"state": st.state or None, "fps": round(fps, 2), "frames": st.frames, "dropped": st.dropped,
            "skipped": st.skipped, "received": st.received, "reconnects": st.reconnects, "lost": st.lost,
            "latency_p50_ms": round(p50, 3) if latencies_ms else None,
            "latency_p99_ms": round(p99, 3) if latencies_ms else None}


class LiveStats:
    """Per-source counters and latency windows; console line, ``stats`` payload and Prometheus metrics.

    Args:
        config: what to keep and where to serve it.
    """

    def __init__(self, *, config: StatsConfig) -> None:
        self.config = config
        self.sources: dict[str, _SourceStats] = {}
        for sid, live in config.sources:
            self.add_source(sid, live)
        self._last = time.monotonic()
        self._metrics: dict[str, Any] = {}
        self._server: Any = None
        self._registry: Any = None
        self.restarts: dict[str, int] = {}
        """Stage restarts seen by this process, by stage name."""
        self._restarts_total = 0
        self.sink_dropped: dict[str, int] = {}
        """Messages each lossy sink dropped so far (total), by sink name (``mqtt``)."""

    def open(self, frames: Mapping[str, int] | None = None) -> None:
        """Start the Prometheus endpoint if configured.

        Args:
            frames: frames each source published before this process (a restarted postprocess
                stage): its count and ``streamdet_frames_total`` go on from there, never back to 0.

        Raises:
            OSError: if the port cannot be bound.
        """
        for sid, n in (frames or {}).items():
            if sid in self.sources:
                self.sources[sid].frames = n
        if self.config.metrics_port is None and not self.config.control:
            return
        import prometheus_client as pc

        reg = pc.CollectorRegistry()
        self._registry = reg
        self._metrics = {
            "frames": pc.Counter("streamdet_frames", "Frames published", ["source"], registry=reg),
            "dropped": pc.Counter("streamdet_dropped_frames", "Live frames dropped (downstream busy)",
                                  ["source"], registry=reg),
            "skipped": pc.Counter("streamdet_skipped_frames", "Live frames skipped for max_fps", ["source"],
                                  registry=reg),
            "reconnects": pc.Counter("streamdet_reconnects", "Reconnection attempts", ["source"], registry=reg),
            "lost": pc.Counter("streamdet_lost_frames", "Live frames lost in a stage restart", ["source"],
                               registry=reg),
            "restarts": pc.Counter("streamdet_stage_restarts", "Stage processes restarted after a crash", ["stage"],
                                   registry=reg),
            "sink_dropped": pc.Counter("streamdet_sink_dropped", "Messages a sink could not deliver (e.g. MQTT "
                                       "broker away and its buffer full)", ["sink"], registry=reg),
            "latency": pc.Histogram("streamdet_latency_seconds", "Capture to publish latency", ["source"],
                                    buckets=LATENCY_BUCKETS_S, registry=reg),
            "state": pc.Enum("streamdet_source_state", "Source state", ["source"],
                             states=["", "file"] + [s.value for s in SourceState], registry=reg),
        }
        for sid, st in self.sources.items():
            if st.frames > 0:
                self._metrics["frames"].labels(sid).inc(st.frames)
        if self.config.metrics_port is not None:
            self._server = pc.start_http_server(self.config.metrics_port, addr=self.config.metrics_host, registry=reg)

    def add_source(self, source_id: str, live: bool, frames: int = 0) -> None:
        """Start keeping figures for a source (one added at runtime through the control API).

        ``frames``: published before (announced again to a restarted postprocess stage).
        """
        self.sources[source_id] = _SourceStats(live=live, state="" if live else "file", frames=frames)
        if frames > 0 and self._metrics:
            self._metrics["frames"].labels(source_id).inc(frames)

    def remove_source(self, source_id: str) -> None:
        """Forget a source that ended (control API runs: sources come and go), its metric series too."""
        if self.sources.pop(source_id, None) is None or not self._metrics:
            return
        for name in ("frames", "dropped", "skipped", "reconnects", "lost", "latency", "state"):
            try:
                self._metrics[name].remove(source_id)
            except KeyError:  # no series for it yet
                pass

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of the registry (empty if it was not built)."""
        if self._registry is None:
            return b""
        import prometheus_client as pc

        return bytes(pc.generate_latest(self._registry))

    def snapshot(self, now: float | None = None) -> bytes:
        """Per-source figures over the last :data:`SNAPSHOT_WINDOW_S` seconds, as JSON (for ``GET /sources``).

        Returns:
            JSON object ``{source_id: {state, fps, frames, dropped, skipped, received, reconnects, lost,
            latency_p50_ms, latency_p99_ms}}`` (latencies null without a recent frame; fps and
            latencies are kept only with :attr:`StatsConfig.control`).
        """
        t = time.monotonic() if now is None else now
        out: dict[str, Any] = {}
        for sid, st in self.sources.items():
            while st.recent and st.recent[0][0] < t - SNAPSHOT_WINDOW_S:
                st.recent.popleft()
            lat = [ms for _, ms in st.recent]
            out[sid] = _figures(st, len(lat) / SNAPSHOT_WINDOW_S, lat)
        return json.dumps(out, separators=(",", ":")).encode()

    def close(self) -> None:
        """Stop the Prometheus endpoint."""
        if self._server is not None:
            server = self._server[0] if isinstance(self._server, tuple) else None
            if server is not None:
                server.shutdown()
                server.server_close()
            self._server = None

    def on_frame(self, source_id: str, latency_ms: float) -> None:
        """Count one published frame of ``source_id`` with its capture→publish latency (ms)."""
        st = self.sources.get(source_id)
        if st is None:
            return
        st.frames += 1
        st.interval_frames += 1
        if len(st.latencies_ms) < LATENCY_WINDOW:
            st.latencies_ms.append(latency_ms)
        else:
            st.latencies_ms[st.frames % LATENCY_WINDOW] = latency_ms
        if self.config.control:
            st.recent.append((time.monotonic(), latency_ms))
            if len(st.recent) > LATENCY_WINDOW:
                st.recent.popleft()
        if self._metrics:
            self._metrics["frames"].labels(source_id).inc()
            self._metrics["latency"].labels(source_id).observe(latency_ms / 1000.0)

    def on_lost(self, source_id: str, frames: int) -> None:
        """Count live frames of ``source_id`` lost in a stage restart (never published)."""
        st = self.sources.get(source_id)
        if st is None or frames <= 0:
            return
        st.lost += frames
        if self._metrics:
            self._metrics["lost"].labels(source_id).inc(frames)

    def on_restart(self, stage: str, total: int) -> None:
        """Count a stage restart; ``total`` is the run's restarts so far (kept across postprocess restarts)."""
        self.restarts[stage] = self.restarts.get(stage, 0) + 1
        if self._metrics:
            self._metrics["restarts"].labels(stage).inc()
        self._restarts_total = max(total, sum(self.restarts.values()))

    def set_sink_dropped(self, sink: str, total: int) -> None:
        """Record that ``sink`` (e.g. ``mqtt``) has dropped ``total`` messages so far (a running total)."""
        previous = self.sink_dropped.get(sink, 0)
        self.sink_dropped[sink] = max(previous, total)
        if self._metrics:
            self._metrics["sink_dropped"].labels(sink).inc(max(0, total - previous))

    @property
    def restarts_total(self) -> int:
        """Stage restarts in the run so far."""
        return max(self._restarts_total, sum(self.restarts.values()))

    def on_status(self, msg: SourceStatusMsg) -> None:
        """Apply a decoder's state and counters."""
        st = self.sources.get(msg.source_id)
        if st is None:
            return
        if self._metrics:
            sid = msg.source_id
            self._metrics["dropped"].labels(sid).inc(max(0, msg.dropped - st.dropped))
            self._metrics["skipped"].labels(sid).inc(max(0, msg.skipped - st.skipped))
        st.dropped, st.skipped, st.received = max(st.dropped, msg.dropped), max(st.skipped, msg.skipped), msg.received
        if msg.publish:
            st.state = msg.state.value
            if msg.state is SourceState.RECONNECTING:
                st.reconnects += 1
                if self._metrics:
                    self._metrics["reconnects"].labels(msg.source_id).inc()
            if self._metrics:
                self._metrics["state"].labels(msg.source_id).state(st.state)

    def due(self, now: float | None = None) -> bool:
        """Whether a stats line is due (only with live sources and a non-zero interval)."""
        t = time.monotonic() if now is None else now
        return (self.config.interval_s > 0 and any(st.live for st in self.sources.values())
                and t - self._last >= self.config.interval_s)

    def report(self, now: float | None = None) -> tuple[str, dict[str, Any]]:
        """The interval's console line and ``stats`` payload; starts a new interval.

        Returns:
            ``(line, payload)``; the payload is ``{schema, time, interval_s, sources: {id: {state, fps,
            frames, dropped, skipped, received, reconnects, latency_p50_ms, latency_p99_ms}}, restarts}``
            (latencies null when no frame was published in the interval), plus ``sink_dropped: {sink:
            total}`` once a sink reported its drops (:meth:`set_sink_dropped`); the line ends with
            `` mqtt_dropped=N`` when that sink dropped messages; the line is "" without ``config.console``.
        """
        t = time.monotonic() if now is None else now
        dt = max(1e-9, t - self._last)
        self._last = t
        parts: list[str] = []
        out: dict[str, Any] = {}
        for sid, st in self.sources.items():
            p50, p99 = percentiles_ms(st.latencies_ms)
            fps = st.interval_frames / dt
            lat = f"p50={p50:.0f}ms p99={p99:.0f}ms" if st.latencies_ms else "p50=- p99=-"
            lost = f" lost={st.lost}" if st.lost else ""
            parts.append(f"{sid}: {st.state or '?'} {fps:.1f} fps drops={st.dropped}{lost} {lat}")
            out[sid] = _figures(st, fps, st.latencies_ms)
            st.interval_frames = 0
            st.latencies_ms = []
        payload = {"schema": STATS_SCHEMA, "time": round(time.time(), 3), "interval_s": round(dt, 3), "sources": out,
                   "restarts": self.restarts_total}
        if self.sink_dropped:
            payload["sink_dropped"] = dict(self.sink_dropped)
        tail = f" | restarts={self.restarts_total}" if self.restarts_total else ""
        tail += "".join(f" {name}_dropped={n}" for name, n in self.sink_dropped.items() if n > 0)
        return ("stats " + " | ".join(parts) + tail if self.config.console else ""), payload
