"""Start-up validation and wiring: probe the sources, prepare one model chain per model, describe every stage.

:func:`prepare_run` checks everything that can be checked before a frame is decoded (each source
exists and is a video, each model is a readable ONNX file whose card matches it and whose backend
can run here) and groups the sources by model into :class:`ModelChain` s. :func:`stage_specs` then
turns the settings, the chains and the endpoints into the picklable :class:`StageSpec` of every
stage process.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from engines.base import Backend, DeviceEngine, EngineError
from pipeline.cgroups import machine_cores
from pipeline.secondary import SecondaryModel, prepare_secondaries, secondary_specs
from pipeline.settings import DEFAULT_MAX_BATCH, Settings
from pipeline.slotpool import pool_name
from pipeline.sources.options import SMALL_MACHINE_CORES, DecodePlacement
from pipeline.sources.probe import SourceError, SourceInfo, probe_source
from pipeline.stages.base import StageSpec
from pipeline.stages.colocated import ColocatedSpec
from pipeline.stages.decode import DecodeSpec
from pipeline.stages.engine import EngineSpec
from pipeline.stages.live_view import PreviewConfig
from pipeline.stages.model_check import ModelInfo, batching, checked_card, inspect_onnx
from pipeline.stages.postprocess import PostprocessSpec
from pipeline.stages.preprocess import PreprocessSpec
from pipeline.stages.sink_config import check_outputs_apart
from pipeline.stages.stats import StatsConfig
from pipeline.summary import PipelineError
from pipeline.supervise import LedgerRef
from pipeline.transport import StageEndpoints, TransportMode, redact_url
from streamdet.card import HeadLayout, ModelCard, ModelCardError
from streamdet.letterbox import ResizeMode
from streamdet.messages import check_source_id
from streamdet.postprocess import device_nms_supported


def source_ids_for(urls: list[str], given: list[str | None] | None = None) -> list[str]:
    """Topic-safe, unique source ids from paths/URLs: the file stem, ``-2``, ``-3``... on repeats.

    Args:
        urls: sources as given.
        given: ids chosen by the user (None entries: derive from the URL); kept as they are.

    Returns:
        One id per source, matching ``[A-Za-z0-9_-]{1,64}``.
    """
    chosen = list(given) if given is not None else [None] * len(urls)
    ids: list[str] = []
    for url, want in zip(urls, chosen, strict=True):
        if want:
            ids.append(check_source_id(want))
            continue
        stem = Path(redact_url(url).split("?", 1)[0].rstrip("/")).stem or "source"
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:56] or "source"
        sid, k = base, 2
        while sid in ids or sid in chosen:
            sid, k = f"{base}-{k}", k + 1
        ids.append(check_source_id(sid))
    return ids


@dataclass(frozen=True)
class ModelChain:
    """One model and the sources it serves (one preprocess and one engine process each).

    Attributes:
        model: the inspected ONNX model.
        card: its card (checked against it).
        max_batch: frames per engine batch.
        pad_batches: whether batches are padded to ``max_batch`` (static batch size).
        source_ids: the sources this model serves, in source order.
        tensor_device: the torch device its preprocess writes input tensors on (the engine's CUDA
            device with ``preprocess.on_device``), or None for host shared memory.
        rect_stride: the model's input height and width are dynamic: frames are letterboxed into
            the smallest rectangle of this stride that holds them (``preprocess.rect``); None: the
            card's full input size.
        concurrent_batches: batches its engine runs at once (``engine.concurrent_batches``, auto resolved).
        intra_op_threads: CPU threads per operator of each engine instance (0: ONNX Runtime's default).
    """

    model: ModelInfo
    card: ModelCard
    max_batch: int
    pad_batches: bool
    source_ids: tuple[str, ...]
    tensor_device: str | None = None
    rect_stride: int | None = None
    concurrent_batches: int = 1
    intra_op_threads: int = 0


@dataclass(frozen=True)
class PreparedRun:
    """What :func:`prepare_run` found: the probed sources and the model chains (at least one).

    Attributes:
        sources: the probed sources, in the order given.
        chains: one chain per distinct model, in order of first use.
        secondaries: secondary models run on crops of the global model's detections.
        primary_chain: the chain of the global model (the secondaries' primary).
    """

    sources: list[SourceInfo]
    chains: list[ModelChain]
    secondaries: tuple[SecondaryModel, ...] = ()
    primary_chain: int = 0

    @property
    def first_card(self) -> ModelCard:
        """The first model's card."""
        return self.chains[0].card

    @property
    def model_names(self) -> str:
        """The models' names joined by ``+`` (each once)."""
        return "+".join(dict.fromkeys(c.card.name for c in self.chains))


def prepare_run(settings: Settings, tensor_device: str | None = None) -> PreparedRun:
    """Probe every source and prepare one :class:`ModelChain` per model (nothing is decoded yet).

    Args:
        settings: the run's settings.
        tensor_device: force the device-tensor path on this torch device (tests); None: decide per
            model (see :func:`prepare_model`).

    Returns:
        The :class:`PreparedRun`.

    Raises:
        PipelineError: naming the first bad input (exit code 1).
    """
    s = settings
    if s.control.port is not None and s.decode.placement is DecodePlacement.WITH_PREPROCESS:
        raise PipelineError("decode.placement with_preprocess cannot be used with control.port (sources added at "
                            "runtime are decoded in processes of their own): use separate or auto")
    if s.control.port is not None and s.transport.mode is not TransportMode.IPC:
        raise PipelineError("control.port needs transport.mode ipc (sources added at runtime get shared-memory "
                            f"frame pools), got {s.transport.mode.value}")
    entries = s.source_entries()
    ids = source_ids_for([e.url for e in entries], given=[e.id for e in entries])
    try:
        check_outputs_apart(jsonl=s.sinks.jsonl, video_out=s.sinks.video_out, jsonl_rotate=s.sinks.jsonl_rotate,
                            sources=[(sid, e.url) for sid, e in zip(ids, entries, strict=True)])
    except ValueError as e:
        raise PipelineError(str(e)) from e
    infos = []
    for entry, sid in zip(entries, ids, strict=True):
        try:
            info = probe_source(entry.url, sid, max_fps=entry.max_fps, hwaccel=s.decode.hwaccel_options())
        except SourceError as e:
            raise PipelineError(str(e)) from e
        if info.warning:  # decode.hwaccel_fallback: said once, at start-up, like the engine's fallback
            print(f"warning: {info.warning}", file=sys.stderr)
        infos.append(info)
    chains: dict[tuple[Path, Path | None], list[str]] = {}
    for entry, sid in zip(entries, ids, strict=True):
        key = (entry.model, entry.card) if entry.model is not None else (s.model, s.card)
        chains.setdefault(key, []).append(sid)
    prepared = [prepare_model(s, path, card_path, tuple(sids), tensor_device)
                for (path, card_path), sids in chains.items()]
    keys = list(chains)
    if not s.secondary:
        return PreparedRun(infos, prepared)
    if (s.model, s.card) not in keys:
        raise PipelineError(f"secondary models run on the global model's detections, but no source uses it ({s.model})")
    k = keys.index((s.model, s.card))
    return PreparedRun(infos, prepared, prepare_secondaries(s, prepared[k].card), k)


def prepare_model(settings: Settings, model_path: Path, card_path: Path | None, source_ids: tuple[str, ...],
                  tensor_device: str | None = None) -> ModelChain:
    """Inspect one model, find and check its card (outputs included) and its backend.

    Args:
        settings: the run's settings (engine and preprocess sections).
        model_path: the ``.onnx`` file.
        card_path: its card file, or None to look beside the model / in its metadata.
        source_ids: the sources it serves.
        tensor_device: force the device-tensor path on this torch device (tests); None: use it when
            the chosen engine is on a CUDA device, has ``infer_device``
            (:class:`~engines.base.DeviceEngine`) and ``preprocess.on_device`` is on.

    Returns:
        The :class:`ModelChain`.

    Raises:
        PipelineError: if the model, its card or its backend is unusable (exit code 1).
    """
    s = settings
    try:
        info = inspect_onnx(model_path)
        card = checked_card(info, card_path)
        from engines.select import choose_backend, engine_class

        eng = s.engine
        choice = choose_backend(eng.backend, eng.device, info.path, allow_fallback=eng.allow_fallback)
    except (EngineError, ModelCardError) as e:
        raise PipelineError(str(e)) from e
    if tensor_device is None and s.preprocess.on_device and choice.device != "cpu" \
            and issubclass(engine_class(choice.backend), DeviceEngine):
        tensor_device = choice.device
    concurrent, threads = engine_parallelism(s, choice.backend, choice.device, device_batches=tensor_device is not None)
    max_batch, pad = batching(info, card, s.preprocess.max_batch or (1 if concurrent > 1 else DEFAULT_MAX_BATCH))
    # TensorRT and CUDA programs are built for the card's input size: only ONNX Runtime takes other sizes
    rect = rect_stride(info, card) if s.preprocess.rect and tensor_device is None \
        and choice.backend is Backend.ONNXRUNTIME else None
    if rect is not None and not s.quiet:
        iw, ih = card.input_wh
        print(f"model {card.name}: dynamic input size, frames letterboxed to the smallest multiple of {rect} "
              f"that holds them (at most {iw}x{ih}; preprocess.rect)", file=sys.stderr)
    return ModelChain(info, card, max_batch, pad, source_ids, tensor_device, rect, concurrent, threads)


def engine_parallelism(settings: Settings, backend: Backend, device: str, *, device_batches: bool = False,
                       cores: int | None = None, host_cores: int | None = None) -> tuple[int, int]:
    """Batches the engine runs at once and CPU threads per run, automatic values resolved.

    These are ``engine.concurrent_batches`` and ``engine.intra_op_threads``. Concurrent batches
    need ONNX Runtime on the CPU with host batches; auto is 2 there on 2 or more cores when the
    threads are automatic too, else 1 (threads set by hand are a CPU budget kept as given).
    With ``intra_op_threads`` 0 and several concurrent batches, each run gets the cores divided
    among them (at least 1); with one batch at a time 0 is passed on (ONNX Runtime: one per
    core of the host), unless the run may use fewer cores than the host has (a container's CPU
    quota, an affinity mask): then it gets that many.

    Args:
        settings: the run's settings.
        backend: the backend the run settled on (after any fallback).
        device: its device (``cpu``, ``cuda``, ``cuda:N``).
        device_batches: the preprocess writes the batches as device tensors.
        cores: the cores the run may use (None: :func:`~pipeline.cgroups.machine_cores`).
        host_cores: the host's cores (None: ``os.cpu_count()``).

    Returns:
        ``(concurrent_batches, intra_op_threads)``.

    Raises:
        PipelineError: if concurrent batches are asked for with another backend or device.
    """
    eng = settings.engine
    n = cores if cores is not None else machine_cores()
    host_ort = backend is Backend.ONNXRUNTIME and device == "cpu" and not device_batches
    if eng.concurrent_batches > 1 and not host_ort:
        where = f"{backend.value} on {device}" + (", device batches" if device_batches else "")
        raise PipelineError(f"engine.concurrent_batches={eng.concurrent_batches}: concurrent batches need the "
                            f"onnxruntime backend on the CPU with host batches (this run: {where}); set it to 0 or 1")
    concurrent = eng.concurrent_batches or (2 if host_ort and n >= 2 and eng.intra_op_threads == 0 else 1)
    limited = n < (host_cores if host_cores is not None else os.cpu_count() or n)
    threads = eng.intra_op_threads or (max(1, n // concurrent) if concurrent > 1 or limited else 0)
    return concurrent, threads


def rect_stride(info: ModelInfo, card: ModelCard) -> int | None:
    """The stride to letterbox into a minimum rectangle with, if the model's input height and width are dynamic.

    The stride is the card's largest head stride, else the ``stride`` of ultralytics metadata (when a
    positive integer), else 32. A ``semantic_logits`` card's strides are its logits' output stride
    (``[1]``: logits at input resolution), not the network's downsampling, so they are not used: such
    a model gets the metadata's ``stride``, else 32 (ultralytics' largest stride; a 5-stage U-Net's).
    Models whose card asks for the ``stretch`` resize always get their full input.

    Args:
        info: the inspected ONNX model.
        card: its card.

    Returns:
        The stride, or None when the input's spatial size is fixed in the graph.
    """
    shape = info.input_shape
    if len(shape) != 4 or (isinstance(shape[2], int) and isinstance(shape[3], int)):
        return None
    if card.input.resize is not ResizeMode.LETTERBOX:  # a stretched frame fills the input: no rectangle
        return None
    if card.head.strides and card.head.layout is not HeadLayout.SEMANTIC_LOGITS:
        return int(max(card.head.strides))
    try:
        stride = int(info.metadata.get("stride", "32"))
    except ValueError:
        return 32
    return stride if stride > 0 else 32


def decode_placement(settings: Settings, cpu_count: int | None = None) -> DecodePlacement:
    """Where the decoders of the sources given at start-up run: ``decode.placement`` with ``auto`` resolved.

    Args:
        settings: the run's settings.
        cpu_count: the cores the run may use (None: :func:`~pipeline.cgroups.machine_cores`).

    Returns:
        :attr:`DecodePlacement.SEPARATE` or :attr:`DecodePlacement.WITH_PREPROCESS`.
    """
    placement = settings.decode.placement
    if placement is not DecodePlacement.AUTO:
        return placement
    cores = cpu_count if cpu_count is not None else machine_cores()
    if cores <= SMALL_MACHINE_CORES and settings.control.port is None:
        return DecodePlacement.WITH_PREPROCESS
    return DecodePlacement.SEPARATE


def stage_specs(settings: Settings, prepared: PreparedRun, endpoints: StageEndpoints, pools: list[str],
                tensor_pools: list[str], ledger: str | None = None, forward: str | None = None,
                secondary_pools: list[str] | None = None, output_pools: list[str] | None = None) -> list[StageSpec]:
    """Describe every stage process of the run.

    Args:
        settings: the run's settings.
        prepared: the sources and model chains.
        endpoints: the pipeline's endpoints (per chain via :meth:`StageEndpoints.for_chain`).
        pools: one frame-pool base name per source (generation 0 is created first).
        tensor_pools: one tensor-pool base name per chain.
        ledger: the shared-memory name of the run's :class:`~pipeline.supervise.Ledger` (None: no
            supervision).
        forward: also push every message to this endpoint (a cluster worker's receiver), or None.
        secondary_pools: one tensor-pool base name per secondary model (the postprocess stage creates them).
        output_pools: one output-pool base name per chain (:mod:`pipeline.output_pool`, created by
            the engine stage; used with a ledger on ``ipc://``; None: outputs travel inline).

    Returns:
        The postprocess spec, then an engine and a preprocess spec per chain, then a decode spec per
        source; with decoders placed with the preprocess stage (:func:`decode_placement`), each
        chain's preprocess spec is a :class:`~pipeline.stages.colocated.ColocatedSpec` holding its
        decode specs instead.
    """
    s, p = settings, prepared
    sinks = s.sinks.sink_config(fps_by_source=tuple((src.source_id, src.fps) for src in p.sources),
                                forward=forward)
    n = len(p.sources)
    ctl = endpoints.control
    first = p.chains[0]
    cs = s.control
    dynamic = cs.port is not None and ledger is not None  # sources come and go through the control API
    links, secondary_engines = secondary_specs(s, p.secondaries, endpoints, secondary_pools or [],
                                               LedgerRef(name=ledger) if ledger else None)
    cv = light_stage_opencv_threads(s)
    specs: list[StageSpec] = [
        PostprocessSpec(control=ctl, nice=s.postprocess.nice, opencv_threads=cv, card=first.card,
                        model_name=first.card.name,
                        config=s.postprocess.to_config(), sinks=sinks, endpoints=endpoints, num_sources=n,
                        stats=StatsConfig(
                            sources=tuple((src.source_id, src.is_live) for src in p.sources),
                            interval_s=s.sinks.stats_interval_s, console=not s.quiet,  # (--quiet: no console line)
                            metrics_port=s.sinks.metrics_port, metrics_host=s.sinks.metrics_host, control=dynamic),
                        cards_by_source=tuple((sid, c.card) for c in p.chains[1:] for sid in c.source_ids),
                        ledger=LedgerRef(name=ledger) if ledger else None, dynamic=dynamic,
                        chain_cards=tuple(ch.card for ch in p.chains),
                        preview=PreviewConfig(fps=cs.preview_fps, width=cs.preview_width, quality=cs.preview_quality)
                        if dynamic else None, secondaries=links, cascade_card=p.chains[p.primary_chain].card),
        *secondary_engines,
    ]
    chain_index = {sid: k for k, c in enumerate(p.chains) for sid in c.source_ids}
    pool_of = {src.source_id: pool for src, pool in zip(p.sources, pools, strict=True)}
    chain_of: dict[str, StageEndpoints] = {}
    for k, (chain, tensor_pool) in enumerate(zip(p.chains, tensor_pools, strict=True)):
        ep = endpoints if len(p.chains) == 1 else endpoints.for_chain(k, [pool_of[i] for i in chain.source_ids])
        chain_of.update((sid, ep) for sid in chain.source_ids)
        m = len(chain.source_ids)
        post_cfg = s.postprocess.to_config()
        device_nms = post_cfg if chain.tensor_device is not None and device_nms_supported(chain.card, post_cfg) \
            else None
        ref = LedgerRef(name=ledger, chain=k) if ledger else None
        specs += [
            EngineSpec(control=ctl, card=chain.card, model_path=str(chain.model.path), backend=s.engine.backend,
                       device=s.engine.device, intra_op_threads=chain.intra_op_threads,
                       allow_fallback=s.engine.allow_fallback, endpoints=ep, num_sources=0 if dynamic else m,
                       warmup_batch=chain.max_batch, device_batches=chain.tensor_device is not None,
                       device_nms=device_nms, ledger=ref, concurrent_batches=chain.concurrent_batches,
                       output_pool=pool_name(output_pools[k], 0) if output_pools and ledger and not ep.inline
                       else None),
            PreprocessSpec(control=ctl, nice=s.preprocess.nice, opencv_threads=cv, card=chain.card, endpoints=ep,
                           tensor_pool=pool_name(tensor_pool, 0),
                           tensor_slots=max(s.preprocess.tensor_slots, chain.concurrent_batches + 1),
                           max_batch=chain.max_batch, pad_batches=chain.pad_batches,
                           max_wait_ms=s.preprocess.max_wait_ms,
                           keep_pixels=sinks.needs_pixels or (k == p.primary_chain and bool(links)),
                           num_sources=0 if dynamic else m,
                           tensor_device=chain.tensor_device, ledger=ref, rect_stride=chain.rect_stride),
        ]
    batch_of = {sid: c.max_batch for c in p.chains for sid in c.source_ids}
    for i, (src, pool) in enumerate(zip(p.sources, pools, strict=True)):
        sid = src.source_id
        specs.append(decode_spec(s, src, pool=pool_name(pool, 0), endpoints=chain_of[sid], batch=batch_of[sid],
                                 ledger=LedgerRef(name=ledger, chain=chain_index[sid], source=i) if ledger else None))
    if decode_placement(s) is DecodePlacement.WITH_PREPROCESS:
        return colocate(specs, chain_index)
    return specs


def light_stage_opencv_threads(settings: Settings) -> int:
    """OpenCV threads for the decode, preprocess and postprocess processes (:attr:`StageSpec.opencv_threads`).

    1 when the engine runs on the CPU: it keeps every core busy, and OpenCV's default of one
    worker per core only adds wake-ups (whole runs of bikes.mp4 on 2 cores, 6 pairs: 0.985x the
    wall time with 1 thread); 0 (OpenCV's default) when the engine runs on a GPU, leaving the
    cores to the light stages.
    """
    return 1 if settings.engine.device == "cpu" else 0


def colocate(specs: list[StageSpec], chain_of: dict[str, int]) -> list[StageSpec]:
    """Put each chain's decode specs into its preprocess spec (:class:`~pipeline.stages.colocated.ColocatedSpec`).

    Args:
        specs: as :func:`stage_specs` makes them (preprocess specs in chain order).
        chain_of: each source's chain index.

    Returns:
        The specs without decode specs, each preprocess spec wrapped with its chain's decoders.
    """
    decoders = [sp for sp in specs if isinstance(sp, DecodeSpec)]
    out: list[StageSpec] = []
    chain = 0
    for sp in specs:
        if isinstance(sp, DecodeSpec):
            continue
        if isinstance(sp, PreprocessSpec):
            mine = tuple(d for d in decoders if chain_of[d.source_id] == chain)
            sp = ColocatedSpec(control=sp.control, nice=sp.nice, ledger=sp.ledger,
                               opencv_threads=sp.opencv_threads, preprocess=sp, decoders=mine)
            chain += 1
        out.append(sp)
    return out


def decode_spec(settings: Settings, source: SourceInfo, *, pool: str, endpoints: StageEndpoints, batch: int,
                ledger: LedgerRef | None) -> DecodeSpec:
    """Describe one source's decode process (at start-up, or added at runtime through the control API).

    Args:
        settings: the run's settings (decode section, ``max_frames``).
        source: the probed source.
        pool: its frame pool's name (generation included).
        endpoints: its model chain's endpoints (its own credit endpoint among ``frame_credits``).
        batch: its chain's engine batch size (a file source's pool holds two batches in flight and more).
        ledger: its place in the run's ledger (None: no supervision).

    Returns:
        The :class:`DecodeSpec`.
    """
    s = settings
    # a frame keeps its slot until it is published: room for two batches in flight and then some
    slots = max(s.decode.slots, 2 * batch + 2) if source.is_file else s.decode.live_slots
    return DecodeSpec(control=endpoints.control, nice=s.decode.nice, opencv_threads=light_stage_opencv_threads(s),
                      source=source, pool=pool, num_slots=slots,
                      endpoints=endpoints, max_frames=s.max_frames, loop=s.decode.loop, threads=s.decode.threads,
                      live=s.decode.live_options(), ledger=ledger)
