"""The latent-diffusion autoencoder: diffusers' ``AutoencoderKL`` sized from a
:class:`genseg.config.VAEConfig`, and the PatchGAN discriminator its optional adversarial term uses.

:class:`KLAutoencoder` wraps ``AutoencoderKL`` so that one ``forward`` returns everything the loss
needs (reconstruction, posterior mean and log-variance): Ray Train's DDP synchronises gradients of
``forward`` calls only, and the diffusers model's own ``forward`` hides the posterior.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

LOGVAR_RANGE = (-30.0, 20.0)       # as diffusers' DiagonalGaussianDistribution clamps it


class KLAutoencoder(nn.Module):
    """``forward(x (B, 3, H, W) in [-1, 1], noise) -> (reconstruction, mean, logvar)``.

    ``noise`` (the posterior sample's standard normal draw, shaped like ``mean``) is passed in so the
    caller owns the random stream (a seeded CPU generator, as every genseg loop); ``None`` decodes
    the posterior mean.  ``H`` and ``W`` must be multiples of :attr:`factor`."""

    def __init__(self, cfg):
        super().__init__()
        n = len(cfg.channels)
        self.factor = cfg.factor
        self.latent_channels = cfg.latent_channels
        self.vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.channels),
            layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_groups, mid_block_add_attention=cfg.attention)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` -> the posterior's mean and (clamped) log-variance, each ``(B, C, H / f, W / f)``."""
        h = self.vae.quant_conv(self.vae.encoder(x))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(self.vae.post_quant_conv(z))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        mean, logvar = self.moments(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean)
        return self.decode(z), mean, logvar


def build_vae(cfg) -> KLAutoencoder:
    return KLAutoencoder(cfg)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) with spectral norm: ``x (B, 3, H, W)`` -> a logit per overlapping
    patch ``(B, 1, H / 4, W / 4)``.  Each logit judges a ~34-pixel patch: local texture and sharpness,
    which L1 and SSIM alone leave blurry."""

    def __init__(self, channels: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        c = channels
        self.body = nn.Sequential(
            sn(nn.Conv2d(3, c, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(c, 2 * c, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * c, 4 * c, 3, 1, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(4 * c, 1, 3, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
