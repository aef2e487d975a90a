"""Pipeline detections, instance masks and class maps on the rendered demo video against its ground truth.

The pipeline's published results (decoded from H.264, letterboxed, through the engine and
postprocess in separate processes, serialised to JSON) are scored against the video's ground truth
and compared with the same model run in one process on the lossless rendered frames. A letterbox,
colour-order, coordinate or mask-encoding bug shows as a gap between the two:

- detector: box mAP (pycocotools) within 0.03;
- instance segmentation: mask mAP (pycocotools ``segm``, the published COCO RLEs) within 0.03;
- semantic segmentation: mIoU of the published class maps within 0.02.

The first 125 frames (5 s) of the 10 s video are scored, on both sides (the pipeline stops each
source there, ``max_frames``): the same frames, with 764 ground-truth objects, at half the
rendering and inference time of the whole video.

Models: ``STREAMDET_TEST_MODEL``, ``STREAMDET_TEST_SEG_MODEL`` and ``STREAMDET_TEST_SEMANTIC_MODEL``
(default: the bundled ``engines/models/{detector,segment,semantic}.onnx``); a missing model skips
its test. Run with ``-s`` to see the measured figures.
"""

import functools
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from engines.onnxruntime_backend import OnnxRuntimeEngine
from pipeline.runner import Pipeline
from pipeline.settings import load_settings
from streamdet.card import ModelCard, Task, card_path_for, load_card
from streamdet.masks import rles_to_class_map
from streamdet.postprocess import EVAL_CONFIG, postprocess
from streamdet.preprocess_ops import preprocess_batch
from training.evaluate import (
    IouType,
    _output_order,
    _segm_results,
    detections_to_coco,
    evaluate_coco,
    iou_per_class,
    semantic_confusion,
)
from training.render_video import render_frames

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"
MODELS = ROOT / "engines" / "models"
MODEL = Path(os.environ.get("STREAMDET_TEST_MODEL", MODELS / "detector.onnx"))
SEG_MODEL = Path(os.environ.get("STREAMDET_TEST_SEG_MODEL", MODELS / "segmenter.onnx"))
SEMANTIC_MODEL = Path(os.environ.get("STREAMDET_TEST_SEMANTIC_MODEL", MODELS / "semantic.onnx"))
BATCH = 8
FRAMES = 125
"""Frames scored: the first 5 s of the demo video."""

# the postprocess settings mAP is measured with, in the pipeline's settings tree
EVAL_POSTPROCESS = {"score_threshold": EVAL_CONFIG.score_threshold, "iou_threshold": EVAL_CONFIG.iou_threshold,
                    "max_detections": EVAL_CONFIG.max_detections, "pre_nms_topk": EVAL_CONFIG.pre_nms_topk,
                    "mask_threshold": EVAL_CONFIG.mask_threshold, "multi_label": EVAL_CONFIG.multi_label}

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools


def _missing(model: Path, env: str) -> Any:
    return pytest.mark.skipif(not model.exists(), reason=f"{model}: model not built (or set {env})")


def _demo_gt() -> dict[str, Any]:
    """The demo video's ground truth, cut to its first :data:`FRAMES` frames."""
    gt = json.loads(DEMO.with_suffix(".json").read_text())
    return {**gt, "images": [im for im in gt["images"] if im["id"] < FRAMES],
            "annotations": [a for a in gt["annotations"] if a["image_id"] < FRAMES]}


def _category_ids(gt: dict[str, Any]) -> list[int]:
    return [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]


@dataclass(frozen=True)
class LosslessFrame:
    """What the tests use of a rendered demo frame: its RGB image and its semantic class map."""

    image: npt.NDArray[np.uint8]
    semantic: npt.NDArray[np.uint8]


@functools.cache
def _lossless_frames(seed: int, seconds: float, fps: float) -> tuple[LosslessFrame, ...]:
    """The demo's first :data:`FRAMES` lossless frames, rendered once for the three tests (about 0.45 GB)."""
    samples = itertools.islice(render_frames(seed, seconds, fps), FRAMES)
    return tuple(LosslessFrame(s.image, s.semantic) for s in samples)


def _lossless_batches(gt: dict[str, Any], batch: int = BATCH) -> Iterator[tuple[list[int], list[LosslessFrame]]]:
    """The demo's lossless frames (frame indices and frames), ``batch`` at a time."""
    info = gt["info"]
    frames = _lossless_frames(info["seed"], info["seconds"], info["fps"])
    for start in range(0, len(frames), batch):
        chunk = list(frames[start : start + batch])
        yield list(range(start, start + len(chunk))), chunk


def _run_pipeline(model: Path, gt: dict[str, Any], tmp_path: Path, postprocess_settings: dict[str, Any]) -> list[Any]:
    """The pipeline's published detection messages of the demo video's first :data:`FRAMES` frames, in order."""
    out = tmp_path / "demo.jsonl"
    settings = load_settings(overrides={
        "sources": [str(DEMO)], "model": str(model), "quiet": True, "max_frames": FRAMES,
        "sinks": {"publish": None, "jsonl": str(out)}, "postprocess": postprocess_settings,
    })
    summary = Pipeline(settings=settings).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    msgs = [m for m in map(json.loads, out.read_text().splitlines()) if "detections" in m]
    assert [m["frame_index"] for m in msgs] == [im["id"] for im in gt["images"]]
    return msgs


def _published_results(gt: dict[str, Any], msgs: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO box results and (where published) mask results of the pipeline's messages."""
    name_to_cat = {c["name"]: c["id"] for c in gt["categories"]}
    boxes, masks = [], []
    for msg in msgs:
        w, h = msg["frame_wh"]
        for d in msg["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            image_id, cat, score = msg["frame_index"], name_to_cat[d["label"]], d["score"]
            boxes.append({"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
            if "mask" in d:
                assert d["mask"]["size"] == [h, w]
                masks.append({"image_id": image_id, "category_id": cat, "segmentation": d["mask"], "score": score})
    return boxes, masks


def _load_card(model: Path, task: Task) -> ModelCard:
    card = load_card(card_path_for(model))
    assert card.task is task, f"{model}: expected a {task.value} model, its card says {card.task.value}"
    return card


def _lossless_results(gt, card):
    cat_ids = _category_ids(gt)
    results = []
    with OnnxRuntimeEngine(model_path=MODEL) as engine:
        for ids, samples in _lossless_batches(gt):
            x, lbs = preprocess_batch([s.image for s in samples], card)
            for fid, det in zip(ids, postprocess(engine.infer(x), lbs, card, EVAL_CONFIG)):
                results += detections_to_coco(det, fid, cat_ids)
    return results


@_missing(MODEL, "STREAMDET_TEST_MODEL")
def test_pipeline_map_matches_lossless_frames(tmp_path):
    gt = _demo_gt()
    card = load_card(card_path_for(MODEL))
    lossless = evaluate_coco(gt, _lossless_results(gt, card), IouType.BBOX)
    piped_boxes, _ = _published_results(gt, _run_pipeline(MODEL, gt, tmp_path, EVAL_POSTPROCESS))
    piped = evaluate_coco(gt, piped_boxes, IouType.BBOX)
    print(f"demo video mAP50-95: pipeline {piped['mAP50-95']:.4f} lossless {lossless['mAP50-95']:.4f}; "
          f"mAP50: pipeline {piped['mAP50']:.4f} lossless {lossless['mAP50']:.4f}")
    assert abs(piped["mAP50-95"] - lossless["mAP50-95"]) <= 0.03
    assert lossless["mAP50-95"] > 0.1  # the model does detect the objects


def _lossless_segment_results(gt, card):
    """COCO box and mask results of the segment model on the lossless frames (``training.evaluate``'s path)."""
    cat_ids = _category_ids(gt)
    boxes, masks = [], []
    engine = OnnxRuntimeEngine(model_path=SEG_MODEL)
    with engine:
        order = _output_order(engine, card)
        for ids, samples in _lossless_batches(gt):
            x, lbs = preprocess_batch([s.image for s in samples], card)
            raw = engine.infer(x)
            b, m = _segm_results(raw[order[0]], raw[order[1]], card, EVAL_CONFIG, lbs, ids, cat_ids)
            boxes += b
            masks += m
    return boxes, masks


@_missing(SEG_MODEL, "STREAMDET_TEST_SEG_MODEL")
def test_pipeline_mask_map_matches_lossless_frames(tmp_path):
    gt = _demo_gt()
    card = _load_card(SEG_MODEL, Task.SEGMENT)
    lossless_boxes, lossless_masks = _lossless_segment_results(gt, card)
    piped_boxes, piped_masks = _published_results(gt, _run_pipeline(SEG_MODEL, gt, tmp_path, EVAL_POSTPROCESS))
    assert len(piped_masks) == len(piped_boxes)  # every published detection carries its mask
    lossless = {t: evaluate_coco(gt, r, t) for t, r in ((IouType.SEGM, lossless_masks), (IouType.BBOX, lossless_boxes))}
    piped = {t: evaluate_coco(gt, r, t) for t, r in ((IouType.SEGM, piped_masks), (IouType.BBOX, piped_boxes))}
    for t in (IouType.SEGM, IouType.BBOX):
        print(f"demo video {card.name} {t.value} mAP50-95: pipeline {piped[t]['mAP50-95']:.4f} lossless "
              f"{lossless[t]['mAP50-95']:.4f}; mAP50: pipeline {piped[t]['mAP50']:.4f} lossless "
              f"{lossless[t]['mAP50']:.4f} ({len(piped_masks)} published, {len(lossless_masks)} lossless detections)")
    assert abs(piped[IouType.SEGM]["mAP50-95"] - lossless[IouType.SEGM]["mAP50-95"]) <= 0.03
    assert lossless[IouType.SEGM]["mAP50-95"] > 0.1  # the model does segment the objects


def _miou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes present (``training.evaluate.miou`` from an accumulated confusion matrix)."""
    return float(np.nanmean(iou_per_class(confusion)))


@_missing(SEMANTIC_MODEL, "STREAMDET_TEST_SEMANTIC_MODEL")
def test_pipeline_semantic_miou_matches_lossless_frames(tmp_path):
    gt = _demo_gt()
    card = _load_card(SEMANTIC_MODEL, Task.SEMANTIC)
    n = card.head.num_classes
    assert list(card.class_names[1:]) == [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    published = {m["frame_index"]: m["semantic"] for m in _run_pipeline(SEMANTIC_MODEL, gt, tmp_path, {})}
    cm_piped = np.zeros((n, n), dtype=np.int64)
    cm_lossless = np.zeros((n, n), dtype=np.int64)
    agree = pixels = 0
    with OnnxRuntimeEngine(model_path=SEMANTIC_MODEL) as engine:
        for ids, samples in _lossless_batches(gt):
            x, lbs = preprocess_batch([s.image for s in samples], card)
            dets = postprocess(engine.infer(x), lbs, card, EVAL_CONFIG)
            for fid, sample, det in zip(ids, samples, dets, strict=True):
                sem = published[fid]
                piped_map = rles_to_class_map([(c["class_id"], c["mask"]) for c in sem["classes"]])
                assert det.semantic is not None and piped_map.shape == det.semantic.shape == sample.semantic.shape
                cm_piped += semantic_confusion(piped_map, sample.semantic, n)
                cm_lossless += semantic_confusion(det.semantic, sample.semantic, n)
                agree += int(np.count_nonzero(piped_map == det.semantic))
                pixels += piped_map.size
    piped, lossless = _miou(cm_piped), _miou(cm_lossless)
    print(f"demo video {card.name} mIoU: pipeline {piped:.4f} lossless {lossless:.4f}; pixels where the published "
          f"map equals the lossless one: {agree / pixels:.4f}")
    assert abs(piped - lossless) <= 0.02
    assert lossless > 0.3  # the model does segment the objects
