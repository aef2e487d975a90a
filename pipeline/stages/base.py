"""What every stage shares: the :class:`Stage` lifecycle, status reports, and the process entry point.

A stage is a class with keyword-only typed dependencies (sockets, pools, engine, sinks) and a
``start`` -> ``run`` -> ``stop`` lifecycle. Sockets cannot cross a process boundary, so the runner
hands each child process a picklable :class:`StageSpec`; :meth:`StageSpec.build` wires the stage in
plain Python inside the child. :func:`stage_main` is the child's entry point: it makes the child
ignore SIGINT (the runner alone decides how to stop), makes it die with its parent, runs the
lifecycle and reports ``ready``, errors and ``done`` to the runner's control socket.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from pipeline.cgroups import prefer_for_oom_kill
from pipeline.supervise import Ledger, LedgerRef
from pipeline.transport import (
    CONTROL_HWM,
    POLL_MS,
    StageEndpoints,
    StageFlags,
    Stopped,
    close_socket,
    make_socket,
    new_context,
    recv_parts,
    set_parent_death_signal,
    set_process_name,
)
from streamdet.messages import Message, StageName, StatusKind, StatusMsg, decode_message

STATUS_LINGER_MS = 1_000
"""How long a stage's last status reports may wait for the runner when the stage exits."""

DEBUG_ENV = "STREAMDET_DEBUG"
"""Set this environment variable to print full tracebacks of stage failures to stderr."""


def say(line: str) -> None:
    """Print one line on standard error, never raising: a reader gone or a terminal hung up drops it.

    After SIGHUP (a closed terminal), which the stages ignore while the run drains, writing there
    fails with ``EIO``; the periodic stats line of live sources would have failed the stage. An
    empty line is not printed.
    """
    if not line:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


_RUNNING: StageFlags | None = None
"""This process's flags while its stage runs (set by :func:`stage_main`), for :func:`show_life`."""


def show_life() -> None:
    """Beat this stage process's heartbeat during one long step (copying a long video), if it has one.

    A stage beats whenever it takes a message or looks at its flags; a single step longer than
    ``supervise.hang_timeout_s`` (finishing a source's annotated video at its EOS: remuxing
    gigabytes) calls this every so often, or the runner would take the stage as hung.
    """
    if _RUNNING is not None:
        _RUNNING.beat()


class StageError(RuntimeError):
    """A stage cannot go on; the message names the input (file, model, endpoint) and the problem."""


class StatusReporter:
    """Sends :class:`StatusMsg` reports from a stage to the runner.

    Args:
        socket: a PUSH socket connected to the runner's control endpoint.
        stage: the reporting stage.
        source_id: the source of a per-source stage (decode), sent with every report; else empty.
    """

    def __init__(self, *, socket: zmq.Socket[Any], stage: StageName, source_id: str = "") -> None:
        self._socket = socket
        self.stage = stage
        self.source_id = source_id

    @classmethod
    def for_spec(cls, ctx: zmq.Context[Any], spec: StageSpec) -> StatusReporter:
        """A reporter for the stage ``spec`` builds: a PUSH socket connected to the runner's control endpoint."""
        return cls(socket=make_socket(ctx, zmq.PUSH, spec.control, bind=False, hwm=CONTROL_HWM),
                   stage=spec.stage_name, source_id=spec.source_id)

    def send(self, kind: StatusKind, *, source_id: str = "", message: str = "", **counts: int) -> None:
        """Send one report (never blocks for long: the control socket has a large high-water mark)."""
        msg = StatusMsg(self.stage, kind, source_id or self.source_id, message, dict(counts))
        try:
            self._socket.send(msg.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:  # the runner is gone or far behind; a report is not worth blocking a stage
            pass

    def close(self) -> None:
        """Close the socket (lingering up to a second so the last reports reach the runner)."""
        self._socket.close(linger=STATUS_LINGER_MS)


class Stage(ABC):
    """A pipeline stage: ``start()`` (acquire resources), ``run()`` (until its inputs end), ``stop()``."""

    name: StageName

    @abstractmethod
    def start(self) -> None:
        """Acquire resources that can fail (open a source, load a model, bind a port).

        Raises:
            StageError: with a message naming the input and the problem.
        """

    @abstractmethod
    def run(self) -> None:
        """Process messages until every source has ended.

        Raises:
            Stopped: when told to stop at once.
        """

    @abstractmethod
    def stop(self) -> None:
        """Release everything (idempotent; called after ``run`` returns or stops)."""

    def abandon(self) -> None:
        """Release everything after ``run`` (or ``start``) failed: the runner may start the stage again.

        Called instead of :meth:`stop`; what a restarted stage continues (its output files) is left
        as a crash would leave it. Default: :meth:`stop`.
        """
        self.stop()


@dataclass(frozen=True, kw_only=True)
class StageSpec(ABC):
    """Picklable description of a stage, built into the stage inside its own process.

    Attributes:
        control: the runner's control endpoint.
        nice: niceness added to the stage's process (0..19): a light stage with a higher value yields
            the CPU to the engine (the bottleneck) whenever both want it.
        ledger: where the stage finds the run's :class:`~pipeline.supervise.Ledger` and its place in
            it (restarts without loss or repetition); None: no supervision.
        opencv_threads: OpenCV's worker threads in the stage's process (``cv2.setNumThreads``; 0:
            OpenCV's default, one per core). A light stage gets 1 when the engine runs on the CPU:
            the engine keeps every core busy, so a resize split over two threads only adds wake-ups
            and contention (docs/pipeline.md).
    """

    control: str
    nice: int = 0
    ledger: LedgerRef | None = None
    opencv_threads: int = 0

    def attach_ledger(self) -> Ledger | None:
        """Attach to the run's ledger (None without one).

        Raises:
            SlotPoolError: if it does not exist.
        """
        return Ledger.attach(self.ledger.name) if self.ledger is not None else None

    @property
    @abstractmethod
    def stage_name(self) -> StageName:
        """Which stage this builds (a subclass may set it as a ``ClassVar[StageName]``)."""

    @property
    def source_id(self) -> str:
        """The source of a per-source stage (decode), else empty."""
        return ""

    @abstractmethod
    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> Stage:
        """Create the stage's dependencies (sockets, pools, engine, sinks) and the stage.

        Raises:
            StageError: if a dependency cannot be created (e.g. an endpoint cannot be bound).
        """


def check_alive(flags: StageFlags) -> None:
    """Return while the stage may go on; raise :class:`~pipeline.transport.Stopped` once it must stop at once.

    Args:
        flags: the stage's lifecycle flags (abort, terminated, parent gone).

    Raises:
        Stopped: when ``flags.alive()`` is False.
    """
    if not flags.alive():
        raise Stopped()


def receive(sock: zmq.Socket[Any], flags: StageFlags, timeout_ms: int = POLL_MS) -> tuple[Message, list[Any]] | None:
    """Receive and decode one multipart message; on a timeout, check that the stage may go on.

    Args:
        sock: a PULL socket.
        flags: the stage's lifecycle flags.
        timeout_ms: how long to wait.

    Returns:
        ``(message, parts)``: the decoded first part and every part as a ``zmq.Frame`` (zero-copy
        ``buffer``); None if nothing came within ``timeout_ms``.

    Raises:
        Stopped: if nothing came and the stage must stop at once.
        ValueError: if the first part is not a message.
    """
    parts = recv_parts(sock, timeout_ms)
    if parts is None:
        check_alive(flags)
        return None
    flags.beat()  # (a busy stage: every message)
    return decode_message(parts[0].buffer), parts


def frame_credit_sockets(ctx: zmq.Context[Any], endpoints: StageEndpoints) -> dict[str, zmq.Socket[Any]]:
    """Connect one PUSH socket per frame pool, to hand frame slots back to their decoders.

    Args:
        ctx: the process's ZeroMQ context.
        endpoints: the pipeline's endpoints.

    Returns:
        ``{pool name: socket}``; empty with inline frames (no pools).
    """
    if endpoints.inline:
        return {}
    return {pool: make_socket(ctx, zmq.PUSH, endpoint, bind=False) for pool, endpoint in endpoints.frame_credits}


def credit_socket(sockets: dict[str, zmq.Socket[Any]], pool: str) -> zmq.Socket[Any]:
    """The credit socket of a frame pool from :func:`frame_credit_sockets`, whatever its generation.

    Raises:
        KeyError: for an unknown pool.
    """
    sock = sockets.get(pool)
    if sock is None:
        from pipeline.slotpool import split_pool_name

        sock = sockets[split_pool_name(pool)[0]]
    return sock


def close_sockets(flags: StageFlags, *, outputs: Iterable[zmq.Socket[Any] | None],
                  inputs: Iterable[zmq.Socket[Any] | None] = ()) -> None:
    """Close a stage's sockets: outputs lingering while the stage is alive, inputs at once.

    Args:
        flags: the stage's lifecycle flags.
        outputs: PUSH sockets, closed by :func:`~pipeline.transport.close_socket` (None entries skipped).
        inputs: PULL sockets, closed without lingering (None entries skipped).
    """
    for out in outputs:
        if out is not None:
            close_socket(out, flags)
    for inp in inputs:
        if inp is not None:
            inp.close(linger=0)


class RunnerStdio:
    """The runner's standard output and error as they are now, for a stage forked from the fork server.

    A forked process has the fork server's descriptors 1 and 2, those the runner process had when
    the server started; a program that embeds the pipeline may have redirected them since. Pickled
    while the stage process starts, this hands the runner's current ones over (as
    ``multiprocessing`` hands over a ``Connection``: ``multiprocessing.reduction.DupFd``); the
    child unpickles an :class:`InheritedStdio` and :meth:`InheritedStdio.adopt` puts them in place.
    """

    def __reduce__(self) -> tuple[Any, tuple[Any, Any]]:
        from multiprocessing import reduction

        return InheritedStdio, (reduction.DupFd(1), reduction.DupFd(2))


@dataclass(frozen=True)
class InheritedStdio:
    """The runner's standard output and error in a stage process (see :class:`RunnerStdio`).

    Attributes:
        out: ``multiprocessing``'s wrapper of the runner's descriptor 1 (``detach()`` gives it).
        err: the same for descriptor 2.
    """

    out: Any
    err: Any

    def adopt(self) -> None:
        """Make them this process's descriptors 1 and 2."""
        for wrapper, target in ((self.out, 1), (self.err, 2)):
            fd = wrapper.detach()
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)


def runner_stdio() -> RunnerStdio | None:
    """A :class:`RunnerStdio` for a forked stage, or None when this process's descriptor 1 or 2 is closed."""
    try:
        os.fstat(1)
        os.fstat(2)
    except OSError:
        return None
    return RunnerStdio()


FINISH_FAILED = -1
"""Internal to :func:`stage_main`: the stage's run ended cleanly and its ``stop()`` failed (an output that
could not be finished). Its error goes to the runner marked ``final`` (the run fails once it has
drained) and the process exits 0: a restart would have nothing left to do."""


GROUP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
"""Signals a stage process ignores: they reach the whole process group (Ctrl-C, a closed terminal,
``systemctl stop`` or ``kill -TERM -PGID``) and the runner stops the run gracefully on them. A
stage stops when the runner says so (its flags), or dies with it (``PR_SET_PDEATHSIG``)."""


def stage_main(spec: StageSpec, go: Any, stop_input: Any, abort: Any, parent_pid: int, *,
               environ: dict[str, str] | None = None, stdio: InheritedStdio | None = None,
               heartbeat: Any = None) -> None:
    """Entry point of a stage process (``multiprocessing`` target, forkserver or spawn start method).

    Args:
        spec: what to build.
        go: flag set by the runner when every stage is ready (a :class:`~pipeline.supervise.LedgerFlag`,
            or any object with ``set``/``is_set``/``wait``, as ``threading.Event``).
        stop_input: flag set by the runner on SIGINT/SIGTERM (graceful stop).
        abort: flag set by the runner to stop at once.
        parent_pid: the runner's pid (a stage forked from the runner's fork server watches the
            server instead, which exits with the runner).
        environ: the environment to run with, the runner's at the time it started this stage (a
            process forked from the fork server otherwise has the server's, from the run's start).
        stdio: the runner's standard output and error (a forked stage; see :class:`RunnerStdio`).
        heartbeat: the process's :class:`~pipeline.supervise.Heartbeat` (the runner watches it
            while the stage runs: from its ready report to the start of its finishing), or None.
    """
    if stdio is not None:
        stdio.adopt()
    if environ is not None and environ != os.environ:
        os.environ.clear()
        os.environ.update(environ)
    if _forked_by_fork_server(parent_pid):  # watch the server, which exits with the runner
        parent_pid = os.getppid()
        _release_fork_server()
    flags = StageFlags(go=go, stop_input=stop_input, abort=abort, parent_pid=parent_pid)
    # Ctrl-C reaches the whole process group, so do a closed terminal's hangup and a service manager's
    # SIGTERM (systemd's KillMode=control-group, kill -TERM -PGID): the runner decides (graceful stop)
    for signum in GROUP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)
    set_process_name(process_name(spec))
    if not flags.parent_alive():  # the runner died before we got here
        return
    ctx = new_context()
    if spec.nice > 0:
        try:
            os.nice(spec.nice)
        except OSError:  # not allowed here: run at the normal priority
            pass
    prefer_for_oom_kill()  # (the runner survives to restart it and say why)
    if spec.opencv_threads > 0:
        import cv2

        cv2.setNumThreads(spec.opencv_threads)
    status = StatusReporter.for_spec(ctx, spec)
    stage: Stage | None = None
    code = 0
    try:
        stage = spec.build(ctx=ctx, flags=flags, status=status)
        stage.start()
        status.send(StatusKind.READY)
        flags.heartbeat = heartbeat
        global _RUNNING
        _RUNNING = flags
        stage.run()
    except Stopped:
        pass
    except Exception as e:  # report every failure to the runner as one line
        code = 1
        status.send(StatusKind.STAGE_ERROR, message=describe_error(e, spec.stage_name))
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc(file=sys.stderr)
    finally:
        flags.heartbeat = None
        _RUNNING = None
        if heartbeat is not None:  # (finishing, e.g. remuxing a long video, beats no more)
            heartbeat.off()
        if stage is not None:
            try:
                stage.abandon() if code else stage.stop()
            except Exception as e:  # (after a clean run: its work is done, a restart would redo nothing)
                status.send(StatusKind.STAGE_ERROR, message=describe_error(e, spec.stage_name), final=int(not code))
                code = code or FINISH_FAILED
        if code and code != FINISH_FAILED:
            status.send(StatusKind.DONE, failed=1)
        else:
            status.send(StatusKind.DONE)
        status.close()
        ctx.term()
    if code and code != FINISH_FAILED:
        raise SystemExit(code)


def _release_fork_server() -> None:
    """Close this process's copy of the fork server's keep-alive pipe.

    ``multiprocessing`` hands every forked child the write end of the pipe whose end-of-file tells
    the fork server that its client is gone; a stage holding it would keep the server alive after
    the runner died, and the server would keep the stage alive (the stage watches it): orphans.
    """
    try:
        from multiprocessing import forkserver

        server: Any = forkserver._forkserver  # type: ignore[attr-defined]
        fd = server._forkserver_alive_fd
        if fd is not None:
            server._forkserver_alive_fd = None
            os.close(fd)
    except (AttributeError, OSError):  # another Python's internals: at worst the server lingers
        pass


def _forked_by_fork_server(runner_pid: int) -> bool:
    """Whether this process's parent is a child of the runner (its fork server) rather than the runner.

    A process whose runner has died already has been re-parented (to init or a subreaper): False.
    """
    parent = os.getppid()
    if parent == runner_pid:
        return False
    try:
        with open(f"/proc/{parent}/stat", encoding="ascii") as fh:
            grandparent = int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return grandparent == runner_pid


def process_name(spec: StageSpec) -> str:
    """The OS-level name of a stage's process: ``sd-<stage>``, ``sd-dec:<source_id>`` for a decoder (15 bytes kept)."""
    if spec.stage_name is StageName.DECODE:
        return f"sd-dec:{spec.source_id}"
    return f"sd-{spec.stage_name.value}"


def describe_error(e: BaseException, stage: StageName) -> str:
    """One line for an exception: expected errors carry their own message, others get a prefix.

    Args:
        e: the exception.
        stage: the stage it happened in.

    Returns:
        A single line (newlines collapsed).
    """
    from engines.base import EngineError
    from pipeline.slotpool import SlotPoolError
    from pipeline.transport import TransportError
    from streamdet.card import ModelCardError

    if isinstance(e, (StageError, EngineError, ModelCardError, TransportError, SlotPoolError)):
        text = str(e)
    elif getattr(e, "errno", None) == errno.EMFILE:  # (ZMQError and OSError alike)
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        text = (f"the {stage.value} stage ran out of file descriptors ({e}; the open-files limit is "
                f"{'unlimited' if soft == resource.RLIM_INFINITY else soft}: ulimit -n)")
    else:
        text = f"internal error in the {stage.value} stage: {type(e).__name__}: {e}"
    return " ".join(text.split())
