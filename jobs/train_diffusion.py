"""``genseg train diffusion``: DDPM training on Ray Train over the shared runner.

Label-conditioned (``cond=mask``, semantic image synthesis) or unconditional.  EMA weights are
kept in every checkpoint and used for sampling; the best checkpoint, and the champion, is the one
with the lowest ``val_x0_mse`` (genseg.diffusion.score: the x0 error at fixed noise levels, which
compares models across schedules, T and prediction types; the raw val loss does not).
"""
from __future__ import annotations

import time

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
                picture = _sample_grid(ema.model, val_shard, cfg, noise, size, rt["classes"]["palette"], s.device)
            s.log(epoch, metrics, picture, f"samples/epoch_{epoch:03d}.png")
        s.report(epoch, metrics, {"model": model, "ema": ema.model}, {"model": optimizer}, {"model": scheduler},
                 meta={"best_val_x0_mse": best}, extra_state={"ema_updates": ema.updates}, rngs=rngs, scaler=scaler)


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
def _sample_grid(model, val_shard, cfg, noise, size, palette, device, n: int = 4) -> np.ndarray:
    """Rows of ``label map | sample`` (conditioned) or a row of samples (unconditional)."""
    batch = next(iter(val_shard.iter_batches(batch_size=n, batch_format="numpy")))
    _, masks = diffusion_batch(batch, size, False, None)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.cond == "mask":
        cond = encode_labels(masks, cfg.num_classes, cfg.ignore_index)
        x = sample(model, noise, (len(masks), 3, *size), cond=cond, w=cfg.guidance, sampler=cfg.sampler,
                   steps=cfg.sample_steps, generator=gen, device=device)
        rows = [np.concatenate([colorize(m.numpy(), palette), img.numpy()], axis=1)
                for m, img in zip(masks, to_uint8(x))]
    else:
        x = sample(model, noise, (n, 3, *size), sampler=cfg.sampler, steps=cfg.sample_steps, generator=gen,
                   device=device)
        rows = [np.concatenate(list(to_uint8(x).numpy()), axis=1)]
    return stack_rows(rows)


build_config = runner.fill_from_manifest

TASK = runner.Task(name="diffusion", experiment="genseg-diffusion", model_name="genseg-diffusion",
                   score="val_x0_mse", higher_is_better=False, loop=train_loop,
                   model_fields=("cond", "num_classes", "channels", "layers_per_block", "attention", "prediction",
                                 "timesteps"))


def run(data: str, cfg: DiffusionConfig, rt, **kw) -> dict:
    """Train on the shards in ``data`` (see :func:`jobs.runner.run` for the keyword arguments)."""
    return runner.fit(TASK, data, cfg, rt, build_config, **kw)
