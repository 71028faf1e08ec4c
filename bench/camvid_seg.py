"""CamVid segmentation benchmark: prepare -> train (Ray Train) -> eval on val at 360x480.

    .venv/bin/python bench/camvid_seg.py --root ../shared/data/camvid [--epochs 100] [--workers 2]

Writes bench/results/camvid_seg.json and bench/results/camvid_miou_curve.png.  Everything runs
through the public CLI, so the figures are what a user gets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENSEG = str(Path(sys.executable).parent / "genseg")


def sh(args: list[str]) -> float:
    print("$", " ".join(args), flush=True)
    t = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="CamVid root with train/ trainannot/ val/ valannot/")
    ap.add_argument("--workdir", default=str(HERE / "runs" / "camvid"))
    ap.add_argument("--config", default=str(HERE / "configs" / "camvid_fcn8s.yaml"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--class-weights", default="dataset")
    ap.add_argument("--run-name", default="camvid-fcn8s")
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--tag", default="", help="suffix for the result files (keeps earlier results)")
    args = ap.parse_args()
    wd = Path(args.workdir)
    shards = wd / "shards"
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)

    t_prep = None
    if not args.skip_prepare:
        t_prep = sh([GENSEG, "prepare", "--source", "camvid", "--root", args.root, "--splits", "train,val",
                     "--out", str(shards), "--workdir", str(wd)])
    train = [GENSEG, "train", "seg", "--data", str(shards), "--config", args.config, "--workers", str(args.workers),
             "--class-weights", args.class_weights, "--run-name", args.run_name, "--workdir", str(wd),
             "--json", str(wd / "train_summary.json")]
    if args.epochs:
        train += ["--epochs", str(args.epochs)]
    t_train = sh(train)
    summary = json.loads((wd / "train_summary.json").read_text())
    eval_json = wd / "eval_val.json"
    t_eval = sh([GENSEG, "eval", "seg", "--model", summary["best_checkpoint"], "--data", str(shards),
                 "--split", "val", "--json", str(eval_json), "--workdir", str(wd)])
    ev = json.loads(eval_json.read_text())

    # per-epoch curve from the MLflow run
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = MlflowClient()
    hist = sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], "val_miou"))
    secs = sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], "epoch_seconds"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([s + 1 for s, _ in hist], [100 * v for _, v in hist], label="genseg FCN-8s (compact, scratch)")
    for name, v in (("SegNet-Basic 46.4", 46.4), ("ENet 51.3", 51.3)):
        ax.axhline(v, ls="--", lw=0.8, color="grey")
        ax.text(1, v + 0.5, name, fontsize=7, color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("CamVid val mIoU per epoch (360x480, void ignored)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(res_dir / f"camvid_miou_curve{args.tag}.png")

    import torch

    result = {
        "benchmark": "camvid_seg",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "machine": {"cores": os.cpu_count(), "device": "cpu", "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": args.config,
        "workers": args.workers,
        "epochs": summary["final_epoch"] + 1,
        "best_epoch": summary["best_epoch"] + 1,
        "train_wall_s": round(t_train, 1),
        "train_epoch_s_median": sorted(v for _, v in secs)[len(secs) // 2] if secs else None,
        "prepare_wall_s": None if t_prep is None else round(t_prep, 1),
        "eval_wall_s": round(t_eval, 1),
        "val_miou": ev["miou"], "val_pixel_acc": ev["pixel_acc"], "val_mean_acc": ev["mean_acc"],
        "val_per_class_iou": ev["per_class_iou"],
        "last_epoch_val_miou": hist[-1][1] if hist else None,   # model selection on val is optimistic
        "miou_curve": [[s + 1, v] for s, v in hist],
        "protocol": ev["protocol"],
    }
    (res_dir / f"camvid_seg{args.tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("epochs", "best_epoch", "train_wall_s", "val_miou", "last_epoch_val_miou",
                                             "val_pixel_acc")}, indent=2))


if __name__ == "__main__":
    main()
