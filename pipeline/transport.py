"""ZeroMQ plumbing between stages: endpoints, socket options, blocking send/receive, stop flags.

Stages talk over PUSH/PULL sockets: reliable and in order for one producer and one consumer, and
a sender blocks once the high-water mark is reached, so a slow stage slows the one before it
(backpressure; nothing is dropped). Only the external detections sink uses PUB (see
:mod:`pipeline.stages.sinks`). Endpoints are ``ipc://`` files in a private temporary directory by
default (this host only); ``tcp://`` by configuration, with frames and tensors travelling inline
as extra message parts instead of through shared memory.

The socket options are named constants (Savant's choices: high-water mark 50, receive timeout
1 s, linger 100 ms). A blocked send or receive wakes every :data:`POLL_MS` to check the stage's
stop flags and that its parent (the runner) is still alive, so no stage outlives the runner.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import zmq

STAGE_HWM = 50
"""High-water mark (messages) of the sockets between stages; a sender blocks beyond it."""

CONTROL_HWM = 10_000
"""High-water mark of the stages' status sockets to the runner (progress must never block a stage long)."""

RECV_TIMEOUT_MS = 1_000
"""Receive timeout of a blocking ``recv`` (stages poll first, so it only guards against surprises)."""

SEND_TIMEOUT_MS = 5_000
"""One attempt of a blocking send; it is retried while the stage runs (a file source never drops)."""

POLL_MS = 50
"""How often a blocked stage wakes up to check its stop flags and its parent."""

LINGER_MS = 100
"""How long closing a socket between stages waits for unsent messages."""

FINAL_LINGER_MS = 30_000
"""Linger when a stage that finished normally closes its data sockets: the last messages (EOS)
must reach a slow peer. A stage that aborts closes with linger 0 instead."""

PUB_HWM = 10_000
"""Per-subscriber queue of the PUB sink; a subscriber this far behind loses messages (PUB semantics)."""

PUB_LINGER_MS = 2_000
"""How long closing the PUB sink waits to deliver the last messages (EOS) to subscribers."""

# The authority of "scheme://": up to the first "/" (or the end of the line); its credentials end at its last "@".
# A raw space, "?", "#" or "@" in a password stays in the authority, so the whole password is hidden.
_AUTHORITY = re.compile(r"(?<=://)[^/\n]*")
# what an authority without "@" must look like to be HOST[:PORT] (else "user:pa/ss@host": a raw "/" in a password)
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^:@\s]*)(:[0-9]*)?")


class TransportMode(str, Enum):
    """How stages reach each other."""

    IPC = "ipc"  # unix sockets in a private temp dir; pixels and tensors in shared memory
    TCP = "tcp"  # tcp sockets; pixels and tensors inline as extra message parts


class TransportError(RuntimeError):
    """A socket cannot be bound or connected; the message names the endpoint."""


class Stopped(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised out of a blocking transport call when the stage has been told to stop."""


def redact_url(url: str) -> str:
    """Hide credentials in a URL, or in a line of text holding URLs: ``rtsp://user:pass@host/x`` -> ``rtsp://***@host/x``.

    The rule: after each ``://``, the authority runs to the first ``/`` (or the end of the line),
    and everything up to its last ``@`` is replaced. So a raw space, ``?``, ``#`` or ``@`` in a
    password is hidden with the rest of it (``rtsp://***@10.0.0.5/stream``), while an ``@`` after
    the first ``/`` is in the path and stays (``rtsp://host/p?x=a@b``). A raw ``/`` in a password
    cannot be told from the path; it is recognised when the text before it cannot be
    ``HOST[:PORT]`` (``rtsp://admin:pa/ss@cam/x``: ``pa`` is no port), and the credentials then
    end at the last ``@`` before the next ``/``. When in doubt more is hidden, never less (text
    after a URL without a path, up to an ``@`` on the same line, is hidden too).

    Args:
        url: any string (paths are returned unchanged).

    Returns:
        The string with every ``scheme://userinfo@`` part replaced by ``scheme://***@``.
    """
    out, pos = [], 0
    for m in _AUTHORITY.finditer(url):
        if m.start() < pos:  # (inside credentials already hidden)
            continue
        end = _credentials_end(url, m)
        if end:
            out += [url[pos:m.start()], "***@"]
            pos = end
    return "".join(out) + url[pos:]


def _credentials_end(text: str, authority: re.Match[str]) -> int:
    """Where the credentials of a ``scheme://`` authority end (just past their ``@``), or 0 for none."""
    start, end = authority.span()
    at = text.rfind("@", start, end)
    if at >= 0:
        return at + 1
    if end == len(text) or text[end] != "/" or _HOST_PORT.fullmatch(text, start, end):
        return 0
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    first_at = text.find("@", end, line_end)
    if first_at < 0:
        return 0
    path = text.find("/", first_at, line_end)
    return text.rfind("@", first_at, path if path >= 0 else line_end) + 1


@dataclass(frozen=True)
class StageEndpoints:
    """Where each stage's sockets live (the binding side in brackets).

    Attributes:
        frames: decode -> preprocess (preprocess binds PULL).
        batches: preprocess -> engine (engine binds PULL).
        results: engine -> postprocess (postprocess binds PULL).
        tensor_credits: engine -> preprocess tensor-slot credits (preprocess binds PULL).
        control: stages -> runner status (runner binds PULL).
        frame_credits: ``(pool name, endpoint)`` pairs: frame-slot credits back to each decoder
            (the decoder binds PULL).
        inline: whether frames and tensors travel inline (tcp://) instead of in shared memory.
        events: decoders -> postprocess source status events (postprocess binds PULL).
        chains: ``(frames, batches, tensor_credits)`` of each further model chain (a pipeline
            serving several models runs one preprocess and one engine per model; chain 0 uses
            the fields above). Every engine pushes to the one ``results`` endpoint.
        live: postprocess -> runner previews and stats snapshots for the control API (runner binds PULL).
        secondaries: ``(batches, results, credits)`` of each secondary model (a cascade): postprocess
            -> its engine (the engine binds PULL), its results and its tensor-slot credits back to the
            postprocess stage (which binds both).
    """

    frames: str
    batches: str
    results: str
    tensor_credits: str
    control: str
    frame_credits: tuple[tuple[str, str], ...]
    inline: bool
    events: str = ""
    chains: tuple[tuple[str, str, str], ...] = ()
    live: str = ""
    secondaries: tuple[tuple[str, str, str], ...] = ()

    def for_chain(self, index: int, pools: Sequence[str] | None = None) -> StageEndpoints:
        """The endpoints seen by model chain ``index`` (its preprocess, engine and decoders).

        Args:
            index: 0 for the first model, ``k`` for ``chains[k - 1]``.
            pools: keep only these frame pools' credit endpoints (None: all).

        Returns:
            A copy with ``frames``, ``batches`` and ``tensor_credits`` of that chain.

        Raises:
            IndexError: for a chain that does not exist.
        """
        out = self
        if index:
            if not 0 < index <= len(self.chains):
                raise IndexError(f"expected a chain index in 0..{len(self.chains)}, got {index}")
            frames, batches, tensor_credits = self.chains[index - 1]
            out = replace(self, frames=frames, batches=batches, tensor_credits=tensor_credits)
        if pools is not None:
            keep = set(pools)
            out = replace(out, frame_credits=tuple((p, e) for p, e in out.frame_credits if p in keep))
        return out

    def credit_endpoint(self, pool: str) -> str:
        """The credit endpoint of a frame pool (any generation of it, see :func:`pipeline.slotpool.pool_name`).

        Raises:
            KeyError: for an unknown pool.
        """
        from pipeline.slotpool import split_pool_name

        base = split_pool_name(pool)[0]
        for name, ep in self.frame_credits:
            if name in (pool, base):
                return ep
        raise KeyError(f"no credit endpoint for pool {pool!r}")


def ipc_endpoints(directory: str | os.PathLike[str], pools: Sequence[str], chains: int = 1,
                  secondaries: int = 0) -> StageEndpoints:
    """Endpoints as unix sockets in ``directory`` (which should be private, mode 0700).

    Args:
        directory: an existing directory.
        pools: the frame pools, one per source.
        chains: model chains (one per distinct model).
        secondaries: secondary models (a cascade).

    Returns:
        :class:`StageEndpoints` with ``inline=False``.
    """
    d = Path(directory)
    return StageEndpoints(
        frames=f"ipc://{d / 'frames'}",
        batches=f"ipc://{d / 'batches'}",
        results=f"ipc://{d / 'results'}",
        tensor_credits=f"ipc://{d / 'tensor-credits'}",
        control=f"ipc://{d / 'control'}",
        frame_credits=tuple((p, f"ipc://{d / f'credits-{i}'}") for i, p in enumerate(pools)),
        inline=False,
        events=f"ipc://{d / 'events'}",
        chains=tuple((f"ipc://{d / f'frames-m{k}'}", f"ipc://{d / f'batches-m{k}'}",
                      f"ipc://{d / f'tensor-credits-m{k}'}") for k in range(1, chains)),
        live=f"ipc://{d / 'live'}",
        secondaries=tuple((f"ipc://{d / f'sec-batches-{k}'}", f"ipc://{d / f'sec-results-{k}'}",
                           f"ipc://{d / f'sec-credits-{k}'}") for k in range(secondaries)),
    )


def tcp_endpoints(host: str, base_port: int, pools: Sequence[str], chains: int = 1) -> StageEndpoints:
    """Endpoints as tcp ports ``base_port``, ``base_port + 1``, ... on ``host``.

    Args:
        host: interface to bind (``127.0.0.1`` keeps everything on this host).
        base_port: first port; ``6 + len(pools) + 3 * (chains - 1)`` consecutive ports are used.
        pools: the frame pools, one per source.
        chains: model chains (one per distinct model).

    Returns:
        :class:`StageEndpoints` with ``inline=True``.

    Raises:
        ValueError: if the port range leaves 1..65535.
    """
    last = base_port + 5 + len(pools) + 3 * (max(chains, 1) - 1)
    if base_port < 1 or last > 65535:
        raise ValueError(f"expected ports {base_port}..{last} inside 1..65535, got base_port {base_port}")

    def ep(k: int) -> str:
        return f"tcp://{host}:{base_port + k}"

    return StageEndpoints(
        frames=ep(0), batches=ep(1), results=ep(2), tensor_credits=ep(3), control=ep(4),
        frame_credits=tuple((p, ep(5 + i)) for i, p in enumerate(pools)), inline=True,
        events=ep(5 + len(pools)),
        chains=tuple((ep(3 + len(pools) + 3 * k), ep(4 + len(pools) + 3 * k), ep(5 + len(pools) + 3 * k))
                     for k in range(1, chains)),
    )


def make_socket(ctx: zmq.Context[Any], kind: int, endpoint: str, *, bind: bool,
                hwm: int = STAGE_HWM, linger_ms: int = LINGER_MS) -> zmq.Socket[Any]:
    """Create, configure and bind or connect a socket.

    Args:
        ctx: the process's ZeroMQ context.
        kind: ``zmq.PUSH``, ``zmq.PULL``, ...
        endpoint: ``ipc://...`` or ``tcp://host:port``.
        bind: bind (the stable side) or connect.
        hwm: send and receive high-water marks.
        linger_ms: linger on close.

    Returns:
        The socket.

    Raises:
        TransportError: if the endpoint cannot be bound or connected (e.g. address in use).
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    try:
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as e:
        sock.close(0)
        how = "bind" if bind else "connect"
        raise TransportError(f"{endpoint}: cannot {how} ({zmq.strerror(e.errno or 0)})") from e
    return sock


def close_socket(sock: zmq.Socket[Any], flags: StageFlags) -> None:
    """Close a data socket, keeping its unsent messages only if the stage finished normally.

    A stage that finished waits up to :data:`FINAL_LINGER_MS` for its last messages to leave; one
    that is aborting drops them.

    Args:
        sock: the socket.
        flags: the stage's flags.
    """
    sock.close(linger=FINAL_LINGER_MS if flags.alive() else 0)


def send_parts(sock: zmq.Socket[Any], parts: Sequence[Any], alive: Callable[[], bool]) -> None:
    """Send a multipart message, blocking while the peer is at its high-water mark.

    Args:
        sock: a PUSH (or DEALER) socket.
        parts: bytes-like parts (sent without copying).
        alive: returns False once the stage must stop.

    Raises:
        Stopped: if ``alive()`` turns False while blocked.
    """
    while True:
        try:
            sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        if sock.poll(POLL_MS, zmq.POLLOUT):
            continue
        if not alive():
            raise Stopped()


def recv_parts(sock: zmq.Socket[Any], timeout_ms: int = POLL_MS) -> list[zmq.Frame] | None:
    """Receive one multipart message, or ``None`` after ``timeout_ms``.

    Args:
        sock: a PULL socket.
        timeout_ms: how long to wait.

    Returns:
        The parts as ``zmq.Frame`` objects (their ``buffer`` is zero-copy), or ``None``.
    """
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart(copy=False)  # type: ignore[no-any-return]
    return None


class StageFlags:
    """Process-shared flags that drive a stage's lifecycle, plus a parent-liveness check.

    The runner passes its ledger's flags (:meth:`pipeline.supervise.Ledger.run_flags`); anything
    with ``set``, ``is_set`` and ``wait`` does (the tests pass ``threading.Event``).

    Args:
        go: set by the runner once every stage is ready: decoders start reading.
        stop_input: set on SIGINT/SIGTERM: decoders stop reading and send EOS; the rest drains.
        abort: set when the run must end now (an error, a second signal, a drain timeout).
        parent_pid: the runner's pid (a stage exits when its parent is gone).
    """

    def __init__(self, *, go: Any, stop_input: Any, abort: Any, parent_pid: int) -> None:
        self.go = go
        self.stop_input = stop_input
        self.abort = abort
        self.parent_pid = parent_pid
        self.heartbeat: Any = None
        """The process's :class:`~pipeline.supervise.Heartbeat` while it runs (set by ``stage_main``), or None."""
        self.terminated = False
        self.base: StageFlags | None = None
        """The flags this copy was derived from (:meth:`derive`): their ``terminated`` counts here too."""
        self.source_stop: Callable[[], bool] | None = None
        """A decoder's own stop request (the control API removed its source), checked by :meth:`input_open`."""

    def parent_alive(self) -> bool:
        """Whether the runner still exists (a dead parent re-parents us to init or a subreaper)."""
        return os.getppid() == self.parent_pid

    def derive(self) -> StageFlags:
        """A copy for one of several stages sharing this process (threads).

        It has the same events and its own ``terminated`` and ``source_stop``; ``terminated`` set
        on this process's flags (a thread of the process failed) stops it too.
        """
        child = StageFlags(go=self.go, stop_input=self.stop_input, abort=self.abort, parent_pid=self.parent_pid)
        child.base = self
        return child

    def _terminated(self) -> bool:
        """``terminated`` here or on the flags this copy was derived from (the events are shared)."""
        return self.terminated or (self.base is not None and self.base._terminated())

    def beat(self) -> None:
        """Show the runner this process is alive (its heartbeat, if it has one while it runs)."""
        flags: StageFlags | None = self
        while flags is not None:  # (derived flags: their process's heartbeat)
            if flags.heartbeat is not None:
                flags.heartbeat.beat()
                return
            flags = flags.base

    def alive(self) -> bool:
        """False once the stage must stop at once (abort, ``terminated``, parent gone); beats the heartbeat."""
        self.beat()
        return not (self._terminated() or self.abort.is_set()) and self.parent_alive()

    def input_open(self) -> bool:
        """False once decoders must stop reading (graceful stop, source removed) or the stage must stop at once."""
        stopped = self.source_stop is not None and self.source_stop()
        return self.alive() and not self.stop_input.is_set() and not stopped


IPC_PATH_MAX = 107
"""Longest ``ipc://`` path: a unix socket's address holds 108 bytes, its NUL included."""

IPC_NAME_ROOM = 32
"""Room kept for a socket's file name inside a run directory (the longest, ``tensor-credits-m12``, has 18)."""


def private_run_dir(prefix: str = "streamdet-") -> str:
    """Make a new private directory (mode 0700) for a run's ``ipc://`` sockets; returns its path.

    In the system's temporary directory (``TMPDIR``), or in ``/tmp`` when that path leaves too
    little of a unix socket's 107 bytes (a deep ``TMPDIR``; macOS's per-user one): binding
    there failed with ``File name too long``.

    Raises:
        OSError: if the directory cannot be made.
    """
    base = tempfile.gettempdir()
    if len(base.encode()) + len(prefix) + 9 + IPC_NAME_ROOM > IPC_PATH_MAX and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def new_context() -> zmq.Context[Any]:
    """A ZeroMQ context that may hold as many sockets as the process may open files.

    libzmq allows 1023 sockets per context by default. The preprocess process holds four per
    source (a decoder's credit, frame and status sockets, and its own credit socket back to the
    decoder), so about 250 sources reached that, with ``ZMQError: Too many open files`` whatever
    the open-files limit (raised by :func:`pipeline.host.prepare_host`). Set before any socket is made.
    """
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        import resource
    except ImportError:  # (not a POSIX system)
        return ctx
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = int(ctx.get(zmq.SOCKET_LIMIT))
    want = cap if soft == resource.RLIM_INFINITY else min(cap, soft)
    if want > int(ctx.get(zmq.MAX_SOCKETS)):
        ctx.set(zmq.MAX_SOCKETS, want)
    return ctx


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``prctl``).

    Returns:
        Whether it was set (False on other systems; the parent-liveness polls still apply).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        return bool(libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def set_process_name(name: str) -> bool:
    """Name this process for ``ps``/``top``/``pgrep`` (Linux ``prctl(PR_SET_NAME)``; at most 15 bytes kept).

    The stage processes call it with ``sd-<stage>`` (``sd-engine``, ``sd-dec:<source_id>``), so
    an operator (or a chaos test) can tell them apart.

    Returns:
        Whether it was set (False on other systems).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_name = 15
        return bool(libc.prctl(pr_set_name, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
