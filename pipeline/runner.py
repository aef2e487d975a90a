"""The runner: validates the inputs, wires the stages together in plain Python and supervises them.

Start-up, before anything is decoded: every source is probed (exists, is a video), the model is
inspected (a readable ONNX file), its card found and checked against it. Then each stage starts
in its own process (``multiprocessing``, spawn start method)::

    decode (one per source) --FrameMsg--> preprocess --BatchMsg--> engine --ResultMsg--> postprocess + sinks
        ^        frame slots (shared memory), credits back      tensor slots, credits back

Stages report ``ready`` once their sockets are bound and the model is loaded (a port in use or a
model ONNX Runtime cannot load fails here); only then does the runner let the decoders start.
The runner then follows the stages' status reports (progress bar, counts, errors) until the
postprocess stage has passed every source's EOS to the sinks.

Stopping: the first SIGINT/SIGTERM closes the inputs (decoders send EOS, the rest drains, sinks
flush; exit 130/143); a second one, a stage error or a drain longer than
:data:`DRAIN_TIMEOUT_S` aborts at once. Children ignore SIGINT, watch their parent and die with
it; the runner joins them and kills any that remain, so no process outlives a run.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from engines.base import Backend, EngineError
from pipeline.settings import Settings
from pipeline.slotpool import unlink_pool
from pipeline.stages.base import StageSpec, stage_main
from pipeline.stages.decode import DecodeSpec, SourceError, SourceInfo, probe_source
from pipeline.stages.engine import EngineSpec, ModelInfo, check_card_against_model, inspect_onnx, resolve_card
from pipeline.stages.postprocess import PostprocessSpec, SinkConfig
from pipeline.stages.preprocess import PreprocessSpec
from pipeline.stages.stats import StatsConfig
from pipeline.transport import (
    CONTROL_HWM,
    POLL_MS,
    StageEndpoints,
    TransportMode,
    ipc_endpoints,
    make_socket,
    redact_url,
    tcp_endpoints,
)
from streamdet.card import ModelCard, ModelCardError
from streamdet.constants import EXIT_FAILURE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from streamdet.messages import StageName, StatusKind, StatusMsg, check_source_id
from streamdet.postprocess import device_nms_supported

STARTUP_TIMEOUT_S = 120.0
"""Longest wait for every stage to report ready (plus the publish-subscriber wait)."""

DRAIN_TIMEOUT_S = 30.0
"""After a stop signal, longest wait for the pipeline to drain before aborting."""

JOIN_TIMEOUT_S = 5.0
"""Longest wait for a stage process to exit once the run is over, before it is killed."""

LIGHT_STAGE_ENV = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Environment of the stages other than the engine (unless the user set these): one BLAS thread.
Their matrix products are small (instance-mask coefficients times prototypes); a BLAS thread pool
woken for each one, on CPUs the engine keeps busy, made the mask postprocess 2-3x slower."""

RSS_SAMPLE_S = 0.5
"""How often the runner samples the stages' resident memory (and calls the monitor)."""



class PipelineError(Exception):
    """The run cannot start or failed; ``str(e)`` is one line naming the input and the problem.

    Attributes:
        exit_code: the process exit status to use.
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


def source_ids_for(urls: list[str], given: list[str | None] | None = None) -> list[str]:
    """Topic-safe, unique source ids from paths/URLs: the file stem, ``-2``, ``-3``... on repeats.

    Args:
        urls: sources as given.
        given: ids chosen by the user (None entries: derive from the URL); kept as they are.

    Returns:
        One id per source, matching ``[A-Za-z0-9_-]{1,64}``.
    """
    chosen = list(given) if given is not None else [None] * len(urls)
    ids: list[str] = []
    for url, want in zip(urls, chosen, strict=True):
        if want:
            ids.append(check_source_id(want))
            continue
        stem = Path(redact_url(url).split("?", 1)[0].rstrip("/")).stem or "source"
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:56] or "source"
        sid, k = base, 2
        while sid in ids or sid in chosen:
            sid, k = f"{base}-{k}", k + 1
        ids.append(check_source_id(sid))
    return ids


@dataclass
class SourceReport:
    """What happened to one source.

    Attributes:
        source_id: its id.
        display: path or URL (credentials redacted).
        frames: frames that went through the whole pipeline.
        reason: how it ended (``finished``, ``max_frames``, ``interrupted``, ``error``), empty if it did not.
        error: the source's problem, if any.
    """

    source_id: str
    display: str
    frames: int = 0
    reason: str = ""
    error: str = ""


@dataclass
class RunSummary:
    """The outcome of a run.

    Attributes:
        model: the model's name.
        frames: frames that went through the whole pipeline (all sources).
        seconds: wall time from the go signal to the end of the last stage.
        detections: detections in the published messages.
        sources: per-source reports.
        outputs: one line per sink saying where its output went.
        errors: one line per problem.
        warnings: one line per problem that did not fail the run (a live source lost while others ran).
        exit_code: the process exit status.
        peak_rss_kib: peak resident memory (sum over the stage processes) seen while running.
    """

    model: str
    frames: int = 0
    seconds: float = 0.0
    detections: int = 0
    sources: list[SourceReport] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK
    peak_rss_kib: int = 0

    @property
    def fps(self) -> float:
        """Frames per second over the run."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def process_rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (``VmRSS`` from ``/proc/<pid>/status``), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class ModelChain:
    """One model and the sources it serves (one preprocess and one engine process each).

    Attributes:
        model: the inspected ONNX model.
        card: its card (checked against it).
        max_batch: frames per engine batch.
        pad_batches: whether batches are padded to ``max_batch`` (static batch size).
        source_ids: the sources this model serves, in source order.
        tensor_device: the torch device its preprocess writes input tensors on (the engine's CUDA
            device with ``preprocess.on_device``), or None for host shared memory.
    """

    model: ModelInfo
    card: ModelCard
    max_batch: int
    pad_batches: bool
    source_ids: tuple[str, ...]
    tensor_device: str | None = None


@dataclass(frozen=True)
class _Prepared:
    sources: list[SourceInfo]
    chains: list[ModelChain]

    @property
    def first_card(self) -> ModelCard:
        return self.chains[0].card

    @property
    def model_names(self) -> str:
        return "+".join(dict.fromkeys(c.card.name for c in self.chains))


class Pipeline:
    """One pipeline run: :meth:`prepare` (validation) then :meth:`run`.

    Args:
        settings: the run's settings.
        progress: show a tqdm progress bar on stderr (default: unless ``settings.quiet`` or stderr
            is not a TTY).
        monitor: called about every 50 ms while running with the pipeline (e.g. to sample memory).
        tensor_device: tests only: run the device-tensor path (device preprocess, ``infer_device``,
            device NMS) with torch tensors on this device, whatever ``engine.device`` is (``"cpu"``
            exercises the GPU wiring without a GPU; needs ``--backend cuda``). None: the path runs
            when the engine is on a CUDA device and ``preprocess.on_device`` is on.
    """

    def __init__(self, *, settings: Settings, progress: bool | None = None,
                 monitor: Callable[[Pipeline], None] | None = None, tensor_device: str | None = None) -> None:
        self.settings = settings
        self.tensor_device = tensor_device
        self.progress = (not settings.quiet and sys.stderr.isatty()) if progress is None else progress
        self.monitor = monitor
        self._prepared: _Prepared | None = None
        self._procs: list[tuple[StageName, str, Any]] = []
        self._signals: list[int] = []
        self.frames_done = 0
        """Frames through the whole pipeline so far (for monitors)."""

    # ----------------------------------------------------------------------------- validation
    def prepare(self) -> None:
        """Validate sources, model and card (nothing is decoded yet).

        Raises:
            PipelineError: naming the first bad input (exit code 1).
        """
        s = self.settings
        entries = s.source_entries()
        ids = source_ids_for([e.url for e in entries], given=[e.id for e in entries])
        infos = []
        for entry, sid in zip(entries, ids, strict=True):
            try:
                info = probe_source(entry.url, sid, max_fps=entry.max_fps, hwaccel=s.decode.hwaccel_options())
            except SourceError as e:
                raise PipelineError(str(e)) from e
            if info.warning:  # decode.hwaccel_fallback: said once, at start-up, like the engine's fallback
                print(f"warning: {info.warning}", file=sys.stderr)
            infos.append(info)
        chains: dict[tuple[Path, Path | None], list[str]] = {}
        for entry, sid in zip(entries, ids, strict=True):
            key = (entry.model, entry.card) if entry.model is not None else (s.model, s.card)
            chains.setdefault(key, []).append(sid)
        self._prepared = _Prepared(infos, [self._prepare_model(path, card_path, tuple(sids))
                                           for (path, card_path), sids in chains.items()])

    def _prepare_model(self, model_path: Path, card_path: Path | None, source_ids: tuple[str, ...]) -> ModelChain:
        """Inspect one model, find and check its card (outputs included) and its backend."""
        s = self.settings
        try:
            info = inspect_onnx(model_path)
            card = resolve_card(info, card_path)
            card_name = str(card_path) if card_path is not None else (
                str(info.path.with_suffix(".json")) if info.path.with_suffix(".json").is_file()
                else "ONNX metadata")
            check_card_against_model(card, info, card_name)
            from engines.select import choose_backend

            eng = s.engine
            choice = choose_backend(eng.backend, eng.device, info.path, allow_fallback=eng.allow_fallback)
        except (EngineError, ModelCardError) as e:
            raise PipelineError(str(e)) from e
        max_batch, pad = s.preprocess.max_batch, False
        if info.static_batch is not None or not card.input.dynamic_batch:
            max_batch, pad = info.static_batch or 1, True
        tensor_device = self.tensor_device
        if tensor_device is None and s.preprocess.on_device and choice.device != "cpu" \
                and choice.backend in (Backend.CUDA, Backend.TENSORRT):  # engines with infer_device
            tensor_device = choice.device
        return ModelChain(info, card, max_batch, pad, source_ids, tensor_device)

    @property
    def chains(self) -> list[ModelChain]:
        """The model chains, one per distinct model (after :meth:`prepare`)."""
        assert self._prepared is not None
        return self._prepared.chains

    @property
    def card(self) -> ModelCard:
        """The (first) model's card (after :meth:`prepare`)."""
        assert self._prepared is not None
        return self._prepared.first_card

    @property
    def sources(self) -> list[SourceInfo]:
        """The probed sources (after :meth:`prepare`)."""
        assert self._prepared is not None
        return self._prepared.sources

    def expected_frames(self) -> int | None:
        """Frames the run should produce if it finishes (None if a source's length is unknown)."""
        total = 0
        for src in self.sources:
            if not src.is_file or src.frames <= 0:
                return None
            n = src.frames * self.settings.decode.loop
            total += min(n, self.settings.max_frames) if self.settings.max_frames else n
        return total

    def child_pids(self) -> list[int]:
        """Pids of the stage processes still running."""
        return [p.pid for _, _, p in self._procs if p.pid is not None and p.is_alive()]

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask for a graceful stop (what SIGINT/SIGTERM do); a second request aborts."""
        self._signals.append(signum)

    # ------------------------------------------------------------------------------- wiring
    def _specs(self, endpoints: StageEndpoints, pools: list[str], tensor_pools: list[str]) -> list[StageSpec]:
        assert self._prepared is not None
        s, p = self.settings, self._prepared
        sinks = SinkConfig(
            publish=s.sinks.publish, publish_wait_subscribers=s.sinks.publish_wait_subscribers,
            publish_wait_timeout_s=s.sinks.publish_wait_timeout_s,
            jsonl=str(s.sinks.jsonl) if s.sinks.jsonl else None,
            video_out=str(s.sinks.video_out) if s.sinks.video_out else None,
            fps_by_source=tuple((src.source_id, src.fps) for src in p.sources),
        )
        n = len(p.sources)
        ctl = endpoints.control
        first = p.chains[0]
        specs: list[StageSpec] = [
            PostprocessSpec(control=ctl, nice=s.postprocess.nice, card=first.card, model_name=first.card.name,
                            config=s.postprocess.to_config(), sinks=sinks, endpoints=endpoints, num_sources=n,
                            stats=StatsConfig(
                                sources=tuple((src.source_id, src.is_live) for src in p.sources),
                                interval_s=s.sinks.stats_interval_s if not s.quiet else 0.0,
                                metrics_port=s.sinks.metrics_port, metrics_host=s.sinks.metrics_host),
                            cards_by_source=tuple((sid, c.card) for c in p.chains[1:] for sid in c.source_ids)),
        ]
        pool_of = {src.source_id: pool for src, pool in zip(p.sources, pools, strict=True)}
        chain_of: dict[str, StageEndpoints] = {}
        for k, (chain, tensor_pool) in enumerate(zip(p.chains, tensor_pools, strict=True)):
            ep = endpoints if len(p.chains) == 1 else endpoints.for_chain(k, [pool_of[i] for i in chain.source_ids])
            chain_of.update((sid, ep) for sid in chain.source_ids)
            m = len(chain.source_ids)
            post_cfg = s.postprocess.to_config()
            device_nms = post_cfg if chain.tensor_device is not None and device_nms_supported(chain.card, post_cfg) \
                else None
            specs += [
                EngineSpec(control=ctl, card=chain.card, model_path=str(chain.model.path), backend=s.engine.backend,
                           device=s.engine.device, intra_op_threads=s.engine.intra_op_threads,
                           allow_fallback=s.engine.allow_fallback, endpoints=ep, num_sources=m,
                           warmup_batch=chain.max_batch, device_batches=chain.tensor_device is not None,
                           device_nms=device_nms),
                PreprocessSpec(control=ctl, nice=s.preprocess.nice, card=chain.card, endpoints=ep,
                               tensor_pool=tensor_pool, tensor_slots=s.preprocess.tensor_slots,
                               max_batch=chain.max_batch, pad_batches=chain.pad_batches,
                               max_wait_ms=s.preprocess.max_wait_ms, keep_pixels=sinks.needs_pixels, num_sources=m,
                               tensor_device=chain.tensor_device),
            ]
        for src, pool in zip(p.sources, pools, strict=True):
            specs.append(DecodeSpec(control=ctl, nice=s.decode.nice, source=src, pool=pool,
                                    num_slots=s.decode.slots if src.is_file else s.decode.live_slots,
                                    endpoints=chain_of[src.source_id], max_frames=s.max_frames, loop=s.decode.loop,
                                    threads=s.decode.threads, live=s.decode.live_options()))
        return specs

    # ---------------------------------------------------------------------------------- run
    def run(self, *, handle_signals: bool = True) -> RunSummary:
        """Run the pipeline to the end of every source (or a stop).

        Args:
            handle_signals: install SIGINT/SIGTERM handlers for the run (main thread only).

        Returns:
            The :class:`RunSummary` (its ``exit_code`` says how the run ended).

        Raises:
            PipelineError: if validation fails (when :meth:`prepare` was not called yet).
        """
        if self._prepared is None:
            self.prepare()
        assert self._prepared is not None
        summary = RunSummary(model=self._prepared.model_names,
                             sources=[SourceReport(src.source_id, src.display) for src in self._prepared.sources])
        old_handlers: dict[int, Any] = {}
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        tmpdir = tempfile.mkdtemp(prefix="streamdet-")  # mode 0700: the ipc sockets are private
        token = uuid.uuid4().hex[:8]
        pools = [f"sd-{token}-f{i}" for i in range(len(self._prepared.sources))]
        n_chains = len(self._prepared.chains)
        tensor_pools = [f"sd-{token}-t"] + [f"sd-{token}-t{k}" for k in range(1, n_chains)]
        ctx: zmq.Context[Any] = zmq.Context()
        control = None
        try:
            t = self.settings.transport
            endpoints = (tcp_endpoints(t.tcp_host, t.tcp_base_port, pools, n_chains) if t.mode is TransportMode.TCP
                         else ipc_endpoints(tmpdir, pools, n_chains))
            try:
                control = make_socket(ctx, zmq.PULL, endpoints.control, bind=True, hwm=CONTROL_HWM)
            except Exception as e:
                raise PipelineError(str(e)) from e
            self._supervise(summary, control, self._specs(endpoints, pools, tensor_pools))
        finally:
            self._shutdown()
            if control is not None:
                control.close(0)
            ctx.term()
            for name in [*pools, *tensor_pools]:
                unlink_pool(name)
            shutil.rmtree(tmpdir, ignore_errors=True)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
        return summary

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _start(self, specs: list[StageSpec], events: tuple[Any, Any, Any]) -> None:
        mpctx = mp.get_context("spawn")
        for spec in specs:
            label = spec.stage_name.value
            if isinstance(spec, DecodeSpec):
                label = f"decode:{spec.source.source_id}"
            proc = mpctx.Process(target=stage_main, args=(spec, *events, os.getpid()),
                                 name=f"streamdet-{label}", daemon=True)
            env = {} if spec.stage_name is StageName.ENGINE else \
                {k: v for k, v in LIGHT_STAGE_ENV.items() if k not in os.environ}
            os.environ.update(env)  # a spawned child starts with the parent's environment
            try:
                proc.start()
            finally:
                for k in env:
                    os.environ.pop(k, None)
            self._procs.append((spec.stage_name, label, proc))

    def _supervise(self, summary: RunSummary, control: zmq.Socket[Any], specs: list[StageSpec]) -> None:
        mpctx = mp.get_context("spawn")
        go, stop_input, abort = mpctx.Event(), mpctx.Event(), mpctx.Event()
        self._abort = abort
        self._start(specs, (go, stop_input, abort))
        reports = {r.source_id: r for r in summary.sources}
        expected = self.expected_frames()
        bar: Any = None
        ready: Counter[str] = Counter()
        done: Counter[str] = Counter()
        per_label = Counter(label for _, label, _ in self._procs)
        started = time.monotonic()
        wait_subs = self.settings.sinks.publish_wait_timeout_s if self.settings.sinks.publish else 0.0
        ready_deadline = started + STARTUP_TIMEOUT_S + wait_subs
        go_at: float | None = None
        drain_deadline: float | None = None
        handled_signals = 0
        next_sample = 0.0
        crashed: set[int] = set()
        try:
            while True:
                # signals: the first closes the inputs (drain), a second one aborts
                while handled_signals < len(self._signals):
                    signum = self._signals[handled_signals]
                    handled_signals += 1
                    if summary.exit_code == EXIT_OK:
                        summary.exit_code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT
                    stop_input.set()  # decoders stop reading (or never start) and send EOS
                    if handled_signals == 1:
                        drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S + (0 if go_at else STARTUP_TIMEOUT_S)
                    else:
                        abort.set()
                if abort.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + JOIN_TIMEOUT_S
                msg = self._recv_status(control)
                if msg is not None:
                    if self._handle_status(msg, summary, reports, ready, done, bar, abort):
                        break
                for _, label, proc in self._procs:  # stage processes that died without a word
                    if proc.exitcode not in (None, 0) and done[label] < per_label[label] \
                            and proc.pid not in crashed:
                        crashed.add(proc.pid)
                        if not abort.is_set():
                            self._fail(summary, f"the {label} stage exited unexpectedly (exit code "
                                                f"{proc.exitcode})", abort)
                if all(p.exitcode is not None for _, _, p in self._procs):
                    break
                if go_at is None and ready.total() == len(self._procs) and not abort.is_set():
                    go.set()
                    go_at = time.monotonic()
                    if self.progress:
                        from tqdm import tqdm

                        bar = tqdm(total=expected, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=True)
                if go_at is None and time.monotonic() > ready_deadline and not abort.is_set():
                    missing = sorted(per_label - ready)
                    self._fail(summary, f"stages {missing} not ready after {STARTUP_TIMEOUT_S:.0f} s", abort)
                if drain_deadline is not None and time.monotonic() > drain_deadline:
                    if abort.is_set():
                        break
                    summary.errors.append(f"the pipeline did not drain within {DRAIN_TIMEOUT_S:.0f} s "
                                          "after the stop signal; aborted")
                    abort.set()
                    drain_deadline = time.monotonic() + JOIN_TIMEOUT_S
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + RSS_SAMPLE_S
                    rss = sum(process_rss_kib(pid) for pid in self.child_pids())
                    summary.peak_rss_kib = max(summary.peak_rss_kib, rss)
                    if self.monitor is not None:
                        self.monitor(self)
            end = time.monotonic()
            summary.seconds = end - go_at if go_at is not None else 0.0
            # drain the remaining reports (OUTPUT lines come from the last stage's stop())
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while time.monotonic() < deadline and any(p.is_alive() for _, _, p in self._procs):
                msg = self._recv_status(control)
                if msg is not None:
                    self._handle_status(msg, summary, reports, ready, done, bar, abort)
            while (msg := self._recv_status(control, 0)) is not None:
                self._handle_status(msg, summary, reports, ready, done, bar, abort)
        finally:
            if bar is not None:
                bar.close()
        # a live source that failed does not fail the run while another source still worked
        live = {src.source_id for src in self.sources if src.is_live}
        all_failed = all(r.error for r in summary.sources)
        for r in summary.sources:
            if r.error:
                if r.source_id in live and not all_failed:
                    summary.warnings.append(r.error)
                else:
                    summary.errors.append(r.error)
        if summary.errors and summary.exit_code == EXIT_OK:
            summary.exit_code = EXIT_FAILURE

    @staticmethod
    def _recv_status(control: zmq.Socket[Any], timeout_ms: int = POLL_MS) -> StatusMsg | None:
        if not control.poll(timeout_ms, zmq.POLLIN):
            return None
        from streamdet.messages import decode_message

        msg = decode_message(control.recv())
        return msg if isinstance(msg, StatusMsg) else None

    def _fail(self, summary: RunSummary, message: str, abort: Any) -> None:
        summary.errors.append(message)
        if summary.exit_code == EXIT_OK:
            summary.exit_code = EXIT_FAILURE
        abort.set()

    def _handle_status(self, msg: StatusMsg, summary: RunSummary, reports: dict[str, SourceReport],
                       ready: Counter[str], done: Counter[str], bar: Any, abort: Any) -> bool:
        """Apply one status report; True once the last stage is done."""
        label = msg.stage.value if msg.stage is not StageName.DECODE else f"decode:{msg.source_id}"
        match msg.kind:
            case StatusKind.READY:
                ready[label] += 1
            case StatusKind.PROGRESS:
                if msg.stage is StageName.POSTPROCESS:
                    n = msg.counts.get("frames", 0)
                    summary.frames += n
                    self.frames_done = summary.frames
                    summary.detections += msg.counts.get("detections", 0)
                    if bar is not None and n:
                        bar.update(n)
            case StatusKind.SOURCE_END:
                r = reports.get(msg.source_id)
                if r is not None:
                    r.reason = msg.message
                    r.frames = msg.counts.get("frames", r.frames)
            case StatusKind.SOURCE_ERROR:
                r = reports.get(msg.source_id)
                if r is not None:
                    r.error = msg.message
            case StatusKind.STAGE_ERROR:
                if not abort.is_set():  # the first error is the cause; later ones are consequences
                    summary.errors.append(msg.message)
                if summary.exit_code == EXIT_OK:
                    summary.exit_code = EXIT_FAILURE
                abort.set()
            case StatusKind.OUTPUT:
                summary.outputs.append(msg.message)
            case StatusKind.DONE:
                done[label] += 1
                if msg.stage is StageName.POSTPROCESS:
                    return True
        return False

    def _shutdown(self) -> None:
        """Join every stage process; kill those that do not exit in time."""
        abort = getattr(self, "_abort", None)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for _, _, proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for _, _, p in self._procs):
            if abort is not None:
                abort.set()
            deadline = time.monotonic() + 2.0
            for _, _, proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for _, _, proc in self._procs:
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.join(2.0)
        for _, _, proc in self._procs:
            with contextlib.suppress(ValueError):
                proc.close()
        self._procs = []


def format_summary(summary: RunSummary) -> list[str]:
    """The run's report, one line each: totals, each source, each output."""
    lines = [f"frames={summary.frames} fps={summary.fps:.1f} detections={summary.detections} "
             f"seconds={summary.seconds:.2f} model={summary.model}"]
    for r in summary.sources:
        how = r.reason or "not finished"
        lines.append(f"source {r.source_id}: {r.display}: {r.frames} frames ({how})")
    for out in summary.outputs:
        lines.append(f"output {out}")
    if not summary.outputs:
        lines.append("output: none (no sink configured or none opened)")
    return lines
