"""Exponential moving average of weights (used for sampling, kept in checkpoints).

The EMA copy lives on the same device as the model it tracks: a training loop builds it, then
moves the model to the GPU (and may wrap it in DDP), and the EMA has to follow or every update
would add CUDA tensors into CPU ones.  :meth:`EMA.to` moves it explicitly; :meth:`EMA.update`
also follows the model by itself when it finds the weights on another device.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.updates = 0

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.state_dict().values())).device

    def to(self, device: torch.device | str) -> "EMA":
        """Move the averaged weights (dtype unchanged: an fp32 average of a low-precision model
        is the point of keeping one)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = d * ema + (1 - d) * weights`` with ``d = min(decay, (1 + n) / (10 + n))`` after ``n``
        updates, the warm-up of Tensorflow's ExponentialMovingAverage (early averages are not stuck
        at the initial weights).  Integer buffers (e.g. BatchNorm's counter) are copied."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = unwrap(model).state_dict()
        first = next(iter(src.values()), None)
        if first is not None and first.device != self.device:
            self.to(first.device)
        for k, v in self.model.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                v.mul_(d).add_(s.to(v.dtype), alpha=1 - d)
            else:
                v.copy_(s)
