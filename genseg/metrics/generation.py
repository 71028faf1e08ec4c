"""Generation metrics in a feature space the project trains itself (no Inception weights here).

* Frechet distance (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)
* KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged
  over random proper subsets
* the real-vs-real noise floor of FD and KID, and a test of whether two FDs differ beyond noise
* precision / recall / density / coverage of samples (mode collapse shows in recall and coverage),
  and the class-pixel histogram of samples as seen by a segmenter
* PSNR and SSIM (Wang et al. 2004) restricted to the pixels of a mask, for inpainting

At the sample counts this project can afford (tens to a few hundred), FD and KID are noisy and
biased upwards; a figure means something only next to its spread and the floor measured between
two real sets of the same size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# KID's spread comes from subsets that are proper subsets of the data: each subset holds
# m = min(subset_size, n // 2) samples.  Below KID_MIN_SUBSET samples per subset (n < 2 * KID_MIN_SUBSET)
# the subsets are too small and too overlapping for their spread to mean anything: std is None.
KID_MIN_SUBSET = 5


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


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of ``x (n, D)`` and ``y (m, D)`` under k(x, y) = (x.y / D + 1)^3 (the
    within-set sums leave out the diagonal k(x_i, x_i))."""
    n, m, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def kernel_inception_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 10,
                              subset_size: int = 50, seed: int = 0) -> tuple[float, float | None]:
    """-> (mean, std) of the unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets.

    Each subset draws ``m = min(subset_size, n // 2)`` samples without replacement from each set
    (``n`` the smaller set size), so subsets differ and their std measures the estimator's spread
    at size ``m`` (larger than the spread of an estimate from all ``n``).  When
    ``n < 2 * KID_MIN_SUBSET`` (or ``subsets < 2``) there are no meaningful subsets: the mean is the
    unbiased MMD^2 of the whole sets and the std is ``None``.
    """
    a, b = feats_a.double(), feats_b.double()
    n = min(len(a), len(b))
    if n < 2:
        raise ValueError("KID needs at least 2 samples per set")
    m = min(subset_size, n // 2)
    if m < KID_MIN_SUBSET or subsets < 2:
        return _mmd2_unbiased(a, b), None
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([_mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:m]],
                                          b[torch.randperm(len(b), generator=g)[:m]]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())


def _real_halves(feats_real: torch.Tensor, n: int | None, rounds: int, seed: int):
    """``rounds`` random pairs of disjoint subsets of ``n`` rows each (default ``len // 2``)."""
    n = len(feats_real) // 2 if n is None else n
    if n < 2 or 2 * n > len(feats_real):
        raise ValueError(f"a noise floor at n={n} needs 2n <= {len(feats_real)} real samples and n >= 2")
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        perm = torch.randperm(len(feats_real), generator=g)
        yield feats_real[perm[:n]], feats_real[perm[n: 2 * n]]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else None)


def fd_noise_floor(feats_real: torch.Tensor, n: int | None = None, rounds: int = 10,
                   seed: int = 0) -> tuple[float, float | None]:
    """The FD between two disjoint random sets of ``n`` real samples (default: two halves),
    -> (mean, std) over ``rounds`` random splits (std ``None`` for one round).

    FD is biased upwards at small n, so the FD of generated against real at n is only meaningful
    relative to this floor at the same n: pass ``n`` = the number of generated samples when there
    are at least 2n real features; a floor at n/2 is higher (more pessimistic) than the floor at n.
    """
    return _mean_std([frechet_distance(x, y) for x, y in _real_halves(feats_real, n, rounds, seed)])


def kid_noise_floor(feats_real: torch.Tensor, n: int | None = None, rounds: int = 10,
                    seed: int = 0) -> tuple[float, float | None]:
    """:func:`fd_noise_floor` for KID: the unbiased MMD^2 of two disjoint real sets of ``n``
    (mean about 0, since KID is unbiased; its std is the noise a KID at n has to beat)."""
    return _mean_std([_mmd2_unbiased(x.double(), y.double()) for x, y in _real_halves(feats_real, n, rounds, seed)])


def fd_difference_resolved(fd_a: float, std_a: float | None, fd_b: float, std_b: float | None,
                           k: float = 2.0) -> bool:
    """Whether ``fd_a`` and ``fd_b`` differ by more than ``k`` combined standard deviations,
    ``|fd_a - fd_b| > k sqrt(std_a^2 + std_b^2)``.  An unknown std (``None``) means it cannot be
    resolved.  Benches print "unresolved" when this is False."""
    if std_a is None or std_b is None:
        return False
    if std_a < 0 or std_b < 0 or k < 0:
        raise ValueError("standard deviations and k must be >= 0")
    return abs(fd_a - fd_b) > k * math.hypot(std_a, std_b)


def fd_ratio_interval(feats_real: torch.Tensor, feats_a: torch.Tensor, feats_b: torch.Tensor,
                      rounds: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Paired bootstrap of ``FD(real, a) / FD(real, b)`` for two generators scored on the SAME
    conditions: row ``i`` of ``feats_a``, ``feats_b`` and ``feats_real`` belong to the same label
    map (and, in genseg's benches, the same seed).  Each round resamples the row indices once and
    applies them to all three sets, so the noise the two FDs share (which real images and label
    maps were drawn) cancels in the ratio, and the interval is much narrower than one built from
    two independent FD spreads.

    -> ``{"ratio", "low", "high", "level", "rounds", "n"}``, the percentile interval at ``level``.
    A claim "a is within 10 % of b" is resolved when ``high <= 1.10`` (yes) or ``low > 1.10`` (no).
    """
    n = len(feats_real)
    if not (len(feats_a) == len(feats_b) == n):
        raise ValueError(f"paired sets must have the same length, got {n}, {len(feats_a)}, {len(feats_b)}")
    if n < 3 or rounds < 2 or not 0 < level < 1:
        raise ValueError("need n >= 3, rounds >= 2 and 0 < level < 1")
    g = torch.Generator().manual_seed(seed)
    ratios = []
    for _ in range(rounds):
        i = torch.randint(n, (n,), generator=g)
        fd_b = frechet_distance(feats_real[i], feats_b[i])
        ratios.append(frechet_distance(feats_real[i], feats_a[i]) / fd_b if fd_b > 0 else float("inf"))
    t = torch.tensor(ratios, dtype=torch.float64)
    lo, hi = torch.quantile(t, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    fd_b = frechet_distance(feats_real, feats_b)
    return {"ratio": frechet_distance(feats_real, feats_a) / fd_b if fd_b > 0 else float("inf"),
            "low": float(lo), "high": float(hi), "level": level, "rounds": rounds, "n": n}


def _kth_nn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row of ``x`` to its k-th nearest other row."""
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


def diversity(feats_real: torch.Tensor, feats_fake: torch.Tensor, k: int = 5) -> dict:
    """Fidelity and diversity of samples in a feature space, from k-nearest-neighbour balls:

    * precision (Kynkaenniemi et al. 2019): share of samples inside some real ball (realistic);
    * recall: share of real points inside some sample ball (the real variety the samples reach);
    * density and coverage (Naeem et al. 2020): density counts how many real balls hold each
      sample (/ k); coverage is the share of real balls holding at least one sample.  Coverage
      and recall fall when a generator collapses onto a few modes; precision and density do not.

    A ball's radius is the distance to the k-th nearest neighbour within its own set.  With fewer
    than ``k + 1`` points in a set the figures are undefined: ValueError."""
    a, b = feats_real.double(), feats_fake.double()
    if len(a) <= k or len(b) <= k:
        raise ValueError(f"diversity with k={k} needs more than {k} real and {k} generated samples, "
                         f"got {len(a)} and {len(b)}")
    r_real, r_fake = _kth_nn_radius(a, k), _kth_nn_radius(b, k)
    d = torch.cdist(b, a)                               # (fake, real)
    inside_real = d <= r_real[None, :]                  # fake j inside real ball i
    inside_fake = d <= r_fake[:, None]                  # real i inside fake ball j
    return {"precision": float(inside_real.any(1).double().mean()),
            "recall": float(inside_fake.any(0).double().mean()),
            "density": float(inside_real.double().sum(1).mean() / k),
            "coverage": float(inside_real.any(0).double().mean()), "k": k}


def class_histogram(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of pixels per class ``(K,)`` in predicted label maps ``pred (N, H, W)``."""
    h = torch.bincount(pred.flatten().long().clamp(0, num_classes - 1), minlength=num_classes).double()
    return h / h.sum().clamp(min=1)


def histogram_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` of two class histograms (0 = same, 1 = disjoint)."""
    return float(0.5 * (p.double() - q.double()).abs().sum())


class RandomFeatures(torch.nn.Module):
    """A fixed, seeded, randomly initialised conv net whose pooled activations give a feature
    space for a score during training, where no trained segmenter is at hand (Naeem et al. 2020
    show random embeddings rank generators sensibly).  Same seed, same features: scores from
    different runs on the same data compare.  Not a substitute for ``eval gen``'s segmenter
    features; it exists to pick a GAN's best epoch and champion."""

    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, prev = [], 3
        for w in widths:
            conv = torch.nn.Conv2d(prev, w, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (9 * prev)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            prev = w
        self.convs = torch.nn.ModuleList(layers)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, 3, H, W)`` in [-1, 1] -> ``(B, sum(widths))``: every stage's ReLU activations, averaged over space."""
        feats = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            feats.append(x.mean((2, 3)))
        return torch.cat(feats, 1)


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
             sigma: float = 1.5, padding: str = "reflect") -> torch.Tensor:
    """SSIM of every Gaussian window ``(B, C, H', W')``.  ``padding="reflect"`` keeps the size
    (``H' = H``, border windows see reflected pixels); ``"valid"`` uses only windows that lie
    inside the image (``H' = H - window + 1``; entry ``(i, j)`` is the window centred on pixel
    ``(i + window // 2, j + window // 2)``)."""
    if padding not in ("reflect", "valid"):
        raise ValueError(f"padding must be 'reflect' or 'valid', got {padding!r}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    g = _gaussian(window, sigma).to(pred)
    ch = pred.shape[1]
    k = (g[:, None] * g[None, :]).expand(ch, 1, window, window).contiguous()
    pad = window // 2

    def blur(x):
        if padding == "reflect":
            x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(x, k, groups=ch)

    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x ** 2
    syy = blur(target * target) - mu_y ** 2
    sxy = blur(pred * target) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def ssim_in_mask(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0,
                 window: int = 11, sigma: float = 1.5) -> float | None:
    """``pred, target (B, C, H, W)``, ``mask (B, 1, H, W)`` -> mean SSIM over the windows that lie
    entirely inside the mask, or ``None`` when no window fits (a hole narrower than ``window`` in
    some direction; pass a smaller ``window`` explicitly if that is wanted, and say so).

    Only whole-inside windows count: a window reaching over the hole's edge would compare known,
    identical pixels and inflate the score.  Equivalently: the window centres are the mask eroded
    by ``window // 2``, and no padding is used.
    """
    m = mask.to(torch.float64)
    if m.shape[-2] < window or m.shape[-1] < window:
        return None
    inside = -F.max_pool2d(-m, window, stride=1) > 0.5       # (B, 1, H', W'): min of the mask under the window
    if not inside.any():
        return None
    s = ssim_map(pred.double(), target.double(), data_range, window, sigma, padding="valid")
    return float(s[inside.expand_as(s)].mean())


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


def boundary_contrast(image: torch.Tensor, region: torch.Tensor) -> dict[str, float]:
    """How visible a filled region's border is: the mean colour difference of neighbouring pixel pairs
    *across* the border (one inside ``region``, one outside) against that of pairs *inside* it.

    ``image (B, 3, H, W)`` in [0, 1], ``region (B, 1, H, W)`` bool.  ``ratio`` near 1: the border is no
    sharper than the fill's own texture; well above 1: a seam.  Compare with the same figure on the
    original image, whose objects have real edges.  Horizontal and vertical neighbours; NaN when the
    region has no border or no inside pair."""
    x, m = image.double(), region.bool().expand_as(image)
    across, inside = [], []
    for dim in (-1, -2):
        a, b = x.narrow(dim, 0, x.shape[dim] - 1), x.narrow(dim, 1, x.shape[dim] - 1)
        ma, mb = m.narrow(dim, 0, m.shape[dim] - 1), m.narrow(dim, 1, m.shape[dim] - 1)
        diff = (a - b).abs()
        across.append(diff[ma != mb])
        inside.append(diff[ma & mb])
    cross, inner = torch.cat(across), torch.cat(inside)
    c = float(cross.mean()) if cross.numel() else float("nan")
    i = float(inner.mean()) if inner.numel() else float("nan")
    return {"across": c, "inside": i, "ratio": c / i if i > 0 else float("nan")}
