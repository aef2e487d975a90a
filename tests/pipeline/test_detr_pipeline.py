"""DETR-family models through the whole pipeline: no NMS, the card's resize undone, bad cards refused at start-up."""

from __future__ import annotations

import json

import av
import cv2
import numpy as np
import onnxruntime as ort
import pytest

from pipeline.runner import Pipeline
from streamdet.letterbox import ResizeMode
from tests.helpers.cli import run
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path
from tests.helpers.standin_detr import build_detr, build_rtdetr
from tests.pipeline.test_rect_inference import ultralytics_letterbox

N = 8


def frames(n: int = N) -> list[np.ndarray]:
    with av.open(str(bikes_path())) as c:
        return [f.to_ndarray(format="rgb24") for _, f in zip(range(n), c.decode(video=0))]


def run_jsonl(tmp_path, model, **extra) -> list[dict]:
    out = tmp_path / "o.jsonl"
    s = settings_with({"sources": [str(bikes_path())], "model": str(model), "quiet": True, "max_frames": N,
                       "sinks": {"publish": None, "jsonl": str(out)}, **extra})
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0 and summary.frames == N
    return [json.loads(x) for x in out.read_text().splitlines() if '"frame_index"' in x]


def rtdetr_reference(model, frame, conf=0.25, max_det=300):
    """ultralytics' RT-DETR predictor, written out: stretch to 640x640, /255, best class per query, boxes x (w, h)."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    img = cv2.resize(frame, (640, 640), interpolation=cv2.INTER_LINEAR)
    (pred,) = sess.run(None, {"images": (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]})
    rows = []
    oh, ow = frame.shape[:2]
    for q in pred[0]:
        cls = int(np.argmax(q[4:]))
        score = float(q[4 + cls])
        if score > conf:
            cx, cy, w, h = q[:4]
            box = np.clip([(cx - w / 2) * ow, (cy - h / 2) * oh, (cx + w / 2) * ow, (cy + h / 2) * oh],
                          0, [ow, oh, ow, oh])  # streamdet clips to the frame
            rows.append((score, cls, box))
    rows.sort(key=lambda r: -r[0])
    return rows[:max_det]


def detr_reference(model, frame, conf=0.25):
    """facebookresearch/detr's PostProcess on a letterboxed input: softmax, drop no-object, letterbox undone."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    img, (top, bottom, left, right) = ultralytics_letterbox(frame, (384, 640), 32, auto=False)
    logits, boxes = sess.run(None, {"images": (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]})
    e = np.exp(logits[0] - logits[0].max(-1, keepdims=True))
    prob = (e / e.sum(-1, keepdims=True))[:, :-1]
    fh, fw = frame.shape[:2]
    r = min(640 / fw, 384 / fh)
    rows = []
    for q in range(prob.shape[0]):
        cls = int(prob[q].argmax())
        if prob[q, cls] > conf:
            cx, cy, w, h = boxes[0, q] * [640, 384, 640, 384]
            box = np.array([cx - w / 2 - left, cy - h / 2 - top, cx + w / 2 - left, cy + h / 2 - top]) / r
            rows.append((float(prob[q, cls]), cls, np.clip(box, 0, [fw, fh, fw, fh])))
    rows.sort(key=lambda r: -r[0])
    return rows


def assert_matches(msgs, refs, atol):
    total = 0
    for m, ref in zip(msgs, refs, strict=True):
        dets = m["detections"]
        assert [d["class_id"] for d in dets] == [r[1] for r in ref]
        np.testing.assert_allclose([d["score"] for d in dets], [r[0] for r in ref], atol=1e-4)
        got = np.array([d["box_xyxy"] for d in dets], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(got, np.array([r[2] for r in ref], np.float32).reshape(-1, 4), atol=atol)
        total += len(dets)
    assert total > 0


def test_rtdetr_export_runs_with_no_card_and_equals_ultralytics(tmp_path):
    """An RT-DETR-layout ONNX with ultralytics metadata only: stretched, decoded without NMS, boxes x (w, h)."""
    model = build_rtdetr(tmp_path / "rtdetr.onnx")
    assert not model.with_suffix(".json").exists()
    msgs = run_jsonl(tmp_path, model)
    assert_matches(msgs, [rtdetr_reference(model, f) for f in frames()], atol=0.011)
    # overlapping queries on one object both survive: no NMS ran
    assert any(len(m["detections"]) > len({d["class_id"] for d in m["detections"]}) for m in msgs)


def test_detr_with_letterbox_card_equals_reference(tmp_path):
    model = build_detr(tmp_path / "detr.onnx", input_wh=(640, 384))
    msgs = run_jsonl(tmp_path, model, preprocess={"rect": False})
    assert_matches(msgs, [detr_reference(model, f) for f in frames()], atol=0.011)


def test_detr_stretch_and_letterbox_cards_differ(tmp_path):
    """The card's resize decides where queries land on the frame: the two runs must disagree."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lb = build_detr(tmp_path / "a" / "m.onnx", input_wh=(640, 384))
    st = build_detr(tmp_path / "b" / "m.onnx", input_wh=(640, 384), resize=ResizeMode.STRETCH)
    a = run_jsonl(tmp_path / "a", lb)
    b = run_jsonl(tmp_path / "b", st)
    boxes = [np.array([d["box_xyxy"] for d in m["detections"]]) for m in a]
    other = [np.array([d["box_xyxy"] for d in m["detections"]]) for m in b]
    assert all(x.shape != y.shape or not np.allclose(x, y, atol=1.0) for x, y in zip(boxes, other, strict=True))


@pytest.mark.parametrize("what,kwargs,needle", [
    ("queries", {"card_queries": 100}, "expected pred_logits with 100 queries (head.num_queries), got 64"),
    ("classes", {"card_classes": 5}, "expected pred_logits with 5+1=6 class logits (the last is no-object) per "
                                     "query, got 4"),
])
def test_detr_card_contradicting_the_model_is_one_error_line(tmp_path, what, kwargs, needle):
    model = build_detr(tmp_path / "detr.onnx", **kwargs)
    jsonl = tmp_path / "o.jsonl"
    rc, out, err = run(["--model", str(model), "--quiet", "--publish", "none", "--source", str(bikes_path()),
                        "--jsonl", str(jsonl)])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(model) in lines[0] and needle in lines[0]
    assert not jsonl.exists() or jsonl.read_text() == ""  # refused before any frame was decoded
