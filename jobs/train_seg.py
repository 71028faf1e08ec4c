"""``genseg train seg``: FCN training on Ray Train (the loop) over the shared runner.

The worker loop only wires shards, the plain step functions of ``genseg.engine``, checkpoints
and ``ray.train.report``; the runner does resume, tracking and registration.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from genseg import config as config_lib
from genseg import engine
from genseg.config import SegConfig
from genseg.data.shards import read_manifest
from genseg.data.weighting import (WEIGHTINGS, inverse_sqrt_weights,  # noqa: F401 (re-exported)
                                   median_frequency_weights, parse_class_weights)
from genseg.models import build_segmenter
from genseg.viz import quad, stack_rows
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
    # the best so far on cfg.select_on; a resume that selects on another split starts its best afresh
    best = meta.get("best_miou", float("-inf")) if meta.get("select_on", "val") == cfg.select_on else float("-inf")
    model = ray.train.torch.prepare_model(model)
    splits = rt.get("eval_splits") or ["val"]          # val first, then e.g. holdout
    shards = {split: ray.train.get_dataset_shard(split) for split in splits}

    for epoch in range(start_epoch, cfg.epochs):
        batches = engine.train_batches(s.epoch_batches(epoch, cfg.batch_size), cfg, tuple(rt["crop"]), rng)
        stats = engine.train_one_epoch(model, optimizer, scheduler, batches, cfg, s.device, scaler,
                                       max_steps=rt["steps_per_epoch"])
        t0 = time.perf_counter()
        scores, kept = {}, {}
        for split, shard in shards.items():
            samples = engine.eval_samples(shard.iter_batches(batch_size=8, batch_format="numpy"), s.rank, s.world)
            cm, kept[split] = engine.evaluate(model, samples, cfg.num_classes, cfg.ignore_index, cfg.infer_scale,
                                              s.device, cfg.amp, keep=3 if s.rank == 0 else 0)
            cm.reduce()
            scores[split] = cm.compute()
        val = scores["val"]
        best = max(best, scores[cfg.select_on]["miou"])
        metrics = {"epoch": epoch, "train_loss": s.mean(stats["train_loss"]), "lr": stats["lr"],
                   "samples_per_s": stats["samples"] * s.world / max(stats["seconds"], 1e-9),
                   "epoch_seconds": stats["seconds"], "data_wait_seconds": stats["data_seconds"],
                   "val_seconds": time.perf_counter() - t0, "best_miou": best}
        for split, sc in scores.items():
            metrics.update({f"{split}_miou": sc["miou"], f"{split}_pixel_acc": sc["pixel_acc"],
                            f"{split}_mean_acc": sc["mean_acc"]})
        if s.rank == 0:
            others = "".join(f", {split} mIoU {100 * sc['miou']:.2f}" for split, sc in scores.items() if split != "val")
            s.say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f}, val mIoU "
                  f"{100 * val['miou']:.2f}, pixel acc {100 * val['pixel_acc']:.2f}{others} ({stats['seconds']:.1f}s "
                  f"train, {metrics['samples_per_s']:.1f} img/s)")
            names = rt["classes"]["names"]
            per_class = {f"{split}_iou_{names[i]}": v for split, sc in scores.items() for i, v in enumerate(sc["iou"])}
            palette = rt["classes"]["palette"]
            picture_epoch = epoch % max(1, cfg.image_every) == 0 or epoch == cfg.epochs - 1
            pictures = {split: stack_rows([quad(i, m, p, palette, cfg.ignore_index) for i, m, p in k])
                        for split, k in kept.items() if k and picture_epoch}
            s.log(epoch, {**metrics, **per_class}, pictures.get("val"), f"pictures/epoch_{epoch:03d}.png")
            for split, picture in pictures.items():      # image | truth | prediction | error map
                if split != "val":
                    s.log_picture(picture, f"pictures/{split}_epoch_{epoch:03d}.png")
        s.report(epoch, metrics, model, {"model": optimizer}, {"model": scheduler},
                 meta={"best_miou": best, "val": val, "scores": scores, "select_on": cfg.select_on,
                       "train_size": rt.get("data_size")}, rngs=rngs, scaler=scaler)


def build_config(manifest: dict, base: SegConfig, class_weights: str | None) -> SegConfig:
    """The config completed from the shards: class count, ignore index and the class weights that
    ``class_weights`` names (none | median-freq | inv-sqrt | dataset, each optionally ``:CAP``).

    A weighting given here replaces the base config's weights, ``none`` included (uniform: a Tune
    trial of ``class_weights: none`` over a base run with ``--class-weights inv-sqrt``); ``None``
    keeps them."""
    over = {"num_classes": manifest["num_classes"], "ignore_index": manifest["ignore_index"]}
    name, cap = parse_class_weights(class_weights)
    w = None
    if name == "none":
        over["class_weights"] = None
    elif name == "median-freq":
        w = median_frequency_weights(manifest)
    elif name == "inv-sqrt":
        w = inverse_sqrt_weights(manifest)
    elif name == "dataset":
        w = manifest["classes"].get("weights")
        if not w:
            raise config_lib.ConfigError("--class-weights dataset: the shard's class spec has no suggested weights")
        w = tuple(w)
    elif name not in (None, "none"):
        over["class_weights"] = name
    if w is not None:
        over["class_weights"] = tuple(min(float(v), cap) for v in w) if cap else w
    return config_lib.replace(base, over)


TASK = runner.Task(name="seg", experiment="genseg-seg", model_name="genseg-segmenter", score="val_miou",
                   higher_is_better=True, loop=train_loop,
                   model_fields=("arch", "backbone", "width", "norm", "upsample", "num_classes"))


def task_for(cfg: SegConfig) -> runner.Task:
    """The task whose score is the mIoU on ``cfg.select_on`` (val by default, e.g. holdout): it picks the
    best checkpoint, Tune's objective and the champion (which compares only scores on that split)."""
    if cfg.select_on == "val":
        return TASK
    import dataclasses

    return dataclasses.replace(TASK, score=f"{cfg.select_on}_miou", scored_on=lambda c: c.select_on)


def eval_splits(data_dir: Path, manifest: dict, cfg: SegConfig) -> list[str]:
    """val, then every other split but train and test (e.g. holdout): each is scored every epoch.  The
    split ``cfg.select_on`` names must be one of them (test never is: it is scored once, at the end)."""
    splits = ["val"] + sorted(s for s in manifest["splits"] if s not in ("train", "val", "test"))
    if cfg.select_on == "test":
        raise config_lib.ConfigError("--select-on test: choosing a model on the test split spends it; select on "
                                     "val or a holdout split, and score test once with `genseg eval seg --split test`")
    if cfg.select_on not in splits:
        raise config_lib.ConfigError(
            f"--select-on {cfg.select_on}: {data_dir} has no split {cfg.select_on!r} (its splits: "
            f"{', '.join(sorted(manifest['splits']))}); a holdout split comes from `genseg prepare --holdout SEQ`")
    return splits


def run(data: str, cfg: SegConfig, rt, *, workers: int = 2, gpu: bool = False, run_name: str | None = None,
        max_failures: int = 0, class_weights: str | None = None, cpus_per_worker: float = 1.0,
        register: bool = True, promote: bool = False, log=print, **kw) -> dict:
    data_dir = Path(data).resolve()
    manifest = read_manifest(data_dir)
    runner.check_splits(data_dir, manifest)
    cfg = build_config(manifest, cfg, class_weights)
    splits = eval_splits(data_dir, manifest, cfg)
    crop = cfg.crop or manifest.get("size")
    if crop is None:
        raise config_lib.ConfigError(f"{data_dir} holds images of several sizes; set a training crop (--set crop=HxW)")
    steps = runner.steps_per_epoch(manifest["splits"]["train"]["count"], workers, cfg.batch_size)
    runtime = {"steps_per_epoch": steps, "crop": list(crop), "data_size": manifest.get("size"),
               "train_names": runner.train_names(data_dir), "eval_splits": splits}
    summary = runner.run(task_for(cfg), data_dir, manifest, cfg, rt, runtime, eval_splits=tuple(splits[1:]),
                         workers=workers, gpu=gpu, run_name=run_name or f"seg-{time.strftime('%Y%m%d-%H%M%S')}",
                         max_failures=max_failures, cpus_per_worker=cpus_per_worker, register=register,
                         promote=promote, log=log, **kw)
    summary[f"best_{cfg.select_on}_miou"] = summary["best_score"]
    return summary
