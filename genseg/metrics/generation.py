"""Generation metrics in a feature space the project trains itself (no Inception weights here).

* Frechet distance (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)
* KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged
  over random subsets
* PSNR and SSIM (Wang et al. 2004) restricted to the pixels of a mask, for inpainting
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """``feats (N, D)`` of two sets -> Frechet distance of the Gaussians fitted to them."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    s = _sqrtm_psd(cov_a)
    # Tr((C_a^1/2 C_b C_a^1/2)^1/2) = sum of sqrt of the eigenvalues of a symmetric PSD matrix
    cross = torch.linalg.eigvalsh(s @ cov_b @ s).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(fd.clamp(min=0))


def frechet_distance_std(feats_a: torch.Tensor, feats_b: torch.Tensor, rounds: int = 50, seed: int = 0) -> float:
    """Bootstrap standard deviation of :func:`frechet_distance` (both sets resampled with replacement):
    how much of a difference between two FDs at this sample count is noise."""
    g = torch.Generator().manual_seed(seed)
    values = [frechet_distance(feats_a[torch.randint(len(feats_a), (len(feats_a),), generator=g)],
                               feats_b[torch.randint(len(feats_b), (len(feats_b),), generator=g)])
              for _ in range(rounds)]
    return float(torch.tensor(values).std())


def kernel_inception_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 10,
                              subset_size: int = 50, seed: int = 0) -> tuple[float, float]:
    """-> (mean, std) of the unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets."""
    a, b = feats_a.double(), feats_b.double()
    n = min(subset_size, len(a), len(b))
    if n < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:n]]
        y = b[torch.randperm(len(b), generator=g)[:n]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
               - 2 * kxy.mean())
        values.append(float(mmd))
    t = torch.tensor(values)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def psnr_in_mask(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> float:
    """``pred, target (B, C, H, W)``, ``mask (B, 1, H, W)`` -> PSNR (dB) over the masked pixels."""
    m = mask.expand_as(pred).bool()
    mse = (pred - target)[m].double().pow(2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(data_range ** 2 / mse))


def _gaussian(window: int, sigma: float) -> torch.Tensor:
    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = 11,
             sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM ``(B, C, H, W)`` with a Gaussian window (reflect padding keeps the size)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    g = _gaussian(window, sigma).to(pred)
    ch = pred.shape[1]
    k = (g[:, None] * g[None, :]).expand(ch, 1, window, window).contiguous()
    pad = window // 2

    def blur(x):
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), k, groups=ch)

    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x ** 2
    syy = blur(target * target) - mu_y ** 2
    sxy = blur(pred * target) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def ssim_in_mask(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> float:
    m = mask.expand_as(pred).bool()
    return float(ssim_map(pred.double(), target.double(), data_range)[m].mean())


def random_holes(n: int, size: tuple[int, int], frac: float = 0.25, seed: int = 0) -> torch.Tensor:
    """``(n, 1, H, W)`` masks with one seeded rectangular hole covering about ``frac`` of the image."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 1, h, w)
    side = math.sqrt(frac)
    hh, ww = max(1, round(h * side)), max(1, round(w * side))
    for i in range(n):
        top = int(torch.randint(0, h - hh + 1, (1,), generator=g))
        left = int(torch.randint(0, w - ww + 1, (1,), generator=g))
        out[i, :, top: top + hh, left: left + ww] = 1
    return out
