"""JSONL sink: every published object (detections and EOS) as one JSON line, durable across crashes.

The file is written under a temporary name (``.<stem>.partial<suffix>``) and renamed into place
when the sink closes (or, with rotation, when a segment is finished), so a dead run leaves no file
posing as complete. Lines reach the kernel every ``flush_ms`` (default: every line), so a SIGKILLed
process loses at most that window; a restarted one (``resume=True``) appends to the partial file it
left. A full disk (or any other write error) never stops the pipeline: the lines that cannot be
written are counted and the sink retries once a second. While a sink may write, it holds a lock
beside the file (:class:`~pipeline.stages.sink_base._OutputLock`): a second run naming the same file
is refused at start-up, before it touches anything.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.stages.base import say
from pipeline.stages.payloads import dumps, eos_payload
from pipeline.stages.sink_base import (
    FrameResult,
    OutputInUseError,
    Sink,
    _AtomicFile,
    _count_lines,
    _drop_torn_tail,
    _last_line,
    _OutputLock,
)
from streamdet.messages import EndOfStream

__all__ = ["RETRY_S", "JsonlRotate", "JsonlSink", "parse_rotate"]

RETRY_S = 1.0
"""After a write error, the sink tries a new file at most this often (seconds)."""

_DURATION_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_BYTES = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
_ROTATE_RE = re.compile(r"(?P<n>[0-9]+)(?:(?P<time>[smhd])|(?P<size>[kKmMgG][bB]))")
_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class JsonlRotate:
    """When a rotated JSONL sink starts a new file; exactly one field is set.

    Attributes:
        seconds: a new file once the current one is that old (wall-clock seconds), or None.
        max_bytes: a new file once the current one holds that many bytes (between lines), or None.

    Raises:
        ValueError: if neither or both are set, or one is not positive.
    """

    seconds: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.max_bytes is None):
            raise ValueError("JsonlRotate: set exactly one of seconds and max_bytes")
        if (self.seconds is not None and not self.seconds > 0) or (self.max_bytes is not None and self.max_bytes <= 0):
            raise ValueError(f"JsonlRotate: the limit must be above 0 ({self})")


def parse_rotate(text: str) -> JsonlRotate:
    """Parse a rotation setting: a duration ``<N>s|m|h|d`` or a size ``<N>KB|MB|GB``.

    Sizes are binary (``1KB`` = 1024 bytes); ``N`` is a whole number above 0. Time units are
    lower case (``m`` is minutes), size units any case (``10mb``); blanks around are ignored.

    Args:
        text: e.g. ``"1h"``, ``"30m"``, ``"100MB"``.

    Returns:
        The parsed rotation.

    Raises:
        ValueError: naming the bad value and the accepted forms.
    """
    m = _ROTATE_RE.fullmatch(text.strip())
    n = int(m["n"]) if m else 0
    if m is None or n <= 0:
        raise ValueError(f"rotate {text!r}: expected a duration <N>s|m|h|d (e.g. 30m, 1h) or a size "
                         f"<N>KB|MB|GB (e.g. 100MB), N a whole number above 0")
    if m["time"]:
        return JsonlRotate(seconds=float(n * _DURATION_S[m["time"]]))
    return JsonlRotate(max_bytes=n * _SIZE_BYTES[m["size"].lower()])


class _RawFile(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...

    def truncate(self, size: int, /) -> int: ...

    def close(self) -> None: ...


def _open_raw(path: Path, *, append: bool) -> _RawFile:
    """Open ``path`` unbuffered for writing (the sink does its own buffering; tests replace this)."""
    return open(path, "ab" if append else "wb", buffering=0)  # noqa: SIM115 (closed by the sink)


def _default_warn(line: str) -> None:
    say(f"warning: {line}")


class _Segment:
    """One output file: its final and temporary names, start time, bytes and lines on disk."""

    def __init__(self, path: Path, start: float, size: int = 0) -> None:
        self.file = _AtomicFile(path)
        self.start = start
        self.size = size
        self.lines = 0
        self.finished = False


class JsonlSink(Sink):
    """Writes every published object (detections and EOS) as one JSON line.

    A clean run without rotation writes exactly what it always did: one
    ``json.dumps(payload, separators=(",", ":"), allow_nan=False)`` line per object, under a
    temporary name renamed to ``path`` by :meth:`close`. A finished run's file ends with one EOS
    line per source.

    With rotation, each file (segment) is named ``<stem>-<YYYYmmddTHHMMSSZ><suffix>`` after the UTC
    time it started (``-2``, ``-3``... if taken), written as ``.<that name>.partial<suffix>`` and
    renamed into place when finished (rotation or close).

    Write errors (e.g. a full disk) never raise from :meth:`write` or :meth:`end_of_stream`: the
    first one of an episode is reported through ``warn``, the lines that cannot be written are
    counted in :attr:`lines_not_written`, and at most every :data:`RETRY_S` the sink opens a new
    segment (without rotation: reopens the partial file in append mode) and tries again; a success
    is reported through ``warn`` too. The files only ever hold whole lines.

    Args:
        path: the ``.jsonl`` file (with rotation: the name the segment names derive from).
        flush_ms: 0: hand every line to the kernel right away; above 0: when at least that many
            milliseconds passed since the last flush (checked on each line; a killed process loses
            at most that window).
        rotate: None (one file), or a duration or size as :func:`parse_rotate` reads it (or parsed).
        resume: after a crash, append to the partial file left behind (with rotation: the newest
            unfinished segment; older unfinished ones are finished), dropping a torn last line;
            False: start a new file as a first run does.
        after_finish: with ``resume``, the crashed sink's run had already published everything (the
            ledger's finished flag: it died while closing). Only the partial files it left are
            finished; no new file is started, so a file it already renamed into place is kept as it is.
        warn: called with one line per write-error episode and per recovery (default: printed to
            stderr as ``warning: ...``).
        clock: wall-clock time in seconds (rotation by time, the flush window and the retry delay;
            tests inject one).

    Attributes:
        lines: lines written to the file(s) so far (handed to the kernel).
        lines_not_written: lines lost to write errors.

    Raises:
        ValueError: for a negative ``flush_ms`` or a bad ``rotate`` value.
    """

    def __init__(self, *, path: str | os.PathLike[str], flush_ms: float = 0.0,
                 rotate: str | JsonlRotate | None = None, resume: bool = False, after_finish: bool = False,
                 warn: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        if not flush_ms >= 0:
            raise ValueError(f"flush_ms {flush_ms}: expected 0 (every line) or more milliseconds")
        self.path = Path(path)
        self.flush_ms = float(flush_ms)
        self.rotate = parse_rotate(rotate) if isinstance(rotate, str) else rotate
        self.resume = resume
        self.after_finish = after_finish
        self._warn = warn or _default_warn
        self._clock = clock
        self.lines = 0
        self.lines_not_written = 0
        self._segments: list[_Segment] = []
        self._fh: _RawFile | None = None
        self._buf: list[bytes] = []  # lines not yet handed to the kernel
        self._buf_bytes = 0
        self._last_flush = 0.0
        self._failed_at: float | None = None  # set while a write-error episode lasts
        self._episode_lost = 0
        self._state = "new"  # new -> open -> closed
        self.resumed_last_line: bytes | None = None  # with ``resume``: the partial file's last line
        self._lock = _OutputLock(self.path)  # held from open() to close() or abandon()

    # ---------------------------------------------------------------- summary
    def describe(self) -> str:
        """``jsonl <path>: N lines`` (with rotation: each file and its lines; lines not written, if any)."""
        if self.rotate is None or not self._segments:
            text = f"jsonl {self.path}: {self.lines} lines"
        else:
            text = "jsonl " + ", ".join(f"{s.file.path} ({s.lines} lines)" for s in self._segments)
        if self.lines_not_written:
            text += f", {self.lines_not_written} lines not written"
        return text

    # ---------------------------------------------------------------- files
    def _segment_path(self, start: float) -> Path:
        base = f"{self.path.stem}-{time.strftime(_STAMP, time.gmtime(start))}"
        used = {s.file.path for s in self._segments}
        k = 1
        while True:
            p = self.path.with_name(f"{base}{'' if k == 1 else f'-{k}'}{self.path.suffix}")
            if p not in used and not p.exists() and not _AtomicFile(p).tmp.exists():
                return p
            k += 1

    def _new_segment(self, now: float) -> None:
        """Start a new file (truncating a stale partial of the same name)."""
        seg = _Segment(self._segment_path(now) if self.rotate else self.path, now)
        try:
            self._fh = _open_raw(seg.file.tmp, append=False)
        except OSError as e:  # named as the user named it, not by its temporary name
            raise OSError(e.errno, e.strerror, str(seg.file.path)) from e
        self._segments.append(seg)

    def _reopen(self, seg: _Segment) -> None:
        """Append to ``seg``'s partial file after dropping a torn last line."""
        seg.size = _drop_torn_tail(seg.file.tmp) if seg.file.tmp.exists() else 0
        self._fh = _open_raw(seg.file.tmp, append=True)

    def _resume(self, seg: _Segment) -> None:
        """Reopen a partial file a dead sink left; its lines count (the summary reports the file's lines)."""
        self._reopen(seg)
        if seg.size:
            seg.lines = _count_lines(seg.file.tmp)
            self.lines += seg.lines
            self.resumed_last_line = _last_line(seg.file.tmp)
        self._segments.append(seg)

    def _unfinished(self) -> list[tuple[float, int, Path]]:
        """Partial segments left in the directory: ``(start, k, final path)``, oldest first."""
        stem, suffix = re.escape(self.path.stem), re.escape(self.path.suffix)
        pattern = re.compile(rf"\.{stem}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?\.partial{suffix}")
        found = []
        for p in self.path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                start = float(calendar.timegm(time.strptime(m[1], _STAMP)))
                name = f"{self.path.stem}-{m[1]}{f'-{m[2]}' if m[2] else ''}{self.path.suffix}"
                found.append((start, int(m[2] or 1), p.with_name(name)))
        return sorted(found)

    def open(self) -> None:
        """Take the output's lock and create (or with ``resume``, reopen) the temporary file.

        Raises:
            OutputInUseError: if another sink (another run) holds the lock: nothing is touched.
            OSError: if it cannot be created, or ``path`` is a directory.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.rotate is None:
            _AtomicFile(self.path).check_target()
        with self._lock.taking():
            self._open()

    def _open(self) -> None:
        now = self._clock()
        self._last_flush = now
        if self.resume and self.rotate is None and _AtomicFile(self.path).tmp.exists():
            self._resume(_Segment(self.path, now))
        elif self.resume and self.rotate is not None and (left := self._unfinished()):
            *older, (start, _, newest) = left
            for _, _, p in older:  # never appended to again: finish them
                _drop_torn_tail(_AtomicFile(p).tmp)
                _AtomicFile(p).commit()
            self._resume(_Segment(newest, start))
        elif self.resume and self.after_finish:  # the dead sink had finished its file(s): nothing more to write
            if self.rotate is None and self.path.is_file():  # what the summary line reports: the file's lines
                self.lines = _count_lines(self.path)
            self._state = "closed"
            return
        else:
            self._new_segment(now)
        self._state = "open"

    def _finish(self, seg: _Segment) -> None:
        """Close the current handle and rename ``seg`` into place.

        Raises:
            OSError: if closing or renaming fails.
        """
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        seg.finished = True
        seg.file.commit()

    # ---------------------------------------------------------------- writing
    def _flush(self, now: float) -> bool:
        """Hand the buffered lines to the kernel; on an error, keep whole lines only and fail.

        Returns:
            Whether everything was written.
        """
        if not self._buf or self._fh is None:
            return self._fh is not None
        seg = self._segments[-1]
        data = b"".join(self._buf)
        pending = len(self._buf)
        self._buf.clear()
        self._buf_bytes = 0
        done = 0
        try:
            while done < len(data):
                done += self._fh.write(memoryview(data)[done:]) or 0
        except OSError as e:
            whole = data.rfind(b"\n", 0, done) + 1
            kept = data.count(b"\n", 0, whole)
            if whole != done:
                try:
                    self._fh.truncate(seg.size + whole)
                except OSError:
                    pass  # dropped when the file is reopened (or resumed)
            self._count_written(seg, whole, kept)
            self._fail(e, now, pending - kept)
            return False
        self._count_written(seg, done, pending)
        self._last_flush = now
        return True

    def _count_written(self, seg: _Segment, nbytes: int, lines: int) -> None:
        seg.size += nbytes
        seg.lines += lines
        self.lines += lines

    def _fail(self, e: OSError, now: float, lost: int) -> None:
        """Start (or continue) a write-error episode: count, warn once, drop the handle."""
        seg = self._segments[-1] if self._segments else None
        if self._failed_at is None:
            self._episode_lost = 0
            name = seg.file.path if seg is not None else self.path
            self._warn(f"{name}: cannot write ({e.strerror or e}); lines are counted as not written until "
                       "it can write again")
        self._failed_at = now
        self._count_lost(lost)
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        if self.rotate is not None and seg is not None and not seg.finished:
            seg.finished = True
            try:  # a rotated segment is never reopened: finish it now (truncating takes no space)
                if _drop_torn_tail(seg.file.tmp) == 0:  # not a line in it: no file
                    seg.file.tmp.unlink()
                    self._segments.remove(seg)
                else:
                    seg.file.commit()
            except OSError:
                pass  # stays a partial file; a resumed sink finishes it

    def _count_lost(self, n: int) -> None:
        self.lines_not_written += n
        self._episode_lost += n

    def _retry(self, now: float) -> bool:
        """In a write-error episode: open a new segment if :data:`RETRY_S` passed. Returns success."""
        assert self._failed_at is not None
        if 0 <= now - self._failed_at < RETRY_S:
            return False
        try:
            if self.rotate is not None or not self._segments:
                self._new_segment(now)
            else:
                self._reopen(self._segments[-1])
        except OSError as e:
            self._fail(e, now, 0)
            return False
        return True

    def _line(self, payload: Mapping[str, Any] | bytes) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.path}: the JSONL sink is not open")
        data = (payload if isinstance(payload, bytes) else dumps(payload)) + b"\n"
        now = self._clock()
        force = False
        if self._failed_at is not None:
            if not self._retry(now):
                self._count_lost(1)
                return
            force = True
        elif self.rotate is not None and self._rotation_due(now):
            if not self._rotate_now(now):
                self._count_lost(1)
                return
        self._buf.append(data)
        self._buf_bytes += len(data)
        elapsed_ms = (now - self._last_flush) * 1000.0
        if force or self.flush_ms == 0 or elapsed_ms >= self.flush_ms or elapsed_ms < 0:
            if self._flush(now) and force:
                self._warn(f"{self._segments[-1].file.path}: writing again after {self._episode_lost} lines "
                           "not written")
                self._failed_at = None
                self._episode_lost = 0

    def _rotation_due(self, now: float) -> bool:
        assert self.rotate is not None
        seg = self._segments[-1]
        if self.rotate.max_bytes is not None:
            return seg.size + self._buf_bytes >= self.rotate.max_bytes
        assert self.rotate.seconds is not None
        return now - seg.start >= self.rotate.seconds

    def _rotate_now(self, now: float) -> bool:
        """Finish the current segment and start the next. Returns False in a write-error episode."""
        seg = self._segments[-1]
        if seg.size + self._buf_bytes == 0 and self._fh is not None:  # nothing in it: start it over, named now
            try:
                self._fh.close()
                self._fh = None
                seg.file.tmp.unlink()
                self._segments.pop()
                self._new_segment(now)
            except OSError as e:
                self._fail(e, now, 0)
                return False
            return True
        if not self._flush(now):
            return False
        try:
            self._finish(seg)
            self._new_segment(now)
        except OSError as e:
            self._fail(e, now, 0)
            return False
        return True

    def write(self, result: FrameResult) -> None:
        """Append the frame's payload (never raises for a write error: see the class)."""
        self._line(result.json())

    def write_json(self, source_id: str, payload_json: bytes) -> None:
        """Append an already encoded detections payload (never raises for a write error)."""
        self._line(payload_json)

    def end_of_stream(self, eos: EndOfStream) -> None:
        """Append the EOS payload (never raises for a write error: see the class)."""
        self._line(eos_payload(eos))

    def abandon(self) -> None:
        """Flush and close, the file left under its temporary name for a restarted sink (never raises)."""
        was_open, self._state = self._state == "open", "closed"
        if was_open:
            self._flush(self._clock())
            fh, self._fh = self._fh, None
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()
        self._lock.release()

    def finish_left(self) -> bool:
        """Rename what a dead sink left into place (a torn last line cut; for the runner). Whether there was any.

        Files another run holds the lock of are its own: left alone (False).

        Raises:
            OSError: if a file cannot be renamed.
        """
        left = _AtomicFile(self.path).tmp.exists() if self.rotate is None else bool(self._unfinished())
        if left:
            self.resume, self.after_finish = True, False
            try:
                self.open()
            except OutputInUseError:
                return False
            self.close()
        return left

    def close(self) -> None:
        """Flush, close and rename into place (idempotent).

        Lines that cannot be flushed are counted as not written (and warned about). In a write-error
        episode without rotation, the partial file (whole lines) is still renamed into place.

        Raises:
            OSError: if closing or renaming the file fails.
        """
        try:
            self._close()
        finally:
            self._lock.release(remove=True)

    def _close(self) -> None:
        if self._state != "open":
            self._state = "closed"
            return
        self._state = "closed"
        self._flush(self._clock())
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.finished:
            return
        if self._fh is not None:
            self._finish(seg)
        elif seg.file.tmp.exists():  # write-error episode without rotation: keep the whole lines written
            seg.finished = True
            seg.file.commit()
