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

from genseg.config import SEG_MIXES
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
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
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


# ---------------------------------------------------------------- photometric (image only)
# They change colours, never geometry: the mask passes through untouched, so no label moves and
# no class id is invented.  They work on the [0, 1] image and return the normalised one.

def _unit(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def _normed(image01: torch.Tensor) -> torch.Tensor:
    return (image01.clamp(0, 1) - MEAN) / STD


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


@dataclass
class ColorJitter:
    """Brightness, contrast and saturation, each scaled by a factor drawn from ``U(1 - s, 1 + s)``, in
    a random order (torchvision's ColorJitter without hue)."""
    strength: float

    def __call__(self, image, mask, rng: random.Random):
        if self.strength <= 0:
            return image, mask
        x = _unit(image)
        ops = ["brightness", "contrast", "saturation"]
        rng.shuffle(ops)
        for op in ops:
            f = rng.uniform(1 - self.strength, 1 + self.strength)
            if op == "brightness":
                x = x * f
            elif op == "contrast":
                mean = _grey(x).mean()
                x = (x - mean) * f + mean
            else:
                g = _grey(x)
                x = (x - g) * f + g
            x = x.clamp(0, 1)
        return _normed(x), mask


@dataclass
class RandomGamma:
    """``x ** gamma`` with ``log(gamma) ~ U(-g, g)``: darker or brighter mid-tones, same black and white."""
    log_range: float

    def __call__(self, image, mask, rng: random.Random):
        if self.log_range <= 0:
            return image, mask
        gamma = float(np.exp(rng.uniform(-self.log_range, self.log_range)))
        return _normed(_unit(image).clamp(0, 1) ** gamma), mask


@dataclass
class RandomBlur:
    """With probability ``p``, a separable Gaussian blur of sigma ``U(0.3, 1.5)`` pixels (edges replicated)."""
    p: float
    sigma: tuple[float, float] = (0.3, 1.5)

    def __call__(self, image, mask, rng: random.Random):
        if self.p <= 0 or rng.random() >= self.p:
            return image, mask
        return gaussian_blur(image, rng.uniform(*self.sigma)), mask


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(C, H, W)`` image blurred by a separable Gaussian (radius ``ceil(3 sigma)``, edges replicated)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=image.dtype, device=image.device) / sigma) ** 2)
    k = k / k.sum()
    c = image.shape[0]
    x = F.pad(image[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng: random.Random):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask


def train_transforms(crop: tuple[int, int], scale_min: float, scale_max: float, hflip: bool,
                     ignore_index: int = IGNORE_INDEX, jitter: float = 0.0, gamma: float = 0.0,
                     blur: float = 0.0) -> Compose:
    """Scale, crop and flip (image and mask together), then the photometric ones that are switched on
    (image only), in that order."""
    ts = [RandomScale(scale_min, scale_max), RandomCrop(crop, ignore_index)]
    if hflip:
        ts.append(RandomHFlip())
    if jitter > 0:
        ts.append(ColorJitter(jitter))
    if gamma > 0:
        ts.append(RandomGamma(gamma))
    if blur > 0:
        ts.append(RandomBlur(blur))
    return Compose(ts)


# ------------------------------------------------------------------ mixing two samples of a batch
# Each picked sample takes a region of its partner (the next sample in the batch), image and mask
# together, so every output pixel is one source's image pixel with that same source's label: no
# class id is invented and none is moved away from its pixels.

def cutmix_region(mask: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A box covering U(0.25, 0.5) of the crop, anywhere in it (French et al., BMVC 2020)."""
    h, w = mask.shape
    area = rng.uniform(0.25, 0.5)
    aspect = rng.uniform(0.5, 2.0)
    bh = max(1, min(h, round((area * h * w * aspect) ** 0.5)))
    bw = max(1, min(w, round(area * h * w / bh)))
    top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
    region = torch.zeros(h, w, dtype=torch.bool, device=mask.device)
    region[top: top + bh, left: left + bw] = True
    return region


def classmix_region(mask: torch.Tensor, rng: random.Random, ignore_index: int) -> torch.Tensor:
    """The pixels of half the classes (rounded up) that ``mask`` labels (Olsson et al., WACV 2021):
    whole objects and surfaces of the partner, with their shapes, pasted over the sample."""
    present = sorted(c for c in mask.unique().tolist() if c != ignore_index)
    if not present:
        return torch.zeros_like(mask, dtype=torch.bool)
    chosen = rng.sample(present, (len(present) + 1) // 2)
    return torch.isin(mask, torch.tensor(chosen, dtype=mask.dtype, device=mask.device))


def mix_batch(images: torch.Tensor, masks: torch.Tensor, kind: str, p: float, rng: random.Random,
              ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``images (B, 3, H, W)``, ``masks (B, H, W)``: with probability ``p`` each sample takes a
    region of sample ``(i + 1) % B`` (as it was before any mixing) by ``kind``: ``cutmix`` (a box) or
    ``classmix`` (the pixels of half the partner's classes).  ``none``, ``p = 0`` or a batch of one
    return the batch unchanged."""
    if kind not in SEG_MIXES:
        raise ValueError(f"unknown mix {kind!r}; expected one of {', '.join(SEG_MIXES)}")
    b = images.shape[0]
    if kind == "none" or p <= 0 or b < 2:
        return images, masks
    out_i, out_m = images.clone(), masks.clone()
    for i in range(b):
        if rng.random() >= p:
            continue
        j = (i + 1) % b
        region = (cutmix_region(masks[j], rng) if kind == "cutmix"
                  else classmix_region(masks[j], rng, ignore_index))
        out_i[i] = torch.where(region, images[j], out_i[i])
        out_m[i] = torch.where(region, masks[j], out_m[i])
    return out_i, out_m
