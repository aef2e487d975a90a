"""A small ``/dev/shm`` for one command, as docker gives a container (64 MiB unless ``--shm-size``).

The command runs in its own mount namespace (``unshare -m``) with a fresh tmpfs of the given size
mounted on ``/dev/shm``; the rest of the machine keeps its own. That needs root (or
CAP_SYS_ADMIN) and util-linux's ``unshare``; :func:`small_shm_unavailable` says why not.
"""

from __future__ import annotations

import functools
import shutil
import subprocess


def small_shm_prefix(mib: int) -> list[str]:
    """A command prefix that runs the rest of the command line with a ``mib`` MiB ``/dev/shm``."""
    script = f'mount -t tmpfs -o size={mib}m tmpfs /dev/shm && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh"]


@functools.cache
def small_shm_unavailable() -> str:
    """Why a small ``/dev/shm`` cannot be made here ("" when it can): a skip reason."""
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run([*small_shm_prefix(4), "df", "--output=size", "/dev/shm"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0 or "4096" not in probe.stdout:
        return f"cannot mount a tmpfs on /dev/shm in a new mount namespace (needs root): {probe.stderr.strip()}"
    return ""
