"""Checkpoint files of both trainers: atomic saves, copying matching weights, the detector's checkpoint dict.

The file contents are what each trainer puts in its dict (``torch.save`` of plain types and
tensors): :func:`make_checkpoint` for the detector (as :mod:`training.export` reads it), the
semantic trainer's own (:mod:`training.semantic_checkpoint`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.model import CHECKPOINT_FORMAT, Detector


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename (no partial checkpoint is ever visible).

    Args:
        path: destination (``RUN_DIR/last.pt`` or ``best.pt``).
        state: the checkpoint dict.

    Raises:
        OSError: if the file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Copy the tensors of ``state`` into ``model`` where names and shapes match.

    Args:
        model: the model to initialise (changed in place).
        state: a state dict (e.g. another checkpoint's ``"model"``).

    Returns:
        ``(copied, total)``: tensors copied, and the model's tensor count.
    """
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)


def make_checkpoint(model: Detector, *, class_names: Sequence[str], task: str, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict as :mod:`training.export` reads it.

    Args:
        model: the detector whose weights are exported (the EMA model during training).
        class_names: one name per class.
        task: ``detect`` or ``segment``.
        **extra: further entries (training state, command line, seeds, metrics).

    Returns:
        ``{"format", "model" (state dict), "model_config", "class_names", "task", "input_wh",
        "torch_version", "time", **extra}``.

    Raises:
        ValueError: if the class names do not match the model's class count.
    """
    if len(class_names) != model.nc:
        raise ValueError(f"expected {model.nc} class names, got {len(class_names)}")
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "class_names": list(class_names),
        "task": task,
        "input_wh": list(model.config.input_wh),
        "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
