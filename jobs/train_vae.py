"""``genseg train vae``: the latent-diffusion autoencoder on Ray Train over the shared runner.

The checkpoint holds the autoencoder (``model``), its EMA (``ema``: validation, encoding and
decoding use it), the optional PatchGAN discriminator and their optimizers.  Every epoch, rank 0..N
score their share of val with the EMA weights, decoding the posterior mean: PSNR and SSIM of the
reconstructions, L1, KL, and the standard deviation of the latents.  ``1 / std`` is kept in the
checkpoint's meta as ``latent_scale`` (the LDM scale factor: a latent diffusion model sees latents
of unit variance).  The best checkpoint, and the champion ``genseg-vae``, has the highest
``val_psnr``.
"""
from __future__ import annotations

import math
import random
import time

import numpy as np
import ray.train
import ray.train.torch
import torch

from genseg import engine
from genseg import rng as rng_lib
from genseg.config import ConfigError, VAEConfig
from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.ema import EMA
from genseg.diffusion.sampling import to_uint8
from genseg.metrics.generation import ssim_map
from genseg.models.vae import PatchDiscriminator, build_vae
from genseg.vae.training import kl_divergence, psnr, train_step
from genseg.viz import stack_rows
from jobs import runner

STEP_FIGURES = ("loss", "l1", "ssim_loss", "kl", "g_adv", "d_loss")


def random_crop(x: torch.Tensor, crop: tuple[int, int] | None, rng: random.Random) -> torch.Tensor:
    """A random ``crop (H, W)`` window of each image in ``x (B, C, H, W)``, drawn from ``rng``;
    ``None`` keeps whole images."""
    if crop is None:
        return x
    ch, cw = crop
    h, w = x.shape[-2:]
    out = []
    for img in x:
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        out.append(img[:, top: top + ch, left: left + cw])
    return torch.stack(out)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    s = runner.WorkerSession(loop_config, VAEConfig)
    cfg, rt = s.cfg, s.rt
    rng = engine.set_seed(cfg.seed, s.rank)            # flips and crops of this worker
    gen = rng_lib.torch_generator(cfg.seed, s.rank, "noise")   # the posterior samples' noise
    rngs = {"augment": rng, "noise": gen}
    size = tuple(cfg.image_size)
    vae = build_vae(cfg).to(s.device)
    ema = EMA(vae, cfg.ema_decay)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = engine.make_scheduler(opt, cfg.lr_schedule, cfg.epochs, cfg.warmup_epochs, rt["steps_per_epoch"])
    models, optimizers = {"model": vae, "ema": ema.model}, {"model": opt}
    disc = opt_d = None
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(cfg.disc_channels).to(s.device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.9))
        models["discriminator"], optimizers["discriminator"] = disc, opt_d
    start_epoch, meta = s.restore(models, optimizers, {"model": sched}, rngs=rngs)
    ema.updates = int(meta.get("extra_state", {}).get("ema_updates", 0))
    best = meta.get("best_val_psnr", -math.inf)
    vae = ray.train.torch.prepare_model(vae)
    if disc is not None:
        disc = ray.train.torch.prepare_model(disc)
    ema.to(s.device)
    autocast = (lambda: engine.autocast(s.device, cfg.amp)) if s.device.type == "cuda" else None
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.epochs):
        t0, figures = time.perf_counter(), {k: [] for k in STEP_FIGURES}
        vae.train()
        adversarial = disc is not None and epoch >= cfg.disc_start
        for batch in s.epoch_batches(epoch, cfg.batch_size):
            x, _ = diffusion_batch(batch, size, cfg.hflip, rng)
            x = random_crop(x, cfg.crop, rng).to(s.device)
            out = train_step(vae, opt, x, cfg, gen, ema, disc if adversarial else None, opt_d, autocast)
            sched.step()
            for k, v in out.items():
                figures[k].append(v)
        seconds = time.perf_counter() - t0
        metrics = s.epoch_means(figures, seconds, cfg.batch_size)
        val = _val_scores(ema.model, val_shard, size, s, cfg.val_images)
        best = max(best, val["val_psnr"])
        scale = 1.0 / max(val["latent_std"], 1e-6)
        metrics.update(val)
        metrics.update({"epoch": epoch, "best_val_psnr": best, "latent_scale": scale, "lr": opt.param_groups[0]["lr"]})
        if s.rank == 0:
            s.say(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.4f} (L1 {metrics['l1']:.4f}, "
                  f"1-SSIM {metrics['ssim_loss']:.4f}, KL {metrics['kl']:.3g}"
                  + (f", D loss {metrics['d_loss']:.3f}" if "d_loss" in metrics else "")
                  + f"), val PSNR {val['val_psnr']:.2f} dB, SSIM {val['val_ssim']:.4f}, latent std "
                  f"{val['latent_std']:.3f} ({seconds:.1f}s, {metrics['samples_per_s']:.1f} img/s)")
            picture = None
            if epoch % cfg.image_every == 0 or epoch == cfg.epochs - 1:
                picture = _picture(ema.model, val_shard, size, s.device)
            s.log(epoch, metrics, picture, f"reconstructions/epoch_{epoch:03d}.png")
        s.report(epoch, metrics, models, optimizers, {"model": sched},
                 meta={"best_val_psnr": best, "latent_scale": scale}, extra_state={"ema_updates": ema.updates},
                 rngs=rngs)


@torch.no_grad()
def _val_scores(model, val_shard, size, s, limit: int = 0) -> dict[str, float]:
    """This worker's share of val (of its first ``limit`` images; 0 = all), reconstructed from the
    posterior mean, summed, then averaged over all workers: PSNR, SSIM and L1 per image, the KL per
    pixel value, and the latents' std."""
    model.eval()
    sums = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "kl": 0.0, "z": 0.0, "z2": 0.0, "n": 0.0, "nz": 0.0}
    i = 0
    for batch in val_shard.iter_batches(batch_size=8, batch_format="numpy"):
        if limit and i >= limit:
            break
        x, _ = diffusion_batch(batch, size, False, None)
        keep = [j for j in range(len(x)) if (i + j) % s.world == s.rank and (not limit or i + j < limit)]
        i += len(x)
        if not keep:
            continue
        x = x[keep].to(s.device)
        mean, logvar = model.moments(x)
        rec = model.decode(mean).float().clamp(-1, 1)
        sums["psnr"] += float(psnr(rec, x).sum())
        sums["ssim"] += float(ssim_map((rec + 1) / 2, (x + 1) / 2).flatten(1).mean(1).sum())
        sums["l1"] += float((rec - x).abs().flatten(1).mean(1).sum())
        sums["kl"] += float(kl_divergence(mean, logvar).sum()) / x[0].numel()
        sums["z"] += float(mean.double().sum())
        sums["z2"] += float(mean.double().pow(2).sum())
        sums["n"] += len(x)
        sums["nz"] += mean.numel()
    total = {k: s.mean(v) for k, v in sums.items()}       # means over workers: their ratios are the totals'
    if total["n"] == 0:
        raise ConfigError("the val split is empty on every worker: nothing to score the autoencoder on")
    mu = total["z"] / total["nz"]
    var = max(total["z2"] / total["nz"] - mu * mu, 0.0)
    return {"val_psnr": total["psnr"] / total["n"], "val_ssim": total["ssim"] / total["n"],
            "val_l1": total["l1"] / total["n"], "val_kl": total["kl"] / total["n"], "latent_mean": mu,
            "latent_std": math.sqrt(var)}


@torch.no_grad()
def _picture(model, val_shard, size, device, n: int = 4) -> np.ndarray:
    """Rows of ``image | reconstruction`` for the first ``n`` val images."""
    batch = next(iter(val_shard.iter_batches(batch_size=n, batch_format="numpy")))
    x, _ = diffusion_batch(batch, size, False, None)
    rec = model.decode(model.moments(x.to(device))[0]).float().cpu()
    return stack_rows([np.concatenate([a, b], axis=1) for a, b in zip(to_uint8(x).numpy(), to_uint8(rec).numpy())])


def build_config(manifest: dict, base: VAEConfig, data_dir) -> VAEConfig:
    """The config completed from the shards: the image size, unless set (one size is required then).
    The config's own checks (sizes a multiple of the factor) run on the result."""
    from genseg import config as config_lib

    return config_lib.replace(base, runner.image_size_from_manifest(manifest, base, data_dir))


TASK = runner.Task(name="vae", experiment="genseg-vae", model_name="genseg-vae",
                   score="val_psnr", higher_is_better=True, loop=train_loop,
                   model_fields=("channels", "layers_per_block", "latent_channels", "norm_groups", "attention",
                                 "disc_weight"))


def run(data: str, cfg: VAEConfig, rt, **kw) -> dict:
    """Train on the shards in ``data`` (see :func:`jobs.runner.run` for the keyword arguments)."""
    return runner.fit(TASK, data, cfg, rt, build_config, **kw)
