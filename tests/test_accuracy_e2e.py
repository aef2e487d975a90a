"""Pipeline detections on the rendered demo video against its ground truth.

The pipeline's published detections (decoded from H.264, letterboxed, through the engine and
postprocess in separate processes) are scored with pycocotools against the video's ground truth and
compared with the same model run in one process on the lossless rendered frames. A letterbox,
colour-order or coordinate bug shows as a gap between the two.
"""

import json
import os
from pathlib import Path

import pytest

from engines.onnxruntime_backend import OnnxRuntimeEngine
from pipeline.modelcard import card_path_for, load_card
from pipeline.postprocess import EVAL_CONFIG, postprocess
from pipeline.preprocess_ops import preprocess_batch
from pipeline.runner import Pipeline
from pipeline.settings import load_settings
from training.evaluate import IouType, detections_to_coco, evaluate_coco
from training.render_video import render_frames

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"
MODEL = Path(os.environ.get("STREAMDET_TEST_MODEL", ROOT / "engines" / "models" / "detector.onnx"))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MODEL.exists(), reason="bundled detector not built")]


def _lossless_results(gt, card, batch=8):
    info = gt["info"]
    cat_ids = [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    results = []
    with OnnxRuntimeEngine(model_path=MODEL) as engine:
        frames, ids = [], []
        for i, sample in enumerate(render_frames(info["seed"], info["seconds"], info["fps"])):
            frames.append(sample.image)
            ids.append(i)
            if len(frames) == batch:
                x, lbs = preprocess_batch(frames, card)
                for fid, det in zip(ids, postprocess(engine.infer(x), lbs, card, EVAL_CONFIG)):
                    results += detections_to_coco(det, fid, cat_ids)
                frames, ids = [], []
        if frames:
            x, lbs = preprocess_batch(frames, card)
            for fid, det in zip(ids, postprocess(engine.infer(x), lbs, card, EVAL_CONFIG)):
                results += detections_to_coco(det, fid, cat_ids)
    return results


def _pipeline_results(gt, tmp_path):
    out = tmp_path / "demo.jsonl"
    settings = load_settings(overrides={
        "sources": [str(DEMO)], "model": str(MODEL), "quiet": True,
        "sinks": {"publish": None, "jsonl": str(out)},
        "postprocess": {"score_threshold": EVAL_CONFIG.score_threshold, "iou_threshold": EVAL_CONFIG.iou_threshold,
                        "max_detections": EVAL_CONFIG.max_detections},
    })
    Pipeline(settings=settings).run(handle_signals=False)
    name_to_cat = {c["name"]: c["id"] for c in gt["categories"]}
    results, frames = [], 0
    for line in out.read_text().splitlines():
        msg = json.loads(line)
        if "detections" not in msg:
            continue
        frames += 1
        w, h = msg["frame_wh"]
        for d in msg["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            results.append({"image_id": msg["frame_index"], "category_id": name_to_cat[d["label"]],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})
    assert frames == len(gt["images"])
    return results


def test_pipeline_map_matches_lossless_frames(tmp_path):
    gt = json.loads(DEMO.with_suffix(".json").read_text())
    card = load_card(card_path_for(MODEL))
    lossless = evaluate_coco(gt, _lossless_results(gt, card), IouType.BBOX)
    piped = evaluate_coco(gt, _pipeline_results(gt, tmp_path), IouType.BBOX)
    print(f"demo video mAP50-95: pipeline {piped['mAP50-95']:.4f} lossless {lossless['mAP50-95']:.4f}; "
          f"mAP50: pipeline {piped['mAP50']:.4f} lossless {lossless['mAP50']:.4f}")
    assert abs(piped["mAP50-95"] - lossless["mAP50-95"]) <= 0.03
    assert lossless["mAP50-95"] > 0.1  # the model does detect the objects
