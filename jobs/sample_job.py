"""``genseg sample``: draw images from a generative model, optionally conditioned on label maps.

Works with any :class:`genseg.generation.Generator` (diffusion now, GAN later): it never reaches
into a model family's internals.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from genseg.data.classes import colorize
from genseg.data.shards import read_manifest
from genseg.diffusion.data import diffusion_batch
from genseg.errors import InputError
from genseg.viz import save_png, stack_rows, upscale
from pipelines.shards import iter_split

GRID_MIN_WIDTH = 768     # the grid is upscaled (NEAREST, integer factor) to at least this many pixels


def label_maps(shards: str, split: str, num: int, gen) -> torch.Tensor:
    """The first ``num`` label maps of a split at the model's size (NEAREST) -> ``(N, H, W)``;
    with fewer maps than ``num`` they are reused in order."""
    manifest = read_manifest(shards)
    if manifest["num_classes"] != gen.num_classes:
        raise InputError(f"{shards}: label maps have {manifest['num_classes']} classes, the model expects "
                         f"{gen.num_classes}")
    maps = [diffusion_batch(batch, tuple(gen.image_size), False, None)[1]
            for batch in iter_split(shards, split, limit=num)]
    if not maps:
        raise InputError(f"{shards} [{split}] holds no label maps")
    maps = torch.cat(maps)
    return maps[torch.arange(num) % len(maps)]


def run(gen, out: str, *, num: int = 8, masks: str | None = None, split: str = "val", seed: int = 0,
        batch_size: int = 8, **sampling) -> dict:
    """Sample ``num`` images into ``out`` (PNGs, label maps, an upscaled ``grid.png``); ``sampling``
    overrides the model's settings (None = the model's own)."""
    settings = gen.settings(**sampling)   # fail before any work
    if num < 1:
        raise InputError(f"--num must be >= 1, got {num}")
    labels = None
    if masks:
        if not gen.conditional:
            raise InputError("--masks was given, but this model is unconditional (trained with cond=none)")
        labels = label_maps(masks, split, num, gen)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = gen.generate(labels, num, seed, batch_size=batch_size, progress=True,
                          **settings.to_dict()).numpy()
    seconds = time.perf_counter() - t0
    palette = gen.classes.get("palette")
    for i, img in enumerate(images):
        save_png(img, out_dir / f"sample_{i:04d}.png")
        if labels is not None and palette:
            save_png(colorize(labels[i].numpy(), palette, gen.ignore_index), out_dir / f"label_{i:04d}.png")
    grid = save_png(upscale(grid_picture(images, labels, palette, gen.ignore_index), GRID_MIN_WIDTH),
                    out_dir / "grid.png")
    # a conditional diffusion model without label maps samples its unconditional branch (w = 0)
    used = settings if labels is not None or not gen.conditional or gen.kind != "diffusion" \
        else settings.merged(guidance=0.0)
    return {"num": int(len(images)), "grid": str(grid), "sampling": used.to_dict(), "sampling_desc": used.describe(),
            "seed": seed,
            "weights": getattr(gen, "weights", None), "size": list(gen.image_size),
            "conditioned": labels is not None, "kind": gen.kind,
            "seconds": round(seconds, 3), "seconds_per_image": seconds / max(1, len(images))}


def grid_picture(images: np.ndarray, labels: torch.Tensor | None, palette, ignore_index: int) -> np.ndarray:
    """Rows of ``label map | sample`` (conditioned), else a near-square grid of samples."""
    if labels is not None and palette:
        rows = [np.concatenate([colorize(labels[i].numpy(), palette, ignore_index), images[i]], axis=1)
                for i in range(len(images))]
        # two pairs side by side keep the picture from being a tall strip
        pairs = [np.concatenate(rows[i: i + 2] + [np.full_like(rows[0], 255)] * (2 - len(rows[i: i + 2])), axis=1)
                 for i in range(0, len(rows), 2)]
        return stack_rows(pairs)
    per_row = max(1, int(math.ceil(math.sqrt(len(images)))))
    rows = [np.concatenate(list(images[i: i + per_row]) + [np.full_like(images[0], 255)] *
                           (per_row - len(images[i: i + per_row])), axis=1)
            for i in range(0, len(images), per_row)]
    return stack_rows(rows)


def write_summary(res: dict, out: str) -> None:
    (Path(out) / "samples.json").write_text(json.dumps(res, indent=2, default=str))
