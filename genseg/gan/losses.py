"""GAN objectives by name, and the two gradient penalties.

With ``r`` = D's logits on real images and ``f`` on generated ones (``softplus(x) = log(1 + e^x)``,
so ``-log sigmoid(x) = softplus(-x)`` and ``-log(1 - sigmoid(x)) = softplus(x)``):

===========  ====================================  ==================================
loss         discriminator                         generator
===========  ====================================  ==================================
minimax      softplus(-r) + softplus(f)            -softplus(f)  (= log(1 - D(G(z))))
nsgan        softplus(-r) + softplus(f)            softplus(-f)  (= -log D(G(z)))
hinge        relu(1 - r) + relu(1 + f)             -f
wgan-gp      f - r  (+ gp_weight * GP)             -f
===========  ====================================  ==================================

``minimax`` is Goodfellow et al.'s original game (its generator gradient vanishes when D wins,
which is why ``nsgan``, the non-saturating variant from the same paper, is what DCGAN trains);
``hinge`` is from Lim & Ye 2017 / Miyato et al. 2018; WGAN-GP from Gulrajani et al. 2017.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from genseg.config import GAN_LOSSES


def _check(name: str) -> None:
    if name not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; choose one of {', '.join(GAN_LOSSES)}")


def d_loss(name: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss (batch mean), without the gradient penalty."""
    _check(name)
    r, f = real_logits.float(), fake_logits.float()
    if name in ("minimax", "nsgan"):
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if name == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return f.mean() - r.mean()


def g_loss(name: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss (batch mean)."""
    _check(name)
    f = fake_logits.float()
    if name == "minimax":
        return -F.softplus(f).mean()
    if name == "nsgan":
        return F.softplus(-f).mean()
    return -f.mean()


def gradient_penalty(d, real: torch.Tensor, fake: torch.Tensor, seg: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` at ``x_hat = e x + (1 - e) G(z)``, ``e ~ U(0, 1)``
    per sample.  ``d`` is the plain module (not a DDP wrapper): the penalty's double backward runs
    through it, and its parameter gradients join the loss's in the same ``backward``."""
    eps = torch.rand(len(real), 1, 1, 1, generator=generator).to(real.device, real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = d(x_hat, seg) if seg is not None else d(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(d, real: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
    """R1: ``E[||grad_x D(x)||^2]`` on real images (the trainer adds ``r1_weight / 2`` times it)."""
    x = real.detach().requires_grad_(True)
    out = d(x, seg) if seg is not None else d(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()
