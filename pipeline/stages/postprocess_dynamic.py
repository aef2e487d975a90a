"""The postprocess stage's side of the control API: sources added at runtime and forgotten once ended.

A mixin of :class:`~pipeline.stages.postprocess.PostprocessStage` (split from it to keep one
module per concern): with the control API on, the runner announces each added source
(:class:`~streamdet.messages.SourceAddedMsg`: its ledger slot, model chain, frame pool and credit
endpoint) and the stage forgets a source once its EOS is published.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from pipeline.stages.base import StageError
from pipeline.transport import close_socket, make_socket
from streamdet.card import ModelCard
from streamdet.messages import SourceAddedMsg

if TYPE_CHECKING:
    from pipeline.slotpool import PoolCache
    from pipeline.stages.cascade import Cascade
    from pipeline.stages.live_view import LiveView
    from pipeline.stages.ordering import PublishOrder
    from pipeline.stages.stats import LiveStats
    from pipeline.supervise import Ledger
    from pipeline.transport import StageFlags


class DynamicSources:
    """Follow sources added at runtime and forget ended ones (the control API runs)."""

    card: ModelCard
    order: PublishOrder
    live_stats: LiveStats
    live_view: LiveView | None
    cascade: Cascade | None
    cards_by_source: dict[str, ModelCard]
    frame_credits_out: dict[str, zmq.Socket[Any]]
    flags: StageFlags
    _sources: list[str]
    _pools: PoolCache
    _ctx: zmq.Context[Any] | None
    _chain_cards: tuple[ModelCard, ...]
    _pool_of: dict[str, str]
    _ended: int
    num_sources: int
    ledger: Ledger | None

    def published_by_source(self) -> dict[str, int]:
        """Frames each source published before this process (the ledger's counts; none without a ledger)."""
        ledger = self.ledger
        return {} if ledger is None else {sid: ledger.frames_published(i) for sid in self._sources
                                          if (i := self.order.index(sid)) >= 0}

    def _finished(self) -> bool:
        """Done: ``num_sources`` EOS published; dynamic: the input closed and every running source's EOS out."""
        if self._ctx is None or self.ledger is None:
            return self._ended >= self.num_sources
        if self.flags.input_open():
            return False
        ledger = self.ledger
        return all(ledger.eos_done(i) or not ledger.active(i) for i in range(ledger.num_sources))

    def follow_added_sources(self, *, ctx: zmq.Context[Any], chain_cards: tuple[ModelCard, ...],
                             pools: tuple[str, ...] = ()) -> None:
        """Take sources added at runtime and forget ended ones; end on the input's close (control API runs).

        Args:
            ctx: the process's ZeroMQ context (credit sockets of added sources are made with it).
            chain_cards: every model chain's card, chain 0 first.
            pools: the frame pool (base name) of each source it starts with, in source order.
        """
        self._ctx = ctx
        self._chain_cards = chain_cards
        self._pool_of = dict(zip(self._sources, pools, strict=False))
        for sid in [sid for sid in self._sources if self.order.ended(sid)]:  # ended before a restart of this stage
            self._forget(sid)

    def _on_added(self, ev: SourceAddedMsg) -> None:
        """Follow a source added at runtime: publication order, stats, its card, its credit socket."""
        if self._ctx is None:
            raise StageError(f"postprocess: source {ev.source_id} added, but the control API is off")
        sid = ev.source_id
        self.order.add(sid, ev.live, ev.ledger_index)
        self.live_stats.add_source(sid, ev.live, self.ledger.frames_published(ev.ledger_index) if self.ledger else 0)
        if sid not in self._sources:  # (announced again after a restart of this stage: once)
            self._sources.append(sid)
        card = self._chain_cards[ev.chain] if ev.chain < len(self._chain_cards) else self.card
        if card is not self.card:
            self.cards_by_source[sid] = card
        else:
            self.cards_by_source.pop(sid, None)
        self._pool_of[sid] = ev.pool
        old = self.frame_credits_out.pop(ev.pool, None)
        if old is not None:
            old.close(linger=0)
        self.frame_credits_out[ev.pool] = make_socket(self._ctx, zmq.PUSH, ev.credit_endpoint, bind=False)

    def _forget(self, source_id: str) -> None:
        """Drop an ended source (dynamic runs): its order state, stats, card, credit socket and mapped pool."""
        self.order.forget(source_id)
        self.live_stats.remove_source(source_id)
        if source_id in self._sources:
            self._sources.remove(source_id)
        self.cards_by_source.pop(source_id, None)
        if self.live_view is not None:
            self.live_view.forget(source_id)
        if self.cascade is not None:
            self.cascade.forget(source_id)
        pool = self._pool_of.pop(source_id, None)
        if pool is not None:
            sock = self.frame_credits_out.pop(pool, None)
            if sock is not None:
                close_socket(sock, self.flags)
            self._pools.drop(pool)
