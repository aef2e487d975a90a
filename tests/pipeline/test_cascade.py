"""The cascade: a secondary model on crops of the primary's detections, end to end on stand-in models.

The reference cuts the crops, letterboxes them (ultralytics' letterbox written out) and runs the
secondary ONNX frame by frame in the test; the pipeline's children must be those, in frame pixels,
with their masks; crops are batched across frames and sources; killing the secondary engine or
the postprocess stage changes nothing in the output; bad settings are one start-up error line.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal

import av
import numpy as np
import onnxruntime as ort
import pytest
from pycocotools import mask as mask_utils

import pipeline.runner as runner_module
from pipeline.runner import Pipeline
from streamdet.card import load_card, save_card
from streamdet.letterbox import LetterboxParams
from streamdet.postprocess import PostprocessConfig, postprocess
from tests.helpers.cli import run
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path, build_standin
from tests.helpers.standin_seg import build_segment_standin, build_semantic_standin
from tests.pipeline.test_rect_inference import ultralytics_letterbox
from tests.pipeline.test_supervise import strip_timing

FRAMES = 30
SEC_WH = (128, 64)
SEC = {"classes": ["red", "blue"], "min_side_px": 12.0, "pad": 0.1, "max_crops": 3, "max_batch": 16,
       "score_threshold": 0.25, "iou_threshold": 0.5, "class_agnostic": True, "max_detections": 32}
SEC_CFG = PostprocessConfig(score_threshold=0.25, iou_threshold=0.5, max_detections=32, class_agnostic=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade")
    prim = build_standin(d / "prim.onnx")
    sec = build_segment_standin(d / "sec.onnx", input_wh=SEC_WH)
    return prim, sec


def cascade_settings(tmp_path, models, name, **sec_over):
    prim, sec = models
    bikes = str(bikes_path())
    return settings_with({"sources": [{"id": "a", "url": bikes}, {"id": "b", "url": bikes}], "model": str(prim),
                          "quiet": True, "max_frames": FRAMES, "sinks": {"publish": None,
                                                                         "jsonl": str(tmp_path / f"{name}.jsonl")},
                          "secondary": [{"model": str(sec), **SEC, **sec_over}]})


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, models):
    tmp = tmp_path_factory.mktemp("ref")
    summary = Pipeline(settings=cascade_settings(tmp, models, "ref")).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    return summary, read(tmp / "ref.jsonl")


def frames(n=FRAMES):
    with av.open(str(bikes_path())) as c:
        return [f.to_ndarray(format="rgb24") for _, f in zip(range(n), c.decode(video=0))]


def select_reference(dets, wanted, min_side, max_crops):
    """Parents by descending score (ties: first in the message), wanted classes, shorter side >= min_side."""
    ok = [(i, d) for i, d in enumerate(dets) if d["label"] in wanted]
    big = [(i, d) for i, d in ok if min(d["box_xyxy"][2] - d["box_xyxy"][0], d["box_xyxy"][3] - d["box_xyxy"][1])
           >= min_side]
    big.sort(key=lambda x: -x[1]["score"])
    return [i for i, _ in big[:max_crops]], len(ok) - len(big), max(0, len(big) - max_crops)


def window(box, hw, pad):
    x1, y1, x2, y2 = box
    px, py = (x2 - x1) * pad, (y2 - y1) * pad
    h, w = hw
    x0, y0 = min(max(0, math.floor(x1 - px)), w - 1), min(max(0, math.floor(y1 - py)), h - 1)
    return x0, y0, max(x0 + 1, min(w, math.ceil(x2 + px))), max(y0 + 1, min(h, math.ceil(y2 + py)))


def secondary_reference(sess, card, frame, box):
    """The crop around ``box``, letterboxed as ultralytics does, through the secondary; children in frame pixels.

    Children are clipped to the parent ``box`` (box and mask; those left with no area dropped).
    Returns ``(boxes (K, 4), scores (K,), class_ids (K,), frame-sized masks (K, H, W))`` and the crop window.
    """
    x0, y0, x1, y1 = window(box, frame.shape[:2], SEC["pad"])
    crop = frame[y0:y1, x0:x1]
    img, (top, bottom, left, right) = ultralytics_letterbox(crop, (SEC_WH[1], SEC_WH[0]), 32, auto=False)
    lb = LetterboxParams(crop.shape[:2], SEC_WH, (SEC_WH[0] - left - right, SEC_WH[1] - top - bottom), (left, top))
    outs = sess.run(None, {"images": (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]})
    (d,) = postprocess(outs, [lb], card, SEC_CFG)
    px0, py0, px1, py1 = (float(v) for v in np.asarray(box, np.float32))
    boxes, scores, classes, masks = [], [], [], []
    for b, sc, c, mk in zip(d.boxes_xyxy.astype(np.float64), d.scores, d.class_ids, d.masks, strict=True):
        fb = b + [x0, y0, x0, y0]
        cb = [min(max(fb[0], px0), px1), min(max(fb[1], py0), py1), min(max(fb[2], px0), px1),
              min(max(fb[3], py0), py1)]
        if cb[2] <= cb[0] or cb[3] <= cb[1]:
            continue
        full = np.zeros(frame.shape[:2], np.uint8)
        full[y0:y1, x0:x1] = mk
        cut = np.zeros_like(full)
        wx0, wy0, wx1, wy1 = math.floor(cb[0]), math.floor(cb[1]), math.ceil(cb[2]), math.ceil(cb[3])
        cut[wy0:wy1, wx0:wx1] = full[wy0:wy1, wx0:wx1]
        boxes.append(cb)
        scores.append(float(sc))
        classes.append(int(c))
        masks.append(cut)
    return ((np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
             np.asarray(classes, np.int64), masks), (x0, y0, x1, y1))


def test_children_equal_the_secondary_run_on_reference_crops(models, reference_run):
    summary, msgs = reference_run
    prim, sec = models
    sess = ort.InferenceSession(str(sec), providers=["CPUExecutionProvider"])
    card = load_card(sec.with_suffix(".json"))
    imgs = frames()
    too_small = over = crops = children = 0
    for m in msgs:
        if "frame_index" not in m:
            continue
        frame = imgs[m["frame_index"]]
        dets = m["detections"]
        parents, small, more = select_reference(dets, set(SEC["classes"]), SEC["min_side_px"], SEC["max_crops"])
        too_small, over, crops = too_small + small, over + more, crops + len(parents)
        assert [i for i, d in enumerate(dets) if "children" in d] == sorted(parents)
        for i in parents:
            (w_boxes, w_scores, w_classes, w_masks), (x0, y0, x1, y1) = secondary_reference(
                sess, card, frame, dets[i]["box_xyxy"])
            # equal scores (the stand-in's are often exactly 0.5) may come in another order from a batch of 16
            got = sorted(dets[i]["children"], key=lambda c: (-c["score"], c["class_id"], c["box_xyxy"]))
            order = sorted(range(len(w_boxes)), key=lambda k: (-round(float(w_scores[k]), 4), int(w_classes[k]),
                                                               w_boxes[k].round(2).tolist()))
            assert [c["class_id"] for c in got] == w_classes[order].tolist()
            boxes = np.array([c["box_xyxy"] for c in got], np.float32).reshape(-1, 4)
            np.testing.assert_allclose(boxes, w_boxes[order].reshape(-1, 4), atol=0.011)
            np.testing.assert_allclose([c["score"] for c in got], w_scores[order], atol=1e-4)
            px0, py0, px1, py1 = dets[i]["box_xyxy"]
            for c, k in zip(got, order, strict=True):
                full = mask_utils.decode({"size": c["mask"]["size"], "counts": c["mask"]["counts"].encode()})
                assert full.shape == frame.shape[:2]
                np.testing.assert_array_equal(full, w_masks[k])  # the crop's mask in place, cut to the clipped box
                bx0, by0, bx1, by1 = c["box_xyxy"]
                assert px0 - 0.01 <= bx0 <= bx1 <= px1 + 0.01 and py0 - 0.01 <= by0 <= by1 <= py1 + 0.01  # in parent
            children += len(got)
    assert crops > 50 and children > 50 and too_small + over > 0  # the test sees crops, children and skips
    line = next(x for x in summary.outputs if x.startswith("secondary"))
    got_counts = re.search(r"(\d+) crops in (\d+) batches .* skipped (\d+) smaller than min_side_px and (\d+) over",
                           line)
    assert got_counts is not None, line
    n_crops, n_batches, n_small, n_over = (int(x) for x in got_counts.groups())
    assert (n_crops, n_small, n_over) == (crops, too_small, over)
    # batched across frames and sources: more crops per batch than one frame can give
    assert n_crops / n_batches > SEC["max_crops"], line


def test_killed_secondary_engine_and_postprocess_change_nothing(tmp_path, models, reference_run, monkeypatch):
    _, ref = reference_run
    # the monitor is called every RSS_SAMPLE_S (0.5 s): an idle machine runs these 60 frames in less.
    # Progress arrives every 0.1 s, and frames held for the restarted secondary come out in a burst:
    # the postprocess stage is killed as soon as that restart is over, not at a later frame count.
    monkeypatch.setattr(runner_module, "RSS_SAMPLE_S", 0.05)
    kills: list[str] = []

    def monitor(p: Pipeline) -> None:
        pids = p.stage_pids()
        for victim, at in (("secondary:segstandin", 10), ("postprocess", 10)):
            if victim not in kills and p.frames_done >= at and not p.restarting and victim in pids \
                    and len(kills) == (0 if victim.startswith("secondary") else 1):
                os.kill(pids[victim], signal.SIGKILL)
                kills.append(victim)

    summary = Pipeline(settings=cascade_settings(tmp_path, models, "out"), monitor=monitor).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    assert kills == ["secondary:segstandin", "postprocess"]
    assert summary.restarts == {"secondary:segstandin": 1, "postprocess": 1}
    got = read(tmp_path / "out.jsonl")
    key = lambda m: (m.get("source_id"), m.get("frame_index", 1 << 30))  # noqa: E731 - per-source order
    got_s, ref_s = sorted(map(strip_timing, got), key=key), sorted(map(strip_timing, ref), key=key)
    assert got_s == ref_s, f"{first_difference(got_s, ref_s)}; {summary.outputs}"


def first_difference(a, b, path: str = "") -> str:
    """Where two JSON-like values first differ: ``path: a != b`` (a readable failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and a != b:
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
        return f"{path}: {len(a)} items != {len(b)} items"
    return f"{path}: {str(a)[:300]} != {str(b)[:300]}"


def test_text_is_read_left_to_right(tmp_path, models):
    """A character-reading secondary (one-character class names): ``text`` = children by centre x, score = least."""
    prim, sec = models
    chars = tmp_path / "chars.onnx"
    chars.write_bytes(sec.read_bytes())
    card = load_card(sec.with_suffix(".json"))
    save_card(card.model_copy(update={"name": "chars", "class_names": ("R", "G", "B")}), chars.with_suffix(".json"))
    s = settings_with({"sources": [str(bikes_path())], "model": str(prim), "quiet": True, "max_frames": 12,
                       "sinks": {"publish": None, "jsonl": str(tmp_path / "t.jsonl")},
                       "secondary": [{"model": str(chars), **SEC, "read_text": True}]})
    assert Pipeline(settings=s).run(handle_signals=False).exit_code == 0
    read_any = 0
    for m in read(tmp_path / "t.jsonl"):
        for d in m.get("detections", []):
            if "children" not in d:
                assert "text" not in d
                continue
            kids = sorted(d["children"], key=lambda c: ((c["box_xyxy"][0] + c["box_xyxy"][2]) / 2, c["box_xyxy"][0]))
            assert d["text"] == "".join(c["label"] for c in kids)
            assert d["text_score"] == (min(c["score"] for c in kids) if kids else 0.0)
            read_any += bool(d["text"])
    assert read_any > 10


@pytest.mark.parametrize("case,needle", [
    ("semantic", "its card's task is semantic, but a secondary model must give boxes (task detect or segment)"),
    ("unknown_class", "primary class 'plate' is not a class of the primary model standin (it has red, green, blue)"),
    ("read_text", "read_text needs one character per class name, but its card (segstandin) has 'red'"),
    ("card", "contradicts"),
    ("missing", "model file not found"),
    ("tcp", "secondary models need transport.mode ipc"),
])
def test_bad_secondary_settings_are_one_start_up_error_line(tmp_path, models, case, needle):
    prim, sec = models
    entry = {"model": str(sec), "classes": ["red"]}
    extra: list[str] = []
    named = str(sec)
    if case == "semantic":
        named = str(build_semantic_standin(tmp_path / "sem.onnx"))
        entry["model"] = named
    elif case == "unknown_class":
        entry["classes"] = ["red", "plate"]
    elif case == "read_text":
        entry["read_text"] = True
    elif case == "card":
        bad = json.loads(sec.with_suffix(".json").read_text())
        bad["input"]["height"] = 96
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        entry["card"] = str(tmp_path / "bad.json")
    elif case == "missing":
        named = entry["model"] = str(tmp_path / "nope.onnx")
    elif case == "tcp":
        extra = ["--set", "transport.mode=tcp"]
        named = "transport.mode"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"secondary": [entry]}))
    jsonl = tmp_path / "o.jsonl"
    rc, out, err = run(["--model", str(prim), "--quiet", "--publish", "none", "--source", str(bikes_path()),
                        "--config", str(cfg), "--jsonl", str(jsonl), *extra])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0] and named in lines[0], lines[0]
    assert not jsonl.exists() or jsonl.read_text() == ""  # refused before any frame was decoded
