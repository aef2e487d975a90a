"""Messages of the runtime control plane (``--control-port``, :mod:`pipeline.control`).

* runner -> postprocess (events socket): :class:`SourceAddedMsg`, a source started while the
  pipeline runs (which ledger slot, model chain, frame pool and credit endpoint it has);
* postprocess -> runner (live socket): :class:`PreviewFrameMsg` (one annotated frame as JPEG,
  only while someone watches) and :class:`StatsSnapshotMsg` (per-source figures and the
  Prometheus exposition for ``GET /sources`` and ``GET /metrics``).

They use the one wire codec of :mod:`streamdet.messages.codec`, like every other message.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamdet.messages.codec import MsgKind, WireMessage, wire
from streamdet.messages.enums import check_count, check_hw, check_nonneg, check_source_id


@wire(MsgKind.SOURCE_ADDED)
@dataclass(frozen=True, slots=True)
class SourceAddedMsg(WireMessage):
    """A source added at runtime (runner -> postprocess events socket), before its decoder starts.

    Attributes:
        source_id: the new source.
        ledger_index: its slot in the run's ledger (publication order, counters).
        live: whether it is a live stream (publishes the newest frames) or a file (every frame, in order).
        chain: the model chain serving it (0: the first model).
        pool: base name of its frame pool (every generation of it).
        credit_endpoint: where its decoder takes frame-slot credits back.
        fps: its nominal frame rate (0: unknown).
    """

    source_id: str
    ledger_index: int
    live: bool
    chain: int
    pool: str
    credit_endpoint: str
    fps: float = 0.0

    def __post_init__(self) -> None:
        check_source_id(self.source_id)
        check_count(self.ledger_index, "ledger_index")
        check_count(self.chain, "chain")
        check_nonneg(self.fps, "fps")
        if not self.pool or not self.credit_endpoint:
            raise ValueError(f"expected a pool name and a credit endpoint, got {self.pool!r}, {self.credit_endpoint!r}")


@wire(MsgKind.PREVIEW_FRAME)
@dataclass(frozen=True, slots=True)
class PreviewFrameMsg(WireMessage):
    """One annotated frame for the preview page (postprocess -> runner live socket).

    Attributes:
        source_id: its source.
        frame_index: its index in the source.
        frame_hw: ``(height, width)`` of the JPEG, pixels (scaled down from the decoded frame).
        jpeg: the JPEG bytes (boxes, labels and masks drawn as in the annotated-video sink).
    """

    source_id: str
    frame_index: int
    frame_hw: tuple[int, int]
    jpeg: bytes

    def __post_init__(self) -> None:
        check_source_id(self.source_id)
        check_count(self.frame_index, "frame_index")
        object.__setattr__(self, "frame_hw", check_hw(self.frame_hw, "frame_hw"))
        if not isinstance(self.jpeg, bytes) or not self.jpeg.startswith(b"\xff\xd8"):
            raise ValueError("expected JPEG bytes (starting with FF D8)")


@wire(MsgKind.STATS_SNAPSHOT)
@dataclass(frozen=True, slots=True)
class StatsSnapshotMsg(WireMessage):
    """The postprocess stage's current figures (postprocess -> runner live socket, about twice a second).

    Attributes:
        sources_json: JSON object ``{source_id: {state, fps, frames, dropped, latency_p50_ms,
            latency_p99_ms, ...}}`` over the last few seconds (:meth:`pipeline.stages.stats.LiveStats.snapshot`).
        metrics: the Prometheus text exposition of the stage's registry (what ``--metrics-port`` serves).
    """

    sources_json: bytes
    metrics: bytes
