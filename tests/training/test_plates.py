import hashlib
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from streamdet.constants import PAD_VALUE
from streamdet.letterbox import letterbox
from training.plates import (
    CHAR_NAMES,
    CROP_PAD,
    crop_box_xyxy,
    make_char_crop_sample,
    make_plate_sample,
    scene_class_names,
)
from training.render_video import main as render_main
from training.render_video import render_frames

SHAPES_FRAMES_SHA256 = "aafefb274c5bfc40e58f772ee23c7bfac83e82374ae82d4a51fc4444fdab0d10"
"""render_frames(7, 1.0) of the shapes scene, hashed before the plate scene was added."""


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_character_set():
    assert len(set(CHAR_NAMES)) == len(CHAR_NAMES) == 20
    assert not set("OIBSZGDQ") & set(CHAR_NAMES)
    assert scene_class_names("plates") == ("plate",)
    assert scene_class_names("plate_chars") == CHAR_NAMES


@pytest.mark.parametrize("index", [0, 1])
def test_plate_frame_annotations(index):
    s = make_plate_sample(11, index)
    again = make_plate_sample(11, index)
    assert _digest(s.image, s.boxes_xyxy, s.char_masks) == _digest(again.image, again.boxes_xyxy, again.char_masks)
    assert (s.class_ids == 0).all()
    for text in s.texts:
        assert 4 <= len(text) <= 8
    for p, text in enumerate(s.texts):
        sel = s.char_plate_index == p
        # characters hidden by a pole may be missing; those present keep their order and classes
        got = "".join(CHAR_NAMES[c] for c in s.char_class_ids[sel])
        it = iter(text)
        assert all(ch in it for ch in got)
    for b, m, p in zip(s.char_boxes_xyxy, s.char_masks, s.char_plate_index):
        pb = s.boxes_xyxy[p]
        assert (b[:2] >= pb[:2] - 1).all() and (b[2:] <= pb[2:] + 1).all()  # inside its plate
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(b)  # tight box of the mask
    assert make_plate_sample(11, index, with_chars=False).image.tobytes() == s.image.tobytes()


def test_char_crop_sample():
    s = make_char_crop_sample(5, 3, (384, 96))
    assert s.image.shape == (96, 384, 3)
    assert _digest(s.image, s.masks) == _digest(*(lambda t: (t.image, t.masks))(make_char_crop_sample(5, 3, (384, 96))))
    assert "".join(CHAR_NAMES[c] for c in s.class_ids) == s.text
    assert 16 <= s.plate_h_px <= 125
    for b, m in zip(s.boxes_xyxy, s.masks):
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(b)
    assert (np.diff((s.boxes_xyxy[:, 0] + s.boxes_xyxy[:, 2]) / 2) > 0).all()  # left to right


def test_crop_geometry_and_letterbox_by_hand():
    box = np.array([100.0, 50.0, 200.0, 80.0], np.float32)  # 100 x 30
    np.testing.assert_array_equal(crop_box_xyxy(box, CROP_PAD), [90, 47, 210, 83])
    np.testing.assert_array_equal(crop_box_xyxy(box, CROP_PAD, (205, 100)), [90, 47, 205, 83])
    crop = np.full((36, 120, 3), 200, np.uint8)
    out, p = letterbox(crop, (384, 96), PAD_VALUE)
    # 120x36 -> scale min(384/120, 96/36) = 2.667: 320x96, centred with 32 px of pad left and right
    assert p.resized_wh == (320, 96) and p.pad_xy == (32, 0)
    assert (out[:, :32] == PAD_VALUE).all() and (out[:, 352:] == PAD_VALUE).all() and (out[:, 32:352] == 200).all()


def test_plate_video_coco(tmp_path):
    out = tmp_path / "plates.mp4"
    assert render_main(["--scene", "plates", "--out", str(out), "--seconds", "0.2", "--seed", "2"]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["categories"][0] == {"id": 1, "name": "plate", "supercategory": "plate"}
    assert [c["name"] for c in doc["categories"][1:]] == list(CHAR_NAMES)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 22))
    coco = COCO(str(out.with_suffix(".json")))
    plates = {a["id"]: a for a in doc["annotations"] if a["category_id"] == 1}
    chars = [a for a in doc["annotations"] if a["category_id"] > 1]
    assert plates and chars and all(4 <= len(a["text"]) <= 8 for a in plates.values())
    assert all(plates[a["parent_id"]]["image_id"] == a["image_id"] for a in chars)
    res = coco.loadRes([{**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 0.9}
                        for a in doc["annotations"]])
    assert len(res.getAnnIds()) == len(doc["annotations"])


def test_shapes_scene_unchanged():
    h = hashlib.sha256()
    for s in render_frames(7, 1.0):
        for a in (s.image, s.boxes_xyxy, s.masks, s.class_ids, s.ignore):
            h.update(a.tobytes())
    assert h.hexdigest() == SHAPES_FRAMES_SHA256
