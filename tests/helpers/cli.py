"""Running ``run_pipeline.py`` in tests: a free port, the run's processes via /proc, no orphans left."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run_pipeline.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TCP_BASE_RANGE = (20_000, 32_000)
"""Where :func:`free_port_range` looks: below Linux's ephemeral ports (32768-60999), which outgoing
connections take at any moment, so a range found free stays free while the test binds it."""


def free_port_range(count: int, attempts: int = 200) -> int:
    """The first of ``count`` consecutive TCP ports on 127.0.0.1 that were all free a moment ago.

    For ``transport.tcp_base_port``: the tcp transport binds ports after the base too.

    Raises:
        RuntimeError: if no such range was found.
    """
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(TCP_BASE_RANGE[0], TCP_BASE_RANGE[1] - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sk = socket.socket()
                held.append(sk)
                sk.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sk in held:
                sk.close()
    raise RuntimeError(f"no {count} consecutive free ports in {TCP_BASE_RANGE}")


def processes_with(marker: str) -> list[int]:
    """Pids whose environment holds ``marker`` (the run's processes and their children), via /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def comm_pids(marker: str, name: str) -> list[int]:
    """Live processes of the run marked ``marker`` whose name (``/proc/PID/comm``) is ``name`` (``sd-engine``)."""
    out = []
    for pid in processes_with(marker):
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == name and state != "Z":
            out.append(pid)
    return out


def parent_pid(pid: int) -> int:
    """The parent of process ``pid``, from ``/proc/<pid>/stat``.

    Raises:
        OSError: if the process is gone.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid, ...


def assert_no_orphans(marker: str) -> None:
    """Every process of the run is gone (within 10 s)."""
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


def _marked_env(extra_env: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """A fresh ``STREAMDET_TEST_MARKER`` and the environment of a run that carries it (no ``STREAMDET_CONFIG``)."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "STREAMDET_TEST_MARKER": marker, **(extra_env or {})}
    env.pop("STREAMDET_CONFIG", None)
    return marker, env


def start(args: list[str], extra_env: dict[str, str] | None = None, prefix: Sequence[str] = (),
          **kw: Any) -> tuple[subprocess.Popen[str], str]:
    """Start ``run_pipeline.py ARGS`` with a fresh ``STREAMDET_TEST_MARKER``; returns the process and the marker.

    ``prefix`` runs it through another command (e.g. :func:`tests.helpers.small_shm.small_shm_prefix`).
    """
    marker, env = _marked_env(extra_env)
    proc = subprocess.Popen([*prefix, sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
    return proc, marker


def run(args: list[str], timeout: float = 120, extra_env: dict[str, str] | None = None,
        prefix: Sequence[str] = ()) -> tuple[int, str, str]:
    """Run ``run_pipeline.py ARGS`` to the end; returns ``(exit code, stdout, stderr)`` after checking no orphans."""
    proc, marker = start(args, extra_env, prefix)
    out, err = proc.communicate(timeout=timeout)
    assert_no_orphans(marker)
    return proc.returncode, out, err


def hang_up(args: list[str], ready: Callable[[str], bool], timeout: float = 60) -> tuple[int, str]:
    """Run ``run_pipeline.py ARGS`` in a terminal of its own, and close that terminal once ``ready(marker)``.

    The child is a new session whose controlling terminal is a pty; closing the pty's master is
    what closing a terminal window or dropping an ssh session does: the kernel sends SIGHUP.

    Returns:
        ``(exit code, marker)`` (the code as :func:`os.waitstatus_to_exitcode` gives it: -1 for a
        death by SIGHUP).
    """
    import pty
    import select

    marker, env = _marked_env()
    pid, master = pty.fork()
    if pid == 0:  # (the child)
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, str(SCRIPT), *args], env)
    try:
        deadline = time.monotonic() + timeout
        while not ready(marker):
            assert time.monotonic() < deadline, "the run did not get ready"
            if select.select([master], [], [], 0.1)[0]:
                try:
                    os.read(master, 4096)
                except OSError:
                    break
    finally:
        os.close(master)  # the hangup
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), marker
