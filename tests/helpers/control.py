"""A pipeline with its control API for the tests: ``run_pipeline.py --control-port`` in a subprocess.

Usage::

    with control_pipeline(model, "--loop", "100", token="t") as run:   # returns once /readyz is 200
        httpx.get(run.url + "/sources", headers=run.auth)
    run.returncode, run.out, run.err                                  # after SIGINT and exit
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.cli import ROOT, SCRIPT, free_port

DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``pred`` every 50 ms until it returns something truthy; AssertionError naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class ControlRun:
    """A started pipeline: its process, API URL, marker (see :func:`tests.helpers.cli.processes_with`), output."""

    proc: subprocess.Popen[str]
    url: str
    marker: str
    token: str | None = None
    ready_codes: list[int] = field(default_factory=list)  # /readyz answers while it started
    returncode: int | None = None
    out: str = ""
    err: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def start_pipeline(model: Path, *extra: str, port: int | None = None, token: str | None = None,
                   prefix: Sequence[str] = ()) -> ControlRun:
    """``run_pipeline.py --control-port`` on the demo video (plus ``extra`` flags), not waited for.

    ``prefix`` runs it through another command (e.g. :func:`tests.helpers.small_shm.small_shm_prefix`).
    """
    port = port or free_port()
    marker = uuid.uuid4().hex
    env = {**os.environ, "STREAMDET_TEST_MARKER": marker}
    env.pop("STREAMDET_CONFIG", None)
    if token:
        env["STREAMDET_CONTROL__TOKEN"] = token
    args = [sys.executable, str(SCRIPT), "--model", str(model), "--source", str(DEMO), "--publish", "none",
            "--control-port", str(port), "--quiet", "--set", "engine.intra_op_threads=1", *extra]
    proc = subprocess.Popen([*prefix, "nice", "-n", "10", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return ControlRun(proc, f"http://127.0.0.1:{port}", marker, token)


@contextmanager
def control_pipeline(model: Path, *extra: str, token: str | None = None,
                     prefix: Sequence[str] = ()) -> Iterator[ControlRun]:
    """A pipeline with its control API, ready (``/readyz`` 200) on entry; stopped with SIGINT on exit."""
    run = start_pipeline(model, *extra, token=token, prefix=prefix)

    def ready() -> bool:
        assert run.proc.poll() is None, run.proc.communicate()[1]
        try:
            code = httpx.get(run.url + "/readyz", timeout=2).status_code
        except httpx.HTTPError:
            return False
        run.ready_codes.append(code)
        return code == 200

    try:
        wait_until(ready, 60, "/readyz 200")
        yield run
        run.proc.send_signal(signal.SIGINT)
        run.out, run.err = run.proc.communicate(timeout=30)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate(timeout=10)
        run.returncode = run.proc.returncode
