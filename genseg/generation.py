"""The one generation interface that every generative model family implements (pixel diffusion now;
latent diffusion and the GAN later), and the sampling settings that travel with a model.

``sample``, ``eval gen``, ``edit`` and the Serve app call :meth:`Generator.generate` and
:meth:`Generator.inpaint` and never reach into a family's internals.

Sampling settings are resolved in one order everywhere: a command-line flag (or request field)
overrides the registry version's settings (set by tuning), which override the checkpoint's own
(the config it was trained with).  See :func:`SamplingSettings.merged`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from genseg.errors import InputError

SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp")


class SamplingError(InputError):
    """Sampling settings or a condition that a model cannot take."""


@dataclass(frozen=True)
class SamplingSettings:
    """How to draw from a model: ``sampler`` x ``steps`` with classifier-free guidance weight ``w``
    (``guidance``): 0 = unconditional, 1 = plain conditional, > 1 stronger adherence to the label map."""

    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 2.0

    def merged(self, **overrides) -> "SamplingSettings":
        """These settings with every override that is not None applied (a GAN's ``truncation`` is refused)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "truncation" in given:
            raise SamplingError("--truncation applies to GANs only; a diffusion model's samples are set by "
                                "sampler, steps and guidance")
        return replace(self, **given)

    def validated(self, max_steps: int | None = None) -> "SamplingSettings":
        """Raise :class:`SamplingError` naming the bad field; ``max_steps`` is the model's T."""
        if self.sampler not in SAMPLER_NAMES:
            raise SamplingError(f"sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLER_NAMES)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SamplingError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if max_steps is not None and self.steps > max_steps:
            raise SamplingError(f"steps {self.steps} exceeds the model's {max_steps} training timesteps; "
                                f"use 1..{max_steps}")
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise SamplingError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.sampler} x{self.steps}, w={self.guidance:g}"

    @classmethod
    def from_dict(cls, data: dict | None) -> "SamplingSettings | None":
        if not data:
            return None
        try:
            return cls(sampler=str(data["sampler"]), steps=int(data["steps"]), guidance=float(data["guidance"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SamplingError(f"stored sampling settings {data!r} are unreadable ({exc})") from None


DIFFUSION_ONLY = ("sampler", "steps", "guidance")


@dataclass(frozen=True)
class OneShotSettings:
    """Sampling settings of a one-pass generator (a GAN): only the truncation trick (Brock et al.
    2019): latent components beyond +-``truncation`` are redrawn; 0 = off (plain N(0, I))."""

    truncation: float = 0.0

    def merged(self, **overrides) -> "OneShotSettings":
        """These settings with the non-None overrides; a diffusion setting (sampler, steps,
        guidance) is refused: a GAN draws an image in one forward pass."""
        given = {k: v for k, v in overrides.items() if v is not None}
        wrong = [k for k in given if k in DIFFUSION_ONLY]
        if wrong:
            raise SamplingError(f"{', '.join('--' + k for k in wrong)}: a GAN draws an image in one forward pass; "
                                f"sampler, steps and guidance apply to diffusion models only")
        return replace(self, **given)

    def validated(self, max_steps: int | None = None) -> "OneShotSettings":
        t = self.truncation
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SamplingError(f"truncation must be a finite number >= 0 (0 = off), got {t!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return "one forward pass" + (f", truncation {self.truncation:g}" if self.truncation else "")


@runtime_checkable
class Generator(Protocol):
    """What ``sample``, ``eval gen``, ``edit`` and Serve need from a generative model.

    Images are ``(N, H, W, 3) uint8`` tensors on the CPU; label maps ``(N, H, W)`` int64 class ids
    (``ignore_index`` = unknown), at any size (they are resized to the model's with NEAREST)."""

    kind: str                          # "diffusion", "gan", ...
    image_size: tuple[int, int]        # (H, W) the model generates at
    num_classes: int
    ignore_index: int
    conditional: bool                  # takes label maps
    sampling: "SamplingSettings | OneShotSettings"   # the model's own defaults
    classes: dict                      # {"names": [...], "palette": [...]} of the data it was trained on

    def settings(self, **overrides) -> "SamplingSettings | OneShotSettings":
        """The model's sampling settings with the non-None overrides applied, validated for this model
        (each has ``to_dict()``, passed back as ``**sampling``, and ``describe()``)."""
        ...

    def generate(self, condition: torch.Tensor | None, n: int, seed: int, **sampling) -> torch.Tensor:
        """Draw ``n`` images; ``condition`` is ``(n, h, w)`` label maps or None (unconditional)."""
        ...

    def inpaint(self, images: torch.Tensor, holes: torch.Tensor, condition: torch.Tensor | None, seed: int,
                **sampling) -> torch.Tensor:
        """Regenerate the ``holes (N, H, W) bool`` of ``images (N, H, W, 3) uint8`` (at the model's size);
        pixels outside the holes are returned unchanged."""
        ...


def labels_at(condition: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label maps ``(N, h, w)`` as int64 at the model's ``size`` (NEAREST: no invented classes)."""
    labels = condition.long()
    if tuple(labels.shape[-2:]) != tuple(size):
        import torch.nn.functional as F

        labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()
    return labels


def check_condition(gen: Generator, condition: torch.Tensor | None, n: int) -> None:
    """One clear error for a condition the model cannot take."""
    if condition is None:
        return
    if not gen.conditional:
        raise SamplingError("label maps were given, but this model is unconditional (trained with cond=none)")
    if condition.ndim != 3 or len(condition) != n:
        raise SamplingError(f"need {n} label maps of shape (H, W), got a tensor of shape {tuple(condition.shape)}")
    bad = condition[(condition < 0) | ((condition >= gen.num_classes) & (condition != gen.ignore_index))]
    if bad.numel():
        raise SamplingError(f"label values {sorted(set(bad.unique()[:10].tolist()))} are out of range "
                            f"0..{gen.num_classes - 1} (or {gen.ignore_index} for unknown)")
