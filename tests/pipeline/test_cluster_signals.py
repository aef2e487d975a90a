"""Stopping the cluster driver while it starts, and addresses it cannot join (the command, a real local cluster).

* a SIGINT (SIGTERM) while the driver joins an address that never answers as a Ray head (a raylet's
  port): exit 130 (143), no traceback, one line at most (before: a ``KeyboardInterrupt`` traceback
  and exit 1; SIGTERM killed it at once);
* a SIGINT while it waits for ``--wait-subscribers``: exit 130 within a few seconds (before: a
  traceback, then blocked in ZeroMQ's ``Context.term()`` until a second signal);
* an address that answers but is not a Ray head: exactly the documented error line (before: Ray's
  C++ client logged a warning a second on stderr too);
* ``--ray-address auto`` with ``RAY_ADDRESS=127.0.0.1:PORT`` and no ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
  set: the run works, as with the explicit address (before: ``Connection refused``, Ray having
  rewritten 127.0.0.1 into this host's network address).

They share the session's two-node cluster (``shared_cluster``) with ``test_cluster_ray.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, SCRIPT, start
from tests.helpers.ray_cluster import shared_cluster, spare_port, wait_for  # noqa: F401  (shared_cluster: a fixture)

pytestmark = pytest.mark.slow

DEMO = str(ROOT / "pipeline" / "samples" / "demo.mp4")


def raylet_port(cluster) -> int:
    """The head's raylet port: it answers gRPC, but is not a Ray head (GCS)."""
    return int(cluster.cluster.head_node.node_manager_port)


def interrupted(proc: subprocess.Popen[str], signum: int = signal.SIGINT, timeout_s: float = 10.0) -> tuple[int, str]:
    """Send ``signum``; the exit code and stderr once the run has ended (killed and failed after ``timeout_s``)."""
    proc.send_signal(signum)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout_s} s of the signal; stderr: {err[-2000:]}")
    print(f"ended {time.monotonic() - t0:.2f} s after the signal")
    return proc.returncode, err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_while_joining_exits_as_stopped_without_a_traceback(shared_cluster, standin_model, signum,  # noqa: F811
                                                                   code):
    port = raylet_port(shared_cluster)
    proc, _ = start(["--ray-address", f"127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=60", "--source", DEMO,
                     "--model", str(standin_model), "--publish", "none", "--quiet"])
    try:
        # Ray is imported only to join the cluster: once it is loaded, the driver is joining
        wait_for(lambda: "_raylet.so" in Path(f"/proc/{proc.pid}/maps").read_text(), 60, "the driver importing Ray")
        time.sleep(2.0)  # (ray.init under way, retrying against the raylet)
        got, err = interrupted(proc, signum)
    finally:
        proc.kill()
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err


def test_sigint_while_waiting_for_subscribers_exits_130_at_once(shared_cluster, standin_model):  # noqa: F811
    port = spare_port()
    proc, _ = start(["--ray-address", shared_cluster.address, "--publish", f"tcp://127.0.0.1:{port}",
                     "--wait-subscribers", "1", "--set", "sinks.publish_wait_timeout_s=120", "--source", DEMO,
                     "--model", str(standin_model), "--quiet"])
    try:
        def listening() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(listening, 60, "the driver's PUB socket, waiting for a subscriber", step_s=0.2)
        code, err = interrupted(proc, timeout_s=8.0)
    finally:
        proc.kill()
    assert code == 130, err
    assert "Traceback" not in err, err


def test_an_address_that_is_not_a_ray_head_is_one_error_line(shared_cluster, standin_model):  # noqa: F811
    port = raylet_port(shared_cluster)
    proc, _ = start(["--ray-address", f"127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=3", "--source", DEMO,
                     "--model", str(standin_model), "--publish", "none", "--quiet"])
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert err.splitlines() == [f"error: --ray-address 127.0.0.1:{port}: the Ray cluster did not answer within 3 s "
                                "(cluster.connect_timeout_s)"]


def test_auto_finds_a_loopback_cluster_from_ray_address(shared_cluster, standin_model):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "STREAMDET_CONFIG")}
    env["RAY_ADDRESS"] = shared_cluster.address
    r = subprocess.run([sys.executable, str(SCRIPT), "--ray-address", "auto", "--source", DEMO, "--model",
                        str(standin_model), "--max-frames", "2", "--publish", "none", "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "output cluster: 1 units on 1 nodes, 0 file retries, 0 shard moves" in r.stdout.splitlines(), r.stdout
