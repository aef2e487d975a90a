"""The cluster driver (``--ray-address``): connect, check, schedule the units, relay, retry, report.

The driver validates the run as a single-host run does (sources probed, model and card checked),
joins the Ray cluster, checks that the cluster can serve it (a GPU when ``engine.device`` is CUDA,
a node with ``cluster.unit_cpus`` CPUs), opens the sinks (ZeroMQ PUB, JSONL, MQTT) on the driver
and then runs:

* **files** as a batch: one Ray task per file (:func:`~pipeline.cluster.remote.run_file_unit`),
  spread over the nodes, each running the whole pipeline for its file and streaming the messages
  back; a unit whose worker or node died is submitted again (``cluster.max_retries``), and the
  relay publishes each frame once, in order; a file that fails for good is reported by name and
  the others go on;
* **cameras** as a fleet: ``cluster.cameras_per_shard`` cameras per Ray actor
  (:class:`~pipeline.cluster.remote.CameraShard`), spread over the nodes; Ray restarts a shard on a
  live node when its node dies, and the driver follows it there (``status`` state ``moved``).

The first SIGINT/SIGTERM stops the cameras gracefully (EOS) and cancels the file units; a second
one ends the run at once. One during the set-up (joining the cluster, the checks, opening the sinks,
``--wait-subscribers``) ends the run there, with the same exit status. Ray is imported here only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import zmq

from engines.base import Backend
from pipeline.chains import PreparedRun, prepare_run
from pipeline.cluster.relay import Relay
from pipeline.cluster.worker import KIND_PLACED, KIND_SUMMARY, Message, UnitSpec, unit_settings
from pipeline.restarts import install_stop_handlers
from pipeline.settings import Settings, SourceEntry
from pipeline.stages.base import StageError
from pipeline.stages.mqtt_sink import MqttSink
from pipeline.stages.postprocess import open_sink
from pipeline.stages.sink_base import Sink
from pipeline.summary import PipelineError, RunSummary, SourceReport
from pipeline.transport import TransportError
from streamdet.constants import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM

__all__ = ["STOP_DRAIN_S", "ClusterRun", "connect"]

STOP_DRAIN_S = 30.0
"""After a stop signal, longest wait for the units to end before the driver gives up on them."""

RESTART_PAUSE_S = 0.2
"""Pause before asking a restarting shard to run again."""

SHARD_MAX_FAILURES = 20
"""A shard whose runs fail this many times in a row, none getting as far as its pipeline's first
message, is given up (its cameras end with an error EOS): Ray restarts it for ever otherwise."""

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Stopped(BaseException):
    """A stop signal during the set-up (joining, checks, sinks): the run ends there (``args[0]``: the signal)."""


@contextlib.contextmanager
def _cpp_logs_hidden(thread: threading.Thread) -> Iterator[None]:
    """Descriptor 2 on /dev/null while ``thread`` (``ray.init``) tries: Ray's C++ client logs each failed try there.

    (A warning a second, for an address that answers but is not a Ray head; no Ray log setting
    applies that early.) If the try goes on (timed out, stopped), ``sys.stderr`` moves to a copy.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (OSError, ValueError, AttributeError):  # (captured: restored, the try's lines may show)
            on_fd2 = False
        if thread.is_alive() and on_fd2:
            sys.stderr.flush()
            sys.stderr = open(saved, "w", buffering=1, encoding=sys.stderr.encoding,  # (for the rest of the process)
                              errors="backslashreplace")
        else:
            os.dup2(saved, 2)
            os.close(saved)


def connect(address: str, timeout_s: float) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT`` or ``auto``) as a driver.

    Nothing is started on this host: an address with no cluster behind it fails here. Ray's own
    console output stays off the driver's (its client's retries, the cluster's error messages).

    Raises:
        PipelineError: one line naming the address and the problem, within ``timeout_s``.
    """
    target = os.environ.get("RAY_ADDRESS", "").strip() if address == "auto" else address
    if target in ("", "auto"):  # as Ray does: else the cluster `ray start` left on this host
        from ray._private.services import get_ray_address_from_environment

        with contextlib.suppress(Exception):  # (ConnectionError: none found)
            target = get_ray_address_from_environment("auto", None) or ""
        if target in ("", "auto"):
            raise PipelineError("--ray-address auto: no Ray cluster found on this host (start one with ray start)")
    shown = address if target == address else f"{address} ({target})"
    host, _, port = target.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if host in _LOOPBACK:
        # a cluster bound to the loopback interface: Ray would rewrite 127.0.0.1 into this host's
        # network address, where nothing listens, unless told that the cluster is local
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "ray" in sys.modules:  # read when Ray was imported
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
    import ray
    from ray._private import worker as ray_worker

    # mute the printer of the cluster's errors ("(raylet) The node ... has been marked dead"), on despite log_to_driver
    ray_worker._worker_logs_enabled = False
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 5.0)).close()
    except (OSError, ValueError, OverflowError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise PipelineError(f"--ray-address {shown}: no Ray cluster reachable there ({why})") from e
    kwargs: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if host in _LOOPBACK else {}
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(address=target, log_to_driver=False, logging_level=logging.ERROR, namespace="streamdet",
                     **kwargs)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    # ray.init retries for ever when the address answers but is not a Ray head: bounded here
    thread = threading.Thread(target=init, name="streamdet-ray-init", daemon=True)
    with _cpp_logs_hidden(thread):
        thread.start()
        thread.join(timeout_s)
    if not outcome:
        raise PipelineError(f"--ray-address {shown}: the Ray cluster did not answer within {timeout_s:g} s "
                            "(cluster.connect_timeout_s)")
    if outcome[0] is not None:
        why = " ".join(str(outcome[0]).split())[:300]
        raise PipelineError(f"--ray-address {shown}: cannot join the Ray cluster ({why})") from outcome[0]


@dataclass
class _Unit:
    """One unit of work and how it is going."""

    spec: UnitSpec
    display: str
    attempt: int = 0
    actor: Any = None
    gen: Any = None
    summary: dict[str, Any] | None = None
    node: dict[str, Any] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)
    moves: int = 0
    failures: int = 0
    runs: int = 0


class ClusterRun:
    """A run over a Ray cluster; the same interface as :class:`~pipeline.runner.Pipeline`.

    Args:
        settings: the run's settings (``cluster.ray_address`` set).
        progress: show a progress bar (default: unless ``quiet`` or stderr is not a TTY).
    """

    def __init__(self, *, settings: Settings, progress: bool | None = None) -> None:
        assert settings.cluster.ray_address is not None
        self.settings = settings
        self.progress = (not settings.quiet and sys.stderr.isatty()) if progress is None else progress
        self._signals: list[int] = []
        self._starting = False
        self._prepared: PreparedRun | None = None
        self.units: list[_Unit] = []
        self.relay: Relay | None = None
        self.cluster_line = ""

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask for a graceful stop (what SIGINT/SIGTERM do); a second request ends at once."""
        self._signals.append(signum)

    def prepare(self) -> None:
        """Validate sources, model and card on the driver (as a single-host run does).

        Raises:
            PipelineError: naming the first bad input.
        """
        if self.settings.sinks.video_out is not None:
            raise PipelineError("sinks.video_out: the annotated video is not available on a cluster "
                                "(--ray-address); run without it, or on one host")
        if self.settings.control.port is not None:
            raise PipelineError("control.port: the control API runs on one host only, not with --ray-address "
                                "(docs/control.md)")
        s = self.settings
        # the engine runs on the workers: the driver checks the model with the CPU engine (it may
        # have no GPU itself); whether the cluster has GPUs is checked once connected
        local = s.model_copy(update={"engine": s.engine.model_copy(update={"device": "cpu",
                                                                         "backend": Backend.ONNXRUNTIME})})
        self._prepared = prepare_run(local, None)

    def run(self, *, handle_signals: bool = True) -> RunSummary:
        """Run every source over the cluster until each has ended (or a stop).

        Returns:
            The :class:`~pipeline.summary.RunSummary` (frames and detections as published by the
            driver's sinks; ``exit_code`` 1 if a file failed for good, 130/143/129 if stopped,
            in the set-up too).

        Raises:
            PipelineError: bad input, an unreachable cluster, a cluster that cannot serve the run,
                or a sink that cannot be opened (nothing was scheduled then).
        """
        if self._prepared is None:
            self.prepare()
        assert self._prepared is not None
        prepared = self._prepared
        s = self.settings
        address = s.cluster.ray_address
        assert address is not None
        summary = RunSummary(model=prepared.model_names,
                             sources=[SourceReport(src.source_id, src.display) for src in prepared.sources])
        # before joining: a stop signal in the set-up (slow cluster, --wait-subscribers) ends it there
        old = install_stop_handlers(self._on_signal, tracker=False) if handle_signals else {}  # (no shared memory)
        self._starting = handle_signals
        ctx: zmq.Context[Any] = zmq.Context()
        sinks: list[Sink] = []
        connected = False
        try:
            connect(address, s.cluster.connect_timeout_s)
            connected = True
            self._check_cluster(address)
            sinks = self._open_sinks(ctx, prepared)
            self._starting = False
            self._run(summary, sinks, prepared)
        except _Stopped as e:
            summary.stopped_by(e.args[0])
        finally:
            self._starting = False
            for sink in sinks:
                try:
                    sink.close()
                except Exception as e:
                    summary.errors.append(f"{sink.describe()}: cannot finish ({e})")
            summary.outputs = [sink.describe() for sink in sinks] + ([self.cluster_line] if self.cluster_line else [])
            ctx.destroy(linger=0)  # (the sinks closed above keep their own linger)
            if connected:
                self._release()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return summary

    # ------------------------------------------------------------------------------- set-up
    def _check_cluster(self, address: str) -> None:
        import ray

        s = self.settings
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if s.engine.device.startswith("cuda"):
            gpus = max((n.get("Resources", {}).get("GPU", 0.0) for n in nodes), default=0.0)
            if gpus < s.cluster.gpus:
                raise PipelineError(f"engine.device={s.engine.device}: the Ray cluster at {address} has no node with "
                                    f"{s.cluster.gpus:g} GPU (largest: {gpus:g}); use --device cpu, or add GPU nodes")
        cpus = max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=0.0)
        need = max(s.cluster.unit_cpus if any(src.is_file for src in self.sources) else 0.0,
                   s.cluster.shard_cpus if any(src.is_live for src in self.sources) else 0.0)
        if cpus < need:
            raise PipelineError(f"the Ray cluster at {address} has no node with {need:g} CPUs (largest: {cpus:g}); "
                                "lower cluster.unit_cpus / cluster.shard_cpus")

    @property
    def sources(self) -> list[Any]:
        """The probed sources (after :meth:`prepare`)."""
        assert self._prepared is not None
        return self._prepared.sources

    def _open_sinks(self, ctx: zmq.Context[Any], prepared: PreparedRun) -> list[Sink]:
        opened: list[Sink] = []
        for sink in self.settings.sinks.sink_config().build(ctx=ctx, class_names=prepared.first_card.class_names):
            try:
                open_sink(sink)
            except BaseException as e:
                refused = isinstance(e, (TransportError, StageError))
                for done in opened if refused else [*opened, sink]:  # (one interrupted part way is closed too)
                    with contextlib.suppress(Exception):
                        done.close()
                if refused:
                    raise PipelineError(str(e)) from e
                raise
            opened.append(sink)
        return opened

    def _units(self) -> list[_Unit]:
        s = self.settings
        entries = {e.url: e for e in s.source_entries()}
        units: list[_Unit] = []
        cameras: list[tuple[SourceEntry, str]] = []
        # longest files first: the batch's tail, when one unit is left alone on a node, stays short
        for src in sorted(self.sources, key=lambda x: -max(x.frames, 0)):
            given = entries.get(src.url) or SourceEntry(url=src.url)
            entry = given.model_copy(update={"id": src.source_id})
            if src.is_file:
                spec = UnitSpec(settings=unit_settings(s, [entry], keep_mqtt=False), source_ids=(src.source_id,))
                units.append(_Unit(spec=spec, display=src.display))
            else:
                cameras.append((entry, src.display))
        k = s.cluster.cameras_per_shard
        for i in range(0, len(cameras), k):
            group = cameras[i:i + k]
            spec = UnitSpec(settings=unit_settings(s, [e for e, _ in group], keep_mqtt=True),
                            source_ids=tuple(str(e.id) for e, _ in group), live=True)
            units.append(_Unit(spec=spec, display=", ".join(d for _, d in group)))
        return units

    # ---------------------------------------------------------------------------------- run
    def _submit(self, unit: _Unit) -> None:
        from pipeline.cluster.remote import CameraShard, run_file_unit

        c = self.settings.cluster
        gpus = c.gpus if self.settings.engine.device.startswith("cuda") else 0.0
        if unit.spec.live:
            if unit.actor is None:
                unit.actor = CameraShard.options(num_cpus=c.shard_cpus, num_gpus=gpus,
                                                 scheduling_strategy="SPREAD").remote(unit.spec)
            unit.gen = unit.actor.run.options(num_returns="streaming").remote(unit.runs)
            unit.runs += 1
        else:
            unit.gen = run_file_unit.options(num_returns="streaming", num_cpus=c.unit_cpus, num_gpus=gpus,
                                             scheduling_strategy="SPREAD").remote(unit.spec, unit.attempt)

    def _run(self, summary: RunSummary, sinks: list[Sink], prepared: PreparedRun) -> None:
        import ray
        from ray.exceptions import RayError

        bar = None
        expected = sum(min(src.frames * self.settings.decode.loop, self.settings.max_frames or 1 << 62)
                       for src in prepared.sources if src.is_file and src.frames > 0)
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=expected or None, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=True)
        worker_published = [sk for sk in sinks if isinstance(sk, MqttSink)] if any(
            src.is_live for src in prepared.sources) else []
        self.relay = relay = Relay(sinks=sinks, worker_published=worker_published,
                                   sources=[(src.source_id, src.is_live) for src in prepared.sources],
                                   on_frames=bar.update if bar is not None else None)
        self.units = self._units()
        active: dict[Any, _Unit] = {}
        for unit in self.units:
            self._submit(unit)
            active[unit.gen] = unit
        started = time.monotonic()
        handled = 0
        stop_deadline: float | None = None
        try:
            while active:
                while handled < len(self._signals):
                    signum = self._signals[handled]
                    handled += 1
                    summary.stopped_by(signum)
                    if handled == 1:
                        stop_deadline = time.monotonic() + STOP_DRAIN_S
                        self._stop_units(active)
                    else:
                        stop_deadline = time.monotonic()
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    summary.errors.append("the cluster units did not end in time after the stop signal; left them")
                    break
                ready: list[Any] = ray.wait(list(active), num_returns=1, timeout=0.1)[0]
                for gen in ready:
                    unit = active.pop(gen)
                    try:
                        batch: list[Message] = ray.get(next(gen))
                    except StopIteration:
                        self._ended(unit, active, summary, stopping=stop_deadline is not None)
                        continue
                    except RayError as e:
                        self._lost(unit, e, active, stopping=stop_deadline is not None)
                        continue
                    active[gen] = unit
                    self._receive(unit, batch)
        finally:
            if bar is not None:
                bar.close()
        summary.seconds = time.monotonic() - started
        for rep in summary.sources:
            t = relay.tally[rep.source_id]
            rep.frames = t.frames
            if t.eos is not None:
                rep.reason = str(t.eos.get("reason", ""))
                rep.error = str(t.eos.get("error") or "")
        summary.frames = sum(t.frames for t in relay.tally.values())
        summary.detections = sum(t.detections for t in relay.tally.values())
        for err in relay.errors:
            summary.fail(err)
        self.cluster_line = self._cluster_line()

    def _cluster_line(self) -> str:
        """``cluster: N units on M nodes, ...``: M counts every node a unit ran on, a retried one's first too."""
        retries = sum(u.attempt for u in self.units if not u.spec.live)
        moves = sum(u.moves for u in self.units if u.spec.live)
        nodes = set().union(*(u.nodes for u in self.units))
        return (f"cluster: {len(self.units)} units on {len(nodes)} nodes, {retries} file retries, "
                f"{moves} shard moves")

    def _receive(self, unit: _Unit, batch: list[Message]) -> None:
        assert self.relay is not None
        if batch and batch[0][0] == KIND_PLACED:
            node = json.loads(batch[0][2])
            if unit.spec.live:
                moved = bool(unit.node) and unit.node.get("node_id") != node.get("node_id")
                unit.moves += int(moved)
                self.relay.place(unit.spec.source_ids, node)
            unit.node = node
            unit.nodes.add(str(node.get("node_id", "")))
            batch = batch[1:]
        if batch:
            unit.failures = 0
        for kind, _, payload, _ in batch:
            if kind == KIND_SUMMARY:
                unit.summary = json.loads(payload)
        self.relay.feed(batch)

    def _ended(self, unit: _Unit, active: dict[Any, _Unit], summary: RunSummary, *, stopping: bool) -> None:
        """A unit's stream ended normally: done, or (no summary) lost."""
        assert self.relay is not None
        result = unit.summary or {}
        if not result:
            self._lost(unit, RuntimeError("its stream ended without a summary"), active, stopping=stopping)
            return
        summary.warnings += list(result.get("warnings", []))
        for label, n in dict(result.get("restarts", {})).items():
            summary.restarts[label] = summary.restarts.get(label, 0) + int(n)
        if int(result.get("exit_code", 0)) not in (EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM):
            # the unit's pipeline failed (bad input, a decode error mid-file): the run fails as on
            # one host; a source whose EOS (reason error) was published already keeps that one
            why = "; ".join(result.get("errors", [])) or f"exit status {result.get('exit_code')}"
            for sid in unit.spec.source_ids:
                self.relay.fail(sid, why)
        elif result.get("errors"):
            summary.warnings += [str(e) for e in result["errors"]]

    def _lost(self, unit: _Unit, error: BaseException, active: dict[Any, _Unit], *, stopping: bool) -> None:
        """A unit's worker, actor or node died (or its stream broke): run it again, or report it."""
        assert self.relay is not None
        why = " ".join(str(error).split())[:300] or type(error).__name__
        if self.relay.ended(unit.spec.source_ids) or stopping:
            return
        unit.summary = None
        if unit.spec.live and unit.failures < SHARD_MAX_FAILURES:  # Ray restarts the actor; run it again
            unit.failures += 1
            time.sleep(RESTART_PAUSE_S)
            print(f"warning: shard of {unit.display}: its worker was lost ({type(error).__name__}); "
                  "Ray restarts it", file=sys.stderr, flush=True)
            self._submit(unit)
            active[unit.gen] = unit
            return
        if not unit.spec.live and unit.attempt < self.settings.cluster.max_retries:
            unit.attempt += 1
            print(f"warning: {unit.display}: its worker was lost ({type(error).__name__}); running it again "
                  f"(retry {unit.attempt} of {self.settings.cluster.max_retries})", file=sys.stderr, flush=True)
            self._submit(unit)
            active[unit.gen] = unit
            return
        tries = unit.failures if unit.spec.live else unit.attempt + 1
        for sid in unit.spec.source_ids:
            self.relay.fail(sid, f"{unit.display}: failed on the cluster after {tries} attempts ({why})")

    def _stop_units(self, active: dict[Any, _Unit]) -> None:
        import ray

        for gen, unit in active.items():
            with contextlib.suppress(Exception):
                if unit.actor is not None:
                    unit.actor.stop.remote()
                else:
                    ray.cancel(gen)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        if self._starting:  # the first one in the set-up ends it (the run's loop sees the others)
            self._starting = False
            raise _Stopped(signum)

    def _release(self) -> None:
        import ray

        for unit in self.units:
            if unit.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(unit.actor, no_restart=True)
        with contextlib.suppress(Exception):
            ray.shutdown()

