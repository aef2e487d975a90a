"""A real local Ray cluster for the cluster tests: head and worker nodes bound to 127.0.0.1 only.

Usage::

    cluster = LocalCluster(nodes=2)     # head + one worker node, 2 logical CPUs each
    cluster.address                     # "127.0.0.1:PORT", for --ray-address
    cluster.kill_node(node_id)          # a node dies (raylet and its workers SIGKILLed)
    cluster.close()                     # always (the fixtures do it)

``shared_cluster`` is a session-wide two-node cluster for tests that do not kill nodes (import it
into a test module to use it: the cluster is started once for every module that does).

Ray's ports are chosen by the system unless ``STREAMDET_TEST_RAY_PORTS=BASE`` is set (a shared
machine): the head and one worker node then take theirs from ``BASE`` .. ``BASE + 99``, two
clusters at a time at most.

Ray rewrites a loopback address into the host's network address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before it is imported: this module sets it first.
Without the ``ray`` package (the ``cluster`` extra) the tests are skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray", reason="needs the cluster extra: pip install -e '.[cluster]'")

FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                          "health_check_initial_delay_ms": 0}
"""GCS settings of the test cluster: a dead node is noticed within ~2 s (Ray's defaults: ~15-30 s)."""

_BLOCKS: set[int] = set()
"""Port blocks (``STREAMDET_TEST_RAY_PORTS``) of the clusters running now."""


def _ports(block: int | None, node: int) -> dict[str, Any]:
    """Ray's ports for node ``node`` (0: the head) of a cluster in the 50 ports from ``block`` (None: the system's)."""
    if block is None or node > 1:
        return {}
    p = block + 25 * node
    names = ("node_manager_port", "object_manager_port", "metrics_agent_port", "metrics_export_port",
             "dashboard_agent_listen_port", "runtime_env_agent_port")
    ports: dict[str, Any] = {name: p + 1 + i for i, name in enumerate(names)}
    if node == 0:
        ports["gcs_server_port"] = p
    return {**ports, "min_worker_port": p + 10, "max_worker_port": p + 24}


class LocalCluster:
    """``ray.cluster_utils.Cluster`` with ``nodes`` nodes of ``cpus`` logical CPUs each, on 127.0.0.1."""

    def __init__(self, nodes: int = 2, cpus: int = 2) -> None:
        from ray.cluster_utils import Cluster

        base = os.environ.get("STREAMDET_TEST_RAY_PORTS")
        self.block = next((b for b in (int(base), int(base) + 50) if b not in _BLOCKS), None) if base else None
        if self.block is not None:
            _BLOCKS.add(self.block)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": FAST_FAILURE_DETECTION, **_ports(self.block, 0)})
        self.workers = [self.cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1", **_ports(self.block, 1 + i))
                        for i in range(nodes - 1)]

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the head (GCS)."""
        return str(self.cluster.address)

    @property
    def head_id(self) -> str:
        """The head node's Ray node id."""
        return str(self.cluster.head_node.node_id)

    def kill_node(self, node_id: str) -> None:
        """The worker node ``node_id`` dies at once, as a machine that loses power.

        Its Ray processes are SIGKILLed (``remove_node``), and so is every process the raylet
        started (the workers and their children): a busy worker does not notice its raylet's
        death for a long while by itself, where a real machine's death takes everything.

        Raises:
            ValueError: if it is the head or not a node of this cluster.
        """
        node = next((n for n in self.workers if n.node_id == node_id), None)
        if node is None:
            raise ValueError(f"{node_id} is not a worker node of this cluster")
        from ray._private import ray_constants

        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        doomed = descendants(raylet)
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        for pid in doomed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop every node (and any driver connection of this process)."""
        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()
        _BLOCKS.discard(self.block or -1)


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[LocalCluster]:
    """A two-node cluster for the whole session (for tests that leave its nodes alone)."""
    c = LocalCluster(nodes=2)
    yield c
    c.close()


def spare_port() -> int:
    """A free TCP port for a test's own socket (with ``STREAMDET_TEST_RAY_PORTS``: one Ray leaves free there)."""
    base = os.environ.get("STREAMDET_TEST_RAY_PORTS")
    if base:
        return int(base) + 8  # (between the head's own ports and its workers', in either block's layout)
    from tests.helpers.cli import free_port

    return free_port()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_for(predicate: Any, timeout_s: float, what: str, step_s: float = 0.05) -> float:
    """Poll ``predicate()`` until true; return the seconds it took.

    Raises:
        AssertionError: naming ``what`` after ``timeout_s``.
    """
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(step_s)
    return time.monotonic() - t0
