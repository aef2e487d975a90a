"""Running ``run_pipeline.py`` in tests: a free port, the run's processes via /proc, no orphans left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run_pipeline.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def assert_no_orphans(marker: str) -> None:
    """Every process of the run is gone (within 10 s)."""
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


def start(args: list[str], extra_env: dict[str, str] | None = None, **kw: Any) -> tuple[subprocess.Popen[str], str]:
    """Start ``run_pipeline.py ARGS`` with a fresh ``STREAMDET_TEST_MARKER``; returns the process and the marker."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "STREAMDET_TEST_MARKER": marker, **(extra_env or {})}
    env.pop("STREAMDET_CONFIG", None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
    return proc, marker


def run(args: list[str], timeout: float = 120, extra_env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``run_pipeline.py ARGS`` to the end; returns ``(exit code, stdout, stderr)`` after checking no orphans."""
    proc, marker = start(args, extra_env)
    out, err = proc.communicate(timeout=timeout)
    assert_no_orphans(marker)
    return proc.returncode, out, err
