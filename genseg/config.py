"""One frozen dataclass per job.

``asdict(cfg)`` is the Ray ``train_loop_config``, the MLflow params, and is stored in every
checkpoint.  CLI flags and YAML presets override fields *by name*; unknown names and values of
the wrong type are rejected with one clear message (:class:`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from genseg.errors import InputError


class ConfigError(InputError):
    """A config file or override names an unknown field or holds a bad value."""


SEG_NORMS = ("bn", "ibn_a", "ibn_b")   # the segmenter's early-layer norms (genseg.models.backbones)
SEG_MIXES = ("none", "cutmix", "classmix")   # two-sample mixing in training (genseg.data.transforms)


@dataclass(frozen=True)
class SegConfig:
    """Training config of ``genseg train seg``."""

    # model
    arch: str = "fcn8s"                  # fcn32s | fcn16s | fcn8s
    backbone: str = "compact"            # compact | resnet18 | resnet34 | resnet50
    width: int = 32                      # base channel width of the compact backbone
    norm: str = "bn"                     # bn | ibn_a | ibn_b (instance norm in the early layers: IBN-Net)
    upsample: str = "learned"            # learned (transposed conv) | bilinear
    num_classes: int = 6                 # filled from the shard manifest when left at 0
    ignore_index: int = 255
    # loss
    loss: str = "ce"                     # ce | dice | ce_dice | ohem | ohem_dice (hard-pixel mining)
    class_weights: tuple[float, ...] | None = None   # one per class; None = uniform
    # optimisation
    epochs: int = 10
    batch_size: int = 8                  # per worker
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"             # adamw | sgd
    schedule: str = "poly"               # poly | cosine | constant
    warmup_epochs: float = 0.0
    # augmentation (applied jointly to image and mask on the fly)
    crop: tuple[int, int] | None = None  # (H, W) training crop; None = shard size
    scale_min: float = 0.75
    scale_max: float = 1.25
    hflip: bool = True
    jitter: float = 0.0                  # photometric: brightness, contrast, saturation each x U(1-j, 1+j)
    gamma: float = 0.0                   # photometric: gamma exp(U(-g, g))
    blur: float = 0.0                    # photometric: probability of a Gaussian blur, sigma U(0.3, 1.5) px
    mix: str = "none"                    # none | cutmix | classmix: a sample takes a region of the next one
    mix_p: float = 0.5                   # probability that a sample is mixed (with mix set)
    # evaluation / logging
    infer_scale: float = 1.0             # run the model at this scale, resize logits back
    select_on: str = "val"               # the split whose mIoU picks the best checkpoint and the champion
    image_every: int = 2                 # log an image | truth | prediction picture every N epochs
    seed: int = 0
    # hardware
    amp: str = "bf16"                    # precision under --gpu: bf16 | fp16 | none
    threads_per_worker: int = 0          # torch intra-op threads per worker; 0 = leave as is

    def __post_init__(self) -> None:
        _check_choice(self, "arch", ("fcn32s", "fcn16s", "fcn8s"))
        _check_choice(self, "upsample", ("learned", "bilinear"))
        _check_choice(self, "norm", SEG_NORMS)
        _check_choice(self, "loss", ("ce", "dice", "ce_dice", "ohem", "ohem_dice"))
        _check_choice(self, "optimizer", ("adamw", "sgd"))
        _check_choice(self, "schedule", ("poly", "cosine", "constant"))
        _check_choice(self, "amp", ("bf16", "fp16", "none"))
        _check_choice(self, "mix", SEG_MIXES)
        for name in ("epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"config field 'lr' must be > 0, got {self.lr}")
        for name, top in (("jitter", 0.9), ("gamma", 1.0), ("blur", 1.0), ("mix_p", 1.0)):
            v = getattr(self, name)
            if not 0 <= v <= top:
                raise ConfigError(f"config field '{name}' must be between 0 and {top}, got {v}")
        if not self.select_on or self.select_on == "train":
            raise ConfigError(f"config field 'select_on' must name an evaluation split (val, holdout...), "
                              f"got {self.select_on!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("config fields 'scale_min'/'scale_max' need 0 < scale_min <= scale_max")
        if self.class_weights is not None and self.num_classes and len(self.class_weights) != self.num_classes:
            raise ConfigError(
                f"config field 'class_weights' has {len(self.class_weights)} values "
                f"but num_classes is {self.num_classes}")
        if self.class_weights is not None and not (all(math.isfinite(w) and w >= 0 for w in self.class_weights)
                                                   and any(w > 0 for w in self.class_weights)):
            raise ConfigError(f"config field 'class_weights' needs finite weights >= 0, not all 0; "
                              f"got {list(self.class_weights)}")
        if not (math.isfinite(self.infer_scale) and 0 < self.infer_scale <= 4):
            raise ConfigError(f"config field 'infer_scale' must be a number in (0, 4], got {self.infer_scale}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Training config of ``genseg train diffusion`` (DDPM, Ho et al. 2020)."""

    # conditioning: "none" (unconditional) or "mask" (one-hot label map as extra input channels)
    cond: str = "mask"
    num_classes: int = 0                 # filled from the shard manifest
    ignore_index: int = 255
    image_size: tuple[int, int] | None = None   # (H, W) the model is trained at; None = shard size
    # latent diffusion (genseg train diffusion --latent REF): the UNet works on an autoencoder's latents,
    # image_size is then the latent grid, and sampling decodes to latent_factor times that size
    latent_channels: int = 0             # 0 = pixel space (3 channels); else the autoencoder's latent channels
    latent_factor: int = 1               # pixels per latent cell along each side (1 = pixel space)
    # network: diffusers UNet2DModel
    channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention: bool = False              # self-attention at the lowest resolution
    # forward process: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    schedule: str = "linear"             # linear | scaled_linear | cosine | sigmoid
    timesteps: int = 1000                # T
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "epsilon"          # epsilon | v_prediction
    p_uncond: float = 0.1                # condition dropout, for classifier-free guidance
    ema_decay: float = 0.999
    # optimisation
    epochs: int = 20
    batch_size: int = 16                 # per worker
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    lr_schedule: str = "constant"        # poly | cosine | constant
    hflip: bool = True
    # sampling pictures during training
    sampler: str = "ddim"
    sample_steps: int = 25
    guidance: float = 2.0                # w
    sample_every: int = 5
    seed: int = 0
    amp: str = "bf16"
    threads_per_worker: int = 0

    def __post_init__(self) -> None:
        _check_choice(self, "cond", ("none", "mask"))
        _check_choice(self, "schedule", ("linear", "scaled_linear", "cosine", "sigmoid"))
        _check_choice(self, "prediction", ("epsilon", "v_prediction"))
        _check_choice(self, "lr_schedule", ("poly", "cosine", "constant"))
        _check_choice(self, "amp", ("bf16", "fp16", "none"))
        _check_choice(self, "sampler", ("ddpm", "ddim", "dpmpp"))
        for name in ("epochs", "batch_size", "timesteps", "layers_per_block", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("config fields 'beta_start'/'beta_end' need 0 < beta_start < beta_end < 1")
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"config field 'p_uncond' must be in [0, 1), got {self.p_uncond}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config field 'ema_decay' must be in [0, 1), got {self.ema_decay}")
        if not self.channels or any(c % 8 for c in self.channels):
            raise ConfigError(f"config field 'channels' needs multiples of 8, got {self.channels}")
        if self.latent_channels < 0 or self.latent_factor < 1 or (self.latent_channels == 0) != (self.latent_factor == 1):
            raise ConfigError(f"config fields 'latent_channels'/'latent_factor' ({self.latent_channels}, "
                              f"{self.latent_factor}) are set by --latent: (0, 1) for a pixel model, both larger "
                              f"for a latent one")
        if self.image_size is not None:
            f = 2 ** (len(self.channels) - 1)
            if self.image_size[0] % f or self.image_size[1] % f:
                raise ConfigError(f"config field 'image_size' {self.image_size} must be divisible by {f} "
                                  f"for {len(self.channels)} UNet levels")


GAN_LOSSES = ("minimax", "nsgan", "hinge", "wgan-gp")


def gan_stages(image_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """-> (number of 2x upsampling stages k, start size (h0, w0)) of a DCGAN at ``image_size``:
    the smaller side is halved k times down to 4..7 pixels (DCGAN's 4x4 start), and both sides
    must be divisible by 2^k.  32x48 -> (3, (4, 6)); 64x80 -> (4, (4, 5)); 128x128 -> (5, (4, 4))."""
    h, w = image_size
    if min(h, w) < 8:
        raise ConfigError(f"config field 'image_size' {image_size}: a GAN needs at least 8 pixels per side")
    k = 0
    while min(h, w) // 2 ** (k + 1) >= 4:
        k += 1
    if h % 2 ** k or w % 2 ** k:
        raise ConfigError(f"config field 'image_size' {tuple(image_size)}: both sides must be divisible by "
                          f"{2 ** k} for a DCGAN that starts at {h // 2 ** k}x{w // 2 ** k} "
                          f"(e.g. 32x48, 64x80, 64x64, 128x128)")
    return k, (h // 2 ** k, w // 2 ** k)


@dataclass(frozen=True)
class GANConfig:
    """Training config of ``genseg train gan`` (DCGAN, Radford et al. 2016, and its stabilisers)."""

    # conditioning: "none" (unconditional) or "mask" (semantic image synthesis: the generator is
    # modulated by the label map at every scale, SPADE-style; the discriminator sees it beside the image)
    cond: str = "mask"
    num_classes: int = 0                 # filled from the shard manifest
    ignore_index: int = 255
    image_size: tuple[int, int] | None = None   # (H, W); None = shard size
    # networks
    z_dim: int = 64
    g_channels: int = 32                 # generator width at the last (full-resolution) stage; doubles per stage up
    d_channels: int = 32                 # discriminator width at the first stage; doubles per stage down
    max_channels: int = 256
    spectral_norm: bool = True           # on every discriminator layer (Miyato et al. 2018)
    # objective
    loss: str = "hinge"                  # minimax | nsgan | hinge | wgan-gp
    gp_weight: float = 10.0              # wgan-gp: lambda of the gradient penalty (Gulrajani et al. 2017)
    r1_weight: float = 0.0               # R1 penalty gamma on real images (Mescheder et al. 2018); 0 = off
    d_steps: int = 1                     # discriminator steps per generator step (n_critic)
    # optimisation: separate learning rates (TTUR, Heusel et al. 2017)
    g_lr: float = 2e-4
    d_lr: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.9
    ema_decay: float = 0.999             # EMA of the generator, used for sampling
    epochs: int = 20
    batch_size: int = 16                 # per worker
    hflip: bool = True
    sample_every: int = 5                # log a sample grid (fixed z) every N epochs
    score_images: int = 128              # val images for the epoch score and diversity figures
    seed: int = 0
    amp: str = "none"                    # precision under --gpu: bf16 | none
    threads_per_worker: int = 0

    def __post_init__(self) -> None:
        _check_choice(self, "cond", ("none", "mask"))
        _check_choice(self, "loss", GAN_LOSSES)
        _check_choice(self, "amp", ("bf16", "none"))
        for name in ("epochs", "batch_size", "z_dim", "g_channels", "d_channels", "max_channels", "d_steps",
                     "sample_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.score_images < 4:
            raise ConfigError(f"config field 'score_images' must be >= 4, got {self.score_images}")
        for name in ("g_lr", "d_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("gp_weight", "r1_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("config fields 'beta1'/'beta2' must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config field 'ema_decay' must be in [0, 1), got {self.ema_decay}")
        if self.image_size is not None:
            gan_stages(self.image_size)


@dataclass(frozen=True)
class VAEConfig:
    """Training config of ``genseg train vae``: a KL-regularised autoencoder (diffusers' ``AutoencoderKL``,
    the first stage of latent diffusion, Rombach et al. 2022) trained from scratch on the shards.

    ``len(channels) - 1`` halvings: (32, 64, 128) compresses by 4 per side, (32, 64, 128, 128) by 8.
    The loss is ``l1_weight * |x - x'| + ssim_weight * (1 - SSIM) + kl_weight * KL`` with the L1 and
    SSIM terms averaged over pixel values and the KL summed over latent values then divided by the
    number of pixel values, so ``kl_weight`` means what it does in the LDM recipe (1e-6 against a
    summed reconstruction loss).  ``disc_weight > 0`` adds a PatchGAN discriminator (hinge) from
    epoch ``disc_start`` on."""
    image_size: tuple[int, int] | None = None   # (H, W) images are resized to; None = shard size
    crop: tuple[int, int] | None = None          # (H, W) random training crop; None = whole images
    # network
    channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 32                # GroupNorm groups; must divide every entry of channels
    attention: bool = False              # self-attention in the middle block (memory grows with H*W squared)
    # objective
    l1_weight: float = 1.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-6
    disc_weight: float = 0.0             # PatchGAN hinge loss weight; 0 = no discriminator
    disc_start: int = 0                  # epoch from which the discriminator trains and counts
    disc_channels: int = 32
    # optimisation
    epochs: int = 20
    batch_size: int = 8                  # per worker
    lr: float = 5e-4
    d_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    lr_schedule: str = "cosine"          # poly | cosine | constant
    hflip: bool = True
    ema_decay: float = 0.999             # EMA of the weights, used for val, encoding and decoding
    image_every: int = 2                 # log an image | reconstruction picture every N epochs
    val_images: int = 0                  # score the first N val images each epoch (0 = all of them)
    seed: int = 0
    amp: str = "none"                    # precision under --gpu: bf16 | none
    threads_per_worker: int = 0

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.channels) - 1)

    def __post_init__(self) -> None:
        _check_choice(self, "lr_schedule", ("poly", "cosine", "constant"))
        _check_choice(self, "amp", ("bf16", "none"))
        for name in ("epochs", "batch_size", "layers_per_block", "latent_channels", "norm_groups", "disc_channels",
                     "image_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.val_images < 0:
            raise ConfigError(f"config field 'val_images' must be >= 0 (0 = all), got {self.val_images}")
        if not 2 <= len(self.channels) <= 5 or any(c < 1 for c in self.channels):
            raise ConfigError(f"config field 'channels' needs 2 to 5 positive widths (factor 2 to 16), "
                              f"got {self.channels}")
        if any(c % self.norm_groups for c in self.channels):
            raise ConfigError(f"config field 'norm_groups' ({self.norm_groups}) must divide every entry of "
                              f"'channels' {self.channels}")
        for name in ("lr", "d_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("l1_weight", "ssim_weight", "kl_weight", "disc_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.l1_weight + self.ssim_weight <= 0:
            raise ConfigError("config fields 'l1_weight' and 'ssim_weight' cannot both be 0: nothing would be "
                              "reconstructed")
        if self.disc_start < 0:
            raise ConfigError(f"config field 'disc_start' must be >= 0, got {self.disc_start}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config field 'ema_decay' must be in [0, 1), got {self.ema_decay}")
        for name in ("image_size", "crop"):
            size = getattr(self, name)
            if size is not None and (size[0] % self.factor or size[1] % self.factor or min(size) < self.factor):
                raise ConfigError(f"config field '{name}' {tuple(size)} must be a multiple of the VAE factor "
                                  f"{self.factor} on both sides")
        if self.crop is not None and self.image_size is not None and (
                self.crop[0] > self.image_size[0] or self.crop[1] > self.image_size[1]):
            raise ConfigError(f"config field 'crop' {tuple(self.crop)} is larger than image_size "
                              f"{tuple(self.image_size)}")


def _check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"config field '{name}' must be one of {', '.join(choices)}; got {value!r}")


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML, JSON or a ``--set k=v`` string) to the field's type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is tuple:
        if isinstance(value, str):       # "64x64", "64,64" or "[64, 64]"
            value = [v for v in value.strip().strip("[]()").replace("x", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}' needs a list, got {value!r}")
        elem = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config field '{name}' needs {len(args)} values, got {value!r}")
        return tuple(_coerce(name, elem, v) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}' expects {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def replace(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Return ``cfg`` with fields overridden by name; unknown names raise :class:`ConfigError`."""
    hints = typing.get_type_hints(type(cfg))
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(unknown)} for {type(cfg).__name__}; "
            f"known fields: {', '.join(sorted(known))}")
    values = {k: _coerce(k, hints[k], v) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    return replace(cls(), data)


def asdict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(cls: type, path: str | Path, base: Any | None = None) -> Any:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    try:
        return replace(base if base is not None else cls(), data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["lr=0.1", "crop=64x64"]`` -> ``{"lr": "0.1", "crop": "64x64"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects field=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def to_json(cfg: Any) -> str:
    return json.dumps({"type": type(cfg).__name__, "fields": asdict(cfg)}, indent=2, sort_keys=True)


CONFIGS: dict[str, type] = {"SegConfig": SegConfig, "DiffusionConfig": DiffusionConfig, "GANConfig": GANConfig,
                           "VAEConfig": VAEConfig}


def from_json(text: str) -> Any:
    data = json.loads(text)
    cls = CONFIGS.get(data.get("type", ""))
    if cls is None:
        raise ConfigError(f"unknown config type {data.get('type')!r}")
    return from_dict(cls, data["fields"])
