"""Exponential moving average of a model's weights (ultralytics ``ModelEMA``) for the detector trainer."""

from __future__ import annotations

import copy
import math
from typing import Generic, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ModelEMA(Generic[ModuleT]):
    """Exponential moving average of a model's weights and buffers (ultralytics ``ModelEMA``).

    ``decay(updates) = decay * (1 - exp(-updates / tau))`` ramps the average in over the first
    few thousand updates. Reference: ultralytics ``utils/torch_utils.py``; Polyak & Juditsky 1992.

    Args:
        model: the model being trained (copied).
        decay: asymptotic decay.
        tau: ramp length in updates.
        updates: updates already done (on resume).
    """

    def __init__(self, model: ModuleT, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema: ModuleT = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current floating-point state into the average."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])
