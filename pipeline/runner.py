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

Self-healing: a stage process that dies once the run has started (a signal, an unhandled
exception, a non-zero exit) is restarted alone, up to ``supervise.max_restarts`` times within
``supervise.window_s`` with backoff, and re-wired without disturbing the others; file frames are
published exactly once and in order across restarts (the protocol is described in
:mod:`pipeline.supervise`). A restart is published as ``status.<source_id>`` (state
``stage_restarted``) and counted in the summary, the stats line and the Prometheus metrics.

Stopping: the first SIGINT/SIGTERM/SIGHUP closes the inputs (decoders send EOS, the rest
drains, sinks flush; exit 130/143/129); a second one, a stage error or a drain longer than
:data:`DRAIN_TIMEOUT_S` aborts at once. Children ignore SIGINT, SIGHUP and SIGTERM, watch their parent and die with
it; the runner joins them and kills any that remain, so no process outlives a run.

This module spawns and supervises the stage processes; the start-up checks and the stages'
descriptions are in :mod:`pipeline.chains`, the run's summary in :mod:`pipeline.summary` (their
public names are re-exported here).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import zmq

from pipeline.chains import ModelChain, PreparedRun, prepare_run, source_ids_for, stage_specs
from pipeline.control.plane import ControlPlane, readiness
from pipeline.host import fit_to_host, prepare_host
from pipeline.restarts import Child, Restarter, environment, install_stop_handlers, join_children, start_fork_server
from pipeline.settings import Settings
from pipeline.slotpool import RUN_PREFIX, pool_name, unlink_pool
from pipeline.sources.probe import SourceInfo
from pipeline.stages.base import StageSpec, runner_stdio, stage_main
from pipeline.stages.cascade import SecondaryEngineSpec
from pipeline.stages.decode import DecodeSpec
from pipeline.summary import (
    PipelineError,
    RunSummary,
    SourceReport,
    StatusBook,
    format_summary,
    process_rss_kib,
)
from pipeline.supervise import Ledger, LedgerFlag, RestartPolicy
from pipeline.transport import (
    CONTROL_HWM,
    POLL_MS,
    TransportMode,
    ipc_endpoints,
    make_socket,
    new_context,
    private_run_dir,
    tcp_endpoints,
)
from streamdet.card import ModelCard
from streamdet.constants import EXIT_FAILURE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from streamdet.messages import StageName, StatusMsg

__all__ = [
    "CPU_ENGINE_LIGHT_STAGE_ENV",
    "DRAIN_TIMEOUT_S",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "JOIN_TIMEOUT_S",
    "LIGHT_STAGE_ENV",
    "RSS_SAMPLE_S",
    "STARTUP_TIMEOUT_S",
    "ModelChain",
    "Pipeline",
    "PipelineError",
    "RunSummary",
    "SourceReport",
    "format_summary",
    "process_rss_kib",
    "source_ids_for",
]

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

CPU_ENGINE_LIGHT_STAGE_ENV = {"OPENCV_FOR_THREADS_NUM": "1"}
"""Added to :data:`LIGHT_STAGE_ENV` when the engine runs on the CPU: one OpenCV thread.

Such an engine keeps every core busy, so OpenCV's thread pool (one thread per core by default)
only adds wake-ups to the letterbox's resize and the postprocess: letterbox and normalise of a
640x272 frame into 832x480 cost 0.71 instead of 0.97 ms of CPU with one thread (2 cores). With
the engine on a GPU the cores are free, and the preprocess of many streams may need them."""


def _light_stage_env(*, cpu_engine: bool) -> dict[str, str]:
    """The light stages' variables that the user has not set.

    :data:`LIGHT_STAGE_ENV`, and :data:`CPU_ENGINE_LIGHT_STAGE_ENV` with ``cpu_engine``.
    """
    env = {**LIGHT_STAGE_ENV, **CPU_ENGINE_LIGHT_STAGE_ENV} if cpu_engine else LIGHT_STAGE_ENV
    return {k: v for k, v in env.items() if k not in os.environ}


RSS_SAMPLE_S = 0.5
"""How often the runner samples the stages' resident memory (and calls the monitor)."""

class Pipeline:
    """One pipeline run: :meth:`prepare` (validation) then :meth:`run`.

    Args:
        settings: the run's settings.
        progress: show a tqdm progress bar on stderr (default: unless ``settings.quiet`` or stderr
            is not a TTY).
        monitor: called every :data:`RSS_SAMPLE_S` (0.5 s) while running with the pipeline (e.g. to sample memory).
        tensor_device: tests only: run the device-tensor path (device preprocess, ``infer_device``,
            device NMS) with torch tensors on this device, whatever ``engine.device`` is (``"cpu"``
            exercises the GPU wiring without a GPU; needs ``--backend cuda``). None: the path runs
            when the engine is on a CUDA device and ``preprocess.on_device`` is on.
        forward: also push every published message to this ZeroMQ endpoint, in order and without
            loss (:mod:`pipeline.stages.forward_sink`; how a cluster worker collects them).
    """

    def __init__(self, *, settings: Settings, progress: bool | None = None,
                 monitor: Callable[[Pipeline], None] | None = None, tensor_device: str | None = None,
                 forward: str | None = None) -> None:
        self.settings = settings
        self.forward = forward
        self.tensor_device = tensor_device
        self.progress = (not settings.quiet and sys.stderr.isatty()) if progress is None else progress
        self.monitor = monitor
        self._prepared: PreparedRun | None = None
        self._procs: list[Child] = []
        self._signals: list[int] = []
        self._pool_names: set[str] = set()
        self._ledger: Ledger | None = None
        self._abort: LedgerFlag | None = None  # the run's abort flag (in the ledger)
        self._events: Any = None  # PUSH socket to the postprocess stage's events endpoint
        self._fork_server = False
        self._restarter: Restarter | None = None
        self._plane: ControlPlane | None = None  # the control API's side in the runner (control.port)
        self.frames_done = 0
        """Frames through the whole pipeline so far (for monitors)."""

    # ----------------------------------------------------------------------------- validation
    def prepare(self) -> None:
        """Validate sources, model and card (nothing is decoded yet).

        Raises:
            PipelineError: naming the first bad input (exit code 1).
        """
        self._prepared = prepare_run(self.settings, self.tensor_device)

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
        return [c.proc.pid for c in self._procs if c.proc.pid is not None and c.proc.is_alive()]

    @property
    def restarting(self) -> bool:
        """Whether a stage restart is in progress (for monitors)."""
        return bool(self._restarter is not None and self._restarter.pending)

    def stage_pids(self) -> dict[str, int]:
        """Pid of every running stage process by label.

        Labels: ``decode:<source_id>``, ``preprocess``, ``engine``, ``postprocess``; a pipeline with
        several models adds ``:<k>`` to the labels of chain ``k >= 1``.
        """
        out: dict[str, int] = {}
        for c in self._procs:
            if c.proc.pid is not None and c.proc.is_alive():
                key = c.label if c.label not in out else f"{c.label}:{c.chain}"
                out[key] = c.proc.pid
        return out

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask for a graceful stop (what SIGINT/SIGTERM do); a second request aborts."""
        self._signals.append(signum)

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
        c = self.settings.control
        prepare_host(len(self._prepared.sources), c.max_sources if c.port is not None else 0)
        control_sock = server = None
        if c.port is not None:  # bound first: a port in use is one line at start-up
            from pipeline.control.server import LOOPBACK_NAMES, ControlServer, bind_control_socket

            control_sock = bind_control_socket(c.host, c.port)
            if c.token is None and c.host not in LOOPBACK_NAMES:
                print(f"warning: the control API listens on {c.host}:{c.port} without a token (set "
                      "control.token / STREAMDET_CONTROL__TOKEN): anyone who reaches it can add sources",
                      file=sys.stderr)
        summary = RunSummary(model=self._prepared.model_names,
                             sources=[SourceReport(src.source_id, src.display) for src in self._prepared.sources])
        old_handlers = install_stop_handlers(self._on_signal) if handle_signals else {}  # (SIGHUP too)
        tmpdir = private_run_dir()  # mode 0700: the ipc sockets are private
        token = uuid.uuid4().hex[:8]
        run = f"{RUN_PREFIX}{token}-"  # every shared-memory name of the run starts with it (reap_orphan_pools)
        pools = [f"{run}f{i}" for i in range(len(self._prepared.sources))]  # base names (generation 0 first)
        n_chains = len(self._prepared.chains)
        tensor_pools = [f"{run}t"] + [f"{run}t{k}" for k in range(1, n_chains)]
        n_sec = len(self._prepared.secondaries)
        secondary_pools = [f"{run}s{k}" for k in range(n_sec)]  # created by the postprocess stage
        output_pools = [f"{run}o{k}" for k in range(n_chains)]  # created by the engine stages
        self._pool_names = {pool_name(base, 0) for base in [*pools, *tensor_pools, *secondary_pools, *output_pools]}
        ctx = new_context()
        control = None
        ledger_name = f"{run}ledger"
        try:
            t = self.settings.transport
            endpoints = (tcp_endpoints(t.tcp_host, t.tcp_base_port, pools, n_chains) if t.mode is TransportMode.TCP
                         else ipc_endpoints(tmpdir, pools, n_chains, n_sec))
            try:
                control = make_socket(ctx, zmq.PULL, endpoints.control, bind=True, hwm=CONTROL_HWM)
                self._ledger = Ledger.create(name=ledger_name, num_chains=n_chains, num_sources=max(
                    len(pools), c.max_sources if control_sock is not None else 0))
                if endpoints.events:
                    self._events = make_socket(ctx, zmq.PUSH, endpoints.events, bind=False, hwm=CONTROL_HWM)
                if control_sock is not None:
                    from pipeline.control.app import create_app

                    self._plane = ControlPlane(settings=self.settings, prepared=self._prepared, endpoints=endpoints,
                                               run_dir=tmpdir, token=token, ledger=self._ledger, ctx=ctx,
                                               events=self._events, spawn=self._spawn_child,
                                               forget_child=self._forget_child, pool_names=self._pool_names)
                    app = create_app(self._plane, token=c.token.get_secret_value() if c.token else None, host=c.host)
                    server = ControlServer(app=app, sock=control_sock)
                    server.start()
            except PipelineError:
                raise
            except Exception as e:
                raise PipelineError(str(e)) from e
            specs = fit_to_host(stage_specs(self.settings, self._prepared, endpoints, pools, tensor_pools,
                                            ledger=ledger_name, forward=self.forward, secondary_pools=secondary_pools,
                                            output_pools=output_pools), run=run)
            self._supervise(summary, control, specs)
        finally:
            if self._plane is not None:  # first: requests still waiting get their 503 before the server stops
                summary.frames += self._plane.retired_totals[0]
                summary.detections += self._plane.retired_totals[1]
                self._plane.close()
            if server is not None:
                server.stop()
            elif control_sock is not None:
                control_sock.close()
            self._shutdown()
            if control is not None:
                control.close(0)
            if self._events is not None:
                self._events.close(0)
                self._events = None
            ctx.term()
            for name in self._pool_names:
                unlink_pool(name)
            if self._ledger is not None:
                self._abort = None  # (its flags live in the ledger)
                self._ledger.close()
                self._ledger = None
            unlink_pool(ledger_name)
            shutil.rmtree(tmpdir, ignore_errors=True)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
        return summary

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _spawn(self, spec: StageSpec, label: str) -> Any:
        """Start one stage process and return it.

        Stage processes are forked from the run's fork server (:meth:`_start_fork_server`), whose
        interpreter has the stage modules imported already, so the stages of a run import them
        once instead of once each, and a restarted stage is ready in a fraction of the time.
        Without it (``supervise.fork_server`` false, not Linux, or the server failed to start)
        each is spawned (a fresh interpreter). Either way the child gets this process's current
        environment (plus :data:`LIGHT_STAGE_ENV` for the stages other than the engines) and
        standard output and error.
        """
        ctx: Any = mp.get_context("forkserver" if self._fork_server else "spawn")
        env = {} if spec.stage_name in (StageName.ENGINE, StageName.SECONDARY) else self._light_env()
        kwargs: dict[str, Any] = {"environ": {**os.environ, **env}}
        if self._fork_server:  # a spawned child inherits them anyway
            kwargs["stdio"] = runner_stdio()
        if self._ledger is not None:  # (watched while it runs: Restarter.reap, supervise.hang_timeout_s)
            kwargs["heartbeat"] = self._ledger.new_heartbeat()
        proc = ctx.Process(target=stage_main, args=(spec, *self._events_args, os.getpid()), kwargs=kwargs,
                           name=f"streamdet-{label}", daemon=True)
        proc.heartbeat = kwargs.get("heartbeat")
        with environment(env):  # a spawned child starts with the parent's environment
            proc.start()
        return proc

    def _light_env(self) -> dict[str, str]:
        """Environment additions of the light stages (and of the fork server): :func:`_light_stage_env`."""
        return _light_stage_env(cpu_engine=self.settings.engine.device == "cpu")

    def _start_fork_server(self) -> None:
        """Start the fork server the stage processes are forked from (see :meth:`_spawn`).

        :func:`pipeline.restarts.start_fork_server`: about 1 s of CPU once (the imports every
        spawned stage would make), and one more process for the run's lifetime.
        """
        self._fork_server = self.settings.supervise.fork_server and start_fork_server(self._light_env())

    def _start(self, specs: list[StageSpec], events: tuple[Any, Any, Any]) -> None:
        self._events_args = events
        self._start_fork_server()
        for spec in specs:
            label = spec.stage_name.value
            if isinstance(spec, DecodeSpec):
                label = f"decode:{spec.source.source_id}"
            elif isinstance(spec, SecondaryEngineSpec):
                label = f"secondary:{spec.card.name}"
            self._spawn_child(spec, label)

    def _spawn_child(self, spec: StageSpec, label: str) -> Child:
        """Start a stage process and follow it (a source added through the control API too)."""
        chain = spec.ledger.chain if spec.ledger is not None else 0
        child = Child(spec.stage_name, label, spec, self._spawn(spec, label), chain)
        self._procs.append(child)
        return child

    def _forget_child(self, child: Child) -> None:
        """Stop following a stage process that finished (a retired source's decoder)."""
        self._procs.remove(child)
        child.proc.join(JOIN_TIMEOUT_S)
        with contextlib.suppress(ValueError):
            child.proc.close()

    def _supervise(self, summary: RunSummary, control: zmq.Socket[Any], specs: list[StageSpec]) -> None:
        assert self._ledger is not None
        go, stop_input, abort = self._ledger.run_flags()  # (no named semaphores to outlive a killed run)
        self._abort = abort
        sv = self.settings.supervise
        policy = RestartPolicy(max_restarts=sv.max_restarts, window_s=sv.window_s, hang_timeout_s=sv.hang_timeout_s,
                               backoff_initial_s=sv.backoff_initial_s, backoff_max_s=sv.backoff_max_s)
        restarter = Restarter(ledger=self._ledger, policy=policy, spawn=self._spawn, events=self._events,
                              pool_names=self._pool_names)  # (first: it counts OOM kills from here on)
        self._restarter = restarter
        self._start(specs, (go, stop_input, abort))
        book = StatusBook(summary, abort)
        plane = self._plane
        if plane is not None:
            plane.attach(summary=summary, book=book, children=self._procs)
        expected = self.expected_frames() if plane is None else None
        per_label = Counter(c.label for c in self._procs)
        started = time.monotonic()
        wait_subs = self.settings.sinks.publish_wait_timeout_s if self.settings.sinks.publish else 0.0
        ready_deadline = started + STARTUP_TIMEOUT_S + wait_subs
        go_at: float | None = None
        drain_deadline: float | None = None
        handled_signals = 0
        next_sample = 0.0
        try:
            while True:
                # signals: the first closes the inputs (drain), a second one aborts
                while handled_signals < len(self._signals):
                    signum = self._signals[handled_signals]
                    handled_signals += 1
                    summary.stopped_by(signum)
                    stop_input.set()  # decoders stop reading (or never start) and send EOS
                    if handled_signals == 1:
                        drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S + (0 if go_at else STARTUP_TIMEOUT_S)
                    else:
                        abort.set()
                if abort.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + JOIN_TIMEOUT_S
                msg = self._recv_status(control)
                if msg is not None and self._apply(book, msg):
                    break
                book.restartable = go_at is not None and policy.max_restarts > 0 and not abort.is_set()
                ended = restarter.reap(self._procs, book, stopping=stop_input.is_set(), aborting=abort.is_set())
                restarter.step(book, summary, abort.is_set())
                if plane is not None:
                    stopping = stop_input.is_set() or abort.is_set()
                    plane.set_ready(readiness(started=go_at is not None, missing=sorted(per_label - book.ready),
                                              restarting=[r.child.label for r in restarter.pending],
                                              stopping=stopping), stopping=stopping)
                    plane.step()
                if len(ended) == len(self._procs) and not restarter.pending and all(
                        c.proc.exitcode is not None for c in self._procs):  # (a restart may have replaced one)
                    break
                if go_at is None and book.ready.total() == len(self._procs) and not abort.is_set():
                    go.set()
                    go_at = time.monotonic()
                    if self.progress:
                        from tqdm import tqdm

                        book.bar = tqdm(total=expected, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=True)
                if go_at is None and time.monotonic() > ready_deadline and not abort.is_set():
                    missing = sorted(per_label - book.ready)
                    book.fail(f"stages {missing} not ready after {STARTUP_TIMEOUT_S:.0f} s")
                if drain_deadline is not None and time.monotonic() > drain_deadline:
                    if abort.is_set():
                        break
                    summary.errors.append(f"the pipeline did not drain within {DRAIN_TIMEOUT_S:.0f} s "
                                          "after the stop signal; aborted")
                    abort.set()
                    drain_deadline = time.monotonic() + JOIN_TIMEOUT_S
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + RSS_SAMPLE_S
                    if self._ledger is not None:  # the heartbeat that keeps other runs from reaping this one
                        self._ledger.touch()
                    rss = sum(process_rss_kib(pid) for pid in self.child_pids())
                    summary.peak_rss_kib = max(summary.peak_rss_kib, rss)
                    if self.monitor is not None:
                        self.monitor(self)
            end = time.monotonic()
            summary.seconds = end - go_at if go_at is not None else 0.0
            # drain the remaining reports (OUTPUT lines come from the last stage's stop())
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while time.monotonic() < deadline and any(c.proc.is_alive() for c in self._procs):
                msg = self._recv_status(control)
                if msg is not None:
                    self._apply(book, msg)
            while (msg := self._recv_status(control, 0)) is not None:
                self._apply(book, msg)
            if self._ledger is not None:  # what was published (a dead postprocess stage's last reports are lost)
                summary.frames, summary.detections = self._ledger.published_totals()
                summary.count_unfinished(self._ledger.frames_by_source([src.source_id for src in self.sources]))
            summary.outputs += restarter.finish_outputs(self._procs)
        finally:
            if book.bar is not None:
                book.bar.close()
        live = {src.source_id for src in self.sources if src.is_live}
        summary.settle_sources(live | plane.live_ids() if plane is not None else live)

    def _apply(self, book: StatusBook, msg: StatusMsg) -> bool:
        """Apply one status report (and keep :attr:`frames_done` current); True once the last stage is done."""
        last = book.apply(msg)
        self.frames_done = book.summary.frames
        return last

    @staticmethod
    def _recv_status(control: zmq.Socket[Any], timeout_ms: int = POLL_MS) -> StatusMsg | None:
        if not control.poll(timeout_ms, zmq.POLLIN):
            return None
        from streamdet.messages import decode_message

        msg = decode_message(control.recv())
        return msg if isinstance(msg, StatusMsg) else None

    def _shutdown(self) -> None:
        """Join every stage process; kill those that do not exit in time."""
        if self._ledger is not None:
            self._ledger.set_finished()
        join_children([c.proc for c in self._procs], self._abort, JOIN_TIMEOUT_S)
        self._procs = []
