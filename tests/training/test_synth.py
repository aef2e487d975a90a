import hashlib

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from training.synth import CLASS_NAMES, ShapeSpec, SyntheticDataset, make_sample, mask_box_xyxy, rasterize


def _digest(s) -> str:
    h = hashlib.sha256()
    for a in (s.image, s.boxes_xyxy, s.class_ids, s.masks, s.semantic, s.ignore):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes():
    assert _digest(make_sample(3, 5)) == _digest(SyntheticDataset(seed=3, num_images=6)[5])


def test_different_seed_differs():
    assert _digest(make_sample(3, 5)) != _digest(make_sample(4, 5))


def test_sample_annotations_consistent():
    s = make_sample(11, 0)
    assert s.image.shape == (720, 1280, 3)
    assert len(CLASS_NAMES) >= 8
    assert s.boxes_xyxy.shape[0] >= 1
    for box, m, cid in zip(s.boxes_xyxy, s.masks, s.class_ids):
        assert tuple(box) == mask_box_xyxy(m)
        # pycocotools agrees on the box of the mask
        rle = mask_utils.encode(np.asfortranarray(m))
        x, y, w, h = mask_utils.toBbox(rle)
        np.testing.assert_allclose(box, [x, y, x + w, y + h])
        # the semantic map holds this class wherever the visible mask is
        assert (s.semantic[m > 0] == cid + 1).all()
    # visible masks do not overlap
    assert s.masks.sum(axis=0).max() <= 1


@pytest.mark.parametrize("size", [16.0, 400.0])
def test_sizes_within_range(size):
    spec = ShapeSpec(0, (640.0, 360.0), size, 1.0, 0.0, (255, 0, 0), 0, 0.0)
    m, (x0, y0, x1, y1) = rasterize(spec, (1280, 720))
    box = mask_box_xyxy(m)
    assert box is not None
    assert abs((box[2] - box[0]) - size) <= 2


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticDataset(seed=0, num_images=2)[2]
