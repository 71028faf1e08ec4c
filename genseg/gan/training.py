"""One GAN training step, shared by ``genseg train gan`` and the unit tests (no Ray in here).

Under Ray Train both networks are DDP-wrapped (``g``, ``d``) and the plain modules inside are
``g_raw``, ``d_raw``.  The step keeps DDP's contract of one wrapped forward per backward:

* discriminator step: real and generated images go through ``d`` in ONE forward (concatenated;
  the discriminator has no BatchNorm, so this equals two forwards); the gradient penalty / R1 is
  computed through ``d_raw`` (DDP does not support the double backward of ``autograd.grad`` with
  ``create_graph``), and its parameter gradients join the loss's in the same ``backward``, where
  autograd sums both paths into each parameter once, so DDP averages the whole gradient;
* generator step: ``g`` (DDP) makes the images, ``d_raw`` scores them, so only the generator's
  gradients are synchronised (the discriminator's local ones are cleared before its next step).
"""
from __future__ import annotations

import contextlib

import torch

from genseg.gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty


def _unwrap(m):
    return getattr(m, "module", m)


def train_step(g, d, opt_g, opt_d, real: torch.Tensor, seg: torch.Tensor | None, cfg, gen: torch.Generator,
               ema=None, autocast=None) -> dict[str, float]:
    """``d_steps`` discriminator steps and one generator step on a batch of ``real (B, 3, H, W)``
    in [-1, 1] (with its one-hot label maps ``seg`` for a conditional GAN).  ``gen`` (a CPU
    generator) draws z and the penalty's interpolation weights.  -> the step's figures."""
    g_raw, d_raw = _unwrap(g), _unwrap(d)
    b, device = len(real), real.device
    ctx = autocast or contextlib.nullcontext
    seg2 = None if seg is None else torch.cat([seg, seg])
    out: dict[str, float] = {}
    for _ in range(cfg.d_steps):
        z = torch.randn(b, cfg.z_dim, generator=gen).to(device)
        with torch.no_grad(), ctx():
            fake = g(z, seg).float()
        with ctx():
            logits = d(torch.cat([real, fake]), seg2).float()
        r, f = logits[:b], logits[b:]
        loss = d_loss(cfg.loss, r, f)
        out["d_loss"] = float(loss.detach())
        if cfg.loss == "wgan-gp":
            gp = gradient_penalty(d_raw, real, fake, seg, generator=gen)
            loss = loss + cfg.gp_weight * gp
            out["gp"] = float(gp.detach())
        if cfg.r1_weight > 0:
            r1 = r1_penalty(d_raw, real, seg)
            loss = loss + 0.5 * cfg.r1_weight * r1
            out["r1"] = float(r1.detach())
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        out["d_real"], out["d_fake"] = float(r.detach().mean()), float(f.detach().mean())
    z = torch.randn(b, cfg.z_dim, generator=gen).to(device)
    with ctx():
        fake = g(z, seg)
        lg = g_loss(cfg.loss, d_raw(fake, seg).float())
    opt_g.zero_grad(set_to_none=True)
    lg.backward()
    opt_g.step()
    opt_d.zero_grad(set_to_none=True)         # the generator step's gradients in D are not D's to use
    if ema is not None:
        ema.update(g_raw)
    out["g_loss"] = float(lg.detach())
    return out


def make_optimizers(g, d, cfg) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam for each network with its own learning rate (TTUR) and the config's betas."""
    betas = (cfg.beta1, cfg.beta2)
    return (torch.optim.Adam(g.parameters(), lr=cfg.g_lr, betas=betas),
            torch.optim.Adam(d.parameters(), lr=cfg.d_lr, betas=betas))
