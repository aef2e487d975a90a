"""Decode and preprocess in one process (``decode.placement: with_preprocess``), for machines with few cores.

By default every source's decoder is its own process and sends each frame to the preprocess
process over an ``ipc://`` socket. Each such hop wakes the receiving process and the ZeroMQ I/O
threads on both sides; on 2 cores those wake-ups and the extra process compete with the engine.
With ``with_preprocess`` the preprocess process runs each decoder of its model chain as a thread
instead: the same :class:`~pipeline.stages.decode.DecodeStage` and
:class:`~pipeline.stages.preprocess.PreprocessStage`, the same messages, frame slots and credits,
but the frame socket is ``inproc://`` (ZeroMQ between threads of one process: no I/O thread, no
system call per message). The preprocess stage still binds its ``ipc://`` frame endpoint as well.

What changes for the operator: there is no ``decode:<source_id>`` process (``ps`` shows
``sd-preprocess`` only); a decoder that fails makes the whole process fail, and supervision
restarts decoders and preprocess together (each decoder resumes after the frames already
published, as a restarted decoder process does). Sources added at runtime through the control API
always get their own process, so the placement is refused together with ``control.port``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import zmq

from pipeline.stages.base import Stage, StageError, StageSpec, StatusReporter, describe_error
from pipeline.stages.decode import DecodeSpec, DecodeStage
from pipeline.stages.preprocess import PreprocessSpec, PreprocessStage
from pipeline.transport import StageFlags, Stopped
from streamdet.messages import StageName

INPROC_FRAMES = "inproc://frames"
"""The in-process frame endpoint the colocated decoders push to (the preprocess stage binds it)."""

JOIN_TIMEOUT_S = 35.0
"""Longest wait for a decoder thread to end once the preprocess stage ended (its EOS lingers up to 30 s)."""


@dataclass(frozen=True, kw_only=True)
class ColocatedSpec(StageSpec):
    """Builds a :class:`ColocatedStage`: one model chain's preprocess stage and its sources' decoders.

    Attributes:
        preprocess: the chain's preprocess stage.
        decoders: one decoder per source of the chain (at least one).
    """

    preprocess: PreprocessSpec
    decoders: tuple[DecodeSpec, ...]

    stage_name: ClassVar[StageName] = StageName.PREPROCESS

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> ColocatedStage:
        """Build the preprocess stage, bind its in-process frame endpoint, build the decoders on it.

        Raises:
            StageError: with no decoder.
        """
        if not self.decoders:
            raise StageError("with_preprocess: expected at least one decoder")
        pre_flags = flags.derive()
        pre = self.preprocess.build(ctx=ctx, flags=pre_flags, status=status)
        decoders: list[DecodeStage] = []
        try:
            pre.frames_in.bind(INPROC_FRAMES)
            for spec in self.decoders:
                reporter = StatusReporter.for_spec(ctx, spec)
                try:
                    local = replace(spec, endpoints=replace(spec.endpoints, frames=INPROC_FRAMES))
                    decoders.append(local.build(ctx=ctx, flags=flags.derive(), status=reporter))
                except BaseException:
                    reporter.close()
                    raise
        except BaseException:
            for d in decoders:
                d.stop()
                d.status.close()
            pre.stop()
            raise
        return ColocatedStage(preprocess=pre, decoders=decoders, preprocess_flags=pre_flags)


class ColocatedStage(Stage):
    """Runs a preprocess stage in this thread and its decoders in threads of their own.

    Args:
        preprocess: the preprocess stage (its frame socket bound to :data:`INPROC_FRAMES` too).
        decoders: the decoders, each with its own flags (derived from the process's) and status reporter.
        preprocess_flags: the preprocess stage's flags, derived from the process's: a decoder that
            fails marks them terminated, so that the preprocess stage stops at once and the process
            fails with the decoder's error.
    """

    name = StageName.PREPROCESS

    def __init__(self, *, preprocess: PreprocessStage, decoders: list[DecodeStage],
                 preprocess_flags: StageFlags) -> None:
        self.preprocess = preprocess
        self.decoders = decoders
        self._pre_flags = preprocess_flags
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the preprocess stage and every decoder (nothing is decoded before ``go``)."""
        self.preprocess.start()
        for d in self.decoders:
            d.start()

    def run(self) -> None:
        """Decode in the threads, preprocess here; then wait for the decoders.

        Raises:
            StageError: with a failed decoder's error (the first one).
            Stopped: when told to stop at once.
        """
        for d in self.decoders:
            t = threading.Thread(target=self._decode, args=(d,), name=f"decode:{d.source.source_id}", daemon=True)
            t.start()
            self._threads.append(t)
        try:
            self.preprocess.run()
        except Stopped:
            self._raise_decoder_error()
            raise
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)
        self._raise_decoder_error()

    def _decode(self, stage: DecodeStage) -> None:
        """A decoder thread: run and stop the decoder; a failure stops the preprocess stage too."""
        try:
            stage.run()
        except Stopped:
            pass
        except Exception as e:  # the whole process fails with it (and is restarted as one, supervised)
            self._fail(e)
        finally:
            try:
                stage.stop()
            except Exception as e:
                self._fail(e)
            stage.status.close()

    def _fail(self, e: Exception) -> None:
        """Record a decoder's error and stop the preprocess stage (the process then fails with the first error)."""
        with self._lock:
            self._errors.append(describe_error(e, StageName.DECODE))
        self._pre_flags.terminated = True

    def _raise_decoder_error(self) -> None:
        with self._lock:
            if self._errors:
                raise StageError(self._errors[0])

    def stop(self) -> None:
        """Stop the decoders (each thread stops its own; never-started ones here), then the preprocess stage."""
        if any(t.is_alive() for t in self._threads):
            for d in self.decoders:
                d.flags.terminated = True
            for t in self._threads:
                t.join(JOIN_TIMEOUT_S)
        for d in self.decoders[len(self._threads):]:  # run() never started their threads
            d.stop()
            d.status.close()
        self.preprocess.stop()
