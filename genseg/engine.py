"""Segmentation training and evaluation as plain functions (no Ray in here).

The Ray Train worker loop in ``jobs/train_seg.py`` wires data, these steps, checkpoints and
``ray.train.report``; a plain-PyTorch script or a test can call the same functions.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from genseg import rng as rng_lib
from genseg.data.shards import COLUMNS, decode_batch
from genseg.data.transforms import mix_batch, to_tensors, train_transforms
from genseg.errors import InputError
from genseg.losses import get_loss
from genseg.metrics import ConfusionMatrix

# ---------------------------------------------------------------- optimisation registries

OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=0.9,
                                               weight_decay=cfg.weight_decay, nesterov=True),
}

SCHEDULES: dict[str, Callable[[float], float]] = {   # progress in [0, 1] -> LR factor
    "poly": lambda p: (1 - min(p, 1.0)) ** 0.9,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * min(p, 1.0))),
    "constant": lambda p: 1.0,
}


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)


def make_scheduler(optimizer, schedule: str, epochs: int, warmup_epochs: float, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR factor; total steps come from ``epochs`` so resuming with more epochs
    stretches the schedule instead of restarting it."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)
    shape = SCHEDULES[schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return shape((step - warmup) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(cfg) -> torch.Tensor | None:
    return torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None


# ---------------------------------------------------------------- data

def train_batches(batches: Iterable[dict], cfg, crop: tuple[int, int], rng: random.Random
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Columnar shard batches -> augmented ``images (B, 3, h, w)``, ``masks (B, h, w)``: each sample
    transformed alone, then (``cfg.mix``) mixed with the next one of its batch."""
    tf = train_transforms(crop, cfg.scale_min, cfg.scale_max, cfg.hflip, cfg.ignore_index,
                          cfg.jitter, cfg.gamma, cfg.blur)
    for batch in batches:
        pairs = [tf(*to_tensors(img, mask), rng) for img, mask in decode_batch(batch)]
        images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        yield mix_batch(images, masks, cfg.mix, cfg.mix_p, rng, cfg.ignore_index)


def epoch_batches(batches: Iterable[dict], names: list[str], seed: int, epoch: int, rank: int, world: int,
                  batch_size: int, steps: int) -> Iterator[dict]:
    """This worker's batches of one epoch, in a fresh order seeded by ``(seed, epoch)``.

    ``names`` are the row names of the whole training split, sorted; ``batches`` stream every row
    of it, in any order (Ray Data's block order does not matter: rows are matched by name).  The
    epoch's permutation of ``names`` is dealt round-robin to the ``world`` workers, so each epoch
    mixes rows across files and workers, and the same ``(seed, epoch)`` gives the same batches
    with or without a resume in between.  Only this worker's ``steps * batch_size`` rows are
    kept in memory; the rows left over this epoch differ from epoch to epoch."""
    order = rng_lib.epoch_permutation(len(names), seed, epoch)[rank::world][: steps * batch_size]
    slot = {names[i]: j for j, i in enumerate(order)}
    rows: list[dict | None] = [None] * len(order)
    for batch in batches:
        for i, name in enumerate(batch["name"]):
            j = slot.get(str(name))
            if j is not None:
                rows[j] = {k: batch[k][i] for k in COLUMNS if k in batch}
    missing = [names[i] for i, r in zip(order, rows) if r is None]
    if missing:
        raise RuntimeError(f"{len(missing)} training row(s) were not delivered (e.g. {missing[0]!r}); "
                           f"did the shard directory change during training?")
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[start: start + batch_size]
        yield {k: [r[k] for r in chunk] for k in COLUMNS if k in chunk[0]}


def eval_samples(batches: Iterable[dict], rank: int = 0, world: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every ``world``-th sample (offset ``rank``) as ``(image (3, H, W), mask (H, W))``."""
    i = 0
    for batch in batches:
        for img, mask in decode_batch(batch):
            if i % world == rank:
                yield to_tensors(img, mask)
            i += 1


# ---------------------------------------------------------------- steps

def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA (``amp`` = bf16 | fp16 | none); a no-op elsewhere.  fp16 needs a
    GradScaler in the step (bf16 has fp32's exponent range and does not)."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise InputError(f"amp=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --set amp=fp16 (or amp=none)")
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def backward_step(loss: torch.Tensor, optimizer, scaler: "torch.amp.GradScaler | None" = None) -> None:
    """Zero the gradients, backpropagate ``loss`` and step (through ``scaler`` for fp16)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(model, optimizer, scheduler, batches: Iterable, cfg, device: torch.device,
                    scaler: "torch.amp.GradScaler | None" = None, max_steps: int | None = None) -> dict:
    """One pass over ``batches``; returns mean loss, samples, seconds, the seconds spent waiting
    for the next batch (``data_seconds``: reading, decoding, augmenting) and the last LR."""
    model.train()
    loss_fn = get_loss(cfg.loss)
    weight = class_weights(cfg)
    total, samples, steps, waited = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    batches = iter(batches)
    while max_steps is None or steps < max_steps:
        t = time.perf_counter()
        try:
            images, masks = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - t
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = model(images)
        loss = loss_fn(logits.float(), masks, weight, cfg.ignore_index)
        backward_step(loss, optimizer, scaler)
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * images.shape[0]
        samples += images.shape[0]
        steps += 1
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(1, samples), "samples": samples, "steps": steps,
            "seconds": seconds, "data_seconds": waited, "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def predict_logits(model, image: torch.Tensor, out_size: tuple[int, int], infer_scale: float = 1.0,
                   device: torch.device | str = "cpu", amp: str = "none", flip: bool = False,
                   scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """``image (B, 3, H, W)`` -> logits ``(B, K, *out_size)``.

    The model runs at ``infer_scale`` times the image size; the *logits* are resized to the
    label's own size before any argmax (the evaluation protocol).  Test-time augmentation: each
    of ``scales`` (times ``infer_scale``) and, with ``flip``, the mirrored input too, whose logits
    are mirrored back; all of them are averaged in logit space at ``out_size``."""
    device = torch.device(device)
    x0 = image.to(device)
    total, n = None, 0
    for scale in scales:
        s = infer_scale * scale
        x = x0
        if s != 1.0:
            h, w = x0.shape[-2:]
            x = F.interpolate(x0, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                              align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            with autocast(device, amp):
                logits = model(x.flip(-1) if mirrored else x)
            logits = logits.float()
            if mirrored:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != tuple(out_size):
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            n += 1
    return total if n == 1 else total / n


@torch.no_grad()
def evaluate(model, samples: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
             ignore_index: int = 255, infer_scale: float = 1.0, device="cpu", amp: str = "none",
             keep: int = 0, flip: bool = False, scales: tuple[float, ...] = (1.0,)) -> tuple[ConfusionMatrix, list]:
    """Accumulate a confusion matrix over ``(image (3, H, W), mask (H, W))`` samples (``flip`` and
    ``scales``: test-time augmentation, see :func:`predict_logits`).

    Returns the (local, un-reduced) matrix and the first ``keep`` (image, mask, pred) triples
    for pictures."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    kept = []
    for image, mask in samples:
        logits = predict_logits(model, image[None], tuple(mask.shape), infer_scale, device, amp, flip, scales)
        pred = logits.argmax(1)[0].cpu()
        cm.update(pred, mask)
        if len(kept) < keep:
            kept.append((image, mask, pred))
    return cm, kept


def set_seed(seed: int, rank: int = 0) -> random.Random:
    """Seed the global generators for worker ``rank`` and return its augmentation generator.

    Seeds are derived from ``(seed, rank)`` by hashing (:mod:`genseg.rng`), never by adding the
    rank, so no two (seed, rank) pairs share a stream."""
    rng_lib.seed_globals(seed, rank)
    return rng_lib.python_rng(seed, rank, "augment")
