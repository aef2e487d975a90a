"""Fit a run into the host before any stage starts: its pools into ``/dev/shm``, its sockets into the open-files limit.

Every frame and tensor travels in a shared-memory slot pool (:mod:`pipeline.slotpool`), and
``/dev/shm`` is a tmpfs of limited size: docker gives a container 64 MiB unless told otherwise
(``docker run --shm-size``), less than twelve 1080p frames. Each pool reserves its pages when it
is made, so a pool that does not fit fails with one line instead of a SIGBUS later; this module
makes it fit in the first place. At start-up the runner adds up what the stages will create:
the file sources' frame pools (``decode.slots`` frames each), the tensor pools and the secondary
models' tensor pools. When that exceeds :data:`SHM_SHARE` of the free room, every file source's
frame pool is capped at the same, largest slot count that fits, and when even
:data:`MIN_FRAME_SLOTS` per source is too many, the tensor pools go down to
:data:`MIN_TENSOR_SLOTS` as well (one warning line naming the ``--shm-size`` that would give them
all); when that does not fit either, the run stops before it starts, with one error line.

Fewer frame slots cost throughput, not correctness: a decoder waits for a slot to come back
(backpressure) and a partial batch leaves after ``preprocess.max_wait_ms``.

Open files: every source costs the process that decodes it about :data:`FDS_PER_SOURCE`
descriptors, and the usual soft limit of 1024 is reached near 64 sources; :func:`prepare_host`
raises it to the hard limit for the run (the stage processes inherit it).

Room: pipeline (start-up planning, beside :mod:`pipeline.chains`; docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import sys
from collections.abc import Iterator

from pipeline.cgroups import memory_limit
from pipeline.slotpool import RUN_PREFIX, SHM_DIR, reap_orphan_pools, shm_bytes_by_run, shm_free_bytes, shm_free_text
from pipeline.stages.base import StageSpec
from pipeline.stages.colocated import ColocatedSpec
from pipeline.stages.decode import DecodeSpec
from pipeline.stages.postprocess import PostprocessSpec
from pipeline.stages.preprocess import PreprocessSpec
from pipeline.summary import PipelineError

SHM_SHARE = 0.75
"""Share of the free ``/dev/shm`` that the pools made at start-up, plus the room one restart needs
(:func:`restart_bytes`), may take. The rest is for what comes later: the engines' output pools
(each at most an eighth of what is then free, else outputs travel inline) and live sources' frame
pools (made at their first frame)."""

MEMORY_SHARE = 0.25
"""Share of a memory limit (a container's ``--memory``) that shared memory may take: the pages of
``/dev/shm`` count towards it, and the stage processes need the rest (the bundled detector's run:
about 300 MiB besides its pools). Eight 720p files in a 500 MiB container with 12 frame slots
each were killed by the OOM killer until the run failed; with 2 or 4 slots they ran."""

MIN_FRAME_SLOTS = 2
"""Fewest frame slots a file source runs with (``decode.slots`` accepts no fewer)."""

MIN_TENSOR_SLOTS = 2
"""Fewest input tensors in flight (``preprocess.tensor_slots`` accepts no fewer): one in the engine
while the next is filled. Tensor slots are cut to it only when frame slots alone are not enough."""

_MIB = 2**20


def _decoders(spec: StageSpec) -> tuple[DecodeSpec, ...]:
    if isinstance(spec, DecodeSpec):
        return (spec,)
    if isinstance(spec, ColocatedSpec):
        return spec.decoders
    return ()


def fixed_pool_bytes(spec: StageSpec) -> int:
    """Shared memory a stage's process creates at start, other than file sources' frame pools.

    Args:
        spec: a stage spec (decode, preprocess, colocated, postprocess, engine, ...).

    Returns:
        Bytes of its tensor pools: the preprocess stage's, the secondary models' (made by the
        postprocess stage); 0 for the others (an engine's output pool sizes itself when made).
    """
    if isinstance(spec, PreprocessSpec):
        return spec.pool_bytes
    if isinstance(spec, ColocatedSpec):
        return spec.preprocess.pool_bytes
    if isinstance(spec, PostprocessSpec):
        return sum(link.pool_bytes for link in spec.secondaries)
    return 0


def restart_bytes(spec: StageSpec) -> int:
    """Shared memory a restart of the stage needs on top of the run's: its old pools that others still map.

    A restarted stage makes its pools again (the next generation) while the stages that read the
    old ones keep them mapped until they see the new one: a decoder's frame pool by the preprocess
    stage, a tensor pool by its engine, the frame pools of a colocated preprocess process by the
    postprocess stage when it needs the pixels (annotated video, preview, secondary models), the
    secondary models' tensor pools by their engines.

    Args:
        spec: a stage spec.

    Returns:
        Bytes.
    """
    if isinstance(spec, DecodeSpec):
        return spec.pool_bytes
    if isinstance(spec, ColocatedSpec):
        pixels = sum(d.pool_bytes for d in spec.decoders) if spec.preprocess.keep_pixels else 0
        return spec.preprocess.pool_bytes + pixels
    return fixed_pool_bytes(spec)


def planned_bytes(specs: list[StageSpec]) -> int:
    """What the run needs in ``/dev/shm``: the pools made at start-up and the room of the largest restart."""
    made = sum(fixed_pool_bytes(sp) + sum(d.pool_bytes for d in _decoders(sp)) for sp in specs)
    return made + max((restart_bytes(sp) for sp in specs), default=0)


def _cap_decoder(spec: DecodeSpec, cap: int) -> DecodeSpec:
    return dataclasses.replace(spec, num_slots=min(spec.num_slots, cap)) if spec.pool_bytes else spec


def _cap_tensors(spec: PreprocessSpec, cap: int | None) -> PreprocessSpec:
    return spec if cap is None else dataclasses.replace(spec, tensor_slots=min(spec.tensor_slots, cap))


def _capped(spec: StageSpec, frames: int, tensors: int | None = None) -> StageSpec:
    """``spec`` with at most ``frames`` slots per file source's frame pool and ``tensors`` tensor slots.

    ``tensors`` None leaves the tensor slots as they are.
    """
    if isinstance(spec, DecodeSpec):
        return _cap_decoder(spec, frames)
    if isinstance(spec, PreprocessSpec):
        return _cap_tensors(spec, tensors)
    if isinstance(spec, ColocatedSpec):
        return dataclasses.replace(spec, preprocess=_cap_tensors(spec.preprocess, tensors),
                                   decoders=tuple(_cap_decoder(d, frames) for d in spec.decoders))
    return spec


def fit_shared_memory(specs: list[StageSpec], free_bytes: int | None, memory_limit: int | None = None,
                      held_bytes: int = 0, claimed_bytes: int = 0) -> tuple[list[StageSpec], str]:
    """Cap the frame slots (then the tensor slots) so that the run's pools fit in :data:`SHM_SHARE` of the room.

    What must fit is :func:`planned_bytes`: the pools and the room of the largest restart. The
    room is the free ``/dev/shm``, and at most :data:`MEMORY_SHARE` of the run's memory limit:
    shared memory counts towards a container's ``--memory``, and pools that take it all leave the
    stages to the OOM killer.

    Args:
        specs: the run's stage specs (:func:`pipeline.chains.stage_specs`), or one decode spec of a
            source added at runtime.
        free_bytes: free bytes in :data:`~pipeline.slotpool.SHM_DIR`
            (:func:`~pipeline.slotpool.shm_free_bytes`); None: unknown (no ``/dev/shm``), nothing
            is changed.
        memory_limit: the run's memory limit in bytes (:func:`pipeline.cgroups.memory_limit`);
            None: none.
        held_bytes: shared memory the run holds already (a source added at runtime: the run's own
            pools, :func:`~pipeline.slotpool.shm_bytes_by_run`), taken from the memory limit's share.
        claimed_bytes: of ``free_bytes``, what other runs starting have planned and not made yet.

    Returns:
        The specs (the same list when everything fits) and a warning ("" when nothing was capped).

    Raises:
        PipelineError: when even :data:`MIN_FRAME_SLOTS` slots per file source and
            :data:`MIN_TENSOR_SLOTS` per tensor pool do not fit; the message names the room, what
            the run needs and the ``--shm-size`` (or ``--memory``) that gives it.
    """
    if free_bytes is None:
        return specs, ""
    wanted = planned_bytes(specs)
    free_text = shm_free_text(free_bytes) + (
        f", {claimed_bytes / _MIB:.1f} MiB of it planned by other runs" if claimed_bytes else "")
    free_bytes = max(0, free_bytes - claimed_bytes)
    room_bytes = free_bytes if memory_limit is None else min(
        free_bytes, max(0, int(memory_limit * MEMORY_SHARE) - held_bytes))
    if wanted <= room_bytes * SHM_SHARE:
        return specs, ""
    budget = int(room_bytes * SHM_SHARE)
    configured = sorted({d.num_slots for sp in specs for d in _decoders(sp) if d.pool_bytes})
    if memory_limit is not None and room_bytes < free_bytes:  # the memory limit binds
        needed = wanted / SHM_SHARE + held_bytes
        advice = f"docker run --memory={math.ceil(needed / MEMORY_SHARE / (64 * _MIB)) * 64}m"
        share = int(memory_limit * MEMORY_SHARE)
        held = f", of which this run holds {held_bytes / _MIB:.1f} MiB already" if held_bytes else ""
        room = (f"the memory limit ({memory_limit / _MIB:.0f} MiB, cgroup) leaves {share / _MIB:.1f} MiB "
                f"for shared memory{held}")
    else:
        advice = f"docker run --shm-size={math.ceil((wanted / SHM_SHARE + claimed_bytes) / (64 * _MIB)) * 64}m"
        room = free_text
    least = wanted
    for tensors in (None, MIN_TENSOR_SLOTS):  # the frame slots first, then the tensor slots too

        def need(cap: int, tensors: int | None = tensors) -> int:
            return planned_bytes([_capped(sp, cap, tensors) for sp in specs])

        least = need(MIN_FRAME_SLOTS)
        if least > budget:
            continue
        cap = max(configured, default=0)
        while need(cap) > budget:  # (at most decode.slots steps; need(MIN_FRAME_SLOTS) fits)
            cap -= 1
        also = "" if tensors is None else f" and {tensors} tensor slots (at most {tensors - 1} engine run at a time)"
        if configured:
            slots = str(configured[0]) if len(configured) == 1 else f"{configured[0]}-{configured[-1]}"
            what, got = f"{slots} frame slots per file source", f"at most {cap} each{also}"
        else:
            what, got = "the tensor slots", also.removeprefix(" and ")
        warning = (f"shared memory: {room}, too little for {what} ({wanted / _MIB:.1f} MiB with the tensor "
                   f"pools and the room of a restart): {got}, which may cost throughput ({advice} gives them all)")
        return [_capped(sp, cap, tensors) for sp in specs], warning
    raise PipelineError(
        f"shared memory: {room}, and this run's frame and tensor pools with the room of a restart need "
        f"{least / _MIB:.1f} MiB at least ({wanted / _MIB:.1f} MiB as configured; a run takes at most "
        f"{SHM_SHARE:.0%} of the room): give it more ({advice}), or run fewer sources or a smaller batch")


CLAIMS_FILE = "sd-claims"
"""In :data:`~pipeline.slotpool.SHM_DIR`: what each run sharing it planned (one line each: ``<run prefix>
<bytes>``), so that runs starting at once do not each plan against the same free room. A run's
claim counts, less what its blocks already take (which the free room no longer shows), while its
ledger exists; the file is read and written under an exclusive ``flock``."""


@contextlib.contextmanager
def _claims() -> Iterator[dict[str, int] | None]:
    """The claims of the runs sharing ``/dev/shm``, locked; written back on exit (None: no claims file here)."""
    try:
        fd = os.open(f"{SHM_DIR}/{CLAIMS_FILE}", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # (no /dev/shm, or another user's file)
        yield None
        return
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # (a file system without locks)
            yield None
            return
        try:
            with contextlib.suppress(OSError):  # (the owner makes it writable for every user's runs)
                os.fchmod(f.fileno(), 0o666)
            claims: dict[str, int] = {}
            for line in f.read().splitlines():
                run, _, size = line.partition(" ")
                if run.startswith(RUN_PREFIX) and size.isdigit() and os.path.exists(f"{SHM_DIR}/{run}ledger"):
                    claims[run] = int(size)  # (a finished run's line goes: its ledger is unlinked)
            yield claims
            with contextlib.suppress(OSError):  # (a full /dev/shm: the claim is lost, the run goes on)
                os.ftruncate(fd, 0)
                os.pwrite(fd, "".join(f"{run} {size}\n" for run, size in claims.items()).encode(), 0)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pending(claims: dict[str, int], run: str, made: dict[str, int]) -> int:
    """Bytes the other runs' claims have not made yet (the planned room less their blocks, ``made`` by run)."""
    return sum(max(0, size - made.get(other, 0)) for other, size in claims.items() if other != run)


def fit_to_host(specs: list[StageSpec], *, run: str, added: bool = False, label: str = "") -> list[StageSpec]:
    """:func:`fit_shared_memory` against this host: the free ``/dev/shm`` and the run's memory limit.

    The room other runs sharing ``/dev/shm`` planned and have not made yet is not free
    (:data:`CLAIMS_FILE`); a run starting claims what it plans. Two runs starting at once in 64
    MiB planned 48 MiB each before: the later one failed making its pools.

    Args:
        specs: as for :func:`fit_shared_memory`.
        run: the run's block prefix, ``sd-<token>-``.
        added: ``specs`` is a source added at runtime: what the run's blocks take already comes
            off the memory limit's share (:func:`~pipeline.slotpool.shm_bytes_by_run`).
        label: prefix of the warning line (``source cam1: ``).

    Returns:
        The specs, capped where needed; a cap is said in one ``warning:`` line on standard error.

    Raises:
        PipelineError: as :func:`fit_shared_memory`.
    """
    with _claims() as claims:
        free = shm_free_bytes()
        made = shm_bytes_by_run() if claims or added else {}  # (one scan of /dev/shm, under the lock)
        pending = _pending(claims, run, made) if claims is not None and free is not None else 0
        fitted, note = fit_shared_memory(specs, free, memory_limit(), made.get(run, 0) if added else 0, pending)
        if claims is not None and not added:
            claims[run] = planned_bytes(fitted)
    if note:
        print(f"warning: {label}{note}", file=sys.stderr)
    return fitted


FDS_PER_SOURCE = 14
"""Open files one source costs the process that holds its decoder (the preprocess process, where
the decoders run as its threads): ZeroMQ sockets and their mailboxes (credits, frames, status),
the file, and a mapping of the ledger (measured with bikes.mp4: 130 descriptors with 8 sources,
442 with 32, so 13 a source and 26 besides)."""

FDS_BASE = 64
"""Open files that process needs besides its sources (libraries, sockets to the other stages)."""


def open_files_need(sources: int) -> int:
    """Open files a run of ``sources`` sources needs in its busiest process.

    :data:`FDS_BASE` and :data:`FDS_PER_SOURCE` per source.
    """
    return FDS_BASE + FDS_PER_SOURCE * sources


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files as far as the system lets it; the stage processes inherit it.

    The soft limit is often 1024 (systemd's default, docker 25+) where the hard limit is far
    higher (524288, 1048576): the process that decodes 72 sources needs about 1070. Where the
    hard limit is unlimited and the kernel caps lower (macOS: soft 256, ``kern.maxfilesperproc``
    some 10240), smaller steps are tried.

    Returns:
        ``(soft, hard)`` limits now (``hard`` may be ``resource.RLIM_INFINITY``), or None when
        there is no limit on open files (an unlimited soft one, or not a POSIX system).
    """
    try:
        import resource
    except ImportError:  # (not a POSIX system)
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    tops = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 65536, 24576, 10240, 4096]
    for want in tops:
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want, hard
        except (ValueError, OSError):  # (the kernel caps lower: a smaller step)
            continue
    return soft, hard


def prepare_host(sources: int, max_sources: int = 0) -> None:
    """Ready the host for a run of ``sources`` sources at start-up, and up to ``max_sources`` later.

    Raises the open-files limit (:func:`raise_open_files_limit`) and removes the shared memory of
    runs whose processes were all killed (:func:`~pipeline.slotpool.reap_orphan_pools`; one
    ``note:`` line on standard error when it finds some). When the limit is too low for
    ``max_sources`` (the control API's ``control.max_sources``) but enough for ``sources``, one
    ``warning:`` line.

    Raises:
        PipelineError: when the open-files limit stays below what ``sources`` need
            (:func:`open_files_need`): ZeroMQ would abort a stage process at its first socket
            past the limit.
    """
    limits = raise_open_files_limit()
    if limits is not None:
        limit, hard = limits
        need, most = open_files_need(sources), open_files_need(max(sources, max_sources))
        hint = "raise the hard limit (docker run --ulimit nofile={n}, LimitNOFILE= in a systemd unit)"
        if limit < need:
            raise PipelineError(
                f"open files: limited to {limit} (ulimit -n, hard limit {hard}) and {sources} sources need about "
                f"{need}: {hint.format(n=need)} or run fewer sources")
        if limit < most:
            print(f"warning: open files: limited to {limit} (ulimit -n), enough for about "
                  f"{(limit - FDS_BASE) // FDS_PER_SOURCE} sources, not control.max_sources={max_sources}: "
                  f"{hint.format(n=most)}", file=sys.stderr)
    reaped, reaped_bytes = reap_orphan_pools()
    if reaped:
        print(f"note: removed {reaped} shared-memory blocks ({reaped_bytes / 2**20:.0f} MiB) left in {SHM_DIR} by "
              "runs whose processes were all killed", file=sys.stderr)
