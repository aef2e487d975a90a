"""Start-up checks and wiring of secondary models (the cascade; runtime in :mod:`pipeline.stages.cascade`).

:func:`prepare_secondaries` checks every secondary model before a frame is decoded: a readable
ONNX file whose card matches it, a task that gives boxes (detect or segment), primary classes
that the primary model has, class names that can be read as text when ``read_text`` is on, a
backend that runs here and the shared-memory transport the crops need. :func:`secondary_specs`
then describes the postprocess stage's side (:class:`~pipeline.stages.cascade.SecondaryLink`) and
each secondary engine's process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engines.base import EngineError
from pipeline.settings import SecondarySettings, Settings
from pipeline.slotpool import pool_name
from pipeline.stages.cascade import SecondaryEngineSpec, SecondaryLink
from pipeline.stages.model_check import ModelInfo, batching, checked_card, inspect_onnx
from pipeline.summary import PipelineError
from pipeline.supervise import LedgerRef
from pipeline.transport import StageEndpoints, TransportMode
from streamdet.card import ModelCard, ModelCardError, Task
from streamdet.postprocess import PostprocessConfig


@dataclass(frozen=True)
class SecondaryModel:
    """A checked secondary model.

    Attributes:
        settings: its settings.
        model: the inspected ONNX model.
        card: its card (checked against it).
        parent_class_ids: the primary class ids that feed it.
        max_batch: crops per batch (a static batch size overrides the setting).
        pad_batches: batches are padded to ``max_batch`` (static batch size).
    """

    settings: SecondarySettings
    model: ModelInfo
    card: ModelCard
    parent_class_ids: tuple[int, ...]
    max_batch: int
    pad_batches: bool


def prepare_secondaries(settings: Settings, primary: ModelCard) -> tuple[SecondaryModel, ...]:
    """Check every secondary model of the settings against itself, the settings and the primary model.

    Args:
        settings: the run's settings (``secondary``, ``engine``, ``transport``).
        primary: the primary (global) model's card.

    Returns:
        One :class:`SecondaryModel` per entry of ``settings.secondary``.

    Raises:
        PipelineError: one line naming the secondary model and what contradicts what (exit code 1).
    """
    if not settings.secondary:
        return ()
    if settings.transport.mode is not TransportMode.IPC:
        raise PipelineError(f"secondary models need transport.mode ipc (crops are cut from the frames in shared "
                            f"memory), got {settings.transport.mode.value}")
    return tuple(_prepare_one(settings, sec, primary) for sec in settings.secondary)


def _prepare_one(settings: Settings, sec: SecondarySettings, primary: ModelCard) -> SecondaryModel:
    where = f"secondary model {sec.model}"
    try:
        info = inspect_onnx(sec.model)
        card = checked_card(info, sec.card)
        from engines.select import choose_backend

        eng = settings.engine
        choose_backend(eng.backend, eng.device, info.path, allow_fallback=eng.allow_fallback)
    except (EngineError, ModelCardError) as e:
        raise PipelineError(f"{where}: {e}") from e
    if card.task not in (Task.DETECT, Task.SEGMENT):
        raise PipelineError(f"{where}: its card's task is {card.task.value}, but a secondary model must give boxes "
                            "(task detect or segment)")
    unknown = [c for c in sec.classes if c not in primary.class_names]
    if unknown:
        raise PipelineError(f"{where}: primary class {unknown[0]!r} is not a class of the primary model "
                            f"{primary.name} (it has {', '.join(primary.class_names)})")
    if sec.read_text:
        long = [c for c in card.class_names if len(c) != 1]
        if long:
            raise PipelineError(f"{where}: read_text needs one character per class name, but its card "
                                f"({card.name}) has {long[0]!r}")
    max_batch, pad = batching(info, card, sec.max_batch)
    ids = tuple(primary.class_names.index(c) for c in dict.fromkeys(sec.classes))
    return SecondaryModel(sec, info, card, ids, max_batch, pad)


def secondary_specs(settings: Settings, secondaries: tuple[SecondaryModel, ...], endpoints: StageEndpoints,
                    pools: list[str], ledger: LedgerRef | None) -> tuple[tuple[SecondaryLink, ...],
                                                                          list[SecondaryEngineSpec]]:
    """The postprocess stage's links to the secondary models, and their engine processes.

    Args:
        settings: the run's settings.
        secondaries: the checked secondary models.
        endpoints: the run's endpoints (``secondaries`` holds each one's batch, result and credit endpoints).
        pools: one tensor-pool base name per secondary model (generation 0 is created first).
        ledger: the run's ledger (the engines run until the run finished).

    Returns:
        ``(links, engine specs)``, in the order of ``secondaries``.
    """
    links: list[SecondaryLink] = []
    specs: list[SecondaryEngineSpec] = []
    eng = settings.engine
    for sm, (batches, results, credits), pool in zip(secondaries, endpoints.secondaries, pools, strict=True):
        s = sm.settings
        config = PostprocessConfig(score_threshold=s.score_threshold, iou_threshold=s.iou_threshold,
                                   max_detections=s.max_detections, class_agnostic=s.class_agnostic, masks=s.masks)
        links.append(SecondaryLink(card=sm.card, config=config, parent_class_ids=sm.parent_class_ids,
                                   min_side_px=s.min_side_px, pad=s.pad, max_crops=s.max_crops,
                                   max_batch=sm.max_batch, pad_batches=sm.pad_batches, max_wait_ms=s.max_wait_ms,
                                   tensor_slots=s.tensor_slots, read_text=s.read_text, batches=batches,
                                   results=results, credits=credits, tensor_pool=pool_name(pool, 0)))
        specs.append(SecondaryEngineSpec(control=endpoints.control, card=sm.card, model_path=str(sm.model.path),
                                         backend=eng.backend, device=eng.device, intra_op_threads=s.intra_op_threads,
                                         allow_fallback=eng.allow_fallback,
                                         endpoints=replace(endpoints, batches=batches, results=results,
                                                           tensor_credits=credits),
                                         num_sources=0, warmup_batch=sm.max_batch, ledger=ledger))
    return tuple(links), specs
