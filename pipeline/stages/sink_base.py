"""What every sink shares: the :class:`Sink` interface, :class:`FrameResult`, the temporary-name file.

Also the lock that keeps a second run off an output file in use (:class:`_OutputLock`) and the
line-file helpers a resumed JSONL file is read back with.

The sinks themselves live in :mod:`pipeline.stages.sinks` (ZeroMQ PUB, and the re-exports),
:mod:`pipeline.stages.jsonl_sink` and :mod:`pipeline.stages.video_sink`; they import this module,
never each other, so the modules form no import cycle.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from pipeline.stages.base import StageError
from pipeline.stages.payloads import dumps
from streamdet.messages import EndOfStream, FrameRecord

__all__ = ["FrameResult", "OutputInUseError", "Sink"]


@dataclass(frozen=True, eq=False)
class FrameResult:
    """One frame's detections on its way to the sinks.

    Attributes:
        record: the frame's record (ids, PTS, letterbox, stage timings).
        detections: a ``streamdet.postprocess.Detections`` in frame pixels.
        payload: the published JSON object (:func:`~pipeline.stages.payloads.detections_payload`).
        pixels: ``(H, W, 3)`` uint8 RGB frame when a sink needs pixels, else None.
        payload_json: ``payload`` encoded once as compact JSON (the PUB message and the JSONL line
            are these bytes), or None to let each sink encode it.
        children: secondary models' results (``streamdet.cascade.Children``) by detection index
            (a cascade), or None.
    """

    record: FrameRecord
    detections: Any
    payload: dict[str, Any]
    pixels: npt.NDArray[np.uint8] | None = None
    payload_json: bytes | None = None
    children: Any = None

    def json(self) -> bytes:
        """The payload as compact JSON bytes (``payload_json`` when given)."""
        return self.payload_json if self.payload_json is not None else dumps(self.payload)


class Sink(ABC):
    """Where results go; lifecycle ``open()`` -> ``write()``/``end_of_stream()``... -> ``close()``."""

    needs_pixels: bool = False
    """Whether :meth:`write` needs ``FrameResult.pixels`` (keeps frame slots until it is done)."""

    @abstractmethod
    def describe(self) -> str:
        """Where this sink's output went, for the run summary."""

    @abstractmethod
    def open(self) -> None:
        """Acquire the output (bind, create a file).

        Raises:
            TransportError: for a socket that cannot be bound.
            OSError: for a file that cannot be created.
        """

    @abstractmethod
    def write(self, result: FrameResult) -> None:
        """Consume one frame's result."""

    def write_json(self, source_id: str, payload_json: bytes) -> None:
        """Consume one frame's detections payload, already encoded (frames relayed from a cluster worker).

        Raises:
            NotImplementedError: for sinks that need the frame itself (the annotated video).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot take relayed messages")

    @abstractmethod
    def end_of_stream(self, eos: EndOfStream) -> None:
        """A source ended (after its last :meth:`write`)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release everything (idempotent)."""

    def abandon(self) -> None:
        """Flush and release everything, leaving files to be resumed: the stage failed and may be restarted.

        What was written stays, under its temporary name, for the restarted sink (``resume``) to
        continue, as after a crash; nothing is finished at its path. Default: :meth:`close`
        (sinks without files). Never raises.
        """
        with contextlib.suppress(Exception):
            self.close()

    def status(self, payload: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """A live source's status event (:func:`status_payload`); ignored unless the sink publishes it."""

    def stats(self, payload: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """The periodic statistics; ignored unless the sink publishes them."""


class _AtomicFile:
    """A file written under a temporary name (``.<stem>.partial<suffix>``) and renamed into place when done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")

    def check_target(self) -> None:
        """Raise ``IsADirectoryError`` naming ``path`` if a directory is there: the file could never be put in place.

        Checked when a sink opens: the rename at its end failed with the run done (every restart of
        the postprocess stage after writing the whole file again).
        """
        if self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.path))

    def commit(self) -> None:
        os.replace(self.tmp, self.path)


class OutputInUseError(StageError):
    """An output file another sink (another run, as a rule) is writing: ``<path>: in use by another run (pid N)``."""


def _lock_holder(fd: int) -> int | None:
    """The pid holding a POSIX lock on the file open as ``fd``, from ``/proc/locks`` (None if not found there)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:  # "1: POSIX  ADVISORY  WRITE <pid> <maj>:<min>:<inode> 0 EOF" (waiters: "1: -> POSIX")
                fields = line.split()
                if fields[1:2] == ["POSIX"] and fields[5:6] == [key]:
                    return int(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


class _OutputLock:
    """An exclusive lock on ``.<name>.lock`` beside an output, held while a sink may write it.

    The kernel releases it when the holding process dies, however it dies, so the restarted sink of
    the same run takes it again and resumes what its predecessor left, and so does a later run after
    a crash. The lock file stays empty (nothing to fill a full disk with) and is removed when the
    sink finishes; a killed holder leaves it behind, to be taken (and removed) by the next sink.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to the process, so a process's later
    sink of the same file takes it over (the suite stands for a killed sink with one never closed,
    in the same process), and it also works over NFS. Closing any descriptor of the lock file
    releases it, so nothing but this class opens that file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.with_name(f".{path.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (nothing if held already).

        Raises:
            OutputInUseError: if another sink holds it (naming ``path``, and the holder's pid if known).
            OSError: naming ``path``, if the lock file cannot be created.
        """
        while self._fd is None:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    pid = _lock_holder(fd)
                    os.close(fd)
                    held_by = f" (pid {pid})" if pid else ""
                    raise OutputInUseError(f"{self.path}: in use by another run{held_by}") from None
                # (a file system without locks, ENOLCK: written unlocked, as before)
            try:  # a holder that finished meanwhile removed the file it locked: lock the one in place
                if os.path.samestat(os.fstat(fd), os.stat(self.file)):
                    self._fd = fd
                    continue
            except OSError:
                pass
            os.close(fd)

    def release(self, *, remove: bool = False) -> None:
        """Release the lock (nothing if not held); ``remove``: the sink is done, remove the file too. Never raises."""
        fd, self._fd = self._fd, None
        if fd is not None:
            if remove:  # (while still locked: a sink that opened it before is told by acquire's check)
                with contextlib.suppress(OSError):
                    self.file.unlink()
            with contextlib.suppress(OSError):
                os.close(fd)

    @contextlib.contextmanager
    def taking(self) -> Iterator[None]:
        """Take the lock for what the body opens; released again if the body raises (nothing was opened)."""
        self.acquire()
        try:
            yield
        except BaseException:
            self.release()
            raise


# ---------------------------------------------------------------- line files (a resumed JSONL file)
def _last_newline(f: BinaryIO, end: int) -> int:
    """The offset of the last newline before offset ``end`` of an open file, or -1 (read backwards in 64 KiB steps)."""
    pos = end
    while pos > 0:
        step = min(pos, 65536)
        f.seek(pos - step)
        i = f.read(step).rfind(b"\n")
        if i >= 0:
            return pos - step + i
        pos -= step
    return -1


def _last_line(path: Path) -> bytes | None:
    """The last line of a file that ends with a newline (without the newline); None for an empty file."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END) - 1  # the final newline
        if end < 0:
            return None
        start = _last_newline(f, end) + 1
        f.seek(start)
        return f.read(end - start)


def _count_lines(path: Path) -> int:
    """The newline-terminated lines in a file."""
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _drop_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline (a line cut short by a crash or a full disk).

    Returns:
        The file's size afterwards.
    """
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep = _last_newline(f, end) + 1
        if keep != end:
            f.truncate(keep)
    return keep
