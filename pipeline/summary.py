"""The outcome of a run: its summary, per-source reports, how stage status reports update them, the report lines.

The runner feeds every :class:`~streamdet.messages.StatusMsg` from the stages to a
:class:`StatusBook`, which keeps the :class:`RunSummary` (frames, detections, per-source ends and
errors, outputs, errors) and the ready/done counts per stage; :func:`format_summary` prints it.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamdet.constants import EXIT_FAILURE, EXIT_OK, EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM
from streamdet.messages import StageName, StatusKind, StatusMsg


class PipelineError(Exception):
    """The run cannot start or failed; ``str(e)`` is one line naming the input and the problem.

    Attributes:
        exit_code: the process exit status to use.
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


@dataclass
class SourceReport:
    """What happened to one source.

    Attributes:
        source_id: its id.
        display: path or URL (credentials redacted).
        frames: frames that went through the whole pipeline (from its end report; one that did not
            finish: what was published of it, :meth:`RunSummary.count_unfinished`).
        reason: how it ended (``finished``, ``max_frames``, ``interrupted``, ``error``), empty if it did not.
        error: the source's problem, if any.
    """

    source_id: str
    display: str
    frames: int = 0
    reason: str = ""
    error: str = ""


@dataclass
class RunSummary:
    """The outcome of a run.

    Attributes:
        model: the model's name.
        frames: frames that went through the whole pipeline (all sources).
        seconds: wall time from the go signal to the end of the last stage.
        detections: detections in the published messages.
        sources: per-source reports.
        outputs: one line per sink saying where its output went.
        errors: one line per problem.
        warnings: one line per problem that did not fail the run (a live source lost while others ran).
        exit_code: the process exit status.
        peak_rss_kib: peak resident memory (sum over the stage processes) seen while running.
        restarts: stage restarts by stage label (``engine``, ``decode:<source_id>``, ...).
        restart_log: ``(label, attempt, reason, down_s)`` of every restart, in order.
        lost_frames: live frames lost in stage restarts (never published), by source id.
    """

    model: str
    frames: int = 0
    seconds: float = 0.0
    detections: int = 0
    sources: list[SourceReport] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK
    peak_rss_kib: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    restart_log: list[tuple[str, int, str, float]] = field(default_factory=list)
    lost_frames: dict[str, int] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        """Frames per second over the run."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def stopped_by(self, signum: int) -> None:
        """Record a stop signal: exit code 143 for SIGTERM, 129 for SIGHUP, else 130, unless the run already has one."""
        if self.exit_code == EXIT_OK:
            codes: dict[int, int] = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGHUP: EXIT_SIGHUP}
            self.exit_code = codes.get(signum, EXIT_SIGINT)

    def fail(self, message: str) -> None:
        """Record a problem that fails the run (exit code 1 unless a signal already set one)."""
        self.errors.append(message)
        if self.exit_code == EXIT_OK:
            self.exit_code = EXIT_FAILURE

    def count_unfinished(self, published: Mapping[str, int]) -> None:
        """Give each source that did not finish the frames published of it (by source id; others are left alone).

        A source's frames come with its end report, which never comes when the run fails first
        (a stage's restarts used up, the drain timed out): without this its line said 0 frames.
        """
        for r in self.sources:
            if not r.reason and r.source_id in published:
                r.frames = published[r.source_id]

    def settle_sources(self, live: set[str]) -> None:
        """Turn the sources' errors into errors or warnings and set the exit code.

        A live source that failed does not fail the run while another source still worked.

        Args:
            live: ids of the live sources.
        """
        all_failed = all(r.error for r in self.sources)
        for r in self.sources:
            if r.error:
                if r.source_id in live and not all_failed:
                    self.warnings.append(r.error)
                else:
                    self.errors.append(r.error)
        if self.errors and self.exit_code == EXIT_OK:
            self.exit_code = EXIT_FAILURE


class StatusBook:
    """Applies the stages' status reports to a :class:`RunSummary`; counts ready and done stages.

    Args:
        summary: the summary to update.
        abort: the run's abort event (set on a stage error).

    Attributes:
        ready: ``ready`` reports per stage label (``decode:<id>`` for decoders).
        done: ``done`` reports per stage label.
        bar: a tqdm progress bar to advance with the frames done, or None.
        frames_done: frames through the whole pipeline so far.
        restartable: set by the runner while a dead stage would be restarted: a stage error is
            then kept in :attr:`last_error` (the reason of the restart) instead of failing the run.
        last_error: the last error line per stage label.
    """

    def __init__(self, summary: RunSummary, abort: Any) -> None:
        self.summary = summary
        self.abort = abort
        self.reports = {r.source_id: r for r in summary.sources}
        self.ready: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.bar: Any = None
        self.restartable = False
        self.last_error: dict[str, str] = {}

    def fail(self, message: str) -> None:
        """Record a problem that fails the run and abort it."""
        self.summary.fail(message)
        self.abort.set()

    def apply(self, msg: StatusMsg) -> bool:
        """Apply one status report.

        Args:
            msg: the report.

        Returns:
            True once the last stage (postprocess) is done.
        """
        summary = self.summary
        label = f"{msg.stage.value}:{msg.source_id}" if msg.stage in (StageName.DECODE, StageName.SECONDARY) \
            else msg.stage.value
        match msg.kind:
            case StatusKind.READY:
                self.ready[label] += 1
            case StatusKind.PROGRESS:
                if msg.stage is StageName.POSTPROCESS:
                    lost = msg.counts.get("lost", 0)
                    if lost:
                        summary.lost_frames[msg.source_id] = summary.lost_frames.get(msg.source_id, 0) + lost
                    n = msg.counts.get("frames", 0)
                    summary.frames += n
                    summary.detections += msg.counts.get("detections", 0)
                    if self.bar is not None and n:
                        self.bar.update(n)
            case StatusKind.SOURCE_END:
                r = self.reports.get(msg.source_id)
                if r is not None:
                    r.reason = msg.message
                    r.frames = msg.counts.get("frames", r.frames)
            case StatusKind.SOURCE_ERROR:
                r = self.reports.get(msg.source_id)
                if r is not None:
                    r.error = msg.message
            case StatusKind.STAGE_ERROR:
                if msg.counts.get("final"):  # its work was done, finishing failed: the run drains, then fails
                    summary.fail(msg.message)
                    return False
                if self.restartable:  # the stage exits and is restarted; this is the reason
                    self.last_error[label] = msg.message
                    return False
                if not self.abort.is_set():  # the first error is the cause; later ones are consequences
                    summary.errors.append(msg.message)
                if summary.exit_code == EXIT_OK:
                    summary.exit_code = EXIT_FAILURE
                self.abort.set()
            case StatusKind.OUTPUT:
                summary.outputs.append(msg.message)
            case StatusKind.DONE:
                self.done[label] += 1
                if msg.stage is StageName.POSTPROCESS and not (self.restartable and msg.counts.get("failed")):
                    return True
        return False


def process_rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (``VmRSS`` from ``/proc/<pid>/status``), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def format_summary(summary: RunSummary) -> list[str]:
    """The run's report, one line each: totals, each source, each output."""
    lines = [f"frames={summary.frames} fps={summary.fps:.1f} detections={summary.detections} "
             f"seconds={summary.seconds:.2f} model={summary.model}"]
    for r in summary.sources:
        how = r.reason or "not finished"
        lines.append(f"source {r.source_id}: {r.display}: {r.frames} frames ({how})")
    if summary.restarts:
        what = ", ".join(f"{label} {n}" for label, n in summary.restarts.items())
        lost = sum(summary.lost_frames.values())
        lines.append(f"restarts: {what}" + (f" (live frames lost: {lost})" if lost else ""))
    for out in summary.outputs:
        lines.append(f"output {out}")
    if not summary.outputs:
        lines.append("output: none (no sink configured or none opened)")
    return lines
