"""Noise schedules: the forward process ``q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)``.

A schedule is chosen by name; the betas come from diffusers' ``DDPMScheduler`` so training and
every sampler share one definition.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

# genseg name -> diffusers beta_schedule
BETA_SCHEDULES: dict[str, str] = {
    "linear": "linear",                  # Ho et al. 2020: beta_t linear in t
    "scaled_linear": "scaled_linear",    # sqrt(beta_t) linear in t (latent diffusion)
    "cosine": "squaredcos_cap_v2",       # Nichol & Dhariwal 2021, eq. 17; beta capped at 0.999
    "sigmoid": "sigmoid",                # beta_t = sigmoid(linspace(-6, 6)) * (end - start) + start
}


def make_train_scheduler(cfg) -> DDPMScheduler:
    """The training-time scheduler (``add_noise``, ``get_velocity``) of a DiffusionConfig."""
    if cfg.schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {cfg.schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    return DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule=BETA_SCHEDULES[cfg.schedule],
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         prediction_type=cfg.prediction,
                         # pixels live in [-1, 1]; a latent model's latents (unit variance) do not
                         clip_sample=not getattr(cfg, "latent_channels", 0))


def alpha_bar(cfg) -> torch.Tensor:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` for t = 0..T-1, shape ``(T,)``."""
    return make_train_scheduler(cfg).alphas_cumprod.clone()
