"""``genseg sample``: draw images from a diffusion checkpoint, optionally conditioned on label maps."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from genseg import checkpoint as ckpt_lib
from genseg.config import DiffusionConfig
from genseg.data.classes import colorize
from genseg.errors import InputError
from genseg.data.shards import read_manifest
from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.conditioning import encode_labels, null_condition
from genseg.diffusion.sampling import sample, to_uint8
from genseg.diffusion.schedules import make_train_scheduler
from genseg.viz import save_png, stack_rows
from pipelines.shards import iter_split


def load_diffusion(model_dir: Path, weights: str = "ema"):
    ck = ckpt_lib.load(model_dir)
    if not isinstance(ck.config, DiffusionConfig):
        raise ckpt_lib.CheckpointError(f"{model_dir} is a {type(ck.config).__name__} checkpoint, not a diffusion model")
    if weights == "ema" and ckpt_lib.load_weights(model_dir, "ema") is None:
        weights = "model"
    return ck, ckpt_lib.build_model(ck, weights=weights), weights


def label_maps(shards: str, split: str, num: int, cfg: DiffusionConfig) -> torch.Tensor:
    """The first ``num`` label maps of a split, resized (NEAREST) to the model's size -> ``(N, H, W)``."""
    manifest = read_manifest(shards)
    if manifest["num_classes"] != cfg.num_classes:
        raise InputError(f"{shards}: label maps have {manifest['num_classes']} classes, the model expects "
                         f"{cfg.num_classes}")
    maps = [diffusion_batch(batch, tuple(cfg.image_size), False, None)[1]
            for batch in iter_split(shards, split, limit=num)]
    if not maps:
        raise InputError(f"{shards} [{split}] holds no label maps")
    maps = torch.cat(maps)
    return maps[torch.arange(num) % len(maps)]   # fewer maps than samples: reuse them in order


def run(model_dir: Path, out: str, *, num: int = 8, masks: str | None = None, split: str = "val",
        sampler: str = "ddim", steps: int = 25, guidance: float | None = None, seed: int = 0,
        weights: str = "ema", batch_size: int = 8, device: str = "cpu") -> dict:
    ck, model, weights = load_diffusion(model_dir, weights)
    cfg = ck.config
    model.to(device)
    noise = make_train_scheduler(cfg)
    w = cfg.guidance if guidance is None else guidance
    labels = None
    if masks:
        if cfg.cond != "mask":
            raise InputError("--masks given, but this model is unconditional")
        labels = label_maps(masks, split, num, cfg)
    elif cfg.cond == "mask":
        w = 0.0    # no label maps: the unconditional branch (trained through condition dropout)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    images = []
    t0 = time.perf_counter()
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        cond = None
        if cfg.cond == "mask":
            if labels is not None:
                cond = encode_labels(labels[start: start + b], cfg.num_classes, cfg.ignore_index)
            else:
                cond = null_condition(torch.zeros(b, cfg.num_classes + 1, *cfg.image_size))
        x = sample(model, noise, (b, 3, *cfg.image_size), cond=cond, w=w, sampler=sampler, steps=steps,
                   generator=gen, device=device, progress=True)
        images.append(to_uint8(x))
    seconds = time.perf_counter() - t0
    images = torch.cat(images).numpy()
    palette = (ck.meta.get("classes") or {}).get("palette")
    for i, img in enumerate(images):
        save_png(img, out_dir / f"sample_{i:04d}.png")
        if labels is not None and palette:
            save_png(colorize(labels[i].numpy(), palette, cfg.ignore_index), out_dir / f"label_{i:04d}.png")
    if labels is not None and palette:
        rows = [np.concatenate([colorize(labels[i].numpy(), palette, cfg.ignore_index), images[i]], axis=1)
                for i in range(len(images))]
    else:
        per_row = max(1, int(math.ceil(math.sqrt(len(images)))))
        rows = [np.concatenate(list(images[i: i + per_row]) + [np.full_like(images[0], 255)] *
                               (per_row - len(images[i: i + per_row])), axis=1)
                for i in range(0, len(images), per_row)]
    grid = save_png(stack_rows(rows), out_dir / "grid.png")
    res = {"num": int(len(images)), "grid": str(grid), "sampler": sampler, "steps": steps, "guidance": w,
           "seed": seed, "weights": weights, "size": list(cfg.image_size), "conditioned": labels is not None,
           "model": str(model_dir), "seconds": round(seconds, 3), "seconds_per_image": seconds / max(1, len(images))}
    (out_dir / "samples.json").write_text(json.dumps(res, indent=2))
    return res
