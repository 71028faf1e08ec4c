"""The DDPM training objective (Ho et al. 2020, Algorithm 1 / eq. 14):

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    loss = || eps - eps_theta(x_t, t, c) ||^2

or, with ``v_prediction`` (Salimans & Ho 2022), the target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from genseg.diffusion.conditioning import drop_condition


def diffusion_loss(model, x0: torch.Tensor, cond: torch.Tensor | None, scheduler, p_uncond: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``x0 (B, 3, H, W)`` in [-1, 1], ``cond (B, K + 1, H, W)`` or None -> scalar loss."""
    b = x0.shape[0]
    # draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move
    where = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=where).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
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

    ``x0``/``cond`` must already be on the model's device; ``generator`` may stay a CPU generator
    (noise is drawn on the CPU and moved, so a run draws the same numbers on any device).
    ``autocast`` is a context manager for mixed precision, or a zero-argument callable making a
    fresh one; ``scaler`` a GradScaler for fp16 (gradients are unscaled before clipping, so the
    clip threshold applies to the true gradient norm)."""
    model.train()
    ctx = contextlib.nullcontext() if autocast is None else (
        autocast if hasattr(autocast, "__enter__") else autocast())
    with ctx:
        loss = diffusion_loss(model, x0, cond, scheduler, p_uncond, generator)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)        # skipped when the unscaled gradients hold inf/NaN
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    if ema is not None:
        ema.update(model)
    return loss.item()
