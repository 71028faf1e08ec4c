import math

import pytest
import torch

from genseg.metrics import generation as gm
from genseg.metrics.generation import (KID_MIN_SUBSET, fd_difference_resolved, fd_noise_floor, frechet_distance,
                                       frechet_distance_std, kernel_inception_distance, kid_noise_floor,
                                       psnr_in_mask, random_holes, ssim_in_mask)

pytestmark = pytest.mark.unit

C1, C2 = 0.01 ** 2, 0.03 ** 2          # SSIM's constants at data range 1


def test_frechet_distance_exact_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    # a scaled copy: covariances C and 4C -> trace term Tr(C) + 4 Tr(C) - 2 * 2 Tr(C) = Tr(C)
    cov_trace = float(torch.trace(torch.cov(a.double().T)))
    assert frechet_distance(a, 2 * a - a.mean(0)) == pytest.approx(cov_trace, rel=1e-5)


def test_kid_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    far, _ = kernel_inception_distance(a, b + 1.5, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and far > 10 * abs(same) and far > 0.5


def test_kid_unbiased_mmd_exact_value_at_tiny_n():
    # d = 1, x = y = [0, 1]; k(u, v) = (u v + 1)^3: k(0,0) = k(0,1) = 1, k(1,1) = 8.
    # within-set off-diagonal means: (k(0,1) + k(1,0)) / 2 = 1 for each set;
    # cross mean over all 4 pairs: (1 + 1 + 1 + 8) / 4 = 11/4  ->  MMD^2 = 1 + 1 - 2 * 11/4 = -3.5.
    # n = 2 is far below 2 * KID_MIN_SUBSET: the whole-set estimate and no std.
    x = torch.tensor([[0.0], [1.0]])
    mean, std = kernel_inception_distance(x, x.clone())
    assert mean == pytest.approx(-3.5, abs=1e-12) and std is None


def test_kid_std_is_none_below_the_threshold_and_positive_above():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) + 0.5
    small_n = 2 * KID_MIN_SUBSET - 1
    assert kernel_inception_distance(a[:small_n], b[:small_n])[1] is None
    assert kernel_inception_distance(a[:2 * KID_MIN_SUBSET], b[:2 * KID_MIN_SUBSET])[1] > 0
    assert kernel_inception_distance(a, b, subsets=1)[1] is None
    # n = 40 <= subset_size = 50: the old code used the whole set in every "subset", so its std was 0
    mean, std = kernel_inception_distance(a, b, subsets=10, subset_size=50)
    assert std > 1e-3


def test_kid_subset_mean_is_unbiased_at_n40():
    # the average over many independent draws of KID at n = 40 (subsets of 20) matches the
    # whole-population MMD^2, estimated from 4000 samples per side; and is ~0 for one distribution
    g = torch.Generator().manual_seed(5)
    shift = 0.5
    big_a, big_b = torch.randn(4000, 4, generator=g), torch.randn(4000, 4, generator=g) + shift
    reference = gm._mmd2_unbiased(big_a.double(), big_b.double())
    draws_shift, draws_same = [], []
    for i in range(60):
        a, b, c = (torch.randn(40, 4, generator=g) for _ in range(3))
        draws_shift.append(kernel_inception_distance(a, b + shift, seed=i)[0])
        draws_same.append(kernel_inception_distance(a, c, seed=i)[0])
    t_shift, t_same = torch.tensor(draws_shift), torch.tensor(draws_same)
    se_shift, se_same = t_shift.std() / math.sqrt(60), t_same.std() / math.sqrt(60)
    assert reference > 0.3
    assert abs(float(t_shift.mean()) - reference) < 3 * float(se_shift) + 0.02 * reference
    assert abs(float(t_same.mean())) < 3 * float(se_same)


def test_fd_noise_floor_shrinks_with_n_and_is_far_below_a_real_shift():
    g = torch.Generator().manual_seed(6)
    real = torch.randn(2000, 8, generator=g)
    floor_small, std_small = fd_noise_floor(real[:60], rounds=10)        # 30 vs 30
    floor_large, std_large = fd_noise_floor(real, rounds=10)             # 1000 vs 1000
    assert floor_small > 5 * floor_large > 0
    assert std_small > std_large > 0
    # two Gaussians 1.0 apart in each of 8 dims: FD ~ 8; the floor between real halves at the
    # same n = 30 is well below it
    shifted = torch.randn(30, 8, generator=g) + 1.0
    assert frechet_distance(real[:30], shifted) > 2 * floor_small
    # an explicit n uses two disjoint sets of n: at n = 1000 it is the default (the halves)
    assert fd_noise_floor(real, n=1000, rounds=10) == (floor_large, std_large)
    assert fd_noise_floor(real[:60], rounds=1)[1] is None
    with pytest.raises(ValueError):
        fd_noise_floor(real[:60], n=31)                                   # 62 > 60 real samples


def test_fd_noise_floor_splits_are_disjoint_and_seeded(monkeypatch):
    # each round compares two sets that share no row (a shared row would pull the floor down)
    real = torch.arange(20, dtype=torch.float64)[:, None].repeat(1, 3)
    seen = []
    monkeypatch.setattr(gm, "frechet_distance", lambda x, y: seen.append((x[:, 0], y[:, 0])) or 1.0)
    gm.fd_noise_floor(real, rounds=3, seed=7)
    assert len(seen) == 3
    for x, y in seen:
        assert len(x) == len(y) == 10 and not set(x.tolist()) & set(y.tolist())
    assert not torch.equal(seen[0][0], seen[1][0])                      # a fresh split each round
    monkeypatch.undo()
    assert fd_noise_floor(real, seed=7) == fd_noise_floor(real, seed=7)


def test_kid_noise_floor_is_about_zero_and_its_spread_shrinks():
    g = torch.Generator().manual_seed(8)
    real = torch.randn(1200, 4, generator=g)
    mean_small, std_small = kid_noise_floor(real[:40], rounds=20)
    mean_large, std_large = kid_noise_floor(real, rounds=20)
    assert std_small > 3 * std_large > 0
    assert abs(mean_small) < std_small and abs(mean_large) < std_large   # unbiased: centred on 0


def test_fd_difference_resolved():
    # threshold k * sqrt(1^2 + 1^2) = 2.83 at k = 2
    assert fd_difference_resolved(10.0, 1.0, 7.0, 1.0) is True           # |diff| = 3.0 > 2.83
    assert fd_difference_resolved(10.0, 1.0, 7.5, 1.0) is False          # 2.5 < 2.83
    assert fd_difference_resolved(7.0, 1.0, 10.0, 1.0) is True           # symmetric
    assert fd_difference_resolved(10.0, 1.0, 7.5, 1.0, k=1) is True      # 2.5 > 1.41
    assert fd_difference_resolved(10.0, 0.0, 10.0, 0.0) is False         # equal is never resolved
    # the README's synthetic table: DDIM x20 2.60 +- 1.09 against DDPM 1.92 (std unknown): unresolved
    assert fd_difference_resolved(2.60, 1.09, 1.92, None) is False
    assert fd_difference_resolved(2.60, 1.09, 1.92, 0.0) is False        # 0.68 < 2.18
    with pytest.raises(ValueError):
        fd_difference_resolved(1.0, -1.0, 2.0, 1.0)


def test_psnr_in_mask():
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    pred = target.clone()
    pred[..., 8:24, 8:24] += 0.1                       # error only inside the mask
    pred[..., :4, :4] = 0                              # outside the mask: must not count
    assert psnr_in_mask(pred, target, mask) == pytest.approx(20.0, abs=1e-4)   # 20 log10(1 / 0.1)
    assert math.isinf(psnr_in_mask(target, target, mask))


def test_ssim_in_mask_identical_and_noisy():
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    assert ssim_in_mask(target, target, mask) == pytest.approx(1.0, abs=1e-9)
    noisy = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    assert ssim_in_mask(noisy, target, mask) < 0.7


def test_ssim_in_mask_constant_hole_exact_value():
    # target 0.5 everywhere; the prediction is perfect outside a 16x16 hole and 0.2 inside it.
    # Every window inside the hole sees constants: mu_x = 0.2, mu_y = 0.5, no variance, so
    # SSIM = (2 * 0.2 * 0.5 + C1) / (0.2^2 + 0.5^2 + C1) * (C2 / C2) = 0.68976 exactly.  Windows over
    # the hole's edge (which the old, padded implementation averaged in: it gave 0.257) see a step in
    # pred and none in target, and score differently.
    target = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    pred = target.clone()
    pred[..., 8:24, 8:24] = 0.2
    expected = (2 * 0.2 * 0.5 + C1) / (0.2 ** 2 + 0.5 ** 2 + C1)
    assert ssim_in_mask(pred, target, mask) == pytest.approx(expected, rel=1e-9)


def _one_window_ssim(x, y, window=11, sigma=1.5):
    """SSIM of one window by the textbook formula (Wang et al. 2004, eq. 13), per channel, averaged."""
    r = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    out = []
    for c in range(x.shape[0]):
        xc, yc = x[c].double(), y[c].double()
        mx, my = (w * xc).sum(), (w * yc).sum()
        vx, vy = (w * (xc - mx) ** 2).sum(), (w * (yc - my) ** 2).sum()
        cxy = (w * (xc - mx) * (yc - my)).sum()
        out.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2)))
    return float(torch.stack(out).mean())


def test_ssim_in_mask_ignores_pixels_outside_the_hole():
    # a textured image; the prediction copies it outside an 11x13 hole and is unrelated noise
    # inside.  With an 11x11 window exactly three windows fit (centres in columns 5, 6, 7 of the
    # hole): the figure is their textbook SSIM, and it must not change when the known pixels
    # outside the hole change.  The old implementation averaged ~200 windows, most of them over
    # the hole's edge where pred == target, and scored this bad fill far higher.
    g = torch.Generator().manual_seed(9)
    target = torch.rand(1, 3, 24, 30, generator=g)
    mask = torch.zeros(1, 1, 24, 30)
    top, left = 6, 9
    mask[..., top: top + 11, left: left + 13] = 1
    pred = target.clone()
    pred[..., top: top + 11, left: left + 13] = torch.rand(1, 3, 11, 13, generator=g)
    expected = sum(_one_window_ssim(pred[0, :, top: top + 11, left + j: left + j + 11],
                                    target[0, :, top: top + 11, left + j: left + j + 11]) for j in range(3)) / 3
    value = ssim_in_mask(pred, target, mask)
    assert value == pytest.approx(expected, rel=1e-9)
    assert value < 0.05                                 # unrelated noise: about 0, not inflated
    # other known pixels outside the hole (the same in pred and target): the same figure
    outside = torch.rand(1, 3, 24, 30, generator=g)
    hole = mask.expand_as(pred).bool()
    pred2, target2 = torch.where(hole, pred, outside), torch.where(hole, target, outside)
    assert ssim_in_mask(pred2, target2, mask) == pytest.approx(value, rel=1e-12)


def test_ssim_in_mask_is_none_when_no_window_fits():
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 4:14, 4:30] = 1                           # 10 rows high: an 11x11 window does not fit
    assert ssim_in_mask(target * 0.5, target, mask) is None
    assert ssim_in_mask(target, target, mask, window=7) == pytest.approx(1.0, abs=1e-9)   # a smaller one does
    assert ssim_in_mask(target[..., :8, :8], target[..., :8, :8], mask[..., :8, :8]) is None   # image < window
    # one image's hole fits, the other's does not: only the fitting windows count
    mask[1, :, 4:20, 4:20] = 1
    pred = target.clone()
    pred[0] = 0.0                                        # image 0 has no window inside its hole
    assert ssim_in_mask(pred, target, mask) == pytest.approx(1.0, abs=1e-9)


def test_random_holes_are_seeded_and_sized():
    a, b = random_holes(4, (40, 60), 0.25, seed=3), random_holes(4, (40, 60), 0.25, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 1, 40, 60)
    assert a[0].mean().item() == pytest.approx(0.25, abs=0.02)


def test_frechet_distance_std_shrinks_with_more_samples():
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(40, 8, generator=g) for _ in range(2)]
    large = [torch.randn(640, 8, generator=g) for _ in range(2)]
    std_small, std_large = frechet_distance_std(*small, rounds=30), frechet_distance_std(*large, rounds=30)
    assert std_small > 2 * std_large > 0
    assert frechet_distance_std(*small, rounds=30) == std_small        # seeded


def test_fd_ratio_interval_is_one_for_identical_generators_and_above_one_for_a_worse_one():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 4, generator=g)
    good = real + 0.3 * torch.randn(60, 4, generator=g)
    same = gm.fd_ratio_interval(real, good, good, rounds=50)
    assert same["ratio"] == 1.0 and same["low"] == 1.0 and same["high"] == 1.0
    worse = gm.fd_ratio_interval(real, good + 0.8, good, rounds=50)     # a shifted mean: FD grows
    assert worse["ratio"] > 1.5 and worse["low"] > 1.10 and worse["low"] <= worse["ratio"] <= worse["high"]


def test_fd_ratio_interval_pairs_rows_so_shared_noise_cancels():
    """Two generators that differ by a small, fixed amount: the paired interval of the ratio is
    narrower than the spread of two independently bootstrapped FDs would allow."""
    g = torch.Generator().manual_seed(1)
    real = torch.randn(80, 3, generator=g)
    b = real + 0.5 * torch.randn(80, 3, generator=g)
    a = b * 1.02
    ci = gm.fd_ratio_interval(real, a, b, rounds=100)
    fd_b = gm.frechet_distance(real, b)
    unpaired = 2 * 1.96 * math.hypot(gm.frechet_distance_std(real, a), gm.frechet_distance_std(real, b)) / fd_b
    assert ci["high"] - ci["low"] < unpaired / 3


def test_fd_ratio_interval_refuses_unpaired_sets():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="same length"):
        gm.fd_ratio_interval(x, x[:9], x)


def test_diversity_exact_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g)
    same = gm.diversity(real, real.clone(), k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = gm.diversity(real, real + 100.0, k=3)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0
    # half the modes: samples only near the real points with x0 > 0
    half = real[real[:, 0] > 0]
    d = gm.diversity(real, half + 0.01, k=3)
    assert d["precision"] == 1.0 and 0.3 < d["coverage"] < 0.75
    with pytest.raises(ValueError, match="needs more than 3"):
        gm.diversity(real, real[:3], k=3)


def test_class_histogram_and_its_distance():
    pred = torch.tensor([[[0, 0], [1, 2]]])
    h = gm.class_histogram(pred, 4)
    assert h.tolist() == [0.5, 0.25, 0.25, 0.0]
    assert gm.histogram_distance(h, h) == 0.0
    assert gm.histogram_distance(torch.tensor([1.0, 0]), torch.tensor([0, 1.0])) == 1.0
    assert gm.histogram_distance(h, torch.tensor([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.25)


def test_random_features_are_fixed_by_their_seed():
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    a, b = gm.RandomFeatures(seed=0)(x), gm.RandomFeatures(seed=0)(x)
    assert a.shape == (3, 32 + 64 + 128) and torch.equal(a, b)
    assert not torch.equal(a, gm.RandomFeatures(seed=1)(x))
    assert a[0].abs().sum() > 0 and not torch.equal(a[0], a[1])
