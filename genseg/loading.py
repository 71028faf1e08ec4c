"""The one loader: a checkpoint directory (or a resolved model REF) -> a typed, ready model on a device.

    seg = load(resolved, expect="segmenter")          # -> genseg.segmenter.Segmenter
    gen = load(resolved, expect="generator")          # -> a genseg.generation.Generator
    vae = load(resolved, expect="vae")                # -> genseg.vae.autoencoder.Autoencoder

Every command, bench script, Tune trial and Serve replica loads models through :func:`load`,
after resolving a REF once with :func:`genseg.tracking.resolve`.  Only weights are read
(safetensors); nothing in a checkpoint is executed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from genseg import checkpoint as ckpt_lib
from genseg.generation import SamplingSettings

# config class name -> (kind, role)
KINDS: dict[str, tuple[str, str]] = {
    "SegConfig": ("segmenter", "segmenter"),
    "DiffusionConfig": ("diffusion", "generator"),
    "GANConfig": ("gan", "generator"),
    "VAEConfig": ("vae", "autoencoder"),
}


class WrongModelKind(ckpt_lib.CheckpointError):
    """A REF names a model of another kind than the command needs."""


def kind_of(ckpt: ckpt_lib.Checkpoint) -> str:
    return KINDS[type(ckpt.config).__name__][0]


def load(source: Any, *, expect: str | None = None, device: str = "cpu", weights: str = "ema",
         sampling: SamplingSettings | None = None, ref: str | None = None):
    """``source``: a checkpoint directory or anything with a ``.path`` (a resolved REF).

    ``expect`` is ``"segmenter"``, ``"generator"`` or a kind (``"diffusion"``); a model of another
    kind raises :class:`WrongModelKind` naming both.  ``weights="ema"`` uses the EMA weights where
    a checkpoint has them.  ``sampling`` (e.g. a registry version's tuned settings) overrides the
    checkpoint's own sampling settings."""
    path = Path(getattr(source, "path", source))
    ref = ref or getattr(source, "ref", None) or str(path)
    if sampling is None:
        sampling = getattr(source, "sampling", None)
    ck = ckpt_lib.load(path)
    name = type(ck.config).__name__
    if name not in KINDS:
        raise WrongModelKind(f"{ref}: no loader for a {name} checkpoint")
    kind, role = KINDS[name]
    if expect is not None and expect not in (kind, role):
        what = {"segmenter": "a segmenter (genseg train seg)", "generator": "a generative model "
                "(genseg train diffusion or genseg train gan)", "vae": "an autoencoder (genseg train vae)",
                "autoencoder": "an autoencoder (genseg train vae)"}.get(expect, expect)
        raise WrongModelKind(f"{ref} is a {kind} model ({name}), but this command needs {what}")
    classes = ck.meta.get("classes") or {}
    if kind == "segmenter":
        from genseg.segmenter import Segmenter

        model = Segmenter(ckpt_lib.build_model(ck), ck.config, classes, device)
    elif kind == "vae":
        from genseg.vae.autoencoder import Autoencoder

        used = "ema" if weights == "ema" and ckpt_lib.load_weights(path, "ema") is not None else "model"
        model = Autoencoder(ckpt_lib.build_model(ck, weights=used), ck.config, ck.meta.get("latent_scale", 1.0),
                            device, used)
    else:
        used = weights
        if weights == "ema" and ckpt_lib.load_weights(path, "ema") is None:
            used = "model"
        if kind == "gan":
            from genseg.gan.generator import GANGenerator

            model = GANGenerator(ckpt_lib.build_model(ck, weights=used), ck.config, classes, None, device, used)
        else:
            from genseg.diffusion.generator import DiffusionGenerator

            decoder = autoencoder_of(ck, path, ref, device) if ck.config.latent_channels else None
            model = DiffusionGenerator(ckpt_lib.build_model(ck, weights=used), ck.config, classes,
                                       sampling or sampling_of(ck), device, used, decoder)
    # where it came from, for reports and response headers
    model.epoch, model.path, model.ref, model.meta = ck.epoch, path, ref, ck.meta
    model.version = getattr(source, "version", None)
    model.model_name = getattr(source, "name", None)
    model.run_id = getattr(source, "run_id", None)
    return model


def sampling_of(ck: ckpt_lib.Checkpoint) -> SamplingSettings | None:
    """The sampling settings a checkpoint carries: its ``meta["sampling"]`` when set (e.g. tuned),
    else the sampler, steps and guidance of the config it was trained with; None for a segmenter."""
    stored = SamplingSettings.from_dict(ck.meta.get("sampling"))
    if stored is not None:
        return stored
    cfg = ck.config
    if all(hasattr(cfg, f) for f in ("sampler", "sample_steps", "guidance")):
        return SamplingSettings(cfg.sampler, cfg.sample_steps, float(cfg.guidance))
    return None


def autoencoder_of(ck: ckpt_lib.Checkpoint, path: Path, ref: str, device: str = "cpu"):
    """The autoencoder a latent diffusion checkpoint carries: its ``vae`` weights and, in its meta, the
    autoencoder's config and latent scale (``meta["vae"]``)."""
    from genseg import config as config_lib
    from genseg.models.vae import build_vae
    from genseg.vae.autoencoder import Autoencoder

    info = ck.meta.get("vae") or {}
    weights = ckpt_lib.load_weights(path, "vae")
    if not info.get("config") or weights is None:
        raise ckpt_lib.CheckpointError(f"{ref}: a latent diffusion checkpoint without its autoencoder "
                                       f"(vae.safetensors and meta.vae); train it again with --latent")
    cfg = config_lib.from_dict(config_lib.VAEConfig, info["config"])
    if cfg.latent_channels != ck.config.latent_channels or cfg.factor != ck.config.latent_factor:
        raise ckpt_lib.CheckpointError(
            f"{ref}: its autoencoder makes {cfg.latent_channels}-channel latents at factor {cfg.factor}, but the "
            f"diffusion model was trained on {ck.config.latent_channels} channels at factor {ck.config.latent_factor}")
    net = build_vae(cfg)
    net.load_state_dict(weights)
    return Autoencoder(net, cfg, info.get("latent_scale", 1.0), device, "ema")
