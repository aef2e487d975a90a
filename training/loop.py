"""What one training iteration and run setup share between the detector and semantic trainers.

Seeding, thread settings, the bfloat16-autocast choice and the optimizer step (zero grad,
backward, optional gradient clipping, step, learning-rate schedule step, optional EMA update).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds any legacy global-RNG use in dependencies)
    torch.manual_seed(seed)


def setup_run(*, threads: int, seed: int) -> None:
    """Torch CPU threads, one OpenCV thread, and :func:`seed_everything`."""
    import cv2

    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    seed_everything(seed)


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(mode: str) -> bool:
    """The ``--bf16 auto|on|off`` choice: ``auto`` is on where :func:`bf16_supported`."""
    return mode == "on" or (mode == "auto" and bf16_supported())


def autocast(enabled: bool) -> AbstractContextManager[object]:
    """bfloat16 CPU autocast for the forward pass (a no-op when not ``enabled``)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    clip_params: nn.Module | None = None,
    max_grad_norm: float = 10.0,
    after_step: Callable[[], None] | None = None,
) -> None:
    """One update: zero the gradients, backpropagate ``loss``, (clip,) step, advance the schedule.

    Args:
        loss: scalar training loss.
        optimizer: the optimizer.
        scheduler: the learning-rate schedule (stepped once per iteration).
        clip_params: clip this module's gradient norm to ``max_grad_norm`` (None: no clipping).
        max_grad_norm: the clipping norm.
        after_step: called after the optimizer step (e.g. an EMA update).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params.parameters(), max_norm=max_grad_norm)
    optimizer.step()
    scheduler.step()
    if after_step is not None:
        after_step()
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on conv/linear weights only (not BatchNorm, not biases)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


