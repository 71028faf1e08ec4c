"""A trained GAN as a :class:`genseg.generation.Generator`: ``sample``, ``eval gen``, ``edit`` and
Serve take it exactly as they take a diffusion model.

Generation is one forward pass of the generator (EMA weights by default).  A GAN has no native
inpainting, so :meth:`GANGenerator.inpaint` inverts it: it optimises z (Adam, a fixed number of
steps, seeded start) so that the generated image matches the known pixels, then fills the hole
with that image; known pixels come back unchanged.
"""
from __future__ import annotations

import torch

from genseg.diffusion.sampling import from_uint8, to_uint8
from genseg.models.dcgan import label_condition
from genseg.generation import OneShotSettings, SamplingError, check_condition, labels_at

INVERSION_STEPS = 200
INVERSION_LR = 0.05
Z_PRIOR = 1e-3          # weight of ||z||^2 / z_dim: keeps the inverted z where the generator was trained


def draw_z(n: int, z_dim: int, gen: torch.Generator, truncation: float = 0.0) -> torch.Tensor:
    """``(n, z_dim)`` standard normal latents; with ``truncation > 0`` every component beyond
    +-truncation is redrawn until it falls inside (the truncation trick)."""
    z = torch.randn(n, z_dim, generator=gen)
    if truncation > 0:
        for _ in range(100):
            bad = z.abs() > truncation
            if not bad.any():
                break
            z[bad] = torch.randn(int(bad.sum()), generator=gen)
        z = z.clamp(-truncation, truncation)
    return z


class GANGenerator:
    kind = "gan"

    def __init__(self, model: torch.nn.Module, cfg, classes: dict | None = None,
                 sampling: OneShotSettings | None = None, device: str | torch.device = "cpu", weights: str = "ema"):
        self.model = model.to(device).eval()
        self.config = cfg
        self.device = torch.device(device)
        self.weights = weights
        self.image_size = tuple(cfg.image_size)
        self.num_classes = cfg.num_classes
        self.ignore_index = cfg.ignore_index
        self.conditional = cfg.cond == "mask"
        self.classes = classes or {}
        self.sampling = sampling if isinstance(sampling, OneShotSettings) else OneShotSettings()

    def settings(self, **overrides) -> OneShotSettings:
        return self.sampling.merged(**overrides).validated()

    def _seg(self, condition: torch.Tensor | None, n: int) -> torch.Tensor | None:
        check_condition(self, condition, n)
        if not self.conditional:
            return None
        if condition is None:
            raise SamplingError("this GAN is conditioned on label maps (cond=mask) and has no unconditional "
                                "mode; give label maps (--masks)")
        labels = labels_at(condition, self.image_size)
        return label_condition(labels, self.config)

    @torch.no_grad()
    def generate(self, condition: torch.Tensor | None, n: int, seed: int, *, batch_size: int = 64,
                 progress: bool = False, **sampling) -> torch.Tensor:
        """-> ``(n, H, W, 3) uint8``; the same (seed, condition, settings) gives the same pixels."""
        if n < 1:
            raise SamplingError(f"the number of images must be >= 1, got {n}")
        s = self.settings(**sampling)
        seg = self._seg(condition, n)
        z = draw_z(n, self.config.z_dim, torch.Generator().manual_seed(seed), s.truncation)
        out = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            c = None if seg is None else seg[sl].to(self.device)
            out.append(to_uint8(self.model(z[sl].to(self.device), c).float().cpu()))
        return torch.cat(out)

    def inpaint(self, images: torch.Tensor, holes: torch.Tensor, condition: torch.Tensor | None, seed: int, *,
                steps: int = INVERSION_STEPS, resample: int = 1, **sampling) -> torch.Tensor:
        """Fill ``holes (N, H, W)`` of ``images (N, H, W, 3) uint8`` by GAN inversion (see the module doc)."""
        s = self.settings(**sampling)
        if resample != 1:
            raise SamplingError("--resample (RePaint jumps) applies to diffusion models; a GAN inpaints by inversion")
        n = len(images)
        if tuple(images.shape[1:3]) != self.image_size or tuple(holes.shape[-2:]) != self.image_size:
            raise SamplingError(f"inpaint takes images and holes at the model size {self.image_size}, "
                                f"got {tuple(images.shape[1:3])} and {tuple(holes.shape[-2:])}")
        seg = self._seg(condition, n)
        seg = None if seg is None else seg.to(self.device)
        target = from_uint8(images).to(self.device)
        known = (~holes.reshape(n, 1, *self.image_size).bool()).float().to(self.device)
        z = draw_z(n, self.config.z_dim, torch.Generator().manual_seed(seed), s.truncation).to(self.device)
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=INVERSION_LR)
        self.model.requires_grad_(False)
        try:
            for _ in range(steps):
                x = self.model(z, seg)
                err = ((x - target) ** 2 * known).flatten(1).sum(1) / known.flatten(1).sum(1).clamp(min=1) / 3
                loss = err.sum() + Z_PRIOR * z.pow(2).mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                out = to_uint8(self.model(z, seg).float().cpu())
        finally:
            self.model.requires_grad_(True)
        keep = ~holes.reshape(n, *self.image_size).bool()
        out[keep] = images[keep]
        return out
