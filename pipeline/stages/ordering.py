"""Exactly-once, in-order publication per source, across stage restarts (used by the postprocess stage).

After a stage restart the decoders send their unpublished frames again (see
:mod:`pipeline.supervise`), so the postprocess stage may see a frame twice, or a frame before an
earlier one that is still on its way. :class:`PublishOrder` decides for each arriving frame:

* a **file** source publishes frame ``i`` only when every frame before it is published: a frame
  ahead of a gap is held (at most the decoder's slot count per source, since held frames are not
  handed back) and published as soon as the gap is filled; a frame already published is a
  duplicate;
* a **live** source publishes every frame newer than the last published one; the frames skipped
  over are counted as lost (they would arrive too late), a frame at or before the last published
  one is a duplicate (or late).

The EOS of a file source waits, like a frame, until every frame it counts is published. The last
published index and the published EOS are recorded in the :class:`~pipeline.supervise.Ledger`, so
a restarted postprocess stage carries on where the dead one stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline.supervise import Ledger
from streamdet.messages import EndOfStream


class Verdict(Enum):
    """What to do with an arriving frame."""

    PUBLISH = "publish"  # publish it now (then :meth:`PublishOrder.ready` may release held ones)
    HOLD = "hold"  # ahead of a gap (file source): kept until the gap is filled
    DUPLICATE = "duplicate"  # published already (or, live, too late): drop it, hand its slot back


@dataclass
class _Source:
    live: bool
    index: int  # in the ledger
    next_index: int = 0
    eos_done: bool = False
    held: dict[int, Any] = field(default_factory=dict)
    held_eos: EndOfStream | None = None
    lost: int = 0
    duplicates: int = 0


class PublishOrder:
    """Per-source publication order (see the module docstring).

    Args:
        sources: ``(source_id, is_live)`` of every source, in ledger order.
        ledger: the run's ledger (the state survives a restart of this stage); None: kept here only.
        strict: publish file sources strictly in order (False: every source like a live one; with
            ``tcp://`` transport frames travel inline, so frames lost in a crash cannot be sent again).
    """

    def __init__(self, *, sources: tuple[tuple[str, bool], ...], ledger: Ledger | None = None,
                 strict: bool = True, indices: tuple[int, ...] = ()) -> None:
        self.ledger = ledger
        self.strict = strict
        self._sources: dict[str, _Source] = {}
        self._forgotten: set[str] = set()  # ended and forgotten: a late copy of theirs is a duplicate
        for i, (sid, live) in enumerate(sources):
            self.add(sid, live, indices[i] if indices else i)

    def add(self, source_id: str, live: bool, index: int) -> None:
        """Follow a source (at start-up, or added at runtime): ``index`` is its slot in the ledger."""
        st = _Source(live=live or not self.strict, index=index)
        if self.ledger is not None:
            st.next_index = self.ledger.published(index) + 1
            st.eos_done = self.ledger.eos_done(index)
        self._sources[source_id] = st
        self._forgotten.discard(source_id)

    def forget(self, source_id: str) -> None:
        """Stop following a source whose EOS was published (its ledger slot may go to another source).

        A late copy of one of its frames or of its EOS (a replay) is then a duplicate, until a source
        with that id is added again.
        """
        if self._sources.pop(source_id, None) is not None:
            self._forgotten.add(source_id)

    def index(self, source_id: str) -> int:
        """The source's slot in the ledger (-1: not announced)."""
        st = self._sources.get(source_id)
        return st.index if st is not None else -1

    def _get(self, source_id: str) -> _Source:
        st = self._sources.get(source_id)
        if st is None:
            # a source not announced (unit tests): a file source; a forgotten one: ended (late copies are duplicates)
            st = _Source(live=not self.strict, index=-1, eos_done=source_id in self._forgotten)
            if not st.eos_done:
                self._sources[source_id] = st
        return st

    @property
    def all_ended(self) -> bool:
        """Whether every known source's EOS is published."""
        return all(st.eos_done for st in self._sources.values())

    def ended(self, source_id: str) -> bool:
        """Whether the source's EOS is published."""
        return self._get(source_id).eos_done

    def next_index(self, source_id: str) -> int:
        """The index the source's next published frame will have (frames published so far, for a file source)."""
        return self._get(source_id).next_index

    def lost(self, source_id: str) -> int:
        """Live frames of the source counted as lost so far."""
        return self._get(source_id).lost

    def duplicates(self, source_id: str) -> int:
        """Frames of the source dropped as duplicates so far."""
        return self._get(source_id).duplicates

    def frame(self, source_id: str, frame_index: int, item: Any) -> tuple[Verdict, int]:
        """Classify an arriving frame.

        Args:
            source_id: its source.
            frame_index: its index.
            item: what to keep if it is held (returned later by :meth:`ready`).

        Returns:
            ``(verdict, lost)``: ``lost`` live frames were skipped over to publish this one.
        """
        st = self._get(source_id)
        if frame_index < st.next_index or st.eos_done:
            st.duplicates += 1
            return Verdict.DUPLICATE, 0
        if st.live:
            lost = frame_index - st.next_index
            st.lost += lost
            return Verdict.PUBLISH, lost
        if frame_index == st.next_index:
            return Verdict.PUBLISH, 0
        if frame_index not in st.held:
            st.held[frame_index] = item
        else:
            st.duplicates += 1
        return Verdict.HOLD, 0

    def published(self, source_id: str, frame_index: int, detections: int = 0) -> None:
        """Record that a frame (with ``detections`` detections) went to the sinks."""
        st = self._get(source_id)
        st.next_index = frame_index + 1
        st.held.pop(frame_index, None)
        if self.ledger is not None and st.index >= 0:
            self.ledger.set_published(st.index, frame_index)
            self.ledger.count_published(st.index, detections)

    def skip(self, source_id: str, frame_index: int) -> None:
        """Forget a held frame that cannot be published after all (its pool is gone; it will come again)."""
        self._get(source_id).held.pop(frame_index, None)

    def ready(self, source_id: str) -> Any | None:
        """The held frame that is next in order, if any (publish it, then call :meth:`published`)."""
        st = self._get(source_id)
        return st.held.get(st.next_index)

    def eos(self, eos: EndOfStream) -> tuple[bool, int]:
        """Classify an arriving EOS.

        Returns:
            ``(publish_now, lost)``: False when it is a duplicate or (a file source) frames it counts
            are still missing, in which case it is held and :meth:`ready_eos` returns it later.
        """
        st = self._get(eos.source_id)
        if st.eos_done:
            st.duplicates += 1
            return False, 0
        if st.live or eos.frames <= st.next_index:
            lost = max(0, eos.frames - st.next_index) if st.live else 0
            st.lost += lost
            return True, lost
        st.held_eos = eos
        return False, 0

    def ready_eos(self, source_id: str) -> EndOfStream | None:
        """The held EOS once every frame it counts is published."""
        st = self._get(source_id)
        if st.held_eos is not None and not st.eos_done and st.held_eos.frames <= st.next_index:
            return st.held_eos
        return None

    def eos_published(self, source_id: str) -> None:
        """Record that the source's EOS went to the sinks."""
        st = self._get(source_id)
        st.eos_done = True
        st.held_eos = None
        st.held.clear()
        if self.ledger is not None and st.index >= 0:
            self.ledger.set_eos_done(st.index)


def catch_up_with_last_line(order: PublishOrder, last_line: bytes) -> str | None:
    """Record as published what the dead stage's last JSONL line shows it published.

    The postprocess stage writes a frame's messages (PUB, then the JSONL line) and records it in
    the ledger right after; a SIGKILL between the two leaves the ledger one frame behind the file.
    A restarted stage that resumes the file passes its last complete line here: a detections line
    for the next frame of its source (or an EOS line not yet recorded) is recorded as published,
    so the decoder's replay of that frame is dropped as a duplicate instead of written twice.

    Args:
        order: the restarted stage's publication state (from the ledger).
        last_line: the last complete line of the resumed JSONL file, without its newline.

    Returns:
        What was caught up (``"source_id frame N"`` or ``"source_id eos"``), or None.
    """
    try:
        msg = json.loads(last_line)
    except ValueError:
        return None
    if not isinstance(msg, dict):
        return None
    schema, sid = str(msg.get("schema", "")), msg.get("source_id")
    if not isinstance(sid, str) or order.index(sid) < 0 or order.ended(sid):
        return None
    if schema.startswith("streamdet.detections/"):
        index = msg.get("frame_index")
        if isinstance(index, int) and index >= order.next_index(sid):
            order.published(sid, index, len(msg.get("detections") or ()))
            return f"{sid} frame {index}"
    elif schema.startswith("streamdet.eos/"):
        order.eos_published(sid)
        return f"{sid} eos"
    return None
