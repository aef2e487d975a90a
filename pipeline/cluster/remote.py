"""The Ray side of a unit: a streaming task per file, an actor per shard of cameras.

Both yield the unit's messages (:class:`~pipeline.cluster.worker.UnitRun`) as a Ray streaming
generator, so results reach the driver as Ray objects (no shared file system), in order, while
the unit runs. The first batch of every run names where it runs (:data:`~pipeline.cluster.worker.KIND_PLACED`).

Fault tolerance follows Ray's model (docs.ray.io, "Actor fault tolerance" and "Task fault
tolerance"): a file task is submitted with ``max_retries=0`` and the driver resubmits it itself
(it knows which frames were already published, so none is published twice); a shard actor has
``max_restarts=-1``: when its node dies Ray starts it again on a node that is alive (the old one
is gone with its node, so a camera never runs in two places), and the driver calls ``run`` again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import ray

from pipeline.cluster.worker import KIND_PLACED, Message, UnitRun, UnitSpec

__all__ = ["CameraShard", "placement", "run_file_unit"]


def _lean_spawn() -> None:
    """Keep the stage processes this worker spawns from importing Ray's worker script again.

    ``multiprocessing``'s spawn and forkserver start methods re-run the parent's ``__main__``
    script in every child (``init_main_from_path``); in a Ray worker that is Ray's
    ``default_worker.py``, which imports Ray: about 1 s of CPU in each of a unit's four stage
    processes, twice what the stage itself imports. A ``__main__`` whose spec is named ``__main__`` is skipped by spawn
    (``multiprocessing.spawn._fixup_main_from_name``); the stages need nothing from it.
    """
    import importlib.machinery

    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None and hasattr(main, "__file__"):
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)


def placement(attempt: int) -> Message:
    """The first message of a run: this worker's node and process."""
    ctx = ray.get_runtime_context()
    info = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "attempt": attempt}
    return (KIND_PLACED, "", json.dumps(info).encode(), -1)


def _run_file_unit(spec: UnitSpec, attempt: int) -> Iterator[list[Message]]:
    """One file's pipeline on a worker (call with ``.options(num_returns="streaming", ...)``).

    Yields:
        Batches of messages: the placement first, then the pipeline's messages in order, the
        unit's summary last.
    """
    _lean_spawn()
    yield [placement(attempt)]
    yield from UnitRun(spec).batches()


class _CameraShard:
    """A shard of cameras: one pipeline for them, restarted by Ray on a live node if its node dies.

    Args:
        spec: the shard's unit (its cameras, the settings).
    """

    def __init__(self, spec: UnitSpec) -> None:
        self.spec = spec
        self.unit: UnitRun | None = None

    def run(self, attempt: int = 0) -> Iterator[list[Message]]:
        """Run the shard's pipeline (call with ``.options(num_returns="streaming")``).

        Args:
            attempt: the driver's count of this shard's earlier runs (0 the first time; a run
                after Ray restarted the actor on a live node has 1 or more).

        Yields:
            Batches of messages: the placement first, then the pipeline's messages until it ends,
            the summary last.
        """
        _lean_spawn()
        yield [placement(attempt)]
        self.unit = UnitRun(self.spec)
        yield from self.unit.batches()

    def stop(self) -> None:
        """End the shard's pipeline gracefully (its cameras send EOS)."""
        if self.unit is not None:
            self.unit.stop()

    def node(self) -> dict[str, Any]:
        """Where this shard runs: ``{node_id, node_ip, pid}``."""
        kind, _, payload, _ = placement(0)
        return dict(json.loads(payload))


_remote: Any = ray.remote  # Ray's overloads do not type actor options

run_file_unit: Any = _remote(max_retries=0)(_run_file_unit)
"""The file unit as a Ray remote function."""

CameraShard: Any = _remote(max_restarts=-1, max_task_retries=0, max_concurrency=4)(_CameraShard)
"""The shard of cameras as a Ray actor class."""
