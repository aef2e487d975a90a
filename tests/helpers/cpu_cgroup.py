"""A CPU quota for one command, as ``docker run --cpus`` or a Kubernetes CPU limit sets it.

Makes a child cgroup with a CFS quota (cgroup v1 ``cpu`` controller, or v2 ``cpu.max`` where the
``cpu`` controller can be enabled below the mount's top) and returns a prefix that runs a command
in it. Needs root and a writable cgroup mount; :func:`cpu_cgroup_unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 100_000


def _cpu_mount() -> tuple[Path, str] | None:
    """``(mount point, "v1" or "v2")`` of a cgroup hierarchy with the cpu controller, or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup" and "cpu" in options:
            return Path(fields[4]), "v1"
    for line in lines:
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            top = Path(fields[4])
            if "cpu" in (top / "cgroup.controllers").read_text().split():
                return top, "v2"
    return None


def cpu_cgroup_unavailable() -> str:
    """Why a CPU-limited cgroup cannot be made here ("" when it can): a skip reason."""
    found = _cpu_mount()
    if found is None:
        return "no cgroup hierarchy with the cpu controller is mounted"
    try:
        with cpu_cgroup(1.0):
            pass
    except OSError as e:
        return f"cannot make a cgroup with a CPU quota under {found[0]} (needs root): {e}"
    return ""


@contextlib.contextmanager
def cpu_cgroup(cores: float) -> Iterator[list[str]]:
    """A new cgroup allowing ``cores`` CPUs; yields a command prefix that runs the command in it.

    Raises:
        OSError: if it cannot be made.
    """
    found = _cpu_mount()
    if found is None:
        raise OSError("no cgroup hierarchy with the cpu controller")
    top, version = found
    group = top / f"streamdet-test-{uuid.uuid4().hex[:8]}"
    if version == "v2":
        (top / "cgroup.subtree_control").write_text("+cpu")
    group.mkdir()
    try:
        if version == "v1":
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(cores * PERIOD_US)))
        else:
            (group / "cpu.max").write_text(f"{int(cores * PERIOD_US)} {PERIOD_US}")
        yield ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh"]
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(group)
