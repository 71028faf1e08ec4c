"""Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015).

FCN-32s scores the stride-32 features with a 1x1 classifier and upsamples 32x.  FCN-16s adds
a 1x1 score of the stride-16 (pool4) features to the 2x-upsampled coarse score; FCN-8s adds the
stride-8 (pool3) score as well (paper, Sec. 4.2).  Skip scores start at zero so the finer nets
begin as the coarser one, as in the paper.  Upsampling is either *learned* (transposed conv
initialised to bilinear interpolation) or fixed *bilinear*.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genseg.models.backbones import build_backbone

SKIPS = {"fcn32s": 0, "fcn16s": 1, "fcn8s": 2}   # how many finer levels are fused


def bilinear_kernel(channels: int, k: int) -> torch.Tensor:
    """Weights of a per-channel transposed conv that performs bilinear upsampling."""
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = torch.arange(k, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    kernel = filt[:, None] * filt[None, :]
    w = torch.zeros(channels, channels, k, k)
    w[range(channels), range(channels)] = kernel
    return w


class Upsample(nn.Module):
    """``(B, C, h, w) -> (B, C, H, W)`` for a target ``(H, W)``; learned or bilinear."""

    def __init__(self, channels: int, factor: int, learned: bool):
        super().__init__()
        self.deconv = None
        if learned:
            k = 2 * factor
            self.deconv = nn.ConvTranspose2d(channels, channels, k, factor, factor // 2, bias=False)
            with torch.no_grad():
                self.deconv.weight.copy_(bilinear_kernel(channels, k))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.deconv is not None:
            x = self.deconv(x)
            if tuple(x.shape[-2:]) == tuple(size):
                return x
        # odd sizes: the stride pyramid is not exact, so finish with an exact resize
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FCN(nn.Module):
    """``forward(x: (B, 3, H, W)) -> logits (B, K, H, W)`` for any H, W."""

    def __init__(self, num_classes: int, arch: str = "fcn8s", backbone: str = "compact",
                 width: int = 32, upsample: str = "learned", head_dropout: float = 0.1, norm: str = "bn"):
        super().__init__()
        if arch not in SKIPS:
            raise ValueError(f"unknown FCN variant {arch!r}; choose one of {', '.join(SKIPS)}")
        self.arch = arch
        self.skips = SKIPS[arch]
        self.backbone = build_backbone(backbone, width, norm)
        c3, c4, c5 = self.backbone.channels
        learned = upsample == "learned"
        # "fc6/fc7" of the paper as a 3x3 conv block, then the 1x1 classifier
        self.head = nn.Sequential(nn.Conv2d(c5, c5, 3, padding=1, bias=False), nn.BatchNorm2d(c5),
                                  nn.ReLU(inplace=True), nn.Dropout2d(head_dropout))
        self.score_fr = nn.Conv2d(c5, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        for conv in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.up2_a = Upsample(num_classes, 2, learned)
        self.up2_b = Upsample(num_classes, 2, learned)
        self.up_final = Upsample(num_classes, {0: 32, 1: 16, 2: 8}[self.skips], learned)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        c3, c4, c5 = self.backbone(x)
        score = self.score_fr(self.head(c5))
        if self.skips >= 1:
            score = self.up2_a(score, c4.shape[-2:]) + self.score_pool4(c4)
        if self.skips >= 2:
            score = self.up2_b(score, c3.shape[-2:]) + self.score_pool3(c3)
        return self.up_final(score, size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled stride-32 features ``(B, C5)``: the feature space of generation metrics."""
        return self.backbone(x)[2].mean(dim=(2, 3))


def build_segmenter(cfg) -> FCN:
    """Build the FCN a :class:`genseg.config.SegConfig` describes."""
    return FCN(cfg.num_classes, cfg.arch, cfg.backbone, cfg.width, cfg.upsample, norm=cfg.norm)
