"""Inpainting with an unconditionally-trained (or label-conditioned) diffusion model, RePaint-style
(Lugmayr et al. 2022): at every reverse step the known region is replaced by the original image
noised to the same level, so the model only invents the masked region; ``resample > 1`` jumps
back one step and re-denoises to harmonise the two regions."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from genseg.diffusion.guidance import guided_output
from genseg.generation import SamplingError
from genseg.diffusion.sampling import make_sampler


@torch.no_grad()
def inpaint(model, train_scheduler, x_known: torch.Tensor, mask: torch.Tensor, *, cond=None, w: float = 1.0,
            sampler: str = "ddim", steps: int = 25, resample: int = 1,
            generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """``x_known (B, 3, H, W)`` in [-1, 1], ``mask (B, 1, H, W)`` with 1 = regenerate -> ``(B, 3, H, W)``."""
    if resample > 1 and sampler == "dpmpp":
        raise SamplingError("resampling needs a stateless sampler (ddpm or ddim), not dpmpp")
    sched = make_sampler(sampler, train_scheduler, steps)
    alpha_bar = train_scheduler.alphas_cumprod.to(device)
    x_known, mask = x_known.to(device), mask.to(device).float()
    cond = None if cond is None else cond.to(device)
    x = torch.randn(x_known.shape, generator=generator).to(device) * sched.init_noise_sigma
    ts = list(sched.timesteps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        for r in range(resample):
            out = guided_output(model, sched.scale_model_input(x, t), t.to(device), cond, w)
            x_prev = sched.step(out, t, x, generator=generator).prev_sample
            if t_prev is not None:   # the known pixels, noised to the level of x_prev
                noise = torch.randn(x_known.shape, generator=generator).to(device)
                known = train_scheduler.add_noise(x_known, noise, t_prev.reshape(1).to(device))
            else:
                known = x_known
            x_prev = mask * x_prev + (1 - mask) * known
            if r < resample - 1 and t_prev is not None:
                # jump back one step: q(x_t | x_prev) = N(sqrt(a) x_prev, (1 - a) I), a = ab_t / ab_prev
                a = alpha_bar[t] / alpha_bar[t_prev]
                x = a.sqrt() * x_prev + (1 - a).sqrt() * torch.randn(x.shape, generator=generator).to(device)
            else:
                break
        x = x_prev
    return x.clamp(-1, 1) if train_scheduler.config.clip_sample else x


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """Soft weights in [0, 1] that fall off *inside* ``mask (H, W) bool`` over ``radius`` pixels and
    are exactly 0 outside it, so compositing never touches a pixel outside the mask."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    if radius > 0:
        # erode repeatedly and average: a linear ramp from the edge inwards
        levels = [m]
        cur = m
        for _ in range(radius):
            cur = -F.max_pool2d(-cur, 3, 1, 1)
            levels.append(cur)
        soft = torch.stack(levels).mean(0)
    else:
        soft = m
    return (soft[0, 0].numpy() * mask).astype(np.float32)


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Blend ``generated`` into ``original`` (both ``(H, W, 3) uint8``) inside ``mask``;
    outside it the result is bit-identical to ``original``."""
    soft = feather(mask, radius)[..., None]
    blend = np.rint(original.astype(np.float32) * (1 - soft) + generated.astype(np.float32) * soft)
    return np.where(mask[..., None], blend.clip(0, 255).astype(np.uint8), original)
