"""The diffusion network: diffusers' ``UNet2DModel`` with an optional label-map condition
concatenated to the noisy image as extra input channels (as in SR3 / Palette-style
conditioning), sized from a :class:`genseg.config.DiffusionConfig`."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn


class DiffusionUNet(nn.Module):
    """``forward(x_t (B, 3, H, W), t (B,) or int, cond (B, K + 1, H, W) | None) -> (B, 3, H, W)``.

    The output is eps or v, as the config's ``prediction`` says."""

    def __init__(self, cfg):
        super().__init__()
        self.cond_channels = cfg.num_classes + 1 if cfg.cond == "mask" else 0
        levels = len(cfg.channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if cfg.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.data_channels = cfg.latent_channels or 3        # an autoencoder's latents, or RGB
        self.unet = UNet2DModel(
            in_channels=self.data_channels + self.cond_channels, out_channels=self.data_channels,
            block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=min(8, cfg.channels[0]), attention_head_dim=8,
        )

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_channels:
            if cond is None:
                raise ValueError("this model is label-conditioned: pass a condition (or the null condition)")
            x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this model is unconditional; it takes no condition")
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t).sample


def build_diffusion_model(cfg) -> DiffusionUNet:
    return DiffusionUNet(cfg)
