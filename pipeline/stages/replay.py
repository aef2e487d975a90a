"""A decoder's record of the frames it has sent and not yet seen published, for replays after a restart.

Used by :class:`~pipeline.stages.decode.DecodeStage` (see :mod:`pipeline.supervise` for the
protocol): every frame sent from a slot stays recorded until the postprocess stage hands that
slot back with a credit tagged with the frame's index; when the model chain's replay generation
changes in the ledger (a shared stage was restarted), every recorded frame is due again, in frame
order, followed by the EOS if it was sent.
"""

from __future__ import annotations

from pipeline.supervise import Ledger
from streamdet.messages import CreditMsg, EndOfStream, FrameMsg


class ReplayBook:
    """The frames a decoder has lent out of its pool, by slot.

    Args:
        ledger: the run's ledger (None: no supervision: nothing is ever due again, the stage starts at 0).
        chain: the source's model chain in the ledger.
        source: the source's index in the ledger.
    """

    def __init__(self, *, ledger: Ledger | None, chain: int = 0, source: int = 0) -> None:
        self.ledger = ledger
        self.chain = chain
        self.source = source
        self.inflight: dict[int, FrameMsg] = {}
        self.eos: EndOfStream | None = None
        self.replays = 0
        self._seen = ledger.replay_gen(chain) if ledger is not None else 0

    def first_index(self, *, is_file: bool) -> int:
        """The index of the first frame to send: after those published (a file) or sent (a camera) before a restart."""
        if self.ledger is None:
            return 0
        return self.ledger.published(self.source) + 1 if is_file else self.ledger.sent(self.source)

    def stop_requested(self) -> bool:
        """Whether the control API asked this source to stop (never without a ledger)."""
        return self.ledger is not None and self.ledger.stop_requested(self.source)

    def reserve(self, frames_sent: int) -> None:
        """Record, before a frame leaves, that ``frames_sent`` frames (this one included) have been sent."""
        if self.ledger is not None:
            self.ledger.set_sent(self.source, frames_sent)

    def lend(self, slot: int, msg: FrameMsg) -> None:
        """Record the frame sent from ``slot``."""
        self.inflight[slot] = msg

    def credited(self, credit: CreditMsg) -> bool:
        """Whether a credit hands back a slot we lent (False: stale, for an older pool or another frame)."""
        held = self.inflight.get(credit.slot)
        if held is None or credit.pool != held.pool or credit.tag not in (-1, held.frame_index):
            return False
        del self.inflight[credit.slot]
        return True

    def due(self) -> list[FrameMsg | EndOfStream]:
        """What to send again now: the lent frames in order and the EOS, once the replay generation changed."""
        if self.ledger is None:
            return []
        gen = self.ledger.replay_gen(self.chain)
        if gen == self._seen:
            return []
        self._seen = gen
        self.replays += 1
        frames = sorted(self.inflight.values(), key=lambda m: m.frame_index)
        out: list[FrameMsg | EndOfStream] = list(frames)
        return [*out, self.eos] if self.eos is not None else out

    def published(self) -> bool:
        """Whether the source's EOS is published (or the run finished): nothing can be due again."""
        return self.ledger is None or self.ledger.eos_done(self.source) or self.ledger.finished

    def close(self) -> None:
        """Forget everything, detach the ledger."""
        self.inflight.clear()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
