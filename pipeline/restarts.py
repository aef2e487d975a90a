"""The runner's side of self-healing: notice a dead stage process, start it again, re-wire it, announce it.

:class:`Restarter` keeps the restart bound (:class:`~pipeline.supervise.RestartPolicy`) and the
restarts in progress. Starting a stage again depends on what it holds (see
:mod:`pipeline.supervise` for the protocol):

* a decoder or the preprocess stage gets a new pool generation (the old pool is unlinked at once;
  readers that still map it finish with it and drop it when they see the next generation); with
  decoders in the preprocess process, every pool of that process does;
* an engine gets a new engine generation, taken over by the preprocess stage (which reclaims the
  tensor slots lent to the dead engine) before the new engine starts;
* the postprocess stage reopens its sinks in resume mode (JSONL appended to, video segments kept)
  and creates its secondary models' tensor pools in a new generation;
* a secondary model's engine (a cascade) just starts again: the postprocess stage sends it the
  batches it had not answered.

Once the new process reports ready, the decoders of the affected model chains are asked to send
their unpublished frames again (a shared stage; a decoder resumes by itself), and a
:class:`~streamdet.messages.StageRestartMsg` goes to the postprocess stage, which publishes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Any

import zmq

from pipeline.cgroups import OomWatch
from pipeline.slotpool import pool_name, shm_free_bytes, shm_free_text, split_pool_name, unlink_pool
from pipeline.stages.base import StageSpec
from pipeline.stages.colocated import ColocatedSpec
from pipeline.stages.decode import DecodeSpec
from pipeline.stages.engine import EngineSpec
from pipeline.stages.postprocess import PostprocessSpec
from pipeline.stages.preprocess import PreprocessSpec
from pipeline.stages.sink_config import finish_left_outputs
from pipeline.summary import RunSummary, StatusBook
from pipeline.supervise import Ledger, RestartPolicy
from streamdet.messages import StageName, StageRestartMsg

ACK_TIMEOUT_S = 2.0
"""Longest wait for the preprocess stage to take over a new engine generation before the new engine starts."""


@dataclass
class Child:
    """One stage process and what it takes to start it again.

    Attributes:
        stage: which stage.
        label: ``decode:<source_id>``, ``preprocess``, ``engine``, ``postprocess``.
        spec: what it was built from (a restart may give it a new pool generation).
        proc: the ``multiprocessing`` process.
        chain: its model chain.
        handled: its death has been dealt with.
    """

    stage: StageName
    label: str
    spec: StageSpec
    proc: Any
    chain: int = 0
    handled: bool = False


@dataclass
class _Pending:
    """A restart in progress: scheduled (``due``), then waiting for the new process to report ready."""

    child: Child
    attempt: int
    reason: str
    noticed: float
    due: float
    ready_before: int = -1  # the label's ready count when the new process started (-1: not started)


def exit_reason(code: int | None, oom: OomWatch | None = None) -> str:
    """Why a process ended, from its exit code: ``killed by SIGKILL``, ``exit code 1``.

    SIGBUS comes with the free room in ``/dev/shm``: a write into shared memory that tmpfs
    cannot back (a block made elsewhere, or grown, without reserving its pages) ends that way.
    SIGKILL comes with the memory limit when ``oom`` has seen the OOM killer strike in the run's
    cgroup (a container's ``--memory``).
    """
    if code is not None and code < 0:
        if -code == signal.SIGKILL and oom is not None and (note := oom.note()):
            return f"killed by SIGKILL ({note})"
        if -code == signal.SIGBUS:
            room = shm_free_text(shm_free_bytes())
            return f"killed by SIGBUS (out of shared memory?{'; ' + room if room else ''})"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def ended_children(children: Sequence[Child]) -> list[Child]:
    """The children whose process has ended, found by one ``multiprocessing.connection.wait`` on their sentinels.

    ``proc.exitcode`` of a forkserver process polls its sentinel with a new selector on every
    call; the runner's loop, checking every child about 30 times a second, spent more CPU on that
    than on anything else. A child whose ``exitcode`` is then still None (a spawned process
    closes its sentinel just before it is reaped) is left for the next call.
    """
    if not children:
        return []
    by_sentinel = {c.proc.sentinel: c for c in children}
    return [by_sentinel[s] for s in mp_wait(list(by_sentinel), timeout=0)]


def proc_alive(proc: Any) -> bool:
    """``proc.is_alive()``, False for a closed process object."""
    try:
        return bool(proc.is_alive())
    except ValueError:
        return False


class Restarter:
    """Restarts dead stage processes within the bound and re-wires them.

    Args:
        ledger: the run's ledger.
        policy: the restart bound and backoff.
        spawn: starts a process for ``(spec, label)`` and returns it.
        events: PUSH socket to the postprocess stage's events endpoint (None: restarts are not published).
        pool_names: every pool name of the run (new generations are added; the runner unlinks them all at the end).

    It counts the OOM killer's kills in the run's memory cgroup from its making on, to tell them
    from other SIGKILLs (:class:`~pipeline.cgroups.OomWatch`).
    """

    def __init__(self, *, ledger: Ledger, policy: RestartPolicy, spawn: Callable[[StageSpec, str], Any],
                 events: zmq.Socket[Any] | None, pool_names: set[str]) -> None:
        self.oom = OomWatch()
        self.ledger = ledger
        self.policy = policy
        self.spawn = spawn
        self.events = events
        self.pool_names = pool_names
        self.pending: list[_Pending] = []
        self._next_watch_ms = 0.0  # next look at the heartbeats (:meth:`_kill_hung`)

    @staticmethod
    def finish_outputs(children: Sequence[Child]) -> list[str]:
        """The output files of a postprocess stage whose last process failed, finished (:func:`finish_left_outputs`).

        Returns:
            Their output lines (none when the stage ended cleanly: it finished its files itself).
        """
        return [line for c in children if c.stage is StageName.POSTPROCESS and c.proc.exitcode not in (None, 0)
                and isinstance(c.spec, PostprocessSpec) for line in finish_left_outputs(c.spec.sinks)]

    def died(self, child: Child, reason: str) -> str | None:
        """Schedule a dead stage's restart.

        Returns:
            None, or the run's error line when the stage died more often than the bound allows.
        """
        attempt = self.policy.record(child.label)
        if attempt is None:
            p = self.policy
            return (f"the {child.label} stage died {p.max_restarts + 1} times within {p.window_s:g} s "
                    f"(supervise.max_restarts={p.max_restarts}); last error: {reason}")
        now = time.monotonic()
        self.pending.append(_Pending(child, attempt, reason, now, now + self.policy.delay(attempt)))
        return None

    def reap(self, children: Sequence[Child], book: StatusBook, *, stopping: bool, aborting: bool) -> list[Child]:
        """Deal with the stage processes that died: schedule their restarts, or fail the run.

        A child that died (non-zero exit) is restarted while ``book.restartable`` and the run is not
        ``stopping``; otherwise, unless ``aborting``, the run fails naming it. Each death is dealt
        with once (``Child.handled``).

        Returns:
            The children whose process has ended, dealt with or not (:func:`ended_children`).
        """
        if not aborting:
            self._kill_hung(children, book)
        ended = ended_children(children)
        for child in ended:
            code = child.proc.exitcode
            if code in (None, 0) or child.handled:
                continue
            child.handled = True
            reason = book.last_error.pop(child.label, "") or exit_reason(code, self.oom)
            if book.restartable and not stopping:
                error = self.died(child, reason)
                if error:
                    book.fail(error)
            elif not aborting:
                book.fail(f"the {child.label} stage exited unexpectedly ({reason})")
        return ended

    def _kill_hung(self, children: Sequence[Child], book: StatusBook) -> None:
        """SIGKILL each running stage whose heartbeat is older than the policy's ``hang_timeout_s``.

        Its death is then dealt with as any other (restart, or the run's error), its reason
        saying it hung. A stage beats only while it runs (not while it starts or finishes).
        """
        limit_ms = self.policy.hang_timeout_s * 1000.0
        now_ms = time.monotonic() * 1000.0
        if limit_ms <= 0 or now_ms < self._next_watch_ms:
            return
        self._next_watch_ms = now_ms + min(limit_ms / 4.0, 500.0)  # (a few ledger reads, twice a second)
        for child in children:
            hb = getattr(child.proc, "heartbeat", None)
            if hb is None or child.handled:
                continue
            last = self.ledger.last_beat_ms(hb)
            if last <= 0 or now_ms - last <= limit_ms or child.proc.exitcode is not None:  # (exitcode: a syscall)
                continue
            hb.off()  # (once)
            reason = (f"made no progress for {(now_ms - last) / 1000.0:.0f} s "
                      f"(hung; supervise.hang_timeout_s={self.policy.hang_timeout_s:g}), killed")
            print(f"warning: the {child.label} stage {reason}", file=sys.stderr)
            book.last_error[child.label] = reason
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGKILL)

    def step(self, book: StatusBook, summary: RunSummary, aborted: bool) -> None:
        """Start the restarts that are due; finish those whose new process reported ready."""
        for r in list(self.pending):
            if aborted:
                self.pending.remove(r)
            elif r.ready_before < 0 and time.monotonic() >= r.due:
                self._relaunch(r, book)
            elif r.ready_before >= 0 and book.ready[r.child.label] > r.ready_before:
                self.pending.remove(r)
                self._restarted(r, summary)

    def _relaunch(self, r: _Pending, book: StatusBook) -> None:
        child, ledger = r.child, self.ledger
        with contextlib.suppress(ValueError):
            child.proc.close()
        spec = child.spec
        if isinstance(spec, DecodeSpec):
            spec = dataclasses.replace(spec, pool=self._next_pool(spec.pool))
        elif isinstance(spec, PreprocessSpec):
            spec = dataclasses.replace(spec, tensor_pool=self._next_pool(spec.tensor_pool))
        elif isinstance(spec, ColocatedSpec):  # its decoders start again too, each after what was published
            pre = dataclasses.replace(spec.preprocess, tensor_pool=self._next_pool(spec.preprocess.tensor_pool))
            decoders = tuple(dataclasses.replace(d, pool=self._next_pool(d.pool)) for d in spec.decoders)
            spec = dataclasses.replace(spec, preprocess=pre, decoders=decoders)
        elif isinstance(spec, EngineSpec) and spec.stage_name is StageName.ENGINE:  # (a secondary engine: nothing)
            if spec.output_pool is not None:
                spec = dataclasses.replace(spec, output_pool=self._next_pool(spec.output_pool))
            gen = ledger.bump_engine_gen(child.chain)
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while ledger.preprocess_ack(child.chain) != gen and time.monotonic() < deadline:
                time.sleep(0.005)
        elif isinstance(spec, PostprocessSpec):  # its secondary tensor pools get a new generation too
            ledger.bump_postprocess_gen()  # the engines take back the output slots the dead one held
            links = tuple(dataclasses.replace(link, tensor_pool=self._next_pool(link.tensor_pool))
                          for link in spec.secondaries)
            spec = dataclasses.replace(spec, sinks=dataclasses.replace(spec.sinks, resume=True), secondaries=links)
        child.spec = spec
        child.handled = False
        r.ready_before = book.ready[child.label]
        child.proc = self.spawn(spec, child.label)

    def _next_pool(self, name: str) -> str:
        base, gen = split_pool_name(name)
        new = pool_name(base, gen + 1)
        self.pool_names.add(new)
        unlink_pool(name)  # readers that still map it keep reading it until they see the new one
        return new

    def _restarted(self, r: _Pending, summary: RunSummary) -> None:
        child, ledger = r.child, self.ledger
        if child.stage is StageName.POSTPROCESS:
            for k in range(ledger.num_chains):
                ledger.bump_replay_gen(k)
        elif child.stage not in (StageName.DECODE, StageName.SECONDARY) and not isinstance(child.spec, ColocatedSpec):
            # (the postprocess stage resends crops; colocated decoders resumed after what was published)
            ledger.bump_replay_gen(child.chain)
        summary.restarts[child.label] = summary.restarts.get(child.label, 0) + 1
        down_s = time.monotonic() - r.noticed
        summary.restart_log.append((child.label, r.attempt, r.reason, down_s))
        msg = StageRestartMsg(child.stage, child.spec.source_id, r.attempt, r.reason, time.time(), down_s,
                              sum(summary.restarts.values()))
        if self.events is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.events.send(msg.encode(), flags=zmq.NOBLOCK)
        print(f"warning: restarted the {child.label} stage (attempt {r.attempt} within "
              f"{self.policy.window_s:g} s, down {down_s:.2f} s): {r.reason}", file=sys.stderr)


def join_children(procs: list[Any], abort: Any, timeout_s: float) -> None:
    """Join stage processes at the end of a run; set ``abort`` for those still running, then kill them.

    Args:
        procs: the ``multiprocessing`` processes.
        abort: the run's abort event (None: none yet).
        timeout_s: longest wait for them to exit by themselves.
    """
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        with contextlib.suppress(ValueError):
            proc.join(max(0.0, deadline - time.monotonic()))
    if any(proc_alive(p) for p in procs):
        if abort is not None:
            abort.set()
        deadline = time.monotonic() + 2.0
        for proc in procs:
            with contextlib.suppress(ValueError):
                proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc_alive(proc):
            with contextlib.suppress(OSError):
                proc.kill()
            proc.join(2.0)
    for proc in procs:
        with contextlib.suppress(ValueError):
            proc.close()


FORK_SERVER_PRELOAD = ["numpy", "zmq", "av", "onnxruntime", "pipeline.stages.decode", "pipeline.stages.preprocess",
                       "pipeline.stages.colocated",
                       "pipeline.stages.engine", "pipeline.stages.postprocess"]
"""Modules the fork server imports once, so that the stages forked from it do not (no GPU library: a
process must not fork with CUDA initialised)."""


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (for the processes started meanwhile)."""
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a run gracefully (the first closes the inputs, a second aborts). SIGHUP is
what a closed terminal or a dropped ssh session sends the whole process group: before, every
process died of it at once, the output files stayed ``.partial`` and the run's shared memory stayed
until the next run removed it."""


@contextlib.contextmanager
def group_signals_ignored() -> Iterator[None]:
    """SIGHUP and SIGTERM ignored while helper processes start (main thread only; elsewhere nothing changes).

    An ignored signal stays ignored across ``exec``: multiprocessing's resource tracker and the
    fork server started meanwhile outlive a hangup or a SIGTERM of the whole process group (a
    closed terminal, ``systemctl stop``) and stay until the runner, which decides, has stopped the
    run (they exit with it). A fork server dead of the group's SIGTERM took every stage forked from
    it along (they watch it): the runner restarted all of them while it drained (``exit code 255``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def install_stop_handlers(handler: Callable[[int, Any], None], *, tracker: bool = True) -> dict[int, Any]:
    """Install ``handler`` for :data:`STOP_SIGNALS` (main thread); returns the handlers it replaced.

    A SIGHUP first sends standard output and error to ``/dev/null`` where they were a terminal,
    now hung up: writing there fails (``EIO``), and the run's last warnings, its progress bar and
    its summary would raise in the middle of the graceful stop. A terminal still there is kept
    (``kill -HUP`` from elsewhere).

    Args:
        handler: the run's own handler.
        tracker: start multiprocessing's resource tracker first, with SIGHUP ignored
            (:func:`group_signals_ignored`): a run's shared memory starts it otherwise, open to the hangup.
    """
    if tracker:
        from multiprocessing import resource_tracker

        with group_signals_ignored():
            resource_tracker.ensure_running()
    terminals = [fd for fd in (1, 2) if os.isatty(fd)]

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            to_devnull([fd for fd in terminals if _hung_up(fd)])
        handler(signum, frame)

    return {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}


def _hung_up(fd: int) -> bool:
    """Whether the terminal on ``fd`` is gone (its attributes can no longer be read)."""
    import termios

    try:
        termios.tcgetattr(fd)
    except (termios.error, OSError):
        return True
    return False


def to_devnull(fds: Sequence[int]) -> None:
    """Point these descriptors at ``/dev/null``: output nobody can read any more (a hung-up terminal, a closed pipe)."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)


def start_fork_server(env: dict[str, str]) -> bool:
    """Start the fork server the stage processes are forked from, importing the stage modules in it.

    The imports cost about 1 s of CPU once, instead of about that much in every spawned stage
    process; a restarted stage is ready in a fraction of the time too. The server is this
    process's ``multiprocessing`` fork server: a second run in the same process reuses it. Linux
    only; any failure leaves the stages on the spawn method.

    Args:
        env: environment variables the fork server starts with (set while its modules are imported,
            e.g. the BLAS thread count; a forked stage then sets the environment the runner hands it).

    Returns:
        Whether the fork server runs.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        from multiprocessing import forkserver

        mp.get_context("forkserver").set_forkserver_preload(FORK_SERVER_PRELOAD)
        with environment(env), group_signals_ignored():
            forkserver.ensure_running()
        return True
    except (OSError, ValueError, RuntimeError):
        return False


def stop_fork_server() -> None:
    """Stop this process's fork server and wait for it to exit (nothing when none runs).

    The server reaps the stage processes forked from it, so their CPU time is counted in the
    server's children; waiting for the server hands it on to this process. Without this the
    server exits with this process but unwaited, and ``time``, ``os.wait4`` or
    ``getrusage(RUSAGE_CHILDREN)`` of a run would leave out every stage (60 frames of bikes.mp4
    with the bundled detector read as 0.59 s of CPU; 4.1-5.1 s once the server is waited for).
    The command line calls it when its run ends; a program running several pipelines keeps the
    server for the next one.
    """
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython 3.8+; private, so guarded
    if stop is None:
        return
    with contextlib.suppress(OSError):
        stop()

