"""Shard batches -> diffusion training tensors."""
from __future__ import annotations

import random

import numpy as np
import torch

from genseg.data.shards import LATENT, decode_batch
from genseg.data.transforms import resize_pair


def diffusion_batch(batch: dict, size: tuple[int, int], hflip: bool, rng: random.Random | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Columnar shard batch -> ``x0 (B, 3, H, W)`` in [-1, 1] and ``masks (B, H, W)`` int64,
    resized to ``size`` (bilinear / NEAREST) and flipped jointly when ``hflip``.

    Latent shards (codec ``latent``) give ``x0 (B, C, h, w)``, the scaled latents, with their label
    maps on the same grid; ``size`` must be that grid (latents are not resized).  Flipping a latent
    grid stands in for encoding the flipped image: the convolutional encoder is nearly, not exactly,
    flip-equivariant."""
    latent = "codec" in batch and len(batch["name"]) and str(batch["codec"][0]) == LATENT
    xs, ms = [], []
    for image, mask in decode_batch(batch):
        m = torch.from_numpy(np.array(mask)).long()
        if latent:
            x = torch.from_numpy(np.array(image))
            if tuple(x.shape[-2:]) != tuple(size):
                raise ValueError(f"latents of {tuple(x.shape[-2:])} cannot be resized to {tuple(size)}: a latent "
                                 f"model trains at its shards' latent grid")
        else:
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
            x, m = resize_pair(x, m, tuple(size))
        if hflip and rng is not None and rng.random() < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        xs.append(x)
        ms.append(m)
    return torch.stack(xs), torch.stack(ms)
