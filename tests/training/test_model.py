"""Detector layout, decode, FLOP count, assigner, CIoU and DFL against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from training.assigner import TaskAlignedAssigner, anchors_in_boxes
from training.box_ops import bbox2dist, bbox_ciou, dist2bbox
from training.loss import DetectionLoss, TargetBatch, crop_mask, dfl_loss
from training.model import (
    NUM_MASK_COEFFS,
    Detector,
    DetectorConfig,
    count_gflops,
    count_params,
    make_anchors,
    num_anchors,
)

torch.set_num_threads(1)

SMALL = {"width_mult": 0.5, "input_wh": (128, 96)}


def _model(segment: bool = False, **kw: object) -> Detector:
    torch.manual_seed(0)
    cfg = {**SMALL, **kw}
    return Detector(DetectorConfig(segment=segment, **cfg))  # type: ignore[arg-type]


@pytest.mark.parametrize("segment", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_eval_output_layout(segment: bool, batch: int) -> None:
    m = _model(segment).eval()
    w, h = m.config.input_wh
    with torch.no_grad():
        out = m(torch.rand(batch, 3, h, w))
    n = sum((h // s) * (w // s) for s in (8, 16, 32))
    assert n == num_anchors((w, h))
    if segment:
        out0, out1 = out
        assert out0.shape == (batch, 4 + 10 + NUM_MASK_COEFFS, n)
        assert out1.shape == (batch, NUM_MASK_COEFFS, h // 4, w // 4)
    else:
        out0 = out
        assert out0.shape == (batch, 4 + 10, n)
    scores = out0[:, 4:14]
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    assert float(out0[:, 2:4].min()) >= 0.0  # widths and heights


def test_default_input_anchor_count() -> None:
    assert num_anchors((640, 384)) == 80 * 48 + 40 * 24 + 20 * 12 == 5040


@pytest.mark.parametrize("segment", [False, True])
def test_train_output_layout(segment: bool) -> None:
    m = _model(segment).train()
    w, h = m.config.input_wh
    out = m(torch.rand(2, 3, h, w))
    no = 4 * 16 + 10 + (NUM_MASK_COEFFS if segment else 0)
    assert [tuple(f.shape) for f in out["feats"]] == [(2, no, h // s, w // s) for s in (8, 16, 32)]
    assert ("protos" in out) == segment


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_decode_matches_bruteforce() -> None:
    m = _model(segment=True).eval()
    w, h = m.config.input_wh
    with torch.no_grad():
        raw = m.forward_raw(torch.rand(1, 3, h, w))
        out0 = m.decode(raw["feats"]).numpy()[0]
    col = 0
    for f, s in zip(raw["feats"], (8, 16, 32), strict=True):
        f = f.numpy()[0].astype(np.float64)
        for gy in range(f.shape[1]):
            for gx in range(f.shape[2]):
                v = f[:, gy, gx]
                dist = (_softmax(v[:64].reshape(4, 16), 1) * np.arange(16)).sum(1)
                ax, ay = gx + 0.5, gy + 0.5
                x1, y1, x2, y2 = (ax - dist[0]) * s, (ay - dist[1]) * s, (ax + dist[2]) * s, (ay + dist[3]) * s
                want = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
                np.testing.assert_allclose(out0[:4, col], want, rtol=1e-5, atol=1e-3)
                np.testing.assert_allclose(out0[4:14, col], 1 / (1 + np.exp(-v[64:74])), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(out0[14:, col], v[74:], rtol=1e-5, atol=1e-6)
                col += 1
    assert col == out0.shape[1]


def test_make_anchors_order() -> None:
    feats = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 2)]
    pts, strides = make_anchors(feats, (8, 16))
    assert pts.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5],
                            [0.5, 0.5], [1.5, 0.5]]
    assert strides.view(-1).tolist() == [8] * 6 + [16] * 2


def test_gflops_match_conv_mac_hooks() -> None:
    m = _model(segment=True).eval()
    macs = [0]

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.ConvTranspose2d):
            k = mod.weight.shape[2] * mod.weight.shape[3]
            macs[0] += inp[0].numel() * mod.out_channels // mod.groups * k
        elif isinstance(mod, nn.Conv2d):
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
            macs[0] += out.numel() * k

    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d)]
    handles = [mod.register_forward_hook(hook) for mod in convs]
    w, h = m.config.input_wh
    with torch.no_grad():
        m(torch.zeros(1, 3, h, w))
    for hd in handles:
        hd.remove()
    n = num_anchors(m.config.input_wh)
    dfl_macs = 4 * n * m.reg_max  # the DFL expectation is a MatMul
    assert count_gflops(m) == pytest.approx(2 * (macs[0] + dfl_macs) / 1e9, rel=1e-6)
    assert count_params(m) == sum(p.numel() for p in m.parameters())


def test_config_roundtrip_and_validation() -> None:
    cfg = DetectorConfig(segment=True, width_mult=0.75)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DetectorConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"input_wh": (100, 96)}, {"reg_max": 1}, {"width": (16, 32)}])
def test_config_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="expected"):
        DetectorConfig(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- box ops


def _ciou_reference(b1: list[float], b2: list[float], eps: float = 1e-7) -> float:
    """CIoU by its definition (Zheng et al. 2020), in plain Python."""
    w1, h1 = b1[2] - b1[0], b1[3] - b1[1] + eps
    w2, h2 = b2[2] - b2[0], b2[3] - b2[1] + eps
    iw = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0]))
    ih = max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]))
    inter = iw * ih
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    cw = max(b1[2], b2[2]) - min(b1[0], b2[0])
    chh = max(b1[3], b2[3]) - min(b1[1], b2[1])
    c2 = cw**2 + chh**2 + eps
    rho2 = ((b1[0] + b1[2]) / 2 - (b2[0] + b2[2]) / 2) ** 2 + ((b1[1] + b1[3]) / 2 - (b2[1] + b2[3]) / 2) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (v - iou + 1 + eps)
    return iou - rho2 / c2 - alpha * v


def test_ciou_matches_definition() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2, 2))
    wh = rng.uniform(1, 60, (200, 2, 2))
    b1 = np.concatenate([xy[:, 0], xy[:, 0] + wh[:, 0]], 1)
    b2 = np.concatenate([xy[:, 1], xy[:, 1] + wh[:, 1]], 1)
    b2[:10] = b1[:10]  # identical pairs
    b2[10:20] = b1[10:20] + 200  # disjoint pairs
    got = bbox_ciou(torch.tensor(b1, dtype=torch.float64), torch.tensor(b2, dtype=torch.float64)).numpy()
    want = [_ciou_reference(list(a), list(b)) for a, b in zip(b1, b2, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[:10], 1.0, atol=1e-6)
    assert (got[10:20] < 0).all()


def test_dist_bbox_roundtrip() -> None:
    pts = torch.tensor([[5.5, 5.5], [2.5, 7.5]])
    boxes = torch.tensor([[3.0, 4.0, 9.0, 6.0], [0.0, 1.0, 4.0, 12.0]])
    d = bbox2dist(pts, boxes, 15)
    torch.testing.assert_close(dist2bbox(d, pts), boxes)


def test_dfl_loss_matches_bruteforce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16, dtype=torch.float64)
    target = torch.rand(3, 4, dtype=torch.float64) * 14.9
    got = dfl_loss(logits, target)
    logp = torch.log_softmax(logits, -1)
    want = torch.zeros(3)
    for i in range(3):
        tot = 0.0
        for j in range(4):
            t = float(target[i, j])
            lo = math.floor(t)
            tot += -(lo + 1 - t) * float(logp[i, j, lo]) - (t - lo) * float(logp[i, j, lo + 1])
        want[i] = tot / 4
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6)


def test_crop_mask() -> None:
    m = torch.ones(1, 6, 8)
    out = crop_mask(m, torch.tensor([[2.0, 1.0, 5.0, 4.0]]))
    want = torch.zeros(1, 6, 8)
    want[0, 1:4, 2:5] = 1
    torch.testing.assert_close(out, want)


# --------------------------------------------------------------------------------------- assigner


def test_anchors_in_boxes() -> None:
    pts = torch.tensor([[1.0, 1.0], [5.0, 5.0], [10.0, 10.0]])
    gt = torch.tensor([[[0.0, 0.0, 6.0, 6.0], [5.0, 5.0, 20.0, 20.0]]])
    mask = anchors_in_boxes(pts, gt)
    assert mask.tolist() == [[[1, 1, 0], [0, 0, 1]]]  # (5, 5) on the second box's edge is outside


def test_assigner_hand_made_case() -> None:
    # 6 anchors on a row (x = 1..6, y = 1); one box covering anchors 1..4, one covering 4..6.
    pts = torch.tensor([[float(x), 1.0] for x in range(1, 7)])
    gt = torch.tensor([[[0.5, 0.0, 4.5, 2.0], [3.5, 0.0, 6.5, 2.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[2, 0, 0]])
    valid = torch.tensor([[True, True, False]])
    # predicted boxes: anchor 2 predicts box 0 exactly, anchor 5 predicts box 1 exactly, others poorer
    pd = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [0.5, 0.0, 4.5, 2.0], [1.0, 0.0, 4.0, 2.0],
                        [3.0, 0.0, 5.0, 2.0], [3.5, 0.0, 6.5, 2.0], [5.5, 0.0, 6.5, 2.0]]])
    scores = torch.full((1, 6, 3), 0.5)
    a = TaskAlignedAssigner(num_classes=3, topk=2)
    res = a(scores, pd, pts, labels, gt, valid)
    # box 0's top 2: anchors 1 (exact) and 2; box 1's top 2: anchors 4 (exact) and 3 (best of the rest)
    assert res.fg_mask[0].tolist() == [False, True, True, True, True, False]
    assert res.target_gt_idx[0, 1:5].tolist() == [0, 0, 1, 1]
    assert res.target_labels[0, 1:5].tolist() == [2, 2, 0, 0]
    torch.testing.assert_close(res.target_bboxes[0, 1], gt[0, 0])
    # the exact predictions get target score = their IoU (1.0) on their class, others less
    assert res.target_scores[0, 1, 2] == pytest.approx(1.0, abs=1e-4)
    assert res.target_scores[0, 4, 0] == pytest.approx(1.0, abs=1e-4)
    assert 0 < float(res.target_scores[0, 2, 2]) < 1.0
    assert float(res.target_scores[0, ~res.fg_mask[0]].abs().sum()) == 0.0
    assert float(res.target_scores[0, 1, :2].sum()) == 0.0  # one-hot on its class


def test_assigner_conflict_goes_to_higher_iou() -> None:
    pts = torch.tensor([[2.0, 2.0]])
    gt = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 10.0, 10.0]]])
    pd = torch.tensor([[[1.0, 1.0, 9.0, 9.0]]])  # overlaps box 1 far more
    res = TaskAlignedAssigner(num_classes=2, topk=1)(torch.full((1, 1, 2), 0.5), pd, pts,
                                                     torch.tensor([[0, 1]]), gt, torch.tensor([[True, True]]))
    assert res.fg_mask.tolist() == [[True]]
    assert res.target_gt_idx.tolist() == [[1]] and res.target_labels.tolist() == [[1]]


def test_assigner_no_boxes() -> None:
    res = TaskAlignedAssigner(num_classes=3)(torch.rand(2, 5, 3), torch.rand(2, 5, 4), torch.rand(5, 2),
                                             torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4),
                                             torch.zeros(2, 0, dtype=torch.bool))
    assert not res.fg_mask.any() and res.target_scores.shape == (2, 5, 3)


@pytest.mark.parametrize("segment", [False, True])
def test_loss_finite_with_and_without_objects(segment: bool) -> None:
    m = _model(segment).train()
    w, h = m.config.input_wh
    loss_fn = DetectionLoss(model=m)
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 50.0]], [[0.0, 0.0, 0.0, 0.0]]])
    masks = torch.zeros(2, 1, h // 4, w // 4, dtype=torch.uint8)
    masks[0, 0, 3:12, 3:15] = 1
    tgt = TargetBatch(boxes, torch.tensor([[3], [0]]), torch.tensor([[True], [False]]), masks if segment else None)
    loss, items = loss_fn(m(torch.rand(2, 3, h, w)), tgt)
    assert torch.isfinite(loss) and items.shape == (len(loss_fn.item_names),)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_target_batch_validates() -> None:
    with pytest.raises(ValueError, match="expected"):
        TargetBatch(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
