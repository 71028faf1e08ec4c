"""A trained autoencoder, ready to encode images to latents and decode them back.

    vae = genseg.loading.load(resolved, expect="vae")
    z = vae.encode(x)          # x (B, 3, H, W) in [-1, 1] -> (B, C, H / f, W / f), scaled to unit variance
    x2 = vae.decode(z)         # -> (B, 3, H, W) in [-1, 1]

Latents are the posterior means times ``scale`` (the checkpoint's ``latent_scale``, 1 / std of the
val latents), so a latent diffusion model trains on values of about unit variance.
"""
from __future__ import annotations

import numpy as np
import torch

from genseg.errors import InputError


class Autoencoder:
    kind = "vae"

    def __init__(self, net, cfg, scale: float, device: str | torch.device = "cpu", weights: str = "ema"):
        self.net = net.to(device).eval()
        self.cfg, self.scale, self.device, self.weights = cfg, float(scale), torch.device(device), weights
        self.factor, self.latent_channels = cfg.factor, cfg.latent_channels
        self.image_size = tuple(cfg.image_size) if cfg.image_size is not None else None

    def check_size(self, h: int, w: int, what: str = "image") -> None:
        """One line when ``h x w`` is not a multiple of the factor (the autoencoder halves it cleanly
        ``log2(factor)`` times or not at all)."""
        if h % self.factor or w % self.factor:
            raise InputError(f"{what} size {h}x{w} is not a multiple of the autoencoder's factor {self.factor} "
                             f"(e.g. {h - h % self.factor or self.factor}x{w - w % self.factor or self.factor})")

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """``x (B, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, C, H / f, W / f)`` (float32, CPU)."""
        self.check_size(*x.shape[-2:])
        out = [self.net.moments(x[i: i + batch].to(self.device).float())[0].float().cpu()
               for i in range(0, len(x), batch)]
        return torch.cat(out) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` -> images ``(B, 3, h f, w f)`` in [-1, 1] (float32, CPU)."""
        if z.shape[1] != self.latent_channels:
            raise InputError(f"latents have {z.shape[1]} channels; this autoencoder's have {self.latent_channels}")
        out = [self.net.decode(z[i: i + batch].to(self.device).float() / self.scale).float().clamp(-1, 1).cpu()
               for i in range(0, len(z), batch)]
        return torch.cat(out)

    def encode_images(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` images of one size -> scaled latents."""
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.encode(x)

    def decode_images(self, z: torch.Tensor) -> np.ndarray:
        """Scaled latents -> uint8 ``(B, H, W, 3)`` images."""
        x = self.decode(z)
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
