"""What every sink shares: the :class:`Sink` interface, :class:`FrameResult`, the temporary-name file.

The sinks themselves live in :mod:`pipeline.stages.sinks` (ZeroMQ PUB, and the re-exports),
:mod:`pipeline.stages.jsonl_sink` and :mod:`pipeline.stages.video_sink`; they import this module,
never each other, so the modules form no import cycle.
"""

from __future__ import annotations

import contextlib
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.stages.payloads import dumps
from streamdet.messages import EndOfStream, FrameRecord

__all__ = ["FrameResult", "Sink"]


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
