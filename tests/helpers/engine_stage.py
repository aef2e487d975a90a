"""An engine stage run on a thread over inproc sockets: a test feeds it batches and reads what it sends."""

from __future__ import annotations

import os
import threading

import numpy as np
import zmq

from pipeline.stages.engine import EngineStage
from pipeline.transport import StageFlags
from streamdet.messages import INLINE_SLOT, BatchMsg, EndOfStream, EosReason, decode_message
from tests.helpers.durable_sinks import record
from tests.helpers.standin import standin_card

SHAPE = (2, 3, 384, 640)
"""The harness's batches: 2 frames of the stand-in's 640x384 input, every value the batch's number."""


class EngineHarness:
    """An engine stage on inproc sockets, run on a thread; the test feeds batches and reads what it sends."""

    def __init__(self, engines, **kw):
        self.ctx = zmq.Context()
        batches_in = self.ctx.socket(zmq.PULL)
        batches_in.bind("inproc://batches")
        self.feed = self.ctx.socket(zmq.PUSH)
        self.feed.connect("inproc://batches")
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind("inproc://results")
        self.credits = self.ctx.socket(zmq.PULL)
        self.credits.bind("inproc://credits")
        results_out = self.ctx.socket(zmq.PUSH)
        results_out.connect("inproc://results")
        credits_out = self.ctx.socket(zmq.PUSH)
        credits_out.connect("inproc://credits")
        ev = [threading.Event() for _ in range(3)]
        self.flags = StageFlags(go=ev[0], stop_input=ev[1], abort=ev[2], parent_pid=os.getppid())
        self.stage = EngineStage(engine=engines[0], more_engines=tuple(engines[1:]), card=standin_card(),
                                 batches_in=batches_in, results_out=results_out, tensor_credits_out=credits_out,
                                 status=None, flags=self.flags, num_sources=1, **kw)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.stage.run()
        except BaseException as e:  # handed to the test
            self.error = e

    def send_batch(self, k: int) -> None:
        msg = BatchMsg((record(i=2 * k), record(i=2 * k + 1)), INLINE_SLOT, "", SHAPE, "float32", tag=k)
        self.feed.send_multipart([msg.encode(), np.full(SHAPE, k, np.float32).tobytes()])

    def send_eos(self) -> None:
        self.feed.send_multipart([EndOfStream("cam", 10, EosReason.FINISHED).encode()])

    def received(self, n: int, timeout_ms: int = 10_000) -> list[tuple[object, list[bytes]]]:
        out = []
        for _ in range(n):
            assert self.results.poll(timeout_ms), f"only {len(out)} of {n} messages came"
            parts = self.results.recv_multipart()
            out.append((decode_message(parts[0]), parts[1:]))
        return out

    def close(self) -> None:
        self.flags.abort.set()
        self.thread.join(10)
        self.stage.stop()
        for s in (self.feed, self.results, self.credits):
            s.close(0)
        self.ctx.term()
