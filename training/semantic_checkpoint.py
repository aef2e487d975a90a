"""Semantic checkpoints: reading one back (``weights_only``) and a detector checkpoint's backbone for ``pan_fcn``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.errors import TrainError
from training.semantic_model import PanFcnConfig

TASK = "semantic"


def detector_init(path: str | os.PathLike[str], num_classes: int, input_wh: tuple[int, int]) -> tuple[
        PanFcnConfig, dict[str, torch.Tensor]]:
    """The :class:`PanFcnConfig` and ``body.``-prefixed weights taken from a detector checkpoint.

    Args:
        path: a ``training.train --task detect|segment`` checkpoint (``best.pt`` / ``last.pt``).
        num_classes: semantic classes ``C``.
        input_wh: model input size ``(width, height)``.

    Returns:
        ``(config, state)``: the detector's widths and depths in a config, and its backbone and
        top-down FPN weights keyed as :class:`training.semantic_model.PanFcnNet` names them.

    Raises:
        TrainError: if the file is not a detector checkpoint (the message names it).
    """
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        raise TrainError(f"{p}: not a torch checkpoint")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # our own training checkpoints
        det = dict(ckpt["model_config"])
        state = ckpt["model"]
        config = PanFcnConfig(num_classes=num_classes, input_wh=input_wh, width=tuple(det["width"]),
                              width_mult=float(det["width_mult"]), depth=tuple(det["depth"]),
                              depth_mult=float(det["depth_mult"]))
    except Exception as e:  # torch.load raises many unpickling error types; KeyError/TypeError on other files
        raise TrainError(f"{p}: not a detector checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    return config, {f"body.{k}": v for k, v in state.items()}




def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a semantic checkpoint (``weights_only``: plain types and tensors) and check its kind.

    Args:
        path: ``last.pt`` or ``best.pt``.

    Returns:
        The checkpoint dict.

    Raises:
        TrainError: if the file is missing, not a torch checkpoint, or not a semantic checkpoint (the
            message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{p}: checkpoint not found")
    if not zipfile.is_zipfile(p):
        raise TrainError(f"{p}: not a torch checkpoint (not a torch.save zip archive)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unpickling / zip errors
        lines = [ln.strip() for ln in str(e).strip().splitlines()] or [type(e).__name__]
        why = next((ln.split("Unpickler error:")[-1].strip() for ln in lines if "Unpickler error:" in ln), lines[0])
        raise TrainError(f"{p}: not a readable torch checkpoint ({why[:200]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("task") != TASK:
        task = ckpt.get("task") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TrainError(f"{p}: expected a checkpoint with task {TASK!r}, got {task!r}")
    for key in ("model", "model_config", "class_names", "input_wh"):
        if key not in ckpt:
            raise TrainError(f"{p}: checkpoint has no {key!r}")
    return ckpt


