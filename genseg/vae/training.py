"""The autoencoder's loss and one training step, shared by ``genseg train vae`` and the unit tests
(no Ray in here).

Under Ray Train the autoencoder and the discriminator are DDP-wrapped (``vae``, ``disc``); the plain
modules inside are reached with :func:`unwrap`.  As in the GAN step, the discriminator scores the
reconstruction through its plain module in the autoencoder's step, so only the autoencoder's
gradients are synchronised there, and its own step has one wrapped forward per backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from genseg.diffusion.ema import unwrap
from genseg.gan.losses import d_loss, g_loss
from genseg.metrics.generation import ssim_map


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over every latent value, per image ``(B,)``:
    ``0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)``."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)


def reconstruction_terms(rec: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rec, x (B, 3, H, W)`` in [-1, 1] -> the L1 (mean over pixel values) and the structural term
    ``1 - SSIM`` (images mapped to [0, 1], mean over all Gaussian windows)."""
    rec, x = rec.float(), x.float()
    l1 = (rec - x).abs().mean()
    ssim = ssim_map((rec + 1) / 2, (x + 1) / 2, data_range=1.0).mean()
    return {"l1": l1, "ssim_loss": 1 - ssim}


def vae_loss(rec: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, cfg
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The autoencoder's loss without the adversarial term (see :class:`genseg.config.VAEConfig`):
    the KL is summed over latent values and divided by the number of pixel values ``3 H W``."""
    terms = reconstruction_terms(rec, x)
    kl = kl_divergence(mean, logvar).mean() / x[0].numel()
    loss = cfg.l1_weight * terms["l1"] + cfg.ssim_weight * terms["ssim_loss"] + cfg.kl_weight * kl
    return loss, {"l1": float(terms["l1"].detach()), "ssim_loss": float(terms["ssim_loss"].detach()),
                  "kl": float(kl.detach())}


def train_step(vae, opt, x: torch.Tensor, cfg, gen: torch.Generator, ema=None, disc=None, opt_d=None,
               autocast=None) -> dict[str, float]:
    """One step on ``x (B, 3, H, W)`` in [-1, 1]: the autoencoder's step (with the adversarial term
    when ``disc`` is given), then the discriminator's.  ``gen`` (a CPU generator) draws the posterior
    sample's noise.  -> the step's figures."""
    ctx = autocast or contextlib.nullcontext
    raw = unwrap(vae)
    h, w = x.shape[-2] // raw.factor, x.shape[-1] // raw.factor
    noise = torch.randn(len(x), raw.latent_channels, h, w, generator=gen).to(x.device)
    with ctx():
        rec, mean, logvar = vae(x, noise)
    loss, out = vae_loss(rec, x, mean, logvar, cfg)
    if disc is not None:
        adv = g_loss("hinge", unwrap(disc)(rec.float()))
        loss = loss + cfg.disc_weight * adv
        out["g_adv"] = float(adv.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema is not None:
        ema.update(raw)
    out["loss"] = float(loss.detach())
    if disc is not None:
        logits = disc(torch.cat([x.float(), rec.detach().float()]))
        ld = d_loss("hinge", logits[: len(x)], logits[len(x):])
        opt_d.zero_grad(set_to_none=True)    # drops what the autoencoder's step left in D
        ld.backward()
        opt_d.step()
        out["d_loss"] = float(ld.detach())
    return out


@torch.no_grad()
def psnr(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``rec`` against ``x``, both in [-1, 1] (data range 2)."""
    mse = (rec.float().clamp(-1, 1) - x.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
