"""Box matching of bench/peer_bench.py (the ultralytics comparison itself needs its own virtual environment)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peer_bench", ROOT / "bench" / "peer_bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peer_bench"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_equal_boxes_match_whatever_the_rounding(peer: ModuleType) -> None:
    a = [(3, 101.25, 40.5, 180.0, 210.75), (0, 1.0, 2.0, 3.0, 4.0)]
    b = [(0, 1.0012, 1.9961, 3.0, 4.004999), (3, 101.2549, 40.5, 180.0, 210.7461)]  # full float32 precision
    assert peer.match_boxes(a, b) == 2


def test_class_and_tolerance(peer: ModuleType) -> None:
    a = [(1, 10.0, 10.0, 20.0, 20.0)]
    assert peer.match_boxes(a, [(2, 10.0, 10.0, 20.0, 20.0)]) == 0  # other class
    assert peer.match_boxes(a, [(1, 10.01, 10.0, 20.0, 20.0)]) == 1  # 0.01 px: within
    assert peer.match_boxes(a, [(1, 10.02, 10.0, 20.0, 20.0)]) == 0  # 0.02 px: not
    assert peer.match_boxes(a, [(1, 10.02, 10.0, 20.0, 20.0)], tol=0.05) == 1


def test_each_box_used_once_closest_first(peer: ModuleType) -> None:
    a = [(0, 0.0, 0.0, 5.0, 5.0), (0, 0.0, 0.0, 5.0, 5.01)]
    b = [(0, 0.0, 0.0, 5.0, 5.01)]
    assert peer.match_boxes(a, b) == 1
    assert peer.match_boxes(a, b + b) == 2
    assert peer.match_boxes([], b) == 0


def test_agreement_is_the_matched_share_of_the_union(peer: ModuleType) -> None:
    box = (0, 1.0, 1.0, 9.0, 9.0)
    a = {0: [box], 1: [box, (1, 2.0, 2.0, 3.0, 3.0)], 2: []}
    b = {0: [box], 1: [box], 3: [box]}  # frame 1 misses one box; frame 3 only on one side
    agr = peer.agreement(a, b)
    assert (agr.boxes_a, agr.boxes_b, agr.matched) == (3, 3, 2)
    assert agr.fraction == pytest.approx(2 / 4)
    assert agr.frames_differing == [1, 3]
    assert peer.agreement({0: [box]}, {0: [box]}).fraction == 1.0
    assert peer.agreement({0: []}, {0: []}).fraction == 1.0


def test_reads_both_sides(peer: ModuleType, tmp_path: Path) -> None:
    sd = tmp_path / "sd.jsonl"
    sd.write_text(json.dumps({"frame_index": 0, "detections": [
        {"box_xyxy": [1.0, 2.0, 3.0, 4.0], "score": 0.9, "class_id": 2, "label": "square"}]}) + "\n"
        + json.dumps({"schema": "streamdet.eos/1", "source_id": "x"}) + "\n")
    ul = tmp_path / "ul.jsonl"
    ul.write_text(json.dumps({"frame_index": 0, "detections": [[1.0, 2.0, 3.0, 4.0, 0.9, 2]]}) + "\n"
                  + json.dumps({"summary": {"frames": 1, "input_hw": [384, 640]}}) + "\n")
    frames, summary = peer.read_peer_jsonl(ul)
    assert peer.read_streamdet_jsonl(sd) == frames == {0: [(2, 1.0, 2.0, 3.0, 4.0)]}
    assert summary["input_hw"] == [384, 640]


def test_missing_ultralytics_python_is_one_error_line(peer: ModuleType, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert peer.main(["--ultralytics-python", str(tmp_path / "nope" / "python")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install" in err[0] and "ultralytics==" in err[0]


def test_static_input_size_decides_the_ultralytics_letterbox(peer: ModuleType, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def model(path: Path, dims: list[int | str]) -> Path:
        x = helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)
        y = helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)
        graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
        onnx.save(helper.make_model(graph), str(path))
        return path

    fixed = model(tmp_path / "fixed.onnx", ["batch", 3, 480, 832])
    dynamic = model(tmp_path / "dynamic.onnx", ["batch", 3, "height", "width"])
    assert peer.static_input_hw(fixed) == (480, 832)
    assert peer.static_input_hw(dynamic) is None
    cmd = peer.ultralytics_cmd("py", Path("v.mp4"), fixed, Path("o.jsonl"), 10, 0)
    assert cmd[-4:] == ["--imgsz", "480", "832", "--no-rect"]
    assert "--imgsz" not in peer.ultralytics_cmd("py", Path("v.mp4"), dynamic, Path("o.jsonl"), 10, 0)
