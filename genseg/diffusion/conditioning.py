"""Label-map conditions: one-hot class channels plus a "null" channel for the unconditional
branch of classifier-free guidance (Ho & Salimans 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_labels(mask: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``mask (B, H, W)`` class ids -> condition ``(B, K + 1, H, W)``; ignored pixels are all-zero,
    the last (null) channel is 0 for a real condition."""
    valid = mask != ignore_index
    onehot = F.one_hot(mask.where(valid, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    null = torch.zeros_like(onehot[:, :1])
    return torch.cat([onehot, null], dim=1)


def null_condition(like: torch.Tensor) -> torch.Tensor:
    """The "no condition" input of the same shape as ``like (B, K + 1, H, W)``: only the null channel set."""
    c = torch.zeros_like(like)
    c[:, -1] = 1.0
    return c


def drop_condition(cond: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each sample's condition by the null condition with probability ``p_uncond``."""
    if p_uncond <= 0:
        return cond
    drop = torch.rand(cond.shape[0], generator=generator, device="cpu").to(cond.device) < p_uncond
    return torch.where(drop[:, None, None, None], null_condition(cond), cond)


def pool_labels(mask: torch.Tensor, factor: int, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``mask (B, H, W)`` -> ``(B, H / factor, W / factor)``: each ``factor x factor`` cell takes its most
    frequent class (ties: the lower id); a cell with no labelled pixel is ``ignore_index``.  A latent
    model's condition on its grid: nearest sampling would keep one pixel of 16 or 64 and drop thin
    classes at random."""
    if factor == 1:
        return mask.long()
    b, h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"label maps of {h}x{w} do not pool to a grid of factor {factor}")
    counts = F.avg_pool2d(encode_labels(mask, num_classes, ignore_index)[:, :num_classes], factor)
    best = counts.argmax(1)
    return best.where(counts.amax(1) > 0, torch.full_like(best, ignore_index))
