"""A pixel-space DDPM as a :class:`genseg.generation.Generator`: the one object that ``sample``,
``eval gen``, ``edit`` and Serve hold for a diffusion model."""
from __future__ import annotations

import torch

from genseg.diffusion.conditioning import encode_labels, null_condition
from genseg.diffusion.inpaint import inpaint as repaint
from genseg.diffusion.sampling import from_uint8, sample, to_uint8
from genseg.diffusion.schedules import make_train_scheduler
from genseg.generation import SamplingError, SamplingSettings, check_condition, labels_at


class DiffusionGenerator:
    kind = "diffusion"

    def __init__(self, model: torch.nn.Module, cfg, classes: dict | None = None,
                 sampling: SamplingSettings | None = None, device: str | torch.device = "cpu",
                 weights: str = "ema"):
        self.model = model.to(device).eval()
        self.config = cfg
        self.device = torch.device(device)
        self.weights = weights
        self.noise = make_train_scheduler(cfg)
        self.image_size = tuple(cfg.image_size)
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
            return null_condition(torch.zeros(n, self.num_classes + 1, *self.image_size)), False
        labels = labels_at(condition, self.image_size)
        return encode_labels(labels, self.num_classes, self.ignore_index), True

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
            x = sample(self.model, self.noise, (b, 3, *self.image_size), cond=c, w=w, sampler=s.sampler,
                       steps=s.steps, generator=gen, device=self.device, progress=progress)
            out.append(to_uint8(x))
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
        x = repaint(self.model, self.noise, from_uint8(images), m, cond=cond, w=w, sampler=s.sampler,
                    steps=s.steps, resample=resample, generator=torch.Generator().manual_seed(seed),
                    device=self.device)
        out = to_uint8(x)
        keep = ~holes.reshape(n, *self.image_size).bool()
        out[keep] = images[keep]
        return out
