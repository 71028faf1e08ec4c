"""A validation score that compares diffusion models across noise schedules, T and prediction types.

The training loss cannot: an eps-MSE and a v-MSE are different quantities, and the same t means a
different noise level under a linear and a cosine schedule.  ``val_x0_mse`` asks every model the
same question: given a val image noised to each of a fixed set of noise levels (log-SNR
-4, -3, ..., 4, i.e. alpha_bar from 0.018 to 0.982) with fixed noise, how far is its estimate of
the clean image x0 from the truth?  Whatever the model predicts (eps or v), it is converted to x0
(Ho et al. 2020 eq. 15; Salimans & Ho 2022 for v), and the MSE is averaged over the levels.  Each
level is mapped to the model's timestep whose alpha_bar is nearest; with T >= 100 the achieved
log-SNR is within ~0.1 of the target for the four schedules here.  The denoising error at these
levels is what the ELBO weights up, so a lower score means a better sampler input at every step;
the tuning search uses the same score as its per-epoch metric.
"""
from __future__ import annotations

import torch

LOG_SNR_LEVELS = tuple(float(v) for v in range(-4, 5))


def timesteps_for_levels(alphas_cumprod: torch.Tensor, levels=LOG_SNR_LEVELS) -> torch.Tensor:
    """The timestep whose log-SNR ``log(ab / (1 - ab))`` is nearest each level -> ``(L,)`` long."""
    # on the CPU: diffusers' add_noise moves a scheduler's alphas_cumprod to the training device
    ab = alphas_cumprod.detach().to("cpu", torch.float64).clamp(1e-12, 1 - 1e-12)
    log_snr = (ab / (1 - ab)).log()
    target = torch.tensor(levels, dtype=torch.float64)
    return (log_snr[None, :] - target[:, None]).abs().argmin(1)


def predicted_x0(out: torch.Tensor, x_t: torch.Tensor, ab: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model's x0 estimate from its raw output; ``ab`` broadcastable to ``x_t``."""
    if prediction == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out
    return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()


@torch.no_grad()
def x0_mse(model, x0: torch.Tensor, cond: torch.Tensor | None, scheduler, seed: int = 1234
           ) -> tuple[float, int]:
    """``x0 (B, 3, H, W)`` in [-1, 1] -> (sum over images of the level-averaged x0 MSE, B).

    Return a sum and a count so workers can reduce it exactly."""
    device = x0.device
    ts = timesteps_for_levels(scheduler.alphas_cumprod)
    g = torch.Generator().manual_seed(seed)
    prediction = scheduler.config.prediction_type
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for t in ts.tolist():
        eps = torch.randn(x0.shape, generator=g).to(device)
        tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
        ab = scheduler.alphas_cumprod[t].to(device).float()
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        out = model(x_t, tt, cond).float()
        err = (predicted_x0(out, x_t, ab, prediction).clamp(-1, 1) - x0).pow(2).mean(dim=(1, 2, 3))
        total += err.double().cpu()
    return float((total / len(ts)).sum()), int(x0.shape[0])
