"""The latest preview frame of each source, and who watches it (shared by the runner and the HTTP server).

The runner's thread puts the JPEGs that arrive from the postprocess stage; each viewer (a
WebSocket or an MJPEG stream) waits for a frame newer than the last one it sent. The viewer counts
go to the ledger (:meth:`pipeline.control.plane.ControlPlane.step`): with nobody watching a
source, its frames are never encoded.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class PreviewHub:
    """Latest JPEG per source with a sequence number; viewer counts per source (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[str, tuple[int, bytes]] = {}
        self._viewers: Counter[str] = Counter()
        self._closed = False
        self.received = 0
        """Preview frames received so far (all sources)."""

    def put(self, source_id: str, jpeg: bytes) -> None:
        """Store a source's newest preview frame."""
        with self._lock:
            seq = self._frames.get(source_id, (0, b""))[0] + 1
            self._frames[source_id] = (seq, jpeg)
            self.received += 1

    def latest(self, source_id: str, after: int = 0) -> tuple[int, bytes] | None:
        """The newest frame ``(sequence, jpeg)`` if its sequence is above ``after``, else None."""
        with self._lock:
            item = self._frames.get(source_id)
        return item if item is not None and item[0] > after else None

    def forget(self, source_id: str) -> None:
        """Drop a source's frame (it ended)."""
        with self._lock:
            self._frames.pop(source_id, None)

    @contextmanager
    def watching(self, source_id: str) -> Iterator[None]:
        """Count one viewer of the source for the duration."""
        with self._lock:
            self._viewers[source_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._viewers[source_id] -= 1
                if self._viewers[source_id] <= 0:
                    del self._viewers[source_id]

    def viewers(self, source_id: str) -> int:
        """Viewers watching the source now."""
        with self._lock:
            return self._viewers.get(source_id, 0)

    @property
    def closed(self) -> bool:
        """Whether the run is over (streams end)."""
        return self._closed

    def close(self) -> None:
        """End every stream."""
        self._closed = True
