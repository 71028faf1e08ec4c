import math

import pytest
import torch
import torch.nn.functional as F

from genseg.losses import ce_dice, cross_entropy, dice_loss, get_loss

pytestmark = pytest.mark.unit


def test_cross_entropy_ignores_pixels_and_weights_classes():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    p1 = -math.log(math.exp(1) / (math.exp(1) + 1))
    assert cross_entropy(logits, target).item() == pytest.approx((p0 + p1) / 2, rel=1e-5)
    ignored = torch.tensor([[[0, 255]]])
    assert cross_entropy(logits, ignored).item() == pytest.approx(p0, rel=1e-5)
    w = torch.tensor([1.0, 3.0])
    assert cross_entropy(logits, target, w).item() == pytest.approx((p0 + 3 * p1) / 4, rel=1e-5)


def test_dice_is_zero_for_confident_correct_and_near_one_for_wrong():
    target = torch.tensor([[[0, 1], [1, 0]]])
    good = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(good, target, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    bad = F.one_hot(1 - target, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(bad, target, eps=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_dice_ignores_pixels():
    target = torch.tensor([[[0, 255]]])
    logits = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])   # wrong only where ignored
    assert dice_loss(logits, target).item() < 1e-3


def test_ce_dice_is_the_sum_and_registry():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 7), torch.randint(0, 3, (2, 5, 7))
    assert ce_dice(logits, target).item() == pytest.approx(
        cross_entropy(logits, target).item() + dice_loss(logits, target).item(), rel=1e-6)
    assert get_loss("dice") is dice_loss
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("focal")


def test_losses_have_gradients():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4))
    ce_dice(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
