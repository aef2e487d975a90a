"""A video with a display matrix (a phone's portrait clip) is decoded upright, as OpenCV and FFmpeg's CLI show it.

The references: OpenCV's ``VideoCapture`` (``CAP_PROP_ORIENTATION_AUTO``, on by default; what
ultralytics reads frames with) for the pixels and the frame size, and the bundled detector run in
this process on OpenCV's upright frames for the boxes.
"""

from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest

from engines.onnxruntime_backend import OnnxRuntimeEngine
from pipeline.runner import Pipeline
from pipeline.settings import load_settings
from pipeline.sources.file_reader import file_frames
from pipeline.sources.options import DecodeThreads
from pipeline.sources.probe import probe_source
from streamdet.card import card_path_for, load_card
from streamdet.orientation import quarter_turns
from streamdet.postprocess import postprocess
from streamdet.preprocess_ops import preprocess_batch
from tests.helpers.cli import ROOT
from tests.helpers.clips import write_h264

DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"
MODEL = ROOT / "engines" / "models" / "detector.onnx"
FRAMES = 8


def _upright_demo_frames(n: int = FRAMES) -> list[npt.NDArray[np.uint8]]:
    with av.open(str(DEMO)) as c:
        frames = []
        for f in c.decode(c.streams.video[0]):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) == n:
                return frames
    return frames


def _turned_clip(path: Path, upright_rgb: list[npt.NDArray[np.uint8]], rotation: int) -> Path:
    """An H.264 MP4 whose coded frames are ``upright_rgb`` turned away, and whose display matrix turns them back."""
    coded = [np.rot90(img, -quarter_turns(rotation)) for img in upright_rgb]
    return write_h264(path, coded, stream_options={"crf": "12"}, display_rotation=rotation)


def _opencv_rgb(path: Path) -> list[npt.NDArray[np.uint8]]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    cap.release()
    return frames


@pytest.mark.parametrize("rotation", [90, -90, 180, 0])
def test_frames_are_decoded_upright_pixel_for_pixel_as_opencv_shows_them(tmp_path, rotation):
    clip = _turned_clip(tmp_path / "turned.mp4", [f[:96, :160] for f in _upright_demo_frames(4)], rotation)
    reference = _opencv_rgb(clip)
    assert len(reference) == 4 and reference[0].shape == (96, 160, 3)  # OpenCV turns them back upright
    info = probe_source(str(clip), "turned")
    assert info.frame_hw == (96, 160)
    errors: list[str] = []
    ours = [rgb for rgb, _, _ in file_frames(info, threads=DecodeThreads.AUTO, on_error=errors.append)]
    assert not errors
    assert len(ours) == 4
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def _reference_detections(frames: list[npt.NDArray[np.uint8]], settings: Any) -> list[Any]:
    card = load_card(card_path_for(MODEL))
    out = []
    with OnnxRuntimeEngine(model_path=MODEL) as engine:
        for img in frames:
            x, lbs = preprocess_batch([img], card)
            out += postprocess(engine.infer(x), lbs, card, settings.postprocess.to_config())
    return out


def test_boxes_of_a_portrait_clip_are_in_its_upright_frame(tmp_path):
    import json

    clip = _turned_clip(tmp_path / "portrait.mp4", _upright_demo_frames(), 90)
    jsonl, video = tmp_path / "d.jsonl", tmp_path / "annotated.mp4"
    settings = load_settings(overrides={"sources": [str(clip)], "model": str(MODEL), "quiet": True,
                                        "sinks": {"publish": None, "jsonl": str(jsonl), "video_out": str(video)}})
    summary = Pipeline(settings=settings).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    msgs = [m for m in map(json.loads, jsonl.read_text().splitlines()) if "detections" in m]
    upright = _opencv_rgb(clip)
    h, w = upright[0].shape[:2]
    assert [m["frame_wh"] for m in msgs] == [[w, h]] * FRAMES
    reference = _reference_detections(upright, settings)
    assert sum(len(d.boxes_xyxy) for d in reference) >= FRAMES  # the detector finds the demo's objects
    for msg, ref in zip(msgs, reference, strict=True):
        got = np.asarray([d["box_xyxy"] for d in msg["detections"]], dtype=np.float32).reshape(-1, 4)
        np.testing.assert_allclose(got, ref.boxes_xyxy, atol=0.01)
    with av.open(str(video)) as c:  # the annotated video is upright itself, with no display matrix to apply
        first = next(c.decode(c.streams.video[0]))
        assert (first.height, first.width, first.rotation) == (h, w, 0)
