"""Models with a dynamic input height and width run at the minimum rectangle, as ultralytics' predictor runs them.

The reference is ultralytics' ``LetterBox(auto=True)`` (``ultralytics/data/augment.py``) written
out here from its source, independently of :mod:`streamdet.letterbox`: the scale ``r = min(new_h / h,
new_w / w)``, the resize to ``(round(w r), round(h r))`` with ``cv2.INTER_LINEAR``, each padding cut to
its remainder modulo the stride and split as ``round(d / 2 -+ 0.1)``, grey 114 borders.
"""

from __future__ import annotations

import json

import av
import cv2
import numpy as np
import onnxruntime as ort
import pytest

from pipeline.runner import Pipeline
from streamdet.letterbox import LetterboxParams, letterbox, rect_input_wh
from streamdet.postprocess import PostprocessConfig, postprocess
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path, build_standin_dynamic, standin_card


def ultralytics_letterbox(image: np.ndarray, new_shape: tuple[int, int] = (640, 640), stride: int = 32,
                          auto: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """ultralytics ``LetterBox(new_shape, auto, stride=stride)(image=...)``: the image, (top, bottom, left, right)."""
    h, w = image.shape[:2]
    r = min(new_shape[0] / h, new_shape[1] / w)
    new_unpad = int(round(w * r)), int(round(h * r))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    dw /= 2
    dh /= 2
    if (w, h) != new_unpad:
        image = cv2.resize(image, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    out = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return out, (top, bottom, left, right)


FRAME_SIZES = [(272, 640), (720, 1280), (1080, 1920), (480, 270), (640, 640), (100, 1000), (33, 47), (2000, 10),
               (288, 640), (361, 640)]


@pytest.mark.parametrize("frame_hw", FRAME_SIZES, ids=[f"{h}x{w}" for h, w in FRAME_SIZES])
@pytest.mark.parametrize("stride", [32, 64])
def test_rect_size_and_pixels_equal_ultralytics(frame_hw, stride):
    h, w = frame_hw
    image = np.random.default_rng(h * 7 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    want, (top, _, left, _) = ultralytics_letterbox(image, (640, 640), stride)
    rect = rect_input_wh(frame_hw, (640, 640), stride)
    assert rect == (want.shape[1], want.shape[0])
    assert rect[0] % stride == 0 or rect[0] == 640 or (640 - rect[0]) % stride == 0
    got, params = letterbox(image, rect)
    assert params.pad_xy == (left, top)
    np.testing.assert_array_equal(got, want)


def test_named_sizes():
    assert rect_input_wh((272, 640), (640, 640), 32) == (640, 288)  # bikes.mp4
    assert rect_input_wh((720, 1280), (640, 640), 32) == (640, 384)  # 720p
    assert rect_input_wh((640, 640), (640, 640), 32) == (640, 640)


def reference(model, frames, rect: bool) -> list:
    """ultralytics' preprocessing (minimum rectangle when ``rect``), ONNX Runtime, postprocess; frame by frame."""
    card = standin_card((640, 640))
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = []
    for f in frames:
        img, (top, bottom, left, right) = ultralytics_letterbox(f, (640, 640), 32, auto=rect)
        ih, iw = img.shape[:2]
        fh, fw = f.shape[:2]
        lb = LetterboxParams((fh, fw), (iw, ih), (iw - left - right, ih - top - bottom), (left, top))
        x = (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        out += postprocess(sess.run(None, {"images": x}), [lb], card, PostprocessConfig())
    return out


@pytest.mark.parametrize("rect", [True, False], ids=["rect", "square"])
def test_pipeline_on_a_dynamic_model_equals_ultralytics_preprocessing(tmp_path, rect):
    model = build_standin_dynamic(tmp_path / "dyn.onnx")
    n = 10
    out = tmp_path / "o.jsonl"
    s = settings_with({"sources": [str(bikes_path())], "model": str(model), "quiet": True, "max_frames": n,
                       "sinks": {"publish": None, "jsonl": str(out)}, "preprocess": {"rect": rect}})
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0 and summary.frames == n
    msgs = [json.loads(x) for x in out.read_text().splitlines() if '"frame_index"' in x]
    frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(n), av.open(str(bikes_path())).decode(video=0))]
    want = reference(model, frames, rect)
    other = reference(model, frames, not rect)
    differs = 0
    for m, d, o in zip(msgs, want, other, strict=True):
        got = np.array([x["box_xyxy"] for x in m["detections"]], np.float32).reshape(-1, 4)
        assert len(got) > 0
        np.testing.assert_allclose(got, d.boxes_xyxy, atol=0.011)
        assert [x["class_id"] for x in m["detections"]] == d.class_ids.tolist()
        differs += got.shape != o.boxes_xyxy.shape or not np.allclose(got, o.boxes_xyxy, atol=0.5)
    assert differs == n  # the rectangle and the square give other boxes: the test tells them apart
