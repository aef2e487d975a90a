"""Self-healing: the shared ledger that lets a restarted stage pick up where the dead one was, and the restart bound.

The runner restarts a stage process that dies after the run started (see
:mod:`pipeline.runner`). What makes a restart lossless for file sources is this protocol:

* **Frames stay in their decoder's slot until published.** A frame slot goes back to its decoder
  (a :class:`~streamdet.messages.CreditMsg` tagged with the frame index) only after the
  postprocess stage has handed the frame to the sinks. So every frame that is not published yet
  is still in some decoder's pool, and the decoder knows which ones.
* **Replay.** After a shared stage (preprocess, engine, postprocess) restarts, the runner bumps
  the chain's *replay generation* in the :class:`Ledger`; each decoder of the chain then sends
  again every frame it has not been credited for, in frame order (and its EOS if it was sent).
* **Exactly once, in order.** The postprocess stage publishes a file source's frames strictly in
  frame-index order: a frame already published (a replayed copy) is dropped, a frame that arrives
  ahead of a missing one waits in a small reorder buffer (bounded by the decoder's slots) until
  the gap is filled. The last published index per source lives in the ledger, so a restarted
  postprocess stage knows it too. Live sources publish every frame newer than the last one
  (frames that arrive too late are counted as lost, never published out of order).
* **Generations.** A restarted decoder or preprocess stage creates a new pool whose name ends
  with the next generation (``<base>.<gen>``, :func:`pool_name`); consumers drop messages that
  point into an older generation than one they have already seen (their frames are replayed). A
  restarted engine gets a new *engine generation*: the preprocess stage reclaims the tensor slots
  it had lent to the dead engine and stamps new batches with the new generation; the new engine
  drops batches stamped with an older one. The engine's output pool gets a new generation too.
  When the postprocess stage dies, the runner bumps the *postprocess generation* before starting
  the new one, and each engine takes back the output slots it had lent before it saw the bump (a
  dead reader never hands them back); a result queued for such a slot and written again since is
  dropped by its reader (:mod:`pipeline.output_pool`): its frames were sent before the bump, so
  they are among those replayed after the restart.
* **Resume.** A restarted file decoder decodes from the start, skipping (without converting)
  the frames already published, and continues with the same frame indices.

Memory stays flat: credits carry tags, so a stale credit can never free a slot holding another
frame; pools of dead incarnations are unlinked by the runner and unmapped by consumers when they
see the next generation.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.slotpool import GENERATION_SEP, SHM_DIR, SlotPool, SlotPoolError, pool_name, split_pool_name

__all__ = ["GENERATION_SEP", "HEARTBEATS", "Heartbeat", "Ledger", "LedgerFlag", "LedgerRef", "RestartPolicy",
           "pool_name", "split_pool_name"]

_HEADER = 2  # n_sources, n_chains
_PER_SOURCE = 8  # published, eos_done, sent, frames out, detections out, stop asked, active, preview viewers
_PER_CHAIN = 3  # engine_gen, preprocess_ack, replay_gen
_RUN_FIELDS = 7  # finished, subscribers, postprocess gen; the go, stop-input and abort flags; PUB messages
_GO, _STOP_INPUT, _ABORT = 3, 4, 5  # run fields: the flags of :meth:`Ledger.run_flags`
_PUB_MESSAGES = 6  # run field: messages the publish sink sent (over every postprocess process)
_FLAG_POLL_S = 0.002  # how often :meth:`LedgerFlag.wait` looks
HEARTBEATS = 256
"""Heartbeat cells in the ledger, handed to stage processes in turn (:meth:`Ledger.new_heartbeat`); a
cell is used again after this many process starts, long after its last holder ended."""


class Ledger:
    """A few int64 counters in shared memory, shared by the runner and every stage process.

    Per source: the last published frame index (-1: none), whether its EOS was published, frames
    its decoder has sent, frames and detections published; and, for the control API
    (:mod:`pipeline.control`), whether the source was asked to stop, whether the slot holds a
    running source, and how many preview viewers watch it. Per model chain: the engine
    generation, the generation the preprocess stage has seen (its acknowledgement), the replay
    generation. Plus a ``finished`` flag (every
    EOS published: the preprocess and engine stages exit), the publish sink's current
    subscriber count (a restarted postprocess stage waits for its subscribers to reconnect) and
    the postprocess generation (its restarts: the engines take back the output slots it held);
    the run's go, stop-input and abort flags (:meth:`run_flags`); and the messages the publish
    sink sent (:attr:`pub_messages`: the run's summary counts every postprocess process's).
    Aligned int64 loads and stores are atomic on the platforms we run on; each counter has one
    writer (``finished``: the postprocess stage, and the runner at the end).

    Build it with :meth:`create` (the runner) or :meth:`attach` (a stage, by name).
    """

    def __init__(self, pool: SlotPool) -> None:
        self._pool = pool
        self.name = pool.name
        raw = pool.view(0, (pool.slot_bytes // 8,), np.int64)
        self.num_sources = int(raw[0])
        self.num_chains = int(raw[1])
        self._a = raw
        self._cells = -1  # the last heartbeat cell handed out (:meth:`new_heartbeat`, runner)

    def __del__(self) -> None:
        self.__dict__.pop("_a", None)  # the view first: a pool dropped unclosed cannot unmap under it

    @staticmethod
    def _size(num_sources: int, num_chains: int) -> int:
        return _HEADER + _PER_SOURCE * num_sources + _PER_CHAIN * num_chains + _RUN_FIELDS + HEARTBEATS

    @classmethod
    def create(cls, *, name: str, num_sources: int, num_chains: int) -> Ledger:
        """Allocate a ledger (every published index -1, every other counter 0).

        Raises:
            SlotPoolError: if the shared memory cannot be created.
        """
        n = cls._size(num_sources, num_chains)
        pool = SlotPool.create(name=name, num_slots=1, slot_bytes=8 * n)
        raw = pool.view(0, (n,), np.int64)
        raw[:] = 0
        raw[0], raw[1] = num_sources, num_chains
        raw[_HEADER : _HEADER + num_sources] = -1
        return cls(pool)

    @classmethod
    def attach(cls, name: str) -> Ledger:
        """Attach to the runner's ledger.

        Raises:
            SlotPoolError: if it does not exist.
        """
        return cls(SlotPool.attach(name))

    def touch(self) -> None:
        """Set its modification time to now: the runner's heartbeat (:func:`pipeline.slotpool.reap_orphan_pools`)."""
        try:
            os.utime(f"{SHM_DIR}/{self.name}")
        except OSError:  # (no /dev/shm on this system, or already unlinked)
            pass

    def close(self) -> None:
        """Unmap it (the runner's handle also unlinks it)."""
        del self._a
        self._pool.close()

    def _src(self, field_index: int, source: int) -> int:
        if not 0 <= source < self.num_sources:
            raise IndexError(f"expected a source index in [0, {self.num_sources}), got {source}")
        return _HEADER + field_index * self.num_sources + source

    def _chain(self, field_index: int, chain: int) -> int:
        if not 0 <= chain < self.num_chains:
            raise IndexError(f"expected a chain index in [0, {self.num_chains}), got {chain}")
        return _HEADER + _PER_SOURCE * self.num_sources + field_index * self.num_chains + chain

    def _run(self, field_index: int) -> int:
        """Index of a run-wide counter: 0 finished, 1 subscribers, 2 postprocess generation, 3-5 flags, 6 PUB sent."""
        return _HEADER + _PER_SOURCE * self.num_sources + _PER_CHAIN * self.num_chains + field_index

    def _get(self, i: int) -> int:
        return int(self._a[i])

    def _set(self, i: int, v: int) -> None:
        self._a[i] = v

    # per source
    def published(self, source: int) -> int:
        """Last published frame index of a source (-1: none yet)."""
        return self._get(self._src(0, source))

    def set_published(self, source: int, frame_index: int) -> None:
        """Record the last published frame index (postprocess stage)."""
        self._set(self._src(0, source), frame_index)

    def eos_done(self, source: int) -> bool:
        """Whether the source's EOS was published."""
        return bool(self._get(self._src(1, source)))

    def set_eos_done(self, source: int) -> None:
        """Record that the source's EOS was published (postprocess stage)."""
        self._set(self._src(1, source), 1)

    def sent(self, source: int) -> int:
        """Frames the source's decoder has sent (frame index of the next new frame)."""
        return self._get(self._src(2, source))

    def set_sent(self, source: int, frames: int) -> None:
        """Record the frames sent (decode stage)."""
        self._set(self._src(2, source), frames)

    def count_published(self, source: int, detections: int) -> None:
        """Count one published frame with its detections (postprocess stage; survives its restarts)."""
        self._set(self._src(3, source), self._get(self._src(3, source)) + 1)
        self._set(self._src(4, source), self._get(self._src(4, source)) + detections)

    def frames_published(self, source: int) -> int:
        """Frames of ``source`` published so far (over every restart of the postprocess stage)."""
        return self._get(self._src(3, source))

    def published_totals(self) -> tuple[int, int]:
        """``(frames, detections)`` published over every source so far."""
        frames = sum(self._get(self._src(3, i)) for i in range(self.num_sources))
        return frames, sum(self._get(self._src(4, i)) for i in range(self.num_sources))

    def frames_by_source(self, source_ids: Sequence[str]) -> dict[str, int]:
        """Frames published per source, the i-th id's from slot i (a run's first sources hold the first slots)."""
        return {sid: self.frames_published(i) for i, sid in enumerate(source_ids)}

    def stop_requested(self, source: int) -> bool:
        """Whether the source was asked to stop (its decoder sends EOS, reason ``removed``)."""
        return bool(self._get(self._src(5, source)))

    def request_stop(self, source: int) -> None:
        """Ask the source's decoder to stop reading and send its EOS (runner, control API)."""
        self._set(self._src(5, source), 1)

    def active(self, source: int) -> bool:
        """Whether the slot holds a source that has not ended (runner, with the control API on)."""
        return bool(self._get(self._src(6, source)))

    def set_active(self, source: int, active: bool) -> None:
        """Mark the slot as holding a running source or free (runner)."""
        self._set(self._src(6, source), int(active))

    def preview_viewers(self, source: int) -> int:
        """Preview viewers watching the source (the postprocess stage encodes previews only then)."""
        return self._get(self._src(7, source))

    def set_preview_viewers(self, source: int, viewers: int) -> None:
        """Record how many preview viewers watch the source (runner)."""
        self._set(self._src(7, source), max(0, viewers))

    def reset_source(self, source: int) -> tuple[int, int]:
        """Make a slot fresh for the next source (runner); returns its ``(frames, detections)`` published.

        Every per-source counter goes back to its initial value (published index -1).
        """
        done = self._get(self._src(3, source)), self._get(self._src(4, source))
        for k in range(_PER_SOURCE):
            self._set(self._src(k, source), -1 if k == 0 else 0)
        return done

    def free_slots(self) -> list[int]:
        """Source slots that hold no running source, lowest first."""
        return [i for i in range(self.num_sources) if not self.active(i)]

    # per chain
    def engine_gen(self, chain: int) -> int:
        """The chain's engine generation (engine restarts so far)."""
        return self._get(self._chain(0, chain))

    def bump_engine_gen(self, chain: int) -> int:
        """Start a new engine generation (runner); returns it."""
        g = self.engine_gen(chain) + 1
        self._set(self._chain(0, chain), g)
        return g

    def preprocess_ack(self, chain: int) -> int:
        """The engine generation the chain's preprocess stage has taken over."""
        return self._get(self._chain(1, chain))

    def set_preprocess_ack(self, chain: int, generation: int) -> None:
        """Acknowledge an engine generation (preprocess stage)."""
        self._set(self._chain(1, chain), generation)

    def replay_gen(self, chain: int) -> int:
        """The chain's replay generation (decoders replay their unpublished frames when it changes)."""
        return self._get(self._chain(2, chain))

    def bump_replay_gen(self, chain: int) -> None:
        """Ask the chain's decoders to replay (runner)."""
        self._set(self._chain(2, chain), self.replay_gen(chain) + 1)

    # run
    @property
    def finished(self) -> bool:
        """Whether every EOS has been published (the preprocess and engine stages may exit)."""
        return bool(self._get(self._run(0)))

    def set_finished(self) -> None:
        """Mark the run finished (runner)."""
        self._set(self._run(0), 1)

    @property
    def subscribers(self) -> int:
        """Subscribers the publish sink had last (a restarted postprocess stage waits for them to reconnect)."""
        return self._get(self._run(1))

    def set_subscribers(self, count: int) -> None:
        """Record the publish sink's current subscriber count (postprocess stage)."""
        self._set(self._run(1), count)

    @property
    def postprocess_gen(self) -> int:
        """Postprocess restarts so far (an engine takes back the output slots it lent when it changes)."""
        return self._get(self._run(2))

    def bump_postprocess_gen(self) -> None:
        """Count a postprocess restart, before the new process starts (runner)."""
        self._set(self._run(2), self.postprocess_gen + 1)

    @property
    def pub_messages(self) -> int:
        """Messages the publish sink sent in the run so far, over every process of the postprocess stage."""
        return self._get(self._run(_PUB_MESSAGES))

    def set_pub_messages(self, count: int) -> None:
        """Record the publish sink's running total (postprocess stage; a restarted one goes on from it)."""
        self._set(self._run(_PUB_MESSAGES), count)

    def new_heartbeat(self) -> Heartbeat:
        """The next heartbeat cell for a stage process (runner), cleared: not watched until the process beats."""
        self._cells += 1
        hb = Heartbeat(self, self._run(_RUN_FIELDS) + self._cells % HEARTBEATS)
        hb.off()
        return hb

    def last_beat_ms(self, hb: Heartbeat) -> int:
        """When the heartbeat's process last showed life (:func:`time.monotonic` ms), 0: not watched."""
        return self._get(hb.index)

    def run_flags(self) -> tuple[LedgerFlag, LedgerFlag, LedgerFlag]:
        """The run's ``(go, stop_input, abort)`` flags (:class:`~pipeline.transport.StageFlags`), all clear at first."""
        go, stop_input, abort = (LedgerFlag(self, self._run(k)) for k in (_GO, _STOP_INPUT, _ABORT))
        return go, stop_input, abort


_ATTACHED: dict[str, Ledger] = {}  # ledgers this process attached for its flags (mapped until it exits)
_ATTACH_LOCK = threading.Lock()  # (a colocated process's decoder threads look at the flags at once)


class _LedgerCell:
    """One counter of the run's ledger, usable in any process.

    It pickles as the ledger's name and the counter's place, and attaches the ledger on first use
    (one mapping per process).

    Args:
        ledger: the run's ledger (the runner), or its name (attached on first use).
        index: the counter's place in the ledger.
    """

    def __init__(self, ledger: Ledger | str, index: int) -> None:
        self._ledger = ledger if isinstance(ledger, Ledger) else None
        self._name = ledger.name if isinstance(ledger, Ledger) else ledger
        self._index = index

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return type(self), (self._name, self._index)

    @property
    def index(self) -> int:
        """The counter's place in the ledger."""
        return self._index

    def _attached(self) -> Ledger | None:
        """The ledger, attached on first use; None once it is gone (the runner ended)."""
        if self._ledger is None:
            with _ATTACH_LOCK:  # one mapping per process: a second one, dropped, would be unmapped under its view
                ledger = _ATTACHED.get(self._name)
                if ledger is None:
                    try:
                        ledger = _ATTACHED[self._name] = Ledger.attach(self._name)
                    except SlotPoolError:
                        return None
                self._ledger = ledger
        return self._ledger


class LedgerFlag(_LedgerCell):
    """A run-wide flag in the ledger, set once and never cleared: the go, stop-input and abort signals.

    It stands where a ``multiprocessing.Event`` would (``set``, ``is_set``, ``wait``) without
    that event's five named POSIX semaphores, which outlive a run whose processes are all killed
    (SIGKILL to the process group left 15 ``/dev/shm/sem.mp-*`` per run, which nobody removes),
    where the ledger is reaped (:func:`pipeline.slotpool.reap_orphan_pools`). It pickles as the
    ledger's name and the flag's place; a stage process attaches the ledger on first use. A ledger
    that is gone (the runner ended) reads as every flag set.

    Args:
        ledger: the run's ledger (the runner), or its name (attached on first use).
        index: the flag's counter in the ledger.
    """

    def is_set(self) -> bool:
        """Whether the flag was set (True when the ledger is gone)."""
        ledger = self._attached()
        return ledger is None or bool(ledger._get(self._index))

    def set(self) -> None:
        """Set the flag for every process of the run."""
        ledger = self._attached()
        if ledger is not None:
            ledger._set(self._index, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set or ``timeout`` seconds passed (None: no limit); returns :meth:`is_set`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = _FLAG_POLL_S if deadline is None else min(_FLAG_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True


class Heartbeat(_LedgerCell):
    """A stage process's sign of life in the ledger: the last time it looked at its flags.

    A stage beats whenever it checks whether to go on (:meth:`pipeline.transport.StageFlags.alive`,
    at least every poll interval while it waits, once per message while it works), from the end
    of its start-up to the start of its finishing; the runner restarts a stage whose heartbeat is
    older than ``supervise.hang_timeout_s`` (:meth:`pipeline.restarts.Restarter.reap`): a deadlock,
    a stopped (SIGSTOP) process, a call that never returns. It pickles as the ledger's name and
    the cell, like :class:`LedgerFlag`.

    Args:
        ledger: the run's ledger (the runner), or its name (attached on first use).
        index: the cell's counter in the ledger.
    """

    def beat(self) -> None:
        """Record that this process is alive now (``time.monotonic()`` in ms; about 0.2 µs)."""
        ledger = self._attached()
        if ledger is not None:
            ledger._set(self._index, int(time.monotonic() * 1000.0) or 1)

    def off(self) -> None:
        """Stop being watched (start-up, finishing: work with no beat for a while, e.g. loading a model)."""
        ledger = self._attached()
        if ledger is not None:
            ledger._set(self._index, 0)


@dataclass(frozen=True, kw_only=True)
class LedgerRef:
    """Where a stage finds the ledger and its place in it (picklable, part of a stage spec).

    Attributes:
        name: the ledger's shared-memory name.
        chain: the stage's model chain.
        source: the decoded source's index (decoders), else -1.
        source_index: ``(source_id, index)`` of every source (postprocess stage).
    """

    name: str
    chain: int = 0
    source: int = -1
    source_index: tuple[tuple[str, int], ...] = ()


@dataclass
class RestartPolicy:
    """The restart bound: at most ``max_restarts`` restarts of one stage within ``window_s``.

    Restarts after the first one in a window wait an exponential backoff with jitter
    (``backoff_initial_s`` doubling up to ``backoff_max_s``), so a stage that dies at every start
    cannot become a restart storm.

    Args:
        max_restarts: restarts allowed per stage within the window (0: never restart).
        window_s: the sliding window, seconds.
        backoff_initial_s: delay before the second restart within the window.
        backoff_max_s: longest delay.
        hang_timeout_s: a running stage whose heartbeat is older than this is killed and so
            restarted (:class:`Heartbeat`); 0: never.
    """

    max_restarts: int
    window_s: float
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 5.0
    hang_timeout_s: float = 0.0
    _times: dict[str, deque[float]] = field(default_factory=dict)

    def record(self, label: str, now: float | None = None) -> int | None:
        """Count a death of stage ``label``.

        Returns:
            The restart attempt within the window (1, 2, ...), or None when the bound is exceeded.
        """
        now = time.monotonic() if now is None else now
        q = self._times.setdefault(label, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        q.append(now)
        return len(q) if len(q) <= self.max_restarts else None

    def delay(self, attempt: int, rng: Any = random) -> float:
        """Seconds to wait before restart ``attempt`` (0 for the first one in the window)."""
        if attempt <= 1:
            return 0.0
        base = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (attempt - 2))
        return float(base * (0.8 + 0.4 * rng.random()))
