"""What Ray Train + Ray Data cost per epoch against a plain PyTorch loop doing the same training.

    .venv/bin/python bench/train_overhead.py --root ../shared/data/camvid [--epochs 4] [--size 180x240]

The same FCN-8s (compact, width 32), crop 176x240, batch 8, seed and epoch of CamVid train at
180x240, three ways:
  plain: one process, 2 torch threads, the split decoded once into in-memory uint8 tensors, the same
         seeded per-epoch permutation, `genseg.engine` transforms and `train_one_epoch`, then the same
         validation (`engine.evaluate`) over val;
  ray1:  `genseg train seg --workers 1` with 2 threads (batch 8);
  ray2:  `genseg train seg --workers 2` with 1 thread each (batch 4 each, 8 per step).
For every epoch: seconds in the training loop, images/s, seconds waiting for the next batch
(measured inside the loop), validation seconds and the epoch's whole wall time (training start to
the next epoch's start: validation, MLflow logging and the checkpoint included).  The first epoch
is reported apart (worker start, first read); the rest are medians.

Writes bench/results/train_overhead.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
GENSEG = [sys.executable, "-m", "jobs.cli"]

SETTINGS = ["--set", "arch=fcn8s", "--set", "backbone=compact", "--set", "width=32", "--set", "crop=176x240",
            "--set", "upsample=learned", "--set", "loss=ce", "--set", "optimizer=adamw", "--set", "lr=0.002",
            "--set", "schedule=poly", "--set", "warmup_epochs=1", "--set", "image_every=1000"]


def prepare(root: str, size: str, out: Path, codec: str) -> None:
    if not (out / "manifest.json").exists():
        subprocess.run([*GENSEG, "prepare", "--source", "camvid", "--root", root, "--size", size, "--out", str(out),
                        "--codec", codec, "--workdir", str(out.parent)], check=True, cwd=ROOT)


def seg_config(shards: Path, epochs: int, batch: int, threads: int):
    from genseg import config as config_lib
    from genseg.config import SegConfig
    from genseg.data.shards import read_manifest
    from jobs.train_seg import build_config

    over = config_lib.parse_overrides([v for v in SETTINGS if v != "--set"])
    over.update({"epochs": str(epochs), "batch_size": str(batch), "threads_per_worker": str(threads)})
    cfg = config_lib.replace(SegConfig(), over)
    return build_config(read_manifest(shards), cfg, None)


def plain(shards: Path, epochs: int) -> list[dict]:
    """The reference: everything in one process, data decoded once, nothing but the loop per epoch."""
    import torch

    from genseg import engine
    from genseg import rng as rng_lib
    from genseg.data.shards import decode_batch
    from genseg.data.transforms import to_tensors, train_transforms
    from genseg.models import build_segmenter
    from pipelines.shards import iter_split

    cfg = seg_config(shards, epochs, 8, 2)
    torch.set_num_threads(2)
    rng = engine.set_seed(cfg.seed, 0)
    train = [(name, img, mask) for b in iter_split(shards, "train", 64)
             for name, (img, mask) in zip(b["name"], decode_batch(b))]
    train.sort(key=lambda r: r[0])
    data = [to_tensors(img, mask) for _, img, mask in train]
    val = [to_tensors(img, mask) for b in iter_split(shards, "val", 64) for img, mask in decode_batch(b)]
    model = build_segmenter(cfg)
    optimizer = engine.make_optimizer(model, cfg)
    steps = len(data) // cfg.batch_size
    scheduler = engine.make_scheduler(optimizer, cfg.schedule, cfg.epochs, cfg.warmup_epochs, steps)
    tf = train_transforms(tuple(cfg.crop), cfg.scale_min, cfg.scale_max, cfg.hflip, cfg.ignore_index)

    def batches(epoch):
        order = rng_lib.epoch_permutation(len(data), cfg.seed, epoch)[: steps * cfg.batch_size]
        for i in range(0, len(order), cfg.batch_size):
            pairs = [tf(*data[j], rng) for j in order[i: i + cfg.batch_size]]
            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    out = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        stats = engine.train_one_epoch(model, optimizer, scheduler, batches(epoch), cfg, torch.device("cpu"),
                                       max_steps=steps)
        t1 = time.perf_counter()
        engine.evaluate(model, iter(val), cfg.num_classes, cfg.ignore_index, cfg.infer_scale, torch.device("cpu"),
                        cfg.amp)
        t2 = time.perf_counter()
        out.append({"epoch": epoch, "train_s": stats["seconds"], "img_s": stats["samples"] / stats["seconds"],
                    "data_wait_s": stats["data_seconds"], "val_s": t2 - t1, "wall_s": t2 - t0})
        print(f"  plain epoch {epoch}: {out[-1]['train_s']:.1f} s train ({out[-1]['img_s']:.1f} img/s), "
              f"{out[-1]['data_wait_s']:.2f} s data wait, {out[-1]['val_s']:.1f} s val", flush=True)
    return out


def ray_run(shards: Path, work: Path, epochs: int, workers: int) -> tuple[list[dict], float]:
    """`genseg train seg` as a user runs it; per-epoch figures from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    batch, threads = (8, 2) if workers == 1 else (4, 1)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = f"overhead-w{workers}-{int(time.time())}"
    cmd = [*GENSEG, "train", "seg", "--data", str(shards), "--workers", str(workers), "--epochs", str(epochs),
           "--batch-size", str(batch), "--set", f"threads_per_worker={threads}", *SETTINGS, "--run-name", name,
           "--workdir", str(work), "--tracking-uri", uri]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "GENSEG_NUM_CPUS": "4"})
    total = time.perf_counter() - t
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("genseg-seg").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    hist = {k: {m.step: m for m in client.get_metric_history(run.info.run_id, k)}
            for k in ("epoch_seconds", "samples_per_s", "data_wait_seconds", "val_seconds", "val_miou")}
    out = []
    stamps = [hist["val_miou"][e].timestamp / 1000 for e in range(epochs)]
    for e in range(epochs):
        out.append({"epoch": e, "train_s": hist["epoch_seconds"][e].value, "img_s": hist["samples_per_s"][e].value,
                    "data_wait_s": hist["data_wait_seconds"][e].value, "val_s": hist["val_seconds"][e].value,
                    # whole epoch: from one epoch's metrics to the next's (validation, logging, checkpoint)
                    "wall_s": stamps[e] - stamps[e - 1] if e else None})
        print(f"  ray{workers} epoch {e}: {out[-1]['train_s']:.1f} s train ({out[-1]['img_s']:.1f} img/s), "
              f"{out[-1]['data_wait_s']:.2f} s data wait, {out[-1]['val_s']:.1f} s val"
              + (f", {out[-1]['wall_s']:.1f} s whole epoch" if e else ""), flush=True)
    return out, total


def summarize(epochs: list[dict]) -> dict:
    rest = epochs[1:]
    med = {k: statistics.median(e[k] for e in rest if e[k] is not None)
           for k in ("train_s", "img_s", "data_wait_s", "val_s", "wall_s") if any(e[k] is not None for e in rest)}
    return {"first_epoch": epochs[0], "median_after_first": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="CamVid root")
    ap.add_argument("--size", default="180x240")
    ap.add_argument("--codec", default="png")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--work", default=str(ROOT / "bench" / "runs" / "train_overhead"))
    ap.add_argument("--only", default="plain,ray1,ray2")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = work / f"shards_{args.size}_{args.codec}"
    prepare(args.root, args.size, shards, args.codec)
    res = {}
    for which in args.only.split(","):
        print(f"{which}:", flush=True)
        if which == "plain":
            res[which] = {"epochs": plain(shards, args.epochs)}
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"{which}-", dir=work))
            epochs, total = ray_run(shards, run_dir, args.epochs, int(which[3:]))
            res[which] = {"epochs": epochs, "command_wall_s": total}
            shutil.rmtree(run_dir, ignore_errors=True)
        res[which].update(summarize(res[which]["epochs"]))
    base = res.get("plain", {}).get("median_after_first")
    print("\n| setup | train s/epoch | img/s | data wait s/epoch | val s | whole epoch s | train vs plain |")
    print("|---|---|---|---|---|---|---|")
    for which, r in res.items():
        m = r["median_after_first"]
        ratio = f"{base['train_s'] / m['train_s']:.2f}" if base else "-"
        print(f"| {which} | {m['train_s']:.2f} | {m['img_s']:.1f} | {m['data_wait_s']:.2f} | {m['val_s']:.2f} | "
              f"{m.get('wall_s', float('nan')):.2f} | {ratio} |")
    import torch

    doc = {"machine": {"cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "date": datetime.date.today().isoformat()}, "args": vars(args), "results": res}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_overhead.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {RESULTS / 'train_overhead.json'}")


if __name__ == "__main__":
    main()
