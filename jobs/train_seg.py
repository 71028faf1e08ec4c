"""``genseg train seg``: FCN training on Ray Train with MLflow tracking and resume.

The worker loop only wires shards, the plain step functions of ``genseg.engine``, checkpoints
and ``ray.train.report``.  Re-running with the same ``--run-name`` continues the same Ray Train
run (from its latest checkpoint) and the same MLflow run.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from genseg import checkpoint as ckpt_lib
from genseg import config as config_lib
from genseg import engine
from genseg.config import SegConfig
from genseg.data.shards import read_manifest
from genseg.models import build_segmenter
from genseg.viz import stack_rows, triptych

EXPERIMENT = "genseg-seg"
MODEL_NAME = "genseg-segmenter"


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg = config_lib.from_dict(SegConfig, loop_config["cfg"])
    rt = loop_config["runtime"]
    for name in ("ray.train", "ray.data"):   # per-report INFO lines drown the epoch summaries
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    rng = engine.set_seed(cfg.seed + 1000 * rank)
    device = ray.train.torch.get_device()

    model = build_segmenter(cfg)
    optimizer = engine.make_optimizer(model, cfg)
    scheduler = engine.make_scheduler(optimizer, cfg.schedule, cfg.epochs, cfg.warmup_epochs,
                                       rt["steps_per_epoch"])
    start_epoch, best = 0, float("-inf")
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            ck = ckpt_lib.load(d)
            model.load_state_dict(ck.state_dict)
            state = ckpt_lib.load_train_state(d)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best = state["epoch"] + 1, ck.meta.get("best_miou", best)
    model = ray.train.torch.prepare_model(model)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None

    mlflow_client = None
    if rank == 0 and rt.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=rt["tracking_uri"])

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    crop = tuple(rt["crop"])
    for epoch in range(start_epoch, cfg.epochs):
        batches = engine.train_batches(
            train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=4 * cfg.batch_size,
                                     local_shuffle_seed=cfg.seed + epoch * 7919 + rank),
            cfg, crop, rng)
        stats = engine.train_one_epoch(model, optimizer, scheduler, batches, cfg, device, scaler,
                                       max_steps=rt["steps_per_epoch"])
        t0 = time.perf_counter()
        samples = engine.eval_samples(val_shard.iter_batches(batch_size=8, batch_format="numpy"), rank, world)
        cm, kept = engine.evaluate(model, samples, cfg.num_classes, cfg.ignore_index, cfg.infer_scale,
                                   device, cfg.amp, keep=3 if rank == 0 else 0)
        cm.reduce()
        val = cm.compute()
        loss = _mean_over_workers(stats["train_loss"], device)
        best = max(best, val["miou"])
        metrics = {"epoch": epoch, "train_loss": loss, "val_miou": val["miou"],
                   "val_pixel_acc": val["pixel_acc"], "val_mean_acc": val["mean_acc"],
                   "lr": stats["lr"], "samples_per_s": stats["samples"] * world / max(stats["seconds"], 1e-9),
                   "epoch_seconds": stats["seconds"], "val_seconds": time.perf_counter() - t0,
                   "best_miou": best}
        if rank != 0:
            ray.train.report(metrics)
            continue
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, val mIoU {100 * val['miou']:.2f}, "
              f"pixel acc {100 * val['pixel_acc']:.2f} ({stats['seconds']:.1f}s train, "
              f"{metrics['samples_per_s']:.1f} img/s)", flush=True)
        if mlflow_client is not None:
            _log_epoch(mlflow_client, rt, cfg, epoch, metrics, val, kept)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_lib.save(Path(tmp) / "ckpt", model, cfg, epoch=epoch,
                          metrics={k: v for k, v in metrics.items()}, classes=rt["classes"],
                          optimizer=optimizer, scheduler=scheduler,
                          extra_meta={"best_miou": best, "val": val})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(Path(tmp) / "ckpt")))


def _mean_over_workers(value: float, device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def _log_epoch(client, rt: dict, cfg: SegConfig, epoch: int, metrics: dict, val: dict, kept) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if np.isfinite(v)]
    names = rt["classes"]["names"]
    ms += [Metric(f"val_iou_{names[i]}", v, now, epoch) for i, v in enumerate(val["iou"]) if np.isfinite(v)]
    client.log_batch(rt["mlflow_run_id"], metrics=ms)
    if kept and (epoch % max(1, cfg.image_every) == 0 or epoch == cfg.epochs - 1):
        palette = rt["classes"]["palette"]
        picture = stack_rows([triptych(img, mask, pred, palette, cfg.ignore_index) for img, mask, pred in kept])
        client.log_image(rt["mlflow_run_id"], picture, f"pictures/epoch_{epoch:03d}.png")


MODEL_FIELDS = ("arch", "backbone", "width", "upsample", "num_classes")


def _check_resumable(run_dir: Path, cfg: SegConfig, run_name: str) -> None:
    """A re-run continues the saved weights, so the model it builds must be the same one."""
    latest = sorted(run_dir.glob("checkpoint_*"))
    if not latest:
        return
    try:
        saved = ckpt_lib.load(latest[-1]).config
    except ckpt_lib.CheckpointError:
        return
    diff = {f: (getattr(saved, f), getattr(cfg, f)) for f in MODEL_FIELDS if getattr(saved, f) != getattr(cfg, f)}
    if diff:
        desc = ", ".join(f"{f}: {a!r} -> {b!r}" for f, (a, b) in diff.items())
        raise config_lib.ConfigError(f"run '{run_name}' exists with a different model ({desc}); "
                                     f"resume it with the same settings or pick a new --run-name")


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
    elif base.class_weights is not None:
        over["class_weights"] = base.class_weights
    return config_lib.replace(base, over)


def run(data: str, cfg: SegConfig, rt, *, workers: int = 2, gpu: bool = False, run_name: str | None = None,
        max_failures: int = 0, class_weights: str | None = None, cpus_per_worker: float = 1.0,
        register: bool = True, log=print) -> dict:
    """Driver side: build the trainer, fit, then log/register the result.  Returns a summary."""
    from genseg import tracking

    data_dir = Path(data).resolve()
    manifest = read_manifest(data_dir)
    for split in ("train", "val"):
        if split not in manifest["splits"]:
            raise config_lib.ConfigError(f"{data_dir} has no '{split}' split (has: {', '.join(manifest['splits'])})")
    cfg = build_config(manifest, cfg, class_weights)
    crop = cfg.crop or manifest.get("size")
    if crop is None:
        raise config_lib.ConfigError(f"{data_dir} holds images of several sizes; set a training crop (--set crop=HxW)")
    n_train = manifest["splits"]["train"]["count"]
    per_worker = n_train // workers
    if per_worker < cfg.batch_size:
        raise config_lib.ConfigError(
            f"{n_train} training images over {workers} workers is fewer than batch_size={cfg.batch_size} "
            f"per worker; lower --batch-size or --workers")
    steps_per_epoch = per_worker // cfg.batch_size
    run_name = run_name or f"seg-{time.strftime('%Y%m%d-%H%M%S')}"

    _check_resumable(rt.workdir / "ray" / run_name, cfg, run_name)
    tracking.setup(rt.workdir, rt.tracking_uri)
    exp_id = tracking.experiment_id(EXPERIMENT, rt.workdir)
    params = {**config_lib.asdict(cfg), "data": str(data_dir), "workers": workers, "gpu": gpu}
    run_id, resumed = tracking.start_or_resume_run(exp_id, run_name, params, tags={"genseg.job": "train seg"})
    log(f"{'resuming' if resumed else 'starting'} run '{run_name}' (MLflow run {run_id}), "
        f"{workers} worker(s), {steps_per_epoch} steps/epoch, crop {crop[0]}x{crop[1]}")

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": config_lib.asdict(cfg), "runtime": {
            "steps_per_epoch": steps_per_epoch, "crop": list(crop), "classes": manifest["classes"],
            "mlflow_run_id": run_id, "tracking_uri": rt.tracking_uri}},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=str(rt.workdir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_miou",
                                               checkpoint_score_order="max")),
        datasets={"train": ray.data.read_parquet(str(data_dir / "train")),
                  # val is small and read whole by every worker each epoch: keep it in memory
                  "val": ray.data.read_parquet(str(data_dir / "val")).materialize()},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    if result.error:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run '{run_name}' failed: {result.error}")

    final = result.checkpoint
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_miou", float("-inf")))
    out = rt.workdir / "runs" / run_name
    with final.as_directory() as d:
        final_ck = ckpt_lib.load(d)
        client.log_artifacts(run_id, d, "checkpoint")
    with best_ckpt.as_directory() as d:
        client.log_artifacts(run_id, d, "best_checkpoint")
        import shutil

        shutil.rmtree(out / "best", ignore_errors=True)
        shutil.copytree(d, out / "best")
    summary = {"run_name": run_name, "mlflow_run_id": run_id, "resumed": resumed,
               "final_epoch": final_ck.epoch, "best_epoch": int(best_metrics["epoch"]),
               "best_val_miou": best_metrics["val_miou"], "final_metrics": final_ck.meta.get("metrics"),
               "best_checkpoint": str(out / "best"), "tracking_uri": rt.tracking_uri}
    run = client.get_run(run_id)
    done_epoch = run.data.tags.get("genseg.registered_epoch")
    if register and done_epoch != str(final_ck.epoch):
        summary["registered"] = tracking.register(run_id, "best_checkpoint", MODEL_NAME, "val_miou",
                                                  float(best_metrics["val_miou"]))
        client.set_tag(run_id, "genseg.registered_epoch", str(final_ck.epoch))
    client.set_terminated(run_id, status="FINISHED")
    return summary
