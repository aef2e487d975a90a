"""Training loop pieces, data cache, augmentation, and the training CLI (short runs)."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.augment import NO_AUGMENT, AugmentConfig, augment_sample, h264_roundtrip, hsv_jitter
from training.loss import DetectionLoss, TargetBatch
from training.model import Detector, DetectorConfig
from training.schedule import current_lr, warmup_cosine
from training.train import ModelEMA, main, param_groups
from training.traindata import (
    BatchLoader,
    CacheSpec,
    build_cache,
    collate,
    load_cache,
    masks_frame_to_input,
    save_cache,
)

torch.set_num_threads(1)


def _toy_batch(segment: bool, wh: tuple[int, int] = (128, 96)) -> tuple[torch.Tensor, TargetBatch]:
    """Two images with flat-coloured rectangles on noise, with boxes (and masks)."""
    rng = np.random.default_rng(0)
    w, h = wh
    imgs = rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8) // 4 + 96
    boxes = np.array([[[10, 12, 50, 40], [70, 20, 120, 90]], [[30, 30, 90, 70], [0, 0, 0, 0]]], np.float32)
    cls = np.array([[1, 4], [7, 0]])
    valid = np.array([[True, True], [True, False]])
    masks = np.zeros((2, 2, h // 4, w // 4), np.uint8)
    for i in range(2):
        for j in range(2):
            if valid[i, j]:
                x1, y1, x2, y2 = boxes[i, j].astype(int)
                imgs[i, y1:y2, x1:x2] = (40 * cls[i, j]) % 255
                masks[i, j, y1 // 4 : y2 // 4, x1 // 4 : x2 // 4] = 1
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    return x, TargetBatch(torch.from_numpy(boxes), torch.from_numpy(cls), torch.from_numpy(valid),
                          torch.from_numpy(masks) if segment else None)


@pytest.mark.parametrize("segment", [False, True])
def test_loss_falls_on_a_tiny_batch(segment: bool) -> None:
    torch.manual_seed(0)
    model = Detector(DetectorConfig(width_mult=0.5, input_wh=(128, 96), segment=segment)).train()
    loss_fn = DetectionLoss(model=model)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    x, tgt = _toy_batch(segment)
    losses = []
    for _ in range(25):
        loss, _ = loss_fn(model(x), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def _reference_lr(iteration: int, total: int, warmup: int, lr: float, final_ratio: float = 0.01) -> float:
    """The detector trainer's schedule as it was written by hand: linear warmup, then cosine."""
    if iteration < warmup:
        return lr * (iteration + 1) / warmup
    t = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _scheduled_lrs(total: int, warm: int, lr: float, start: int = 0, steps: int | None = None) -> list[float]:
    """Per-iteration learning rates of :func:`warmup_cosine` (two parameter groups, as the trainer's AdamW)."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=123.0)
    sched = warmup_cosine(opt, lr=lr, total=total, warmup=warm, final_ratio=0.01, iteration=start)
    out = []
    for _ in range(total - start if steps is None else steps):
        assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)
        out.append(current_lr(opt))
        opt.step()
        sched.step()
    return out


def test_lr_schedule() -> None:
    total, warm, lr = 100, 10, 1e-3
    vals = _scheduled_lrs(total, warm, lr, steps=total + 1)
    assert vals == pytest.approx([_reference_lr(i, total, warm, lr) for i in range(total + 1)], rel=1e-12)
    assert vals[0] == pytest.approx(lr / warm) and vals[warm - 1] == pytest.approx(lr)
    assert vals[warm] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(vals[warm:], vals[warm + 1 :], strict=False))
    assert vals[total] == pytest.approx(lr * 0.01)
    # a resumed run picks the schedule up at its iteration
    assert _scheduled_lrs(total, warm, lr, start=37) == pytest.approx(vals[37:total], rel=1e-12)


def test_model_ema_matches_formula() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(4, 3))  # moves BatchNorm running stats and num_batches_tracked
        ema.update(model)
        d = 0.9 * (1 - math.exp(-step / 2.0))
        for k, v in model.state_dict().items():
            ref[k] = ref[k] * d + v * (1 - d) if v.dtype.is_floating_point else v.clone()
    for k, v in ema.ema.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_param_groups_no_decay_on_bn_and_bias() -> None:
    model = Detector(DetectorConfig(width_mult=0.25, input_wh=(64, 64)))
    decay, no_decay = param_groups(model, 0.05)
    n_bn = sum(2 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    n_bias = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    assert len(no_decay["params"]) == n_bn + n_bias
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ augmentation


def _mask_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_augment_boxes_follow_masks(seed: int) -> None:
    h, w = 96, 160
    img = np.full((h * 4, w * 4, 3), 114, np.uint8)
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 20:50, 30:70] = 1
    masks[1, 60:80, 100:150] = 1
    boxes = np.array([_mask_box(m) for m in masks], np.float32) * 4
    cfg = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0.5, scale=0.3, translate=0.1, min_area_ratio=0.0)
    rng = np.random.default_rng(seed)
    out, b2, c2, m2 = augment_sample(img, boxes, np.array([3, 5]), masks, rng, cfg)
    assert out.shape == img.shape and m2 is not None and m2.shape[1:] == (h, w)
    assert len(b2) == len(c2) == len(m2)
    for box, m in zip(b2, m2, strict=True):
        if m.any():
            np.testing.assert_allclose(np.array(_mask_box(m)) * 4, box, atol=4 * 1.5)


def test_augment_flip_exact() -> None:
    img = np.zeros((8, 12, 3), np.uint8)
    img[2:4, 1:3] = 255
    cfg = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, fliplr=1.0, scale=0, translate=0)
    out, b, _, _ = augment_sample(img, np.array([[1, 2, 3, 4]], np.float32), np.array([0]), None,
                                  np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out, img[:, ::-1])
    np.testing.assert_allclose(b, [[9, 2, 11, 4]])


def test_no_augment_is_identity() -> None:
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    boxes = np.array([[1, 1, 9, 9]], np.float32)
    out, b, c, _ = augment_sample(img, boxes, np.array([2]), None, np.random.default_rng(0), NO_AUGMENT)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(b, boxes)


def test_hsv_jitter_keeps_gray() -> None:
    img = np.full((4, 4, 3), 100, np.uint8)
    out = hsv_jitter(img, np.random.default_rng(0), AugmentConfig(hsv_v=0.0))
    np.testing.assert_array_equal(out, img)  # hue/saturation gains leave gray pixels gray


def test_h264_roundtrip_deterministic_and_lossy() -> None:
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), (5, 5), 0) for _ in range(3)]
    a = h264_roundtrip(frames, crf=35)
    b = h264_roundtrip(frames, crf=35)
    assert len(a) == 3 and all(x.shape == (64, 96, 3) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    err = np.mean([np.abs(x.astype(int) - f).mean() for x, f in zip(a, frames, strict=True)])
    assert 0.5 < err < 40
    assert np.mean(np.abs(h264_roundtrip(frames, crf=20)[0].astype(int) - frames[0])) < err


@pytest.mark.parametrize("bad", [{"frames": []}, {"crf": 60}, {"frames": [np.zeros((5, 8, 3), np.uint8)]}])
def test_h264_roundtrip_rejects(bad: dict[str, object]) -> None:
    kw = {"frames": [np.zeros((8, 8, 3), np.uint8)], "crf": 30, **bad}
    with pytest.raises(ValueError, match="expected"):
        h264_roundtrip(**kw)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- data cache


def test_masks_frame_to_input_matches_boxes() -> None:
    masks = np.zeros((1, 720, 1280), np.uint8)
    masks[0, 100:300, 200:600] = 1
    small = masks_frame_to_input(masks, (720, 1280), (640, 384))
    assert small.shape == (1, 96, 160)
    # frame -> input: x / 2, y / 2 + 12; input -> masks: / 4
    np.testing.assert_allclose(_mask_box(small[0]), [25, 15.5, 75, 40.5], atol=1)


def test_collate_pads() -> None:
    imgs = [np.zeros((8, 16, 3), np.uint8), np.full((8, 16, 3), 255, np.uint8)]
    masks = [np.ones((2, 2, 4), np.uint8), np.zeros((0, 2, 4), np.uint8)]
    b = collate(imgs, [np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32)],
                [np.array([1, 2]), np.zeros(0, np.int64)], masks, np.array([5, 6]))
    assert b.images.shape == (2, 3, 8, 16) and float(b.images[1].min()) == 1.0
    assert b.targets.valid.tolist() == [[True, True], [False, False]]
    assert b.targets.masks is not None and b.targets.masks.shape == (2, 2, 2, 4)


def test_cache_deterministic_roundtrip(tmp_path: Path) -> None:
    spec = CacheSpec(seed=3, num_images=4, input_wh=(160, 96), with_masks=True, h264_fraction=0.5)
    a = build_cache(spec, progress=False)
    b = build_cache(spec, progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.masks is not None and a.masks.shape == (int(a.offsets[-1]), 24, 40)
    save_cache(a, tmp_path)
    c = load_cache(spec, tmp_path)
    assert c is not None
    np.testing.assert_array_equal(np.asarray(c.images), a.images)
    np.testing.assert_array_equal(c.boxes_xyxy, a.boxes_xyxy)
    assert load_cache(CacheSpec(seed=4, num_images=4, input_wh=(160, 96)), tmp_path) is None
    loader = BatchLoader(cache=a, batch_size=2, augment=AugmentConfig(), seed=0, with_masks=True)
    b1 = [x.images for x in loader.epoch(0)]
    b2 = [x.images for x in loader.epoch(0)]
    assert len(b1) == 2 and all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))


# ----------------------------------------------------------------------------------------------- CLI


def test_semantic_task_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("training.train_semantic")
    def fake_main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 0

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.train_semantic", fake)
    import training

    monkeypatch.setattr(training, "train_semantic", fake, raising=False)
    assert main(["--task", "semantic", "--out", "x", "--epochs", "2"]) == 0
    assert seen == [["--out", "x", "--epochs", "2"]]


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "error: argument --images: expected an integer >= 1, got '0' (see --help)"),
    (["--batch", "9", "--images", "4"], "error: --images: expected at least --batch (9) images, got 4"),
    (["--lr", "-1"], "error: argument --lr: expected a finite number > 0 and <= 1, got '-1' (see --help)"),
])
def test_cli_rejects_bad_options(tmp_path: Path, argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # (every option's table: tests/training/test_cli_args.py)
    try:
        rc = main(["--out", str(tmp_path / "run"), *argv])
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "run"), "--resume"]) == 1
    assert "last.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_resume_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--task", "segment", "--out", str(run), "--images", "4", "--val-images", "2", "--batch", "2",
              "--input", "160x96", "--width-mult", "0.25", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main([*common, "--epochs", "2", "--max-iters", "3"]) == 0
    ck = torch.load(run / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["iteration"], ck["resume_epoch"], ck["resume_batch"]) == (1, 3, 1, 1)
    assert ck["task"] == "segment" and ck["data_seed"] == 0 and "training.train" in ck["command"]
    assert (run / "best.pt").is_file()
    assert main([*common, "--resume"]) == 0
    ck = torch.load(run / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["iteration"], ck["resume_epoch"]) == (1, 4, 2)
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "2"]
    from training.export import main as export_main

    out = tmp_path / "seg.onnx"
    assert export_main([str(run / "best.pt"), "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_init_copies_matching_weights_into_segment_variant(tmp_path):
    import torch

    from training.model import Detector, DetectorConfig
    from training.train import TrainError, _init_from

    det = Detector(DetectorConfig(num_classes=10))
    torch.save({"model": det.state_dict()}, tmp_path / "det.pt")
    seg = Detector(DetectorConfig(num_classes=10, segment=True))
    _init_from(seg, tmp_path / "det.pt")
    seg_state, det_state = seg.state_dict(), det.state_dict()
    shared = [k for k in det_state if k in seg_state and seg_state[k].shape == det_state[k].shape]
    assert len(shared) > len(det_state) // 2
    assert all(torch.equal(seg_state[k], det_state[k]) for k in shared)
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(TrainError, match="bad.pt"):
        _init_from(seg, tmp_path / "bad.pt")
