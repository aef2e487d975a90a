"""The learning-rate schedule of both trainers: linear warmup, then cosine decay, as a ``LambdaLR``.

``lr(i) = lr * (i + 1) / warmup`` for ``i < warmup``, then
``lr * (final + (1 - final) * (1 + cos(pi * t)) / 2)`` with ``t = (i - warmup) / (total - warmup)``
clipped to 1 (Loshchilov & Hutter, "SGDR", 2017; the ultralytics YOLOv8 recipe).
"""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_cosine_factor(iteration: int, *, total: int, warmup: int, final_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``iteration``.

    Args:
        iteration: 0-based iteration.
        total: total iterations of the run.
        warmup: warmup iterations (>= 1).
        final_ratio: final / peak learning rate.

    Returns:
        The factor in ``(0, 1]``.
    """
    if iteration < warmup:
        return (iteration + 1) / warmup
    t = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, lr: float, total: int, warmup: int, final_ratio: float, iteration: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`warmup_cosine_factor`, positioned at ``iteration``.

    Call its ``step()`` after every ``optimizer.step()``; during iteration ``i`` every parameter
    group's ``lr`` is ``lr * warmup_cosine_factor(i)``. On resume the schedule is recomputed from
    ``iteration`` (checkpoints hold no scheduler state).

    Args:
        optimizer: the optimizer (its groups' peak learning rate becomes ``lr``).
        lr: peak learning rate.
        total: total iterations of the run.
        warmup: warmup iterations (>= 1).
        final_ratio: final / peak learning rate.
        iteration: the next iteration to run (0 for a fresh run).

    Returns:
        The scheduler.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    factor = partial(warmup_cosine_factor, total=total, warmup=warmup, final_ratio=final_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=iteration - 1)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
