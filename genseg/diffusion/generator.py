"""A DDPM as a :class:`genseg.generation.Generator`: the one object that ``sample``, ``eval gen``,
``edit``, Tune and Serve hold for a diffusion model, in pixel space or in an autoencoder's latent space.

A latent model (``latent_channels > 0``) carries its autoencoder (``decoder``): it samples latents on
its grid and decodes them, takes label maps at full resolution (pooled to the grid by majority), and
inpaints in latent space (RePaint) before compositing in pixel space.  ``image_size`` is the
decoded size either way, so callers cannot tell the two apart."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from genseg.diffusion.conditioning import encode_labels, null_condition, pool_labels
from genseg.diffusion.inpaint import inpaint as repaint
from genseg.diffusion.sampling import from_uint8, sample, to_uint8
from genseg.diffusion.schedules import make_train_scheduler
from genseg.generation import SamplingError, SamplingSettings, check_condition, labels_at


class DiffusionGenerator:
    kind = "diffusion"

    def __init__(self, model: torch.nn.Module, cfg, classes: dict | None = None,
                 sampling: SamplingSettings | None = None, device: str | torch.device = "cpu",
                 weights: str = "ema", decoder=None):
        self.model = model.to(device).eval()
        self.config = cfg
        self.device = torch.device(device)
        self.weights = weights
        self.noise = make_train_scheduler(cfg)
        self.factor = cfg.latent_factor
        self.grid = tuple(cfg.image_size)                   # the UNet's size: pixels, or latent cells
        self.image_size = (self.grid[0] * self.factor, self.grid[1] * self.factor)
        self.channels = cfg.latent_channels or 3
        if cfg.latent_channels and decoder is None:
            raise ValueError("a latent diffusion model needs its autoencoder (decoder=)")
        self.decoder = decoder
        self.num_classes = cfg.num_classes
        self.ignore_index = cfg.ignore_index
        self.conditional = cfg.cond == "mask"
        self.classes = classes or {}
        self.sampling = sampling or SamplingSettings(cfg.sampler, cfg.sample_steps, cfg.guidance)

    # ------------------------------------------------------------------ settings and conditions

    def settings(self, **overrides) -> SamplingSettings:
        """The model's sampling settings with the given overrides, validated against this model's T."""
        return self.sampling.merged(**overrides).validated(self.config.timesteps)

    def _cond(self, condition: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, bool]:
        """-> (model condition ``(n, K + 1, H, W)`` or None, whether it is a real label condition)."""
        check_condition(self, condition, n)
        if not self.conditional:
            return None, False
        if condition is None:   # the unconditional branch, trained through condition dropout
            return null_condition(torch.zeros(n, self.num_classes + 1, *self.grid)), False
        labels = labels_at(condition, self.image_size)
        if self.factor > 1:     # the latent grid's labels, as the latent shards hold them
            labels = pool_labels(labels, self.factor, self.num_classes, self.ignore_index)
        return encode_labels(labels, self.num_classes, self.ignore_index), True

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's output -> ``(B, H, W, 3) uint8``: latents are decoded first."""
        return to_uint8(self.decoder.decode(x) if self.decoder is not None else x)

    # ------------------------------------------------------------------ the interface

    @torch.no_grad()
    def generate(self, condition: torch.Tensor | None, n: int, seed: int, *, batch_size: int = 16,
                 progress: bool = False, **sampling) -> torch.Tensor:
        """-> ``(n, H, W, 3) uint8``.  Seeded: the same (seed, settings, condition) gives the same pixels."""
        if n < 1:
            raise SamplingError(f"the number of images must be >= 1, got {n}")
        s = self.settings(**sampling)
        cond, real = self._cond(condition, n)
        w = s.guidance if real else 1.0
        gen = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            c = None if cond is None else cond[start: start + b]
            x = sample(self.model, self.noise, (b, self.channels, *self.grid), cond=c, w=w, sampler=s.sampler,
                       steps=s.steps, generator=gen, device=self.device, progress=progress)
            out.append(self._pixels(x))
        return torch.cat(out)

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, holes: torch.Tensor, condition: torch.Tensor | None, seed: int, *,
                resample: int = 1, **sampling) -> torch.Tensor:
        """RePaint-style inpainting at the model's size; outside ``holes`` the input comes back unchanged."""
        s = self.settings(**sampling)
        if resample < 1:
            raise SamplingError(f"resample must be >= 1, got {resample}")
        if resample > 1 and s.sampler == "dpmpp":
            raise SamplingError("resampling (--resample > 1) needs the ddpm or ddim sampler, not dpmpp")
        n = len(images)
        if tuple(images.shape[1:3]) != self.image_size or tuple(holes.shape[-2:]) != self.image_size:
            raise SamplingError(f"inpaint takes images and holes at the model size {self.image_size}, "
                                f"got {tuple(images.shape[1:3])} and {tuple(holes.shape[-2:])}")
        cond, real = self._cond(condition, n)
        w = s.guidance if real else 1.0
        m = holes.reshape(n, 1, *self.image_size).float()
        known = from_uint8(images)
        if self.decoder is not None:   # RePaint in latent space: a cell is regenerated if any pixel of it is
            known = self.decoder.encode(known)
            m = F.max_pool2d(m, self.factor)
        x = repaint(self.model, self.noise, known, m, cond=cond, w=w, sampler=s.sampler,
                    steps=s.steps, resample=resample, generator=torch.Generator().manual_seed(seed),
                    device=self.device)
        out = self._pixels(x)
        keep = ~holes.reshape(n, *self.image_size).bool()
        out[keep] = images[keep]
        return out
