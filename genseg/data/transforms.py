"""Joint (image, mask) transforms, in the style of torchvision's segmentation references.

Every transform takes and returns ``(image, mask)``: ``image`` is a ``(3, H, W)`` float tensor,
``mask`` a ``(H, W)`` int64 tensor of class ids.  Geometry is applied to both; masks are resized
with NEAREST and padded with the ignore index so no invented labels appear.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from genseg.data.classes import IGNORE_INDEX

# Images are scaled to roughly zero mean / unit variance with fixed constants (no dataset
# statistics needed, same numbers at train, eval and serve time).
MEAN = 0.5
STD = 0.25


def to_tensors(image: np.ndarray, mask: np.ndarray | None = None):
    """``(H, W, 3) uint8`` [+ ``(H, W)`` ids] -> normalised ``(3, H, W)`` float [+ int64 mask]."""
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    img = (img - MEAN) / STD
    if mask is None:
        return img
    return img, torch.from_numpy(np.array(mask)).long()


def denormalize(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` normalised tensor -> ``(H, W, 3) uint8``."""
    x = (image.detach().float().cpu() * STD + MEAN).clamp(0, 1).mul(255).round()
    return x.byte().permute(1, 2, 0).numpy()


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]):
    """Bilinear for the image, NEAREST for the mask."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


@dataclass
class RandomScale:
    min_scale: float
    max_scale: float

    def __call__(self, image, mask, rng: random.Random):
        s = rng.uniform(self.min_scale, self.max_scale)
        h, w = mask.shape
        return resize_pair(image, mask, (max(1, round(h * s)), max(1, round(w * s))))


@dataclass
class RandomCrop:
    size: tuple[int, int]
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image, mask, rng: random.Random):
        ch, cw = self.size
        h, w = mask.shape
        ph, pw = max(0, ch - h), max(0, cw - w)
        if ph or pw:   # pad bottom/right: image with 0 (the mean), mask with ignore
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore_index)
            h, w = mask.shape
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        return image[:, top: top + ch, left: left + cw], mask[top: top + ch, left: left + cw]


@dataclass
class RandomHFlip:
    p: float = 0.5

    def __call__(self, image, mask, rng: random.Random):
        if rng.random() < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng: random.Random):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask


def train_transforms(crop: tuple[int, int], scale_min: float, scale_max: float, hflip: bool,
                     ignore_index: int = IGNORE_INDEX) -> Compose:
    ts = [RandomScale(scale_min, scale_max), RandomCrop(crop, ignore_index)]
    if hflip:
        ts.append(RandomHFlip())
    return Compose(ts)
