"""Classifier-free guidance (Ho & Salimans 2022, eq. 6):

    eps~(x_t, t, c) = eps(x_t, t) + w * (eps(x_t, t, c) - eps(x_t, t))

w = 0 is unconditional, w = 1 plain conditional sampling, w > 1 strengthens the condition.
"""
from __future__ import annotations

import torch

from genseg.diffusion.conditioning import null_condition


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    return eps_uncond + w * (eps_cond - eps_uncond)


def guided_output(model, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None,
                  w: float) -> torch.Tensor:
    """The model output at ``(x_t (B, 3, H, W), t)`` under guidance weight ``w``.

    Both branches go through the network in ONE batched forward pass of size 2B."""
    if cond is None:
        return model(x_t, t)
    if w == 1.0:
        return model(x_t, t, cond)
    if w == 0.0:
        return model(x_t, t, null_condition(cond))
    out = model(torch.cat([x_t, x_t]), t, torch.cat([null_condition(cond), cond]))
    eps_uncond, eps_cond = out.chunk(2)
    return guide(eps_uncond, eps_cond, w)
