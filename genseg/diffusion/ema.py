"""Exponential moving average of weights (used for sampling, kept in checkpoints)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # warm-up as in Tensorflow's ExponentialMovingAverage: early averages are not stuck at init
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = getattr(model, "module", model).state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1 - d)
            else:
                v.copy_(src[k])
