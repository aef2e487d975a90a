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
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import zmq

from pipeline.chains import ModelChain, PreparedRun, prepare_run, source_ids_for, stage_specs
from pipeline.settings import Settings
from pipeline.slotpool import unlink_pool
from pipeline.stages.base import StageSpec, stage_main
from pipeline.stages.decode import DecodeSpec, SourceInfo
from pipeline.summary import (
    PipelineError,
    RunSummary,
    SourceReport,
    StatusBook,
    format_summary,
    process_rss_kib,
)
from pipeline.transport import CONTROL_HWM, POLL_MS, TransportMode, ipc_endpoints, make_socket, tcp_endpoints
from streamdet.card import ModelCard
from streamdet.constants import EXIT_FAILURE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from streamdet.messages import StageName, StatusMsg

__all__ = [
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

RSS_SAMPLE_S = 0.5
"""How often the runner samples the stages' resident memory (and calls the monitor)."""


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
        self._prepared: PreparedRun | None = None
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
        return [p.pid for _, _, p in self._procs if p.pid is not None and p.is_alive()]

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
            self._supervise(summary, control,
                            stage_specs(self.settings, self._prepared, endpoints, pools, tensor_pools))
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
        book = StatusBook(summary, abort)
        expected = self.expected_frames()
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
                if msg is not None and self._apply(book, msg):
                    break
                for _, label, proc in self._procs:  # stage processes that died without a word
                    if proc.exitcode not in (None, 0) and book.done[label] < per_label[label] \
                            and proc.pid not in crashed:
                        crashed.add(proc.pid)
                        if not abort.is_set():
                            book.fail(f"the {label} stage exited unexpectedly (exit code {proc.exitcode})")
                if all(p.exitcode is not None for _, _, p in self._procs):
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
                    self._apply(book, msg)
            while (msg := self._recv_status(control, 0)) is not None:
                self._apply(book, msg)
        finally:
            if book.bar is not None:
                book.bar.close()
        summary.settle_sources({src.source_id for src in self.sources if src.is_live})

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
