"""The evaluator: pycocotools on hand-made cases with known AP, mIoU, the CLI on tiny ONNX models, bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Task, save_card
from streamdet.masks import masks_to_rle
from streamdet.postprocess import expected_num_anchors
from training.evaluate import IouType, evaluate_coco, main, miou, semantic_confusion

# ---------------------------------------------------------------- evaluate_coco on hand-made cases


def gt_doc(boxes_per_image: list[list[tuple[float, float, float, float, int]]], hw: tuple[int, int] = (48, 128),
           n_cats: int = 2) -> dict:
    images: list[dict] = []
    anns: list[dict] = []
    for i, boxes in enumerate(boxes_per_image):
        images.append({"id": i, "file_name": f"{i:06d}.png", "height": hw[0], "width": hw[1]})
        for x1, y1, x2, y2, c in boxes:
            m = np.zeros(hw, np.uint8)
            m[int(y1):int(y2), int(x1):int(x2)] = 1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": float(m.sum()), "segmentation": masks_to_rle(m[None])[0], "iscrowd": 0})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(n_cats)]
    return {"images": images, "annotations": anns, "categories": cats}


A = (10.0, 8.0, 50.0, 40.0, 0)
B = (70.0, 10.0, 110.0, 30.0, 0)
C = (60.0, 30.0, 90.0, 45.0, 1)


def det(image_id: int, box: tuple, score: float) -> dict:
    x1, y1, x2, y2, c = box
    return {"image_id": image_id, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def cocoeval_direct(gt: dict, dets: list[dict], iou_type: str = "bbox") -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        d = g.loadRes(copy.deepcopy(dets))
        ev = COCOeval(g, d, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_perfect_detections_score_one() -> None:
    gt = gt_doc([[A, C], [B]])
    dets = [det(0, A, 0.9), det(0, C, 0.8), det(1, B, 0.7)]
    m = evaluate_coco(gt, dets, IouType.BBOX)
    assert m["mAP50-95"] == pytest.approx(1.0) and m["mAP50"] == pytest.approx(1.0)
    assert m["per_class"] == {"c0": {"AP50-95": pytest.approx(1.0), "AP50": pytest.approx(1.0)},
                              "c1": {"AP50-95": pytest.approx(1.0), "AP50": pytest.approx(1.0)}}


def test_one_of_two_missed() -> None:
    # recall tops out at 0.5 with precision 1: 51 of COCO's 101 recall points (0, .01, ..., .50) -> 51/101
    gt = gt_doc([[A, B]], n_cats=1)
    dets = [det(0, A, 0.9)]
    m = evaluate_coco(gt, dets, "bbox")
    assert m["mAP50"] == pytest.approx(51 / 101) and m["mAP50-95"] == pytest.approx(51 / 101)
    assert m["mAP50-95"] == pytest.approx(cocoeval_direct(gt, dets)[0])


def test_tp_fp_tp_known_ap() -> None:
    # scores .9 TP, .8 FP, .7 TP over 2 GT: precision/recall (1, .5), (.5, .5), (2/3, 1)
    # interpolated precision: 1 for recall <= .5 (51 points), 2/3 for .51 .. 1.0 (50 points)
    gt = gt_doc([[A, B]], n_cats=1)
    dets = [det(0, A, 0.9), det(0, (80.0, 35.0, 100.0, 45.0, 0), 0.8), det(0, B, 0.7)]
    m = evaluate_coco(gt, dets, IouType.BBOX)
    want = (51 + 50 * 2 / 3) / 101
    assert m["mAP50"] == pytest.approx(want) and m["mAP50-95"] == pytest.approx(want)
    assert m["per_class"]["c0"]["AP50"] == pytest.approx(want)
    stats = cocoeval_direct(gt, dets)
    assert [m["mAP50-95"], m["mAP50"], m["mAP75"]] == pytest.approx(list(stats[:3]))


def test_segm_and_missing_class_and_empty() -> None:
    gt = gt_doc([[A, B]], n_cats=2)  # class c1 has no ground truth
    masks = np.zeros((2, 48, 128), bool)
    masks[0, 8:40, 10:50] = True
    masks[1, 10:30, 70:110] = True
    rles = masks_to_rle(masks)
    dets = [{"image_id": 0, "category_id": 1, "segmentation": rles[0], "score": 0.9, "bbox": [0, 0, 1, 1]},
            {"image_id": 0, "category_id": 1, "segmentation": rles[1], "score": 0.8}]
    m = evaluate_coco(gt, dets, IouType.SEGM)
    assert m["mAP50-95"] == pytest.approx(1.0)
    assert m["per_class"]["c1"] == {"AP50-95": None, "AP50": None}
    empty = evaluate_coco(gt, [], IouType.BBOX)
    assert empty["mAP50-95"] == 0.0 and empty["per_class"]["c0"]["AP50"] == 0.0
    assert empty["per_class"]["c1"]["AP50"] is None
    gt_before = copy.deepcopy(gt)
    evaluate_coco(gt, dets, IouType.SEGM)
    assert gt == gt_before  # the caller's ground truth is not modified


def test_evaluate_coco_rejects_bad_results() -> None:
    gt = gt_doc([[A]], n_cats=1)
    with pytest.raises(ValueError, match="ground-truth images"):
        evaluate_coco(gt, [det(7, A, 0.9)], "bbox")
    with pytest.raises(ValueError, match="score"):
        evaluate_coco(gt, [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 1, 1]}], "bbox")


# ---------------------------------------------------------------- mIoU


def test_miou_hand_made() -> None:
    gt = np.array([[0, 0], [1, 1]], np.uint8)
    pred = np.array([[0, 1], [1, 1]], np.uint8)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent everywhere -> not counted
    assert miou([pred], [gt], 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    gt_ignore = np.array([[0, 255], [1, 1]], np.uint8)  # the pixel predicted 1 over gt 255 is ignored
    assert miou([pred], [gt_ignore], 3) == pytest.approx(1.0)
    cm = semantic_confusion(pred, gt, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    # accumulated over maps, not averaged per map
    assert miou([pred, gt], [gt, gt], 3) == pytest.approx((3 / 4 + 4 / 5) / 2)
    with pytest.raises(ValueError, match="as many"):
        miou([pred], [], 3)
    with pytest.raises(ValueError, match="< 1"):
        semantic_confusion(pred, gt, 1)


# ---------------------------------------------------------------- the CLI on tiny constant-output ONNX models

IN_WH = (64, 32)
FRAME_HW = (48, 128)  # letterbox: scale 0.5, pad (0, 4)
N_ANCHORS = expected_num_anchors(IN_WH, (8, 16, 32))
GT_BOXES = [A, (70.0, 10.0, 110.0, 30.0, 1)]


def write_dataset(root: Path, n_images: int = 2, boxes: list[tuple] = GT_BOXES) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "semantic").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        img = rng.integers(0, 256, (*FRAME_HW, 3), dtype=np.uint8)
        sem = np.zeros(FRAME_HW, np.uint8)
        for x1, y1, x2, y2, c in boxes:
            sem[int(y1):int(y2), int(x1):int(x2)] = c + 1
        cv2.imwrite(str(root / "images" / f"{i:06d}.png"), img)
        cv2.imwrite(str(root / "semantic" / f"{i:06d}.png"), sem)
    doc = gt_doc([boxes] * n_images, FRAME_HW, n_cats=2)
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def to_input_cxcywh(box: tuple) -> list[float]:
    x1, y1, x2, y2 = (v * 0.5 for v in box[:4])
    y1, y2 = y1 + 4, y2 + 4
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def const_onnx(path: Path, outputs: dict[str, np.ndarray]) -> Path:
    """An ONNX model whose outputs are constants (leading dim 1) broadcast to the input's batch size."""
    iw, ih = IN_WH
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for name, value in outputs.items():
        shape = np.array([-1] + [1] * (value.ndim - 1), np.int64)
        inits += [numpy_helper.from_array(value.astype(np.float32), f"{name}_c"),
                  numpy_helper.from_array(shape, f"{name}_s")]
        nodes += [helper.make_node("Reshape", ["z", f"{name}_s"], [f"{name}_z"]),
                  helper.make_node("Add", [f"{name}_z", f"{name}_c"], [name])]
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *value.shape[1:]]))
    graph = helper.make_graph(nodes, "const", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                             ["batch", 3, ih, iw])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def card_for(task: Task, layout: HeadLayout, nc: int, nm: int = 0,
             outputs: tuple[str, ...] = ("output0",)) -> ModelCard:
    names = tuple(f"c{i}" for i in range(nc)) if task is not Task.SEMANTIC else ("background", "c0", "c1")
    return ModelCard(name="const", task=task, head=HeadSpec(layout=layout, num_classes=nc, num_mask_coeffs=nm,
                                                            outputs=outputs, mask_hw=(8, 16) if nm else None),
                     input=InputSpec(width=IN_WH[0], height=IN_WH[1]), class_names=names)


def detect_model(tmp: Path, nc: int = 2, nm: int = 0, name: str = "det") -> Path:
    out0 = np.zeros((1, 4 + nc + nm, N_ANCHORS), np.float32)
    for j, box in enumerate(GT_BOXES):
        out0[0, 0:4, j] = to_input_cxcywh(box)
        out0[0, 4 + box[4], j] = 0.9 - 0.1 * j
        if nm:
            out0[0, 4 + nc :, j] = 1.0
    outputs = {"output0": out0}
    if nm:
        outputs["output1"] = np.full((1, nm, 8, 16), 10.0, np.float32)  # mask = the whole box
    model = const_onnx(tmp / f"{name}.onnx", outputs)
    if nm:
        save_card(card_for(Task.SEGMENT, HeadLayout.ULTRALYTICS_SEGMENT, nc, nm, ("output0", "output1")),
                  model.with_suffix(".json"))
    else:
        save_card(card_for(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, nc), model.with_suffix(".json"))
    return model


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    rc = main([*args, "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def test_cli_detect_perfect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data")
    model = detect_model(tmp_path)
    plot, js = tmp_path / "pr.png", tmp_path / "m.json"
    rc, out, err = run_main(["--model", str(model), "--data", str(data), "--batch", "3", "--plot", str(plot),
                             "--json-out", str(js)], capsys)
    assert rc == 0, err
    assert out[-1] == "mAP50-95=1.000 mAP50=1.000"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(js.read_text())
    assert metrics["bbox"]["mAP50-95"] == pytest.approx(1.0) and metrics["images"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_detect_partial_with_max_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data", boxes=[*GT_BOXES, (80.0, 35.0, 100.0, 45.0, 0)])  # a GT never found
    model = detect_model(tmp_path)
    rc, out, err = run_main(["--model", str(model), "--data", str(data), "--max-images", "1"], capsys)
    assert rc == 0, err
    # class c0: 1 of 2 found at top score -> 51/101; class c1: perfect -> mean (51/101 + 1) / 2
    want = (51 / 101 + 1) / 2
    assert out[-1] == f"mAP50-95={want:.3f} mAP50={want:.3f}"
    assert any(line.split()[0] == "c0" and line.split()[1] == f"{51 / 101:.3f}" for line in out)


def test_cli_multi_label_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An anchor whose true class (0.4) is not its best class (0.6) counts only as ultralytics counts it."""
    data = write_dataset(tmp_path / "data")
    out0 = np.zeros((1, 4 + 2, N_ANCHORS), np.float32)
    for j, box in enumerate(GT_BOXES):
        out0[0, 0:4, j] = to_input_cxcywh(box)
    out0[0, 4:6, 0] = (0.4, 0.6)  # GT A is class 0; class 1 scores higher on it
    out0[0, 5, 1] = 0.8  # GT B, class 1
    model = const_onnx(tmp_path / "ml.onnx", {"output0": out0})
    save_card(card_for(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 2), model.with_suffix(".json"))
    rc, out, err = run_main(["--model", str(model), "--data", str(data)], capsys)
    assert rc == 0, err
    assert out[-1] == "mAP50-95=1.000 mAP50=1.000"  # class 0 found at 0.4; class 1's FP ranks below its TP
    rc, out, err = run_main(["--model", str(model), "--data", str(data), "--single-label"], capsys)
    assert rc == 0, err
    assert out[-1] == "mAP50-95=0.500 mAP50=0.500"  # the anchor is class 1 only: class 0 never found


def test_cli_segment_perfect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data")
    model = detect_model(tmp_path, nm=1, name="seg")
    rc, out, err = run_main(["--model", str(model), "--data", str(data)], capsys)
    assert rc == 0, err
    assert out[-1] == "mAP50-95=1.000 mAP50=1.000 mask_mAP50-95=1.000 mask_mAP50=1.000"


def test_cli_semantic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data")
    lg = np.zeros((1, 3, IN_WH[1], IN_WH[0]), np.float32)
    lg[0, 0] = 1.0
    lg[0, 1, 8:24, 5:25] = 5.0  # box A in input pixels
    lg[0, 2, 9:19, 35:55] = 5.0  # box (70, 10, 110, 30) in input pixels
    model = const_onnx(tmp_path / "sem.onnx", {"output0": lg})
    card = tmp_path / "elsewhere.json"
    save_card(card_for(Task.SEMANTIC, HeadLayout.SEMANTIC_LOGITS, 3), card)
    js = tmp_path / "m.json"
    rc, out, err = run_main(["--model", str(model), "--data", str(data), "--card", str(card), "--json-out", str(js)],
                            capsys)
    assert rc == 0, err
    assert out[-1] == "mIoU=1.000"
    assert json.loads(js.read_text())["per_class_IoU"]["c1"] == pytest.approx(1.0)
    lg[0, 2, 9:19, 35:45] = 0.0  # half of that box is now predicted background
    model = const_onnx(tmp_path / "sem.onnx", {"output0": lg})
    rc, out, err = run_main(["--model", str(model), "--data", str(data), "--card", str(card)], capsys)
    assert rc == 0, err
    bg_area = 128 * 48 - 40 * 32 - 40 * 20
    want = ((bg_area / (bg_area + 400)) + 1.0 + 0.5) / 3
    assert out[-1] == f"mIoU={want:.3f}"


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    data = write_dataset(tmp / "data")
    model = detect_model(tmp)
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "annotations.json").write_text("{not json")
    no_ann = tmp / "no_ann"
    no_ann.mkdir()
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    wrong = detect_model(tmp, nc=3, name="wrong")  # 4+3 rows, but the card below says 2 classes
    save_card(card_for(Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, 2), wrong.with_suffix(".json"))
    nocard = tmp / "nocard.onnx"
    nocard.write_bytes(model.read_bytes())
    three = detect_model(tmp, nc=3, name="three")  # consistent model and card, but 3 classes vs 2 categories
    return {
        "missing dataset dir": (["--model", str(model), "--data", str(tmp / "nope")], str(tmp / "nope")),
        "malformed annotations": (["--model", str(model), "--data", str(broken)], "annotations.json"),
        "missing annotations": (["--model", str(model), "--data", str(no_ann)], "annotation file not found"),
        "not an onnx model": (["--model", str(garbage), "--data", str(data)], "not a loadable ONNX model"),
        "missing model": (["--model", str(tmp / "x.onnx"), "--data", str(data)], "model file not found"),
        "card/model mismatch": (["--model", str(wrong), "--data", str(data)], "4+2=6 rows, got 7"),
        "no card, no metadata": (["--model", str(nocard), "--data", str(data)], "no model card"),
        "card/dataset mismatch": (["--model", str(three), "--data", str(data)],
                                  "dataset has 2 categories, model card has 3 classes"),
    }


def test_cli_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, (args, needle) in _bad_cases(tmp_path).items():
        rc, out, err = run_main(args, capsys)
        assert rc == 1, name
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (name, err)


def test_cli_subprocess_exit_code(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(tmp_path / "m.onnx"), "--data",
                        str(tmp_path / "nope")], capture_output=True, text=True, cwd=Path(__file__).parents[2],
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: dataset directory not found"]
