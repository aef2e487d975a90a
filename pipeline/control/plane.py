"""The runner's side of the control API: sources added and removed while the pipeline runs.

The HTTP handlers (:mod:`pipeline.control.app`, uvicorn's threads) never touch the stages: they
validate a request, probe a new source, then hand a command to the runner's thread and wait for
its outcome. The runner calls :meth:`ControlPlane.step` every loop (about every 50 ms), which

* adds a source: takes a free slot of the ledger (sized ``control.max_sources``), announces the
  source to the postprocess stage (:class:`~streamdet.messages.SourceAddedMsg`: publication order,
  stats, card, credit socket), and spawns its decoder, which feeds its model chain's preprocess
  stage like any other: the preprocess, engine and postprocess stages are not restarted and
  batching across streams simply sees one more source;
* removes a source: asks its decoder through the ledger to stop reading; the decoder sends EOS
  (reason ``removed``), the postprocess stage publishes it and forgets the source, the decoder
  exits once its slots are back, and the runner unlinks its pool and frees its ledger slot;
* retires every source whose decoder finished (a file that ended, a removed camera) the same way;
* keeps the latest preview frame and stats snapshot from the postprocess stage, and writes the
  preview viewer counts into the ledger (frames are encoded only while someone watches).

The stage processes' own restarts (:mod:`pipeline.restarts`) work for added sources too: the
postprocess stage's spec is kept current, so a restarted one knows every running source.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from pipeline.chains import ModelChain, PreparedRun, decode_spec, source_ids_for
from pipeline.control.preview import PreviewHub
from pipeline.host import fit_to_host
from pipeline.restarts import Child
from pipeline.settings import Settings
from pipeline.slotpool import RUN_PREFIX, pool_name, split_pool_name, unlink_pool
from pipeline.sources.probe import SourceError, SourceInfo, probe_source
from pipeline.stages.postprocess import PostprocessSpec
from pipeline.summary import PipelineError, RunSummary, SourceReport, StatusBook
from pipeline.supervise import Ledger, LedgerRef
from pipeline.transport import StageEndpoints, redact_url
from streamdet.messages import (
    PreviewFrameMsg,
    SourceAddedMsg,
    StageName,
    StatsSnapshotMsg,
    check_source_id,
    decode_message,
)

COMMAND_TIMEOUT_S = 10.0
"""Longest wait of an HTTP request for the runner to start a source."""

KEEP_ENDED = 100
"""Ended sources still listed by ``GET /sources`` (the oldest are dropped beyond this)."""

REMOVE_TIMEOUT_S = 20.0
"""Longest wait of ``DELETE /sources/{id}`` for the source's EOS to be published and its slots freed."""


class ControlError(Exception):
    """A request the control plane refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class SourceRecord:
    """One source of the run, as the control API shows it.

    Attributes:
        info: the probed source.
        chain: its model chain.
        index: its slot in the ledger.
        pool: base name of its frame pool.
        credit_endpoint: where its decoder takes frame-slot credits back.
        state: ``starting`` (until removed or ended: ``GET /sources`` then shows the state the stats
            report, ``running`` once frames are published), ``removing``, ``ended``.
        child: its decoder process (None before it is spawned or once retired).
        reason: how it ended (the EOS reason), once ended.
        error: its problem, if any.
        done: set once it is retired (a ``DELETE`` waits for it).
        eos_at: when its EOS was first seen published (``time.monotonic()``; 0: not yet).
    """

    info: SourceInfo
    chain: int
    index: int
    pool: str
    credit_endpoint: str
    state: str = "starting"
    child: Child | None = None
    reason: str = ""
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    eos_at: float = 0.0


END_STATUS_WAIT_S = 2.0
"""Longest wait, once a source's EOS is published, for the postprocess stage's ``source_end``
status (its reason) before the source is retired without it."""


@dataclass
class _Command:
    kind: str  # "add" or "remove"
    source_id: str
    info: SourceInfo | None = None
    chain: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: ControlError | None = None


class ControlPlane:
    """Runtime source management and the live view's data, shared by the runner and the HTTP server.

    Args:
        settings: the run's settings.
        prepared: the sources and model chains found at start-up.
        endpoints: the run's endpoints (``live`` is bound here).
        run_dir: the run's private directory (credit endpoints of added sources go there).
        token: the run's token (names of added pools: ``sd-<token>-a<n>``).
        ledger: the run's ledger (sized for ``control.max_sources``).
        ctx: the runner's ZeroMQ context.
        events: PUSH socket to the postprocess stage's events endpoint.
        spawn: starts a decoder for ``(spec, label)`` and returns its :class:`~pipeline.restarts.Child`.
        forget_child: removes a finished decoder's :class:`Child` from the runner's list.
        pool_names: the run's pool names (added pools are recorded; retired ones removed and unlinked).
    """

    def __init__(self, *, settings: Settings, prepared: PreparedRun, endpoints: StageEndpoints, run_dir: str,
                 token: str, ledger: Ledger, ctx: zmq.Context[Any], events: zmq.Socket[Any] | None,
                 spawn: Callable[[Any, str], Child], forget_child: Callable[[Child], None],
                 pool_names: set[str]) -> None:
        self.settings = settings
        self.prepared = prepared
        self.endpoints = endpoints
        self.run_dir = run_dir
        self.token = token
        self.ledger = ledger
        self.events = events
        self.spawn = spawn
        self.forget_child = forget_child
        self.pool_names = pool_names
        self.preview = PreviewHub()
        self._lock = threading.Lock()
        self._records: dict[str, SourceRecord] = {}
        self._reserved: set[str] = set()  # ids being probed by a request
        self._commands: list[_Command] = []
        self._added = 0
        self._snapshot: dict[str, Any] = {}
        self._metrics = b""
        self._ready_reason: str | None = "stages starting"
        self._stopping = False
        self._closed = False  # set by close(): every command submitted later is refused (503)
        self.retired_totals = [0, 0]
        """Frames and detections published by sources whose ledger slot was freed (for the run's totals)."""
        self._live = ctx.socket(zmq.PULL)
        self._live.setsockopt(zmq.LINGER, 0)
        self._live.bind(endpoints.live)
        self._summary: RunSummary | None = None
        self._book: StatusBook | None = None
        self._postprocess: Child | None = None

    # ------------------------------------------------------------------ runner thread
    def attach(self, *, summary: RunSummary, book: StatusBook, children: list[Child]) -> None:
        """Start following the run: the sources it started with and their decoders."""
        self._summary, self._book = summary, book
        by_label = {c.label: c for c in children}
        self._postprocess = next(c for c in children if c.stage is StageName.POSTPROCESS)
        chain_of = {sid: k for k, ch in enumerate(self.prepared.chains) for sid in ch.source_ids}
        for i, (src, (pool, ep)) in enumerate(zip(self.prepared.sources, self.endpoints.frame_credits, strict=True)):
            rec = SourceRecord(src, chain_of[src.source_id], i, pool, ep, child=by_label.get(f"decode:{src.source_id}"))
            self._records[src.source_id] = rec
            self.ledger.set_active(i, True)

    def set_ready(self, reason: str | None, *, stopping: bool = False) -> None:
        """Record why the pipeline is not ready (None: every stage is), and whether it is stopping (no more adds)."""
        self._ready_reason = reason
        self._stopping = stopping

    def step(self) -> None:
        """Run pending commands, retire finished sources, take the postprocess stage's live data."""
        with self._lock:
            commands, self._commands = self._commands, []
        for cmd in commands:
            try:
                if cmd.kind == "add":
                    self._start(cmd)
                else:
                    self._stop(cmd.source_id)
            except ControlError as e:
                cmd.error = e
            cmd.done.set()
        self._retire_finished()
        self._drain_live()
        for rec in self.running():
            self.ledger.set_preview_viewers(rec.index, self.preview.viewers(rec.info.source_id))

    def _start(self, cmd: _Command) -> None:
        assert cmd.info is not None and self._summary is not None and self._book is not None
        if self._stopping:
            raise ControlError(503, "the pipeline is stopping")
        if self.is_running(cmd.source_id):
            raise ControlError(409, f"id {cmd.source_id!r} is already in use")
        free = self.ledger.free_slots()
        if not free:
            raise ControlError(409, f"no room for source {cmd.source_id}: {len(self.running())} sources run "
                                    f"(control.max_sources={self.ledger.num_sources})")
        index = free[0]
        added_no = self._added + 1
        base = f"{RUN_PREFIX}{self.token}-a{added_no}"
        credit_ep = f"ipc://{Path(self.run_dir) / f'credits-a{added_no}'}"
        chain: ModelChain = self.prepared.chains[cmd.chain]
        ep = dataclasses.replace(self.endpoints.for_chain(cmd.chain), frame_credits=((base, credit_ep),))
        info = cmd.info
        spec = decode_spec(self.settings, info, pool=pool_name(base, 0), endpoints=ep, batch=chain.max_batch,
                           ledger=LedgerRef(name=self.ledger.name, chain=cmd.chain, source=index))
        try:  # a file's frame pool is made at start: fewer slots, or no source, rather than a SIGBUS
            fitted = fit_to_host([spec], run=f"{RUN_PREFIX}{self.token}-", added=True,
                                 label=f"source {cmd.source_id}: ")
        except PipelineError as e:
            raise ControlError(507, f"source {cmd.source_id}: {e}") from e
        self._added = added_no
        self.ledger.reset_source(index)
        self.ledger.set_active(index, True)
        added = SourceAddedMsg(info.source_id, index, info.is_live, cmd.chain, base, credit_ep, float(info.fps))
        if self.events is not None:
            self.events.send(added.encode())
        self.pool_names.add(pool_name(base, 0))
        rec = SourceRecord(info, cmd.chain, index, base, credit_ep)
        with self._lock:
            self._records[info.source_id] = rec
            self._reserved.discard(info.source_id)
        report = SourceReport(info.source_id, info.display)
        self._summary.sources.append(report)
        self._book.reports[info.source_id] = report
        rec.child = self.spawn(fitted[0], f"decode:{info.source_id}")
        self._refresh_postprocess_spec()

    def _stop(self, source_id: str) -> None:
        rec = self._records.get(source_id)
        if rec is None or rec.state == "ended":
            raise ControlError(404, f"no running source {source_id!r}")
        rec.state = "removing"
        self.ledger.request_stop(rec.index)

    def _retire_finished(self) -> None:
        for rec in self.running():
            child = rec.child
            if child is None or child.proc.exitcode != 0 or not self.ledger.eos_done(rec.index):
                continue
            report = self._book.reports.get(rec.info.source_id) if self._book is not None else None
            rec.eos_at = rec.eos_at or time.monotonic()
            if report is not None and not report.reason and time.monotonic() - rec.eos_at < END_STATUS_WAIT_S:
                continue  # (the ledger says the EOS is out; its status, with the reason, is still on its way)
            self.forget_child(child)
            rec.child = None
            for name in [n for n in self.pool_names if split_pool_name(n)[0] == rec.pool]:
                unlink_pool(name)
                self.pool_names.discard(name)
            frames, detections = self.ledger.reset_source(rec.index)
            self.retired_totals[0] += frames
            self.retired_totals[1] += detections
            rec.reason = report.reason if report is not None else ""
            rec.error = report.error if report is not None else ""
            rec.state = "ended"
            self.preview.forget(rec.info.source_id)
            self._refresh_postprocess_spec()
            rec.done.set()
        ended = [sid for sid, r in self._records.items() if r.state == "ended"]
        if len(ended) > KEEP_ENDED:
            with self._lock:
                for sid in ended[: len(ended) - KEEP_ENDED]:
                    del self._records[sid]

    def _refresh_postprocess_spec(self) -> None:
        """Make the postprocess stage's spec describe the running sources (what a restart of it starts with)."""
        child = self._postprocess
        if child is None or not isinstance(child.spec, PostprocessSpec):
            return
        spec = child.spec
        running = self.running()
        cards = self.prepared.chains
        child.spec = dataclasses.replace(
            spec, num_sources=len(running),
            stats=dataclasses.replace(spec.stats, sources=tuple((r.info.source_id, r.info.is_live) for r in running)),
            ledger_indices=tuple(r.index for r in running),
            cards_by_source=tuple((r.info.source_id, cards[r.chain].card) for r in running if r.chain > 0),
            endpoints=dataclasses.replace(spec.endpoints, frame_credits=tuple(
                (r.pool, r.credit_endpoint) for r in running)))

    def _drain_live(self) -> None:
        while self._live.poll(0, zmq.POLLIN):
            try:
                msg = decode_message(self._live.recv())
            except ValueError:
                continue
            if isinstance(msg, PreviewFrameMsg):
                self.preview.put(msg.source_id, msg.jpeg)
            elif isinstance(msg, StatsSnapshotMsg):
                try:
                    self._snapshot = json.loads(msg.sources_json)
                except ValueError:
                    continue
                self._metrics = msg.metrics

    def close(self) -> None:
        """Close the live socket, wake the requests still waiting, refuse later ones, end the preview streams."""
        self._live.close(0)
        self.preview.close()
        with self._lock:
            self._closed = True
            for cmd in self._commands:
                cmd.error = ControlError(503, "the pipeline is stopping")
                cmd.done.set()
            self._commands = []
        for rec in self._records.values():
            rec.done.set()

    def live_ids(self) -> set[str]:
        """Ids of every live source the run had (for the summary: a failed camera is a warning while others work)."""
        return {sid for sid, r in self._records.items() if r.info.is_live}

    def running(self) -> list[SourceRecord]:
        """The sources that have not ended, in the order they were started."""
        return [r for r in self._records.values() if r.state != "ended"]

    # ------------------------------------------------------------------ HTTP threads
    def readiness(self) -> str | None:
        """Why the pipeline is not ready, or None when every stage is."""
        return self._ready_reason

    def metrics(self) -> bytes:
        """The Prometheus exposition of the postprocess stage's registry (as ``--metrics-port`` serves it)."""
        return self._metrics

    def list_sources(self) -> list[dict[str, Any]]:
        """Every source of the run with its figures (``GET /sources``)."""
        restarts = self._summary.restarts if self._summary is not None else {}
        out = []
        with self._lock:
            records = list(self._records.values())
        for r in records:
            sid = r.info.source_id
            snap = self._snapshot.get(sid, {}) if r.state != "ended" else {}
            state = r.state
            if state == "starting":
                state = snap.get("state") or ("running" if snap.get("frames") else "starting")
                if state == "file":
                    state = "running"
            report = self._book.reports.get(sid) if self._book is not None else None
            out.append({
                "id": sid, "url": r.info.display, "kind": "live" if r.info.is_live else "file", "state": state,
                "model": self.prepared.chains[r.chain].card.name, "fps": snap.get("fps"),
                "dropped": snap.get("dropped", 0), "latency_p50_ms": snap.get("latency_p50_ms"),
                "latency_p99_ms": snap.get("latency_p99_ms"),
                "frames": report.frames if r.state == "ended" and report is not None  # (the ledger's: over restarts)
                else max(self.ledger.frames_published(r.index), snap.get("frames", 0)),
                "restarts": restarts.get(f"decode:{sid}", 0), "reason": r.reason or None,
                "error": r.error or None,
            })
        return out

    def is_running(self, source_id: str) -> bool:
        """Whether the source exists and has not ended."""
        rec = self._records.get(source_id)
        return rec is not None and rec.state != "ended"

    def source(self, source_id: str) -> dict[str, Any] | None:
        """One source as :meth:`list_sources` shows it, or None."""
        return next((s for s in self.list_sources() if s["id"] == source_id), None)

    def add_source(self, *, url: str, source_id: str | None = None, max_fps: float | None = None,
                   model: str | None = None) -> dict[str, Any]:
        """Probe a new source and have the runner start it (``POST /sources``).

        Args:
            url: file path or URL (``rtsp://...``).
            source_id: its id (default: derived from the URL, made unique).
            max_fps: live sources: frame-rate cap.
            model: a loaded model, by card name or ONNX path (default: the first model).

        Returns:
            The source as :meth:`list_sources` shows it.

        Raises:
            ControlError: 409 for an id in use or no free slot, 422 for a malformed URL, a source
                that cannot be opened or an unknown model, 503 while stopping or on a timeout.
        """
        if not url.strip():
            raise ControlError(422, f"url {url!r}: expected a file path or a URL")
        if "://" in url:  # the start-up rule: spaces are refused in a URL only (a file path may hold them)
            if any(c.isspace() for c in url):
                raise ControlError(422, f"url {redact_url(url)!r}: malformed (expected a URL without spaces)")
            scheme, rest = url.split("://", 1)
            if not scheme.isalpha() or not rest.split("/", 1)[0].rsplit("@", 1)[-1]:
                raise ControlError(422, f"url {redact_url(url)!r}: malformed (expected SCHEME://HOST[:PORT]/...)")
        chain = self._chain_for(model)
        with self._lock:
            taken = {r.info.source_id for r in self._records.values() if r.state != "ended"} | self._reserved
            if source_id is not None:
                try:
                    check_source_id(source_id)
                except ValueError as e:
                    raise ControlError(422, f"id {source_id!r}: {e}") from e
                if source_id in taken:
                    raise ControlError(409, f"id {source_id!r} is already in use")
                sid = source_id
            else:
                known = sorted(taken | set(self._records))
                sid = source_ids_for([*known, url], given=[*known, None])[-1]
            self._reserved.add(sid)
        try:
            try:
                info = probe_source(url, sid, max_fps=max_fps, hwaccel=self.settings.decode.hwaccel_options())
            except SourceError as e:
                raise ControlError(422, str(e)) from e
            cmd = _Command("add", sid, info, chain)
            self._submit(cmd, COMMAND_TIMEOUT_S)
        finally:
            with self._lock:
                self._reserved.discard(sid)
        return self.source(sid) or {"id": sid}

    def remove_source(self, source_id: str) -> None:
        """Have the runner stop a source and wait until its EOS is published and its slots freed (``DELETE``).

        Raises:
            ControlError: 404 for an unknown or ended source, 503 while stopping or on a timeout.
        """
        rec = self._records.get(source_id)
        if rec is None or rec.state == "ended":
            raise ControlError(404, f"no running source {source_id!r}")
        self._submit(_Command("remove", source_id), COMMAND_TIMEOUT_S)
        if not rec.done.wait(REMOVE_TIMEOUT_S):
            raise ControlError(503, f"source {source_id!r} did not stop within {REMOVE_TIMEOUT_S:.0f} s")
        if rec.state != "ended":  # woken by close(): the run stops every source itself
            raise ControlError(503, "the pipeline is stopping")

    def _submit(self, cmd: _Command, timeout_s: float) -> None:
        """Hand a command to the runner's thread and wait for its outcome (503 once the plane is closed)."""
        with self._lock:
            if self._closed:  # the runner no longer steps: nobody would ever take it
                raise ControlError(503, "the pipeline is stopping")
            self._commands.append(cmd)
        if not cmd.done.wait(timeout_s):
            with self._lock:  # withdrawn unless the runner has taken it already: then its outcome stands
                withdrawn = cmd in self._commands
                if withdrawn:
                    self._commands.remove(cmd)
            if withdrawn:
                raise ControlError(503, f"the pipeline did not take the request within {timeout_s:.0f} s")
            cmd.done.wait()
        if cmd.error is not None:
            raise cmd.error

    def _chain_for(self, model: str | None) -> int:
        chains = self.prepared.chains
        if model is None or not model.strip():
            return 0
        want = model.strip()
        for k, ch in enumerate(chains):
            path = ch.model.path
            if want in (ch.card.name, str(path), path.name, path.stem) or Path(want).resolve() == path.resolve():
                return k
        loaded = ", ".join(f"{ch.card.name} ({ch.model.path.name})" for ch in chains)
        raise ControlError(422, f"model {want!r} is not loaded (loaded: {loaded}); a source can only use a "
                                "model the pipeline started with")


def readiness(*, started: bool, missing: list[str], restarting: list[str], stopping: bool) -> str | None:
    """Why the pipeline is not ready (``GET /readyz`` answers 503 with it), or None.

    Args:
        started: every stage reported ready once and the decoders were let go.
        missing: stages that have not reported ready yet (before the start).
        restarting: stages being restarted now.
        stopping: the run is stopping (a signal, an error).
    """
    if stopping:
        return "the pipeline is stopping"
    if not started:
        return f"stages not ready yet: {', '.join(missing) or 'starting'}"
    if restarting:
        return f"restarting: {', '.join(restarting)}"
    return None

