"""The calibration warns in one line when its frames hold few confident detections (issue #16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.deploy.calibrate import main
from engines.deploy.coverage import CONFIDENT_SCORE, confident_detections, coverage_warning
from engines.deploy.frames import calibration_frames, probe_source
from streamdet.card import card_path_for, load_card
from tests.helpers.cli import ROOT
from tests.helpers.standin import bikes_path

DETECTOR = ROOT / "engines" / "models" / "detector.onnx"
SEMANTIC = ROOT / "engines" / "models" / "semantic.onnx"
DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"
needs_bundled = pytest.mark.skipif(not DETECTOR.is_file(), reason=f"{DETECTOR}: bundled detector not built")


@needs_bundled
@pytest.mark.parametrize("frames, detections, warned", [
    (64, 0, True), (64, 31, True), (64, 32, False), (64, 500, False), (0, 0, False), (1, 0, True),
])
def test_warning_threshold_table(frames: int, detections: int, warned: bool) -> None:
    card = load_card(card_path_for(DETECTOR))
    line = coverage_warning(card, frames, detections, ["a.mp4", "b/"])
    assert (line is not None) is warned
    if line is not None:
        assert "\n" not in line and f"{detections} confident detections" in line and f"on {frames} frames" in line
        assert "a.mp4, b/" in line and f"score > {CONFIDENT_SCORE}" in line


@pytest.mark.skipif(not SEMANTIC.is_file(), reason=f"{SEMANTIC}: bundled semantic model not built")
def test_semantic_models_are_not_checked() -> None:
    assert coverage_warning(load_card(card_path_for(SEMANTIC)), 64, 0, ["x.mp4"]) is None


@needs_bundled
def test_demo_frames_hold_detections_bikes_frames_hardly_any() -> None:
    card = load_card(card_path_for(DETECTOR))
    demo = list(calibration_frames([probe_source(DEMO)], 8))
    bikes = list(calibration_frames([probe_source(bikes_path())], 8))
    assert confident_detections(DETECTOR, card, demo) >= 8  # the demo video shows the model's classes
    assert confident_detections(DETECTOR, card, bikes) < 4  # bikes.mp4 has none of them


@needs_bundled
@pytest.mark.parametrize("source, warned", [(bikes_path(), True), (DEMO, False)])
def test_cli_warns_once_on_unrepresentative_frames(source: Path, warned: bool, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.int8.onnx"
    assert main([str(DETECTOR), "--source", str(source), "--frames", "8", "--out-int8", str(out)]) == 0
    err_lines = capsys.readouterr().err.splitlines()
    warnings = [line for line in err_lines if line.startswith("warning: calibration frames:")]
    assert len(warnings) == (1 if warned else 0), err_lines
    if warned:
        assert str(source) in warnings[0] and "on 8 frames" in warnings[0]
    assert out.is_file()
