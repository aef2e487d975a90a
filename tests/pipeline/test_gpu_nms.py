"""GPU NMS (torch, run here on CPU tensors) against streamdet.nms and streamdet.postprocess."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.gpu.gpu_nms import (  # noqa: E402
    batched_nms_torch,
    box_iou_torch,
    postprocess_detect_torch,
)
from streamdet.boxes import box_iou  # noqa: E402
from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Task  # noqa: E402
from streamdet.letterbox import letterbox_params  # noqa: E402
from streamdet.nms import batched_nms, nms  # noqa: E402
from streamdet.postprocess import NmsMethod, PostprocessConfig, postprocess_detect  # noqa: E402

torch.set_num_threads(1)


def random_boxes(rng: np.random.Generator, n: int, size: float = 640.0) -> np.ndarray:
    """Boxes of very different sizes (2..400 px), clustered so that many overlap."""
    centres = rng.uniform(0, size, (max(1, n // 6), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 12, (n, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(400), (n, 2)))
    return np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_iou_bit_identical_to_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 50), random_boxes(rng, 40)
    a[:3, 2:] = a[:3, :2]  # zero-area boxes
    got = box_iou_torch(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(got, box_iou(a, b))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("iou", [0.3, 0.45, 0.7])
@pytest.mark.parametrize("agnostic", [False, True])
def test_batched_nms_matches_cpu(seed: int, iou: float, agnostic: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    boxes = random_boxes(rng, n)
    scores = rng.random(n).astype(np.float32)
    scores[rng.random(n) < 0.2] = 0.5  # ties, broken by index
    classes = rng.integers(0, 3, n)
    want = batched_nms(boxes, scores, classes, iou, class_agnostic=agnostic, max_output=100)
    got = batched_nms_torch(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), iou,
                            class_agnostic=agnostic, max_output=100).numpy()
    np.testing.assert_array_equal(got, want)


def test_threshold_is_strict_and_long_chains() -> None:
    # a chain a>b>c>... where each suppresses only the next: greedy keeps every other box
    boxes = np.array([[i * 10.0, 0, i * 10.0 + 20, 10] for i in range(40)], np.float32)  # IoU(i, i+1) = 1/3
    scores = np.linspace(1, 0.1, 40).astype(np.float32)
    for thr in (1 / 3 - 1e-6, float(np.float32(1 / 3)), 0.5):
        want = nms(boxes, scores, thr)
        got = batched_nms_torch(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(40, dtype=torch.int64),
                                thr).numpy()
        np.testing.assert_array_equal(got, want)


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected boxes"):
        batched_nms_torch(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.int64), 0.5)


def card(num_classes: int, input_wh: tuple[int, int] = (640, 384)) -> ModelCard:
    return ModelCard(name="t", task=Task.DETECT,
                     head=HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=num_classes),
                     input=InputSpec(width=input_wh[0], height=input_wh[1]),
                     class_names=tuple(f"c{i}" for i in range(num_classes)))


def fake_output0(rng: np.random.Generator, b: int, nc: int, n: int = 5040) -> np.ndarray:
    out = np.empty((b, 4 + nc, n), np.float32)
    xyxy = random_boxes(rng, b * n).reshape(b, n, 4)
    out[:, 0] = (xyxy[..., 0] + xyxy[..., 2]) / 2
    out[:, 1] = (xyxy[..., 1] + xyxy[..., 3]) / 2 * 0.6
    out[:, 2] = xyxy[..., 2] - xyxy[..., 0]
    out[:, 3] = (xyxy[..., 3] - xyxy[..., 1]) * 0.6
    out[:, 4:] = rng.random((b, nc, n)).astype(np.float32) ** 6  # mostly low scores
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cfg", [
    PostprocessConfig(),
    PostprocessConfig(score_threshold=0.05, iou_threshold=0.6, max_detections=50, pre_nms_topk=400),
    PostprocessConfig(score_threshold=0.3, class_agnostic=True, max_detections=7),
    PostprocessConfig(score_threshold=0.999999),  # no candidates
])
def test_postprocess_matches_cpu(seed: int, cfg: PostprocessConfig) -> None:
    rng = np.random.default_rng(seed)
    nc = 3 if seed % 2 else 1
    out0 = fake_output0(rng, 3, nc)
    frames = [(720, 1280), (480, 640), (1080, 1920)]
    lbs = [letterbox_params(hw, (640, 384)) for hw in frames]
    want = postprocess_detect([out0], lbs, card(nc), cfg)
    got = postprocess_detect_torch(torch.from_numpy(out0), lbs, num_classes=nc, cfg=cfg)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.class_ids, w.class_ids)
        np.testing.assert_array_equal(g.scores, w.scores)
        np.testing.assert_allclose(g.boxes_xyxy, w.boxes_xyxy, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_non_finite_candidates_are_dropped_as_on_the_cpu(seed: int) -> None:
    """A NaN or infinite box or score never reaches NMS or the JSON writer (which refuses NaN)."""
    rng = np.random.default_rng(seed)
    nc = 3
    out0 = fake_output0(rng, 2, nc)
    hot = rng.choice(out0.shape[2], 12, replace=False)
    out0[:, 4, hot] = 0.99  # the bad anchors would score highest
    out0[0, 0, hot[0:3]] = np.nan
    out0[0, 3, hot[3:5]] = np.inf
    out0[1, 4, hot[5:7]] = np.inf
    out0[1, 5, hot[7:9]] = np.nan  # a NaN in another class's column
    lbs = [letterbox_params(hw, (640, 384)) for hw in [(720, 1280), (480, 640)]]
    cfg = PostprocessConfig(score_threshold=0.05)
    want = postprocess_detect([out0], lbs, card(nc), cfg)
    got = postprocess_detect_torch(torch.from_numpy(out0), lbs, num_classes=nc, cfg=cfg)
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(g.boxes_xyxy).all() and np.isfinite(g.scores).all()
        np.testing.assert_array_equal(g.class_ids, w.class_ids)
        np.testing.assert_array_equal(g.scores, w.scores)
        np.testing.assert_allclose(g.boxes_xyxy, w.boxes_xyxy, rtol=0, atol=1e-4)


def test_postprocess_rejects_soft_nms_and_bad_batch() -> None:
    out0 = torch.zeros(2, 5, 10)
    lbs = [letterbox_params((720, 1280), (640, 384))] * 2
    with pytest.raises(ValueError, match="hard NMS"):
        postprocess_detect_torch(out0, lbs, num_classes=1, cfg=PostprocessConfig(nms_method=NmsMethod.SOFT_LINEAR))
    with pytest.raises(ValueError, match="one letterbox per image"):
        postprocess_detect_torch(out0, lbs[:1], num_classes=1, cfg=PostprocessConfig())
    with pytest.raises(ValueError, match="expected output0"):
        postprocess_detect_torch(torch.zeros(2, 4, 10), lbs, num_classes=1, cfg=PostprocessConfig())
