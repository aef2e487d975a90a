"""A CPU quota or a memory limit for one command, as ``docker run --cpus/--memory`` or Kubernetes limits set them.

Makes a child cgroup (cgroup v1 ``cpu`` / ``memory`` controllers, or v2 where the controller can
be enabled below the mount's top) and yields a prefix that runs a command in it. Needs root and
a writable cgroup mount; :func:`cgroup_unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 100_000


def _mount(controller: str) -> tuple[Path, bool] | None:
    """``(mount point, is v2)`` of a cgroup hierarchy where ``controller`` can be used, or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    tops = []
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup" and controller in options:
            return Path(fields[4]), False
        if fstype == "cgroup2":
            tops.append(Path(fields[4]))
    for top in tops:
        with contextlib.suppress(OSError):
            if controller in (top / "cgroup.controllers").read_text().split():
                return top, True
    return None


@functools.cache
def cgroup_unavailable(controller: str) -> str:
    """Why a cgroup limiting ``controller`` (``cpu``, ``memory``) cannot be made here ("" when it can)."""
    if _mount(controller) is None:
        return f"no cgroup hierarchy with the {controller} controller is mounted"
    try:
        with limited_cgroup(**({"cores": 1.0} if controller == "cpu" else {"memory_mib": 512})):
            pass
    except OSError as e:
        return f"cannot make a cgroup limiting {controller} (needs root): {e}"
    return ""


@contextlib.contextmanager
def limited_cgroup(*, cores: float | None = None, memory_mib: int | None = None) -> Iterator[list[str]]:
    """New cgroups allowing ``cores`` CPUs and ``memory_mib`` MiB; yields a prefix that runs a command in them.

    Raises:
        OSError: if they cannot be made.
    """
    made: list[Path] = []
    procs: list[Path] = []
    try:
        for controller, value in (("cpu", cores), ("memory", memory_mib)):
            if value is None:
                continue
            found = _mount(controller)
            if found is None:
                raise OSError(f"no cgroup hierarchy with the {controller} controller")
            top, v2 = found
            if v2:
                (top / "cgroup.subtree_control").write_text(f"+{controller}")
            group = top / f"streamdet-test-{uuid.uuid4().hex[:8]}"
            group.mkdir()
            made.append(group)
            if controller == "cpu":
                quota = int(value * PERIOD_US)
                if v2:
                    (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                else:
                    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                    (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(int(value) << 20))
            procs.append(group / "cgroup.procs")
        moves = " && ".join(f"echo $$ > {shlex.quote(str(p))}" for p in procs) or "true"
        yield ["sh", "-c", f'{moves} && exec "$@"', "sh"]
    finally:
        for group in made:  # (busy for a moment after its last process exits)
            for _ in range(50):
                try:
                    os.rmdir(group)
                    break
                except OSError:
                    time.sleep(0.1)
