"""The DDPM training objective (Ho et al. 2020, Algorithm 1 / eq. 14):

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    loss = || eps - eps_theta(x_t, t, c) ||^2

or, with ``v_prediction`` (Salimans & Ho 2022), the target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from genseg.diffusion.conditioning import drop_condition


def diffusion_loss(model, x0: torch.Tensor, cond: torch.Tensor | None, scheduler, p_uncond: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``x0 (B, 3, H, W)`` in [-1, 1], ``cond (B, K + 1, H, W)`` or None -> scalar loss."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, eps, t)
    else:
        target = eps
    if cond is not None:
        cond = drop_condition(cond, p_uncond, generator)
    pred = model(x_t, t, cond)
    return F.mse_loss(pred.float(), target.float())


def train_step(model, optimizer, x0, cond, scheduler, p_uncond: float, ema=None, autocast=None,
               generator=None, scaler=None) -> float:
    """One optimisation step (gradient clipping at 1, EMA update); returns the loss.

    ``autocast`` is a context manager for mixed precision; ``scaler`` a GradScaler for fp16."""
    model.train()
    if autocast is not None:
        with autocast:
            loss = diffusion_loss(model, x0, cond, scheduler, p_uncond, generator)
    else:
        loss = diffusion_loss(model, x0, cond, scheduler, p_uncond, generator)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    if ema is not None:
        ema.update(model)
    return loss.item()
