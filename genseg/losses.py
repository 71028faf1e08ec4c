"""Segmentation losses: pure functions of ``logits (B, K, H, W)`` and ``target (B, H, W)``."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy; ``weight (K,)`` rescales classes, ignored pixels count nothing."""
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              ignore_index: int = 255, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - mean_k (2 |P_k . G_k| + eps) / (|P_k| + |G_k| + eps)``.

    Softmax probabilities ``P`` against one-hot ``G`` over the non-ignored pixels of the batch;
    classes with neither predicted mass nor label pixels score 1 (no penalty) through ``eps``.
    """
    num_classes = logits.shape[1]
    valid = target != ignore_index                                   # (B, H, W)
    probs = logits.float().softmax(dim=1) * valid[:, None]
    onehot = F.one_hot(target.where(valid, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)                         # (K,)
    if weight is not None:
        w = weight.to(dice)
        return 1 - (dice * w).sum() / w.sum()
    return 1 - dice.mean()


def ce_dice(logits, target, weight=None, ignore_index: int = 255) -> torch.Tensor:
    return cross_entropy(logits, target, weight, ignore_index) + dice_loss(logits, target, None, ignore_index)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                       ignore_index: int = 255, threshold: float = 0.7, min_kept: float = 1 / 16) -> torch.Tensor:
    """Online hard-example mining (Shrivastava et al. 2016, as in semantic segmentation's OHEM-CE):
    the mean cross-entropy over the pixels whose probability of their true class is below
    ``threshold``, and never fewer than the ``min_kept`` share of the labelled pixels (the hardest
    ones).  Easy pixels, most of road and sky, stop dominating the gradient."""
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none").flatten()
    valid = (target != ignore_index).flatten()
    losses = per_pixel[valid]
    if losses.numel() == 0:
        return per_pixel.sum() * 0.0
    # p(true class) < threshold  <=>  the unweighted CE > -log(threshold); with class weights the
    # ranking is by the weighted loss, the cut by the same rule on each pixel's own weight
    w = weight[target.flatten()[valid]] if weight is not None else torch.ones_like(losses)
    hard = losses > -math.log(threshold) * w
    keep = max(1, int(math.ceil(min_kept * losses.numel())))
    if int(hard.sum()) < keep:
        return losses.topk(keep).values.mean()
    return losses[hard].mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": cross_entropy,
    "dice": dice_loss,
    "ce_dice": ce_dice,
    "ohem": ohem_cross_entropy,
    "ohem_dice": lambda logits, target, weight=None, ignore_index=255: (
        ohem_cross_entropy(logits, target, weight, ignore_index) + dice_loss(logits, target, None, ignore_index)),
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
