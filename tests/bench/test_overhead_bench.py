"""The constant stand-in model of bench/overhead_bench.py: the real model's outputs on one frame, whatever the input."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from streamdet.card import load_card
from streamdet.preprocess_ops import preprocess_batch
from tests.helpers.standin import build_standin, build_standin_dynamic, standin_card

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def overhead(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the bench scripts import their siblings
    import overhead_bench

    return overhead_bench


def _frame(h: int, w: int) -> np.ndarray:
    frame = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    frame[h // 4 : h // 2, w // 4 : w // 2] = (250, 10, 10)  # a red patch: the stand-in's class 0
    return frame


def test_constant_model_outputs_the_real_outputs_of_its_frame_at_any_batch(overhead: ModuleType,
                                                                           tmp_path: Path) -> None:
    model = build_standin(tmp_path / "det.onnx", input_wh=(160, 96), gain=24.0)
    card = standin_card((160, 96))
    frame = _frame(90, 200)
    path = overhead.constant_model(model, card, frame, tmp_path / "out")
    assert load_card(path.with_suffix(".json")) == card
    expected = ort.InferenceSession(str(model)).run(None, {"images": preprocess_batch([frame], card)[0]})[0]
    assert (expected[0, 4:].max(axis=0) > 0.5).any()  # the frame has confident detections to publish
    other = np.random.default_rng(4).random((3, 3, 96, 160), dtype=np.float32)
    got = ort.InferenceSession(str(path)).run(None, {"images": other})[0]
    assert got.shape == (3, *expected.shape[1:])
    np.testing.assert_array_equal(got, np.repeat(expected, 3, axis=0))


def test_constant_model_refuses_a_dynamic_input_size(overhead: ModuleType, tmp_path: Path) -> None:
    model = build_standin_dynamic(tmp_path / "dyn.onnx", input_wh=(160, 160))
    with pytest.raises(ValueError, match="expected a fixed"):
        overhead.constant_model(model, standin_card((160, 160)), _frame(90, 160), tmp_path / "out")
