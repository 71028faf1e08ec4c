"""DCGAN networks (Radford et al. 2016) sized from the config, optionally conditioned on a label map.

Generator: ``z -> linear -> (C0, h0, w0) -> [ConvTranspose 4x4 /2 -> norm -> ReLU] x k -> conv 3x3
-> tanh``, starting at DCGAN's 4x4 (4..7 pixels on the short side, :func:`genseg.config.gan_stages`)
and doubling k times to the image size.  With ``cond="mask"`` every norm is SPADE (Park et al.
2019): a parameter-free BatchNorm whose per-pixel scale and shift are predicted from the label map
resized to that stage, so the layout is injected at every scale.  Unconditional models use
ordinary BatchNorm (DCGAN).

Discriminator: ``[image | one-hot label map] -> [conv 4x4 /2 -> LeakyReLU 0.2] x k -> linear ->
logit``.  No BatchNorm: a gradient penalty is per sample and BatchNorm would mix samples (WGAN-GP
drops it for that reason); spectral norm on every layer is the stabiliser instead (option).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genseg.config import GANConfig, gan_stages
from genseg.diffusion.conditioning import encode_labels


def _widths(base: int, k: int, cap: int, up: bool) -> list[int]:
    """k + 1 widths: the generator's halve from the start to ``base`` at full resolution; the
    discriminator's double from ``base`` at the first stage."""
    w = [min(base * 2 ** i, cap) for i in range(k + 1)]
    return w[::-1] if up else w


class SPADE(nn.Module):
    """``BatchNorm(x) * (1 + gamma(seg)) + beta(seg)`` with gamma, beta from the label map."""

    def __init__(self, channels: int, label_channels: int, hidden: int = 32):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        a = self.shared(F.interpolate(seg, size=x.shape[-2:], mode="nearest"))
        return self.norm(x) * (1 + self.gamma(a)) + self.beta(a)


class _BN(nn.BatchNorm2d):
    """DCGAN's BatchNorm with the SPADE call signature (the label map is ignored)."""

    def forward(self, x: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class DCGANGenerator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        self.k, (self.h0, self.w0) = gan_stages(cfg.image_size)
        widths = _widths(cfg.g_channels, self.k, cfg.max_channels, up=True)
        self.conditional = cfg.cond == "mask"
        label_ch = cfg.num_classes + 1

        def norm(c: int) -> nn.Module:
            return SPADE(c, label_ch) if self.conditional else _BN(c)

        self.fc = nn.Linear(cfg.z_dim, widths[0] * self.h0 * self.w0)
        self.norms = nn.ModuleList([norm(widths[0])])
        self.ups = nn.ModuleList()
        for i in range(self.k):
            self.ups.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False))
            self.norms.append(norm(widths[i + 1]))
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        """``z (B, z_dim)``, ``seg (B, K + 1, H, W)`` one-hot label map (conditional models) -> images in [-1, 1]."""
        if self.conditional and seg is None:
            raise ValueError("this generator is conditioned on label maps; pass seg")
        x = self.fc(z).view(len(z), -1, self.h0, self.w0)
        x = F.relu(self.norms[0](x, seg))
        for up, norm in zip(self.ups, self.norms[1:]):
            x = F.relu(norm(up(x), seg))
        return torch.tanh(self.to_rgb(x))


class DCGANDiscriminator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        self.k, (h0, w0) = gan_stages(cfg.image_size)
        self.conditional = cfg.cond == "mask"
        widths = _widths(cfg.d_channels, self.k - 1, cfg.max_channels, up=False)
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        in_ch = 3 + (cfg.num_classes + 1 if self.conditional else 0)
        layers, prev = [], in_ch
        for w in widths:
            layers += [sn(nn.Conv2d(prev, w, 4, 2, 1)), nn.LeakyReLU(0.2)]
            prev = w
        self.body = nn.Sequential(*layers)
        self.head = sn(nn.Linear(prev * h0 * w0, 1))
        _dcgan_init(self)

    def forward(self, x: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, 3, H, W)`` in [-1, 1] (+ the one-hot label map) -> logits ``(B,)``."""
        if self.conditional:
            if seg is None:
                raise ValueError("this discriminator is conditioned on label maps; pass seg")
            x = torch.cat([x, seg.to(x.dtype)], dim=1)
        return self.head(self.body(x).flatten(1)).squeeze(1)


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's N(0, 0.02) conv/linear weights and N(1, 0.02) norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = getattr(getattr(m, "parametrizations", None), "weight", None)
            target = w.original if w is not None else m.weight
            nn.init.normal_(target, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_generator(cfg: GANConfig) -> DCGANGenerator:
    if cfg.image_size is None or (cfg.cond == "mask" and cfg.num_classes < 1):
        raise ValueError("a GAN config needs image_size (and num_classes when conditioned)")
    return DCGANGenerator(cfg)


def build_discriminator(cfg: GANConfig) -> DCGANDiscriminator:
    return DCGANDiscriminator(cfg)


def label_condition(masks: torch.Tensor | None, cfg: GANConfig) -> torch.Tensor | None:
    """``masks (B, H, W)`` -> one-hot ``(B, K + 1, H, W)`` for a conditional GAN, else None."""
    if cfg.cond != "mask" or masks is None:
        return None
    return encode_labels(masks, cfg.num_classes, cfg.ignore_index)
