"""``genseg train diffusion``: DDPM training on Ray Train over the shared runner.

Label-conditioned (``cond=mask``, semantic image synthesis) or unconditional.  In pixel space, or
with ``--latent REF`` in the latent space of a trained autoencoder (latent diffusion): the shards
are encoded once into a cache of latent shards (pipelines/latents.py, keyed by the shards, the
autoencoder and the size), the UNet trains on them, and every checkpoint carries the autoencoder
so that sampling decodes to full resolution.  Latent models register as
``genseg-latent-diffusion``: their x0 error is measured in latent space and does not compare with
a pixel model's.  EMA weights are
kept in every checkpoint and used for sampling; the best checkpoint, and the champion, is the one
with the lowest ``val_x0_mse`` (genseg.diffusion.score: the x0 error at fixed noise levels, which
compares models across schedules, T and prediction types; the raw val loss does not).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from genseg import engine
from genseg import rng as rng_lib
from genseg.config import DiffusionConfig
from genseg.data.classes import colorize
from genseg.diffusion.conditioning import encode_labels
from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.ema import EMA
from genseg.diffusion.sampling import sample, to_uint8
from genseg.diffusion.schedules import make_train_scheduler
from genseg.diffusion.score import x0_mse
from genseg.diffusion.training import diffusion_loss, train_step
from genseg.models.unet import build_diffusion_model
from genseg.viz import stack_rows
from jobs import runner


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    s = runner.WorkerSession(loop_config, DiffusionConfig)
    cfg, rt = s.cfg, s.rt
    rng = engine.set_seed(cfg.seed, s.rank)           # global generators + this worker's flip stream
    gen = rng_lib.torch_generator(cfg.seed, s.rank, "noise")   # t, eps and condition dropout (a CPU generator)
    rngs = {"augment": rng, "noise": gen}
    size = tuple(cfg.image_size)
    # on the device before the optimizer and the EMA copy exist: restored optimizer state and the EMA
    # weights then live beside the model's (EMA.update also follows the model if it moves later)
    model = build_diffusion_model(cfg).to(s.device)
    ema = EMA(model, cfg.ema_decay)
    vae, vae_meta = _autoencoder(rt, s.device) if cfg.latent_channels else (None, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = engine.make_scheduler(optimizer, cfg.lr_schedule, cfg.epochs, cfg.warmup_epochs, rt["steps_per_epoch"])
    scaler = torch.amp.GradScaler("cuda") if s.device.type == "cuda" and cfg.amp == "fp16" else None
    start_epoch, meta = s.restore({"model": model, "ema": ema.model}, {"model": optimizer}, {"model": scheduler},
                                  rngs=rngs, scaler=scaler)
    ema.updates = int(meta.get("extra_state", {}).get("ema_updates", 0))
    best = meta.get("best_val_x0_mse", float("inf"))
    noise = make_train_scheduler(cfg)
    model = ray.train.torch.prepare_model(model)
    ema.to(s.device)
    # a fresh autocast context per step (None on CPU)
    autocast = (lambda: engine.autocast(s.device, cfg.amp)) if s.device.type == "cuda" else None
    conditioned = cfg.cond == "mask"
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.epochs):
        t0, losses = time.perf_counter(), []
        for batch in s.epoch_batches(epoch, cfg.batch_size):
            x0, masks = diffusion_batch(batch, size, cfg.hflip, rng)
            cond = encode_labels(masks, cfg.num_classes, cfg.ignore_index).to(s.device) if conditioned else None
            losses.append(train_step(model, optimizer, x0.to(s.device), cond, noise, cfg.p_uncond, ema,
                                     autocast, gen, scaler))
            scheduler.step()
        seconds = time.perf_counter() - t0
        val_loss, val_x0 = _val_scores(ema.model, val_shard, cfg, noise, size, s)
        val_loss, val_x0 = s.mean(val_loss), s.mean(val_x0)
        best = min(best, val_x0)
        metrics = {"epoch": epoch, "train_loss": s.mean(float(np.mean(losses)) if losses else float("nan")),
                   "val_loss": val_loss, "val_x0_mse": val_x0, "best_val_x0_mse": best, "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": len(losses) * cfg.batch_size * s.world / max(seconds, 1e-9),
                   "epoch_seconds": seconds}
        if s.rank == 0:
            s.say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}, val x0-MSE {val_x0:.4f} "
                  f"({seconds:.1f}s, {metrics['samples_per_s']:.1f} img/s)")
            picture = None
            if epoch % max(1, cfg.sample_every) == 0 or epoch == cfg.epochs - 1:
                picture = _sample_grid(ema.model, val_shard, cfg, noise, size, rt["classes"]["palette"], s.device, vae)
            s.log(epoch, metrics, picture, f"samples/epoch_{epoch:03d}.png")
        models = {"model": model, "ema": ema.model}
        meta = {"best_val_x0_mse": best}
        if vae is not None:          # the decoder travels with every checkpoint of a latent model
            models["vae"], meta["vae"] = vae.net, vae_meta
        s.report(epoch, metrics, models, {"model": optimizer}, {"model": scheduler},
                 meta=meta, extra_state={"ema_updates": ema.updates}, rngs=rngs, scaler=scaler)


def _autoencoder(rt: dict, device):
    """The autoencoder the latent shards were encoded with (their ``vae/`` copy) and what a checkpoint
    records of it."""
    from genseg import config as config_lib
    from genseg.loading import load

    vae = load(rt["vae_dir"], expect="vae", device=device)
    return vae, {"config": config_lib.asdict(vae.cfg), "latent_scale": vae.scale, **rt["latent"]}


@torch.no_grad()
def _val_scores(model, val_shard, cfg, noise, size, s, max_images: int = 64) -> tuple[float, float]:
    """On (this worker's share of) val, with fixed seeds so epochs are comparable: the DDPM loss of
    the EMA model in its own parameterization, and ``val_x0_mse`` (genseg.diffusion.score), the
    score that compares models across schedules and prediction types and picks the champion."""
    model.eval()
    gen = torch.Generator().manual_seed(1234 + s.rank)
    total, n, i = 0.0, 0, 0
    x0_total = 0.0
    for batch in val_shard.iter_batches(batch_size=16, batch_format="numpy"):
        x0, masks = diffusion_batch(batch, size, False, None)
        keep = [j for j in range(len(x0)) if (i + j) % s.world == s.rank]
        i += len(x0)
        if not keep or n >= max_images:
            continue
        x0, masks = x0[keep], masks[keep]
        cond = encode_labels(masks, cfg.num_classes, cfg.ignore_index).to(s.device) if cfg.cond == "mask" else None
        total += diffusion_loss(model, x0.to(s.device), cond, noise, 0.0, gen).item() * len(x0)
        x0_total += x0_mse(model, x0.to(s.device), cond, noise, seed=4321 + i)[0]
        n += len(x0)
    return total / max(n, 1), x0_total / max(n, 1)


@torch.no_grad()
def _sample_grid(model, val_shard, cfg, noise, size, palette, device, vae=None, n: int = 4) -> np.ndarray:
    """Rows of ``label map | sample`` (conditioned) or a row of samples (unconditional); a latent
    model's samples decoded, its grid's label maps shown at the decoded size."""
    batch = next(iter(val_shard.iter_batches(batch_size=n, batch_format="numpy")))
    _, masks = diffusion_batch(batch, size, False, None)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (len(masks) if cfg.cond == "mask" else n, cfg.latent_channels or 3, *size)
    cond = encode_labels(masks, cfg.num_classes, cfg.ignore_index) if cfg.cond == "mask" else None
    x = sample(model, noise, shape, cond=cond, w=cfg.guidance if cond is not None else 1.0, sampler=cfg.sampler,
               steps=cfg.sample_steps, generator=gen, device=device)
    images = to_uint8(vae.decode(x) if vae is not None else x).numpy()
    if cfg.cond != "mask":
        return stack_rows([np.concatenate(list(images), axis=1)])
    f = cfg.latent_factor
    return stack_rows([np.concatenate([colorize(m.numpy(), palette).repeat(f, 0).repeat(f, 1), img], axis=1)
                       for m, img in zip(masks, images)])


def build_config(manifest: dict, base: DiffusionConfig, data_dir) -> DiffusionConfig:
    """The config completed from the shards (classes, size); from latent shards also the latent channels
    and factor, and the size is their grid."""
    from genseg import config as config_lib

    latent = manifest.get("latent")
    if latent is None:
        if base.latent_channels:
            raise config_lib.ConfigError(f"{data_dir} holds images, not latents; train a latent model with "
                                         f"--latent REF (the autoencoder) instead of setting latent_channels")
        return runner.fill_from_manifest(manifest, base, data_dir)
    grid = tuple(manifest["size"])
    if base.image_size is not None and tuple(base.image_size) != grid:
        raise config_lib.ConfigError(f"a latent model trains at its shards' latent grid {grid[0]}x{grid[1]}, not "
                                     f"image_size {tuple(base.image_size)}; encode at another --size to change it")
    base = config_lib.replace(base, {"latent_channels": latent["channels"], "latent_factor": latent["factor"],
                                     "image_size": grid})
    return runner.fill_from_manifest(manifest, base, data_dir)


MODEL_FIELDS = ("cond", "num_classes", "channels", "layers_per_block", "attention", "prediction", "timesteps",
                "latent_channels", "latent_factor")
TASK = runner.Task(name="diffusion", experiment="genseg-diffusion", model_name="genseg-diffusion",
                   score="val_x0_mse", higher_is_better=False, loop=train_loop, model_fields=MODEL_FIELDS)
# the x0 error of a latent model is in its autoencoder's latent space: a registry of its own
LATENT_TASK = runner.Task(name="diffusion", experiment="genseg-diffusion", model_name="genseg-latent-diffusion",
                          score="val_x0_mse", higher_is_better=False, loop=train_loop, model_fields=MODEL_FIELDS,
                          scored_on=lambda cfg: f"val latents (factor {cfg.latent_factor})")


def run(data: str, cfg: DiffusionConfig, rt, latent: str | None = None, log=print, **kw) -> dict:
    """Train on the shards in ``data`` (see :func:`jobs.runner.run` for the keyword arguments);
    ``latent``: an autoencoder REF, to train a latent model on the shards' latents (encoded once and
    cached under the workdir).  Latent shards given directly as ``data`` train a latent model too."""
    from genseg.data.shards import read_manifest

    if latent is not None:
        data = str(latent_shards(data, latent, rt, log))
    manifest = read_manifest(data)
    if manifest.get("latent") is None:
        return runner.fit(TASK, data, cfg, rt, build_config, log=log, **kw)
    vae_dir = Path(data).resolve() / "vae"
    info = {k: manifest["latent"][k] for k in ("vae", "vae_digest", "image_size")}
    return runner.fit(LATENT_TASK, data, cfg, rt, build_config, log=log,
                      runtime={"vae_dir": str(vae_dir), "latent": info}, **kw)


def latent_shards(data: str, ref: str, rt, log=print) -> Path:
    """The latent shards of ``data`` under the autoencoder ``ref``: from the workdir's cache, or encoded
    now (once per machine: a second command waits for the first's encoding)."""
    import tempfile

    from genseg import tracking
    from jobs.runtime import machine_lock
    from pipelines.latents import cache_key, encode_shards

    with tempfile.TemporaryDirectory(prefix="genseg-vae-") as tmp:
        resolved = tracking.resolve(ref, rt.tracking_uri, dst=tmp)
        key = cache_key(data, resolved.path)
        out = Path(rt.workdir).resolve() / "latents" / key
        with machine_lock(f"latents-{key}"):
            if not (out / "manifest.json").is_file():
                name = resolved.label
                log(f"encoding {data} with {name} into {out} (once; later runs reuse it)")
                encode_shards(data, resolved.path, out, vae_ref=name, progress=sys.stdout.isatty())
            else:
                log(f"latents of {data}: {out} (cached)")
    return out
