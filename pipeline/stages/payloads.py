"""The published JSON messages: schema ids, topics, and the payload of a frame, an end of stream, a status event.

These objects are the public, versioned schema documented in ``docs/schema.md``; the sinks
(:mod:`pipeline.stages.sinks`) publish and write them, :mod:`pipeline.subscribe` reads them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.transport import redact_url
from streamdet.messages import EndOfStream, FrameRecord, SourceStatusMsg, StageRestartMsg

DETECTIONS_SCHEMA = "streamdet.detections/2"
"""Schema id of the published detection messages."""

EOS_SCHEMA = "streamdet.eos/1"
"""Schema id of the published end-of-stream messages."""

STATUS_SCHEMA = "streamdet.status/1"
"""Schema id of the published source status events."""

STAGE_RESTARTED = "stage_restarted"
"""``state`` of the status event published when a stage process was restarted after a crash."""

DETECTIONS_TOPIC = "detections"
EOS_TOPIC = "eos"
STATUS_TOPIC = "status"
STATS_TOPIC = b"stats"


def topic(kind: str, source_id: str) -> bytes:
    """The ZeroMQ topic ``<kind>.<source_id>`` as bytes (kind: ``detections``, ``eos``, ``status``)."""
    return f"{kind}.{source_id}".encode()


def detections_payload(
    record: FrameRecord,
    detections: Any,
    *,
    model: str,
    class_names: Sequence[str],
    engine_ms: float,
    postprocess_ms: float,
    now: float | None = None,
    children: Mapping[int, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """The published JSON object of one frame (schema :data:`DETECTIONS_SCHEMA`).

    Args:
        record: the frame's record.
        detections: its ``Detections`` (boxes xyxy in frame pixels, scores, class ids, masks optional).
        model: model name.
        class_names: names by class id.
        engine_ms: the engine time of the frame's batch, milliseconds.
        postprocess_ms: the postprocess time of the frame's batch, milliseconds.
        now: ``time.monotonic()`` at publication (default: now).
        children: secondary models' results (``streamdet.cascade.Children``) by detection index (the cascade).

    Returns:
        A JSON-ready dict: ``schema, source_id, frame_index, pts_s, capture_time (wall clock at the
        frame's receipt, Unix seconds), latency_ms (capture -> publish), frame_wh, model,
        detections[], timing_ms{decode, preprocess, engine, postprocess, end_to_end}``; each detection has
        ``box_xyxy`` (frame pixels, 2 decimals), ``score`` (4 decimals), ``class_id``, ``label`` and,
        for instance-segmentation models, ``mask`` (COCO RLE ``{size: [h, w], counts: str}``);
        semantic models add ``semantic: {size: [h, w], classes: [{class_id, label, mask}]}``, one
        COCO RLE per class present in the class map (together they cover every pixel once). A
        detection that went through secondary models has ``children`` (the same fields, boxes and
        masks in frame pixels) and, from a text-reading one, ``text`` and ``text_score``.
    """
    f = record.frame
    t = time.monotonic() if now is None else now
    latency_ms = max(0.0, (t - f.capture_time) * 1000.0)
    capture_wall = time.time() - (time.monotonic() - f.capture_time)  # CLOCK_MONOTONIC is system-wide
    dets = _detection_list(detections, class_names)
    for parent, found in (children or {}).items():
        d = dets[parent]
        d["children"] = [c for ch in found for c in _detection_list(ch.detections, ch.class_names)]
        for ch in found:
            if ch.text is not None:
                d["text"], d["text_score"] = ch.text, round(float(ch.text_score or 0.0), 4)
    extra: dict[str, Any] = {}
    semantic = getattr(detections, "semantic", None)
    if semantic is not None:
        from streamdet.masks import class_map_to_rles

        extra["semantic"] = {
            "size": [int(semantic.shape[0]), int(semantic.shape[1])],
            "classes": [{"class_id": k, "label": class_names[k] if k < len(class_names) else str(k), "mask": rle}
                        for k, rle in class_map_to_rles(semantic)],
        }
    return {
        "schema": DETECTIONS_SCHEMA,
        "source_id": f.source_id,
        "frame_index": f.frame_index,
        "pts_s": round(f.pts_s, 6),
        "capture_time": round(capture_wall, 6),
        "latency_ms": round(latency_ms, 3),
        "frame_wh": [f.frame_hw[1], f.frame_hw[0]],
        "model": model,
        "detections": dets,
        **extra,
        "timing_ms": {
            "decode": round(f.decode_ms, 3),
            "preprocess": round(record.preprocess_ms, 3),
            "engine": round(engine_ms, 3),
            "postprocess": round(postprocess_ms, 3),
            "end_to_end": round(latency_ms, 3),
        },
    }


def _detection_list(detections: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """``[{box_xyxy, score, class_id, label[, mask]}]`` of a ``Detections`` (boxes 2 decimals, scores 4)."""
    boxes = np.round(detections.boxes_xyxy.astype(np.float64), 2).tolist()
    scores = np.round(detections.scores.astype(np.float64), 4).tolist()
    ids = detections.class_ids.tolist()
    dets: list[dict[str, Any]] = []
    for box, score, cid in zip(boxes, scores, ids, strict=True):
        label = class_names[cid] if 0 <= cid < len(class_names) else str(cid)
        dets.append({"box_xyxy": box, "score": score, "class_id": cid, "label": label})
    rles = getattr(detections, "mask_rles", None)
    masks = getattr(detections, "masks", None)
    if rles is not None:
        for d, rle in zip(dets, rles, strict=True):
            d["mask"] = rle
    elif masks is not None and len(masks):
        from streamdet.masks import masks_to_rle

        for d, rle in zip(dets, masks_to_rle(masks), strict=True):
            d["mask"] = rle
    return dets


def eos_payload(eos: EndOfStream) -> dict[str, Any]:
    """The published JSON object of an end of stream (schema :data:`EOS_SCHEMA`).

    Returns:
        ``{schema, source_id, frames, reason, error}`` (``error`` null unless ``reason`` is ``error``).
    """
    return {"schema": EOS_SCHEMA, "source_id": eos.source_id, "frames": eos.frames, "reason": eos.reason.value,
            "error": eos.error or None}


def status_payload(msg: SourceStatusMsg) -> dict[str, Any]:
    """The published JSON object of a source status event (schema :data:`STATUS_SCHEMA`).

    Returns:
        ``{schema, source_id, state, attempt, next_delay_s, message, time, dropped}`` (``message``
        has URL credentials redacted; ``time`` is Unix seconds).
    """
    return {"schema": STATUS_SCHEMA, "source_id": msg.source_id, "state": msg.state.value, "attempt": msg.attempt,
            "next_delay_s": round(msg.next_delay_s, 3), "message": redact_url(msg.message),
            "time": round(msg.time, 6), "dropped": msg.dropped}


def restart_payload(msg: StageRestartMsg, source_id: str) -> dict[str, Any]:
    """The published status object of a stage restart that affected ``source_id`` (schema :data:`STATUS_SCHEMA`).

    Returns:
        ``{schema, source_id, state: "stage_restarted", attempt, next_delay_s: 0, message, time,
        dropped: 0, stage, down_s, restarts}``: ``message`` is why the stage died, ``down_s`` how
        long it was down, ``restarts`` the run's restarts so far.
    """
    return {"schema": STATUS_SCHEMA, "source_id": source_id, "state": STAGE_RESTARTED, "attempt": msg.attempt,
            "next_delay_s": 0.0, "message": redact_url(msg.reason), "time": round(msg.time, 6), "dropped": 0,
            "stage": msg.stage.value, "down_s": round(msg.down_s, 3), "restarts": msg.total}


def dumps(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes of a payload."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
