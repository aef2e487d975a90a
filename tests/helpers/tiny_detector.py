"""A small randomly initialised detector exported to ONNX (+ card, + torch.export program) for GPU-path tests."""

from __future__ import annotations

from pathlib import Path

import torch

from streamdet.card import card_path_for, save_card
from training.export import build_card, export_onnx, ultralytics_metadata
from training.model import Detector, DetectorConfig

TINY_INPUT_WH = (128, 96)
CLASS_NAMES = ["a", "b", "c"]


def tiny_detector(out_dir: Path, *, seed: int = 0, pt2: bool = False, input_wh: tuple[int, int] = TINY_INPUT_WH,
                  name: str = "tiny") -> tuple[Path, Detector]:
    """Write ``out_dir/NAME.onnx`` and ``NAME.json`` (and ``NAME.pt2``); returns the ONNX path and the model."""
    torch.manual_seed(seed)
    model = Detector(DetectorConfig(num_classes=len(CLASS_NAMES), width=(8, 16, 16, 32, 32),
                                    input_wh=input_wh)).eval()
    with torch.no_grad():  # livelier than the prior-probability init: scores spread over (0, 1)
        for branch in model.cls_branch:
            branch[-1].bias.data.normal_(0.0, 2.0)
    path = out_dir / f"{name}.onnx"
    export_onnx(model, path, 17, ultralytics_metadata(model.config, CLASS_NAMES, "detect"))
    card = build_card(model, {"class_names": CLASS_NAMES}, name=name, export_command="test", opset=17)
    save_card(card, card_path_for(path))
    if pt2:
        from engines.cuda_backend import save_exported_program

        save_exported_program(model, path.with_suffix(".pt2"), input_wh=input_wh)
    return path, model
