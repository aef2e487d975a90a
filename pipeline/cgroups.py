"""This process's cgroup limits: the CPU quota, the memory limit, the OOM killer's kills.

A container's limits (``docker run --cpus=2 --memory=1g``, a Kubernetes pod's ``limits``) are
cgroup settings that neither ``os.cpu_count()``, the CPU affinity nor ``/proc/meminfo`` show.
:func:`machine_cores` counts the CPU quota, so that the engine's threads and the decoders'
placement follow the cores the run may use; :class:`OomWatch` tells a stage killed by the OOM
killer (a bare SIGKILL) from one killed by someone.

Both cgroup versions are read, along the process's cgroup path up to the top of the hierarchy (a
Kubernetes pod's limit sits on a parent of the container's cgroup), as the JDK's and Go's
container support do: v2 ``cpu.max``, ``memory.max``, ``memory.events``; v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, ``memory.limit_in_bytes``, ``memory.oom_control``.

Room: pipeline (start-up planning and supervision; docs/architecture.md).
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

PROC_SELF = "/proc/self"

_V1_UNLIMITED = 1 << 62
"""cgroup v1 reports "no memory limit" as a page-rounded LONG_MAX; anything this large is none."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _unescape(field: str) -> str:
    r"""A ``mountinfo`` path: space, tab, newline and backslash come as octal escapes (``\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _hierarchies(controller: str, proc: str) -> Iterator[tuple[bool, list[str]]]:
    """Each mounted hierarchy that holds ``controller`` for the process.

    Yields:
        ``(is v2, directories)``: the process's own cgroup directory first, then its parents up
        to the top of the hierarchy.
    """
    cgroup, mountinfo = _read(f"{proc}/cgroup"), _read(f"{proc}/mountinfo")
    if cgroup is None or mountinfo is None:
        return
    groups = [line.split(":", 2) for line in cgroup.splitlines() if line.count(":") >= 2]
    for line in mountinfo.splitlines():
        fields = line.split()
        # ID parent major:minor root mount-point options [optional...] - fstype source super-options
        dash = fields.index("-") if "-" in fields else -1
        if dash < 5 or len(fields) <= dash + 3:
            continue
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        root, point = _unescape(fields[3]), _unescape(fields[4])
        for hid, controllers, path in groups:
            v2 = fstype == "cgroup2" and hid == "0" and controllers == ""
            v1 = fstype == "cgroup" and controller in controllers.split(",") and controller in options
            if not (v2 or v1):
                continue
            inside = path == root or path.startswith(root.rstrip("/") + "/")
            rel = posixpath.relpath(path, root) if inside else "."  # (else the mount's own cgroup, as the JDK)
            rel = "" if rel == "." else rel.strip("/")
            dirs = []
            while True:
                dirs.append(posixpath.join(point, rel) if rel else point)
                if not rel:
                    break
                rel = posixpath.dirname(rel)
            yield v2, dirs


def _tightest(controller: str, proc: str, v2: Callable[[str], T | None], v1: Callable[[str], T | None]) -> list[T]:
    """Every limit set on the way up, read with ``v2`` or ``v1`` from each directory."""
    found = []
    for is_v2, dirs in _hierarchies(controller, proc):
        for d in dirs:
            value = (v2 if is_v2 else v1)(d)
            if value is not None:
                found.append(value)
    return found


def _v2_cpu(d: str) -> float | None:
    text = _read(posixpath.join(d, "cpu.max"))
    parts = text.split() if text else []
    if len(parts) < 2 or parts[0] == "max" or not (parts[0].isdigit() and parts[1].isdigit()) or int(parts[1]) <= 0:
        return None
    return int(parts[0]) / int(parts[1])


def _v1_cpu(d: str) -> float | None:
    quota, period = _read(posixpath.join(d, "cpu.cfs_quota_us")), _read(posixpath.join(d, "cpu.cfs_period_us"))
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_quota(proc: str = PROC_SELF) -> float | None:
    """The CPU limit of the process's cgroups, in cores (``2.5`` for ``docker run --cpus=2.5``).

    Args:
        proc: the ``/proc`` entry of the process (a fake tree in tests).

    Returns:
        The tightest quota in cores, or None without one (or off Linux).
    """
    found = _tightest("cpu", proc, _v2_cpu, _v1_cpu)
    return min(found) if found else None


def machine_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (rounded up).

    Returns:
        At least 1.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def _v2_memory(d: str) -> int | None:
    text = (_read(posixpath.join(d, "memory.max")) or "").strip()
    return int(text) if text.isdigit() else None


def _v1_memory(d: str) -> int | None:
    text = (_read(posixpath.join(d, "memory.limit_in_bytes")) or "").strip()
    return int(text) if text.isdigit() and int(text) < _V1_UNLIMITED else None


def _oom_kill_line(text: str | None) -> int | None:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def memory_limit(proc: str = PROC_SELF) -> int | None:
    """The memory limit of the process's cgroups in bytes (the tightest on the way up), or None."""
    found = _tightest("memory", proc, _v2_memory, _v1_memory)
    return min(found) if found else None


def oom_kills(proc: str = PROC_SELF) -> int | None:
    """Processes the OOM killer has killed in the process's own memory cgroup (and below), or None.

    v2 ``memory.events`` ``oom_kill``; v1 ``memory.oom_control`` ``oom_kill`` (Linux 4.13+).
    """
    for is_v2, dirs in _hierarchies("memory", proc):
        name = "memory.events" if is_v2 else "memory.oom_control"
        count = _oom_kill_line(_read(posixpath.join(dirs[0], name)))
        if count is not None:
            return count
    return None


class OomWatch:
    """Tells whether the OOM killer has struck in this process's memory cgroup since it was made.

    Args:
        proc: the ``/proc`` entry of the process whose cgroup is watched (a fake tree in tests).
    """

    def __init__(self, proc: str = PROC_SELF) -> None:
        self.proc = proc
        self.start = oom_kills(proc)

    def note(self) -> str:
        """"" or what to add to a SIGKILL: ``the OOM killer: the cgroup's memory limit is 250 MiB, 3 kills ...``."""
        now = oom_kills(self.proc)
        if now is None or self.start is None or now <= self.start:
            return ""
        limit = memory_limit(self.proc)
        room = f"the cgroup's memory limit is {limit / 2**20:.0f} MiB" if limit is not None else "no memory limit"
        kills = now - self.start
        return f"the OOM killer: {room}, {kills} kill{'s' if kills != 1 else ''} since the run started"


STAGE_OOM_SCORE_ADJ = 300
"""``oom_score_adj`` of the stage processes: when memory runs out, the OOM killer takes a stage,
which the runner restarts and reports, before the runner, whose death would end the run without a
word (under a 200 MiB limit the runner was the one killed)."""


def prefer_for_oom_kill(adj: int = STAGE_OOM_SCORE_ADJ) -> bool:
    """Raise this process's ``oom_score_adj`` to ``adj`` (Linux; raising needs no privilege).

    Returns:
        Whether it is at least ``adj`` now.
    """
    path = f"{PROC_SELF}/oom_score_adj"
    try:
        with open(path) as f:
            if int(f.read()) >= adj:
                return True
        with open(path, "w") as f:
            f.write(str(adj))
        return True
    except (OSError, ValueError):
        return False
