"""``genseg train seg``: FCN training on Ray Train (the loop) over the shared runner.

The worker loop only wires shards, the plain step functions of ``genseg.engine``, checkpoints
and ``ray.train.report``; the runner does resume, tracking and registration.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from genseg import config as config_lib
from genseg import engine
from genseg.config import SegConfig
from genseg.data.shards import read_manifest
from genseg.models import build_segmenter
from genseg.viz import stack_rows, triptych
from jobs import runner


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    s = runner.WorkerSession(loop_config, SegConfig)
    cfg, rt = s.cfg, s.rt
    rng = engine.set_seed(cfg.seed, s.rank)          # global generators + this worker's augmentation stream
    # on the device before the optimizer exists: restored optimizer state then lands beside the weights
    model = build_segmenter(cfg).to(s.device)
    optimizer = engine.make_optimizer(model, cfg)
    scheduler = engine.make_scheduler(optimizer, cfg.schedule, cfg.epochs, cfg.warmup_epochs, rt["steps_per_epoch"])
    scaler = torch.amp.GradScaler("cuda") if s.device.type == "cuda" and cfg.amp == "fp16" else None
    rngs = {"augment": rng}
    start_epoch, meta = s.restore(model, {"model": optimizer}, {"model": scheduler}, rngs=rngs, scaler=scaler)
    best = meta.get("best_miou", float("-inf"))
    model = ray.train.torch.prepare_model(model)
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.epochs):
        batches = engine.train_batches(s.epoch_batches(epoch, cfg.batch_size), cfg, tuple(rt["crop"]), rng)
        stats = engine.train_one_epoch(model, optimizer, scheduler, batches, cfg, s.device, scaler,
                                       max_steps=rt["steps_per_epoch"])
        t0 = time.perf_counter()
        samples = engine.eval_samples(val_shard.iter_batches(batch_size=8, batch_format="numpy"), s.rank, s.world)
        cm, kept = engine.evaluate(model, samples, cfg.num_classes, cfg.ignore_index, cfg.infer_scale,
                                   s.device, cfg.amp, keep=3 if s.rank == 0 else 0)
        cm.reduce()
        val = cm.compute()
        best = max(best, val["miou"])
        metrics = {"epoch": epoch, "train_loss": s.mean(stats["train_loss"]), "val_miou": val["miou"],
                   "val_pixel_acc": val["pixel_acc"], "val_mean_acc": val["mean_acc"], "lr": stats["lr"],
                   "samples_per_s": stats["samples"] * s.world / max(stats["seconds"], 1e-9),
                   "epoch_seconds": stats["seconds"], "data_wait_seconds": stats["data_seconds"],
                   "val_seconds": time.perf_counter() - t0, "best_miou": best}
        if s.rank == 0:
            s.say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f}, val mIoU "
                  f"{100 * val['miou']:.2f}, pixel acc {100 * val['pixel_acc']:.2f} ({stats['seconds']:.1f}s train, "
                  f"{metrics['samples_per_s']:.1f} img/s)")
            names = rt["classes"]["names"]
            per_class = {f"val_iou_{names[i]}": v for i, v in enumerate(val["iou"])}
            picture = None
            if kept and (epoch % max(1, cfg.image_every) == 0 or epoch == cfg.epochs - 1):
                palette = rt["classes"]["palette"]
                picture = stack_rows([triptych(i, m, p, palette, cfg.ignore_index) for i, m, p in kept])
            s.log(epoch, {**metrics, **per_class}, picture, f"pictures/epoch_{epoch:03d}.png")
        s.report(epoch, metrics, model, {"model": optimizer}, {"model": scheduler},
                 meta={"best_miou": best, "val": val, "train_size": rt.get("data_size")}, rngs=rngs, scaler=scaler)


def median_frequency_weights(manifest: dict) -> tuple[float, ...]:
    """SegNet's median-frequency balancing from the shard's class pixel histogram."""
    freq = np.asarray(manifest["class_pixels"], dtype=np.float64)
    freq = freq / max(freq.sum(), 1)
    present = freq > 0
    med = np.median(freq[present]) if present.any() else 1.0
    w = np.where(present, med / np.where(present, freq, 1), 0.0)
    return tuple(round(float(v), 4) for v in w)


def build_config(manifest: dict, base: SegConfig, class_weights: str | None) -> SegConfig:
    over = {"num_classes": manifest["num_classes"], "ignore_index": manifest["ignore_index"]}
    if class_weights == "median-freq":
        over["class_weights"] = median_frequency_weights(manifest)
    elif class_weights == "dataset":
        w = manifest["classes"].get("weights")
        if not w:
            raise config_lib.ConfigError("--class-weights dataset: the shard's class spec has no suggested weights")
        over["class_weights"] = tuple(w)
    elif class_weights not in (None, "none"):
        over["class_weights"] = class_weights
    return config_lib.replace(base, over)


TASK = runner.Task(name="seg", experiment="genseg-seg", model_name="genseg-segmenter", score="val_miou",
                   higher_is_better=True, loop=train_loop,
                   model_fields=("arch", "backbone", "width", "upsample", "num_classes"))


def run(data: str, cfg: SegConfig, rt, *, workers: int = 2, gpu: bool = False, run_name: str | None = None,
        max_failures: int = 0, class_weights: str | None = None, cpus_per_worker: float = 1.0,
        register: bool = True, promote: bool = False, log=print, **kw) -> dict:
    data_dir = Path(data).resolve()
    manifest = read_manifest(data_dir)
    runner.check_splits(data_dir, manifest)
    cfg = build_config(manifest, cfg, class_weights)
    crop = cfg.crop or manifest.get("size")
    if crop is None:
        raise config_lib.ConfigError(f"{data_dir} holds images of several sizes; set a training crop (--set crop=HxW)")
    steps = runner.steps_per_epoch(manifest["splits"]["train"]["count"], workers, cfg.batch_size)
    runtime = {"steps_per_epoch": steps, "crop": list(crop), "data_size": manifest.get("size"),
               "train_names": runner.train_names(data_dir)}
    summary = runner.run(TASK, data_dir, manifest, cfg, rt, runtime,
                         workers=workers, gpu=gpu, run_name=run_name or f"seg-{time.strftime('%Y%m%d-%H%M%S')}",
                         max_failures=max_failures, cpus_per_worker=cpus_per_worker, register=register,
                         promote=promote, log=log, **kw)
    summary["best_val_miou"] = summary["best_score"]
    return summary
