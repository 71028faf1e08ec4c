import math

import pytest
import torch

from genseg.metrics.generation import (frechet_distance, frechet_distance_std, kernel_inception_distance,
                                       psnr_in_mask, random_holes, ssim_in_mask)

pytestmark = pytest.mark.unit


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


def test_psnr_and_ssim_in_mask():
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    pred = target.clone()
    pred[..., 8:24, 8:24] += 0.1                       # error only inside the mask
    pred[..., :4, :4] = 0                              # outside the mask: must not count
    assert psnr_in_mask(pred, target, mask) == pytest.approx(20.0, abs=1e-4)   # 20 log10(1 / 0.1)
    assert math.isinf(psnr_in_mask(target, target, mask))
    assert ssim_in_mask(target, target, mask) == pytest.approx(1.0, abs=1e-9)
    noisy = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    assert ssim_in_mask(noisy, target, mask) < 0.7


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
