"""CamVid segmentation benchmark: prepare -> train (Ray Train) -> eval at 360x480.

    .venv/bin/python bench/camvid_seg.py --root ../shared/data/camvid [--epochs 100] [--workers 2]
    .venv/bin/python bench/camvid_seg.py --root ../shared/data/camvid --holdout 0006R0 --select-on holdout \
        --workdir bench/runs/camvid-holdout --tag _holdout

With ``--holdout SEQ`` the training frames of that sequence become a split the model never trains on
(CamVid's val is all sequence 0016E5, like 204 of the training frames, so val flatters); both are
scored every epoch.  The report gives, for val and for holdout, the checkpoint picked by
``--select-on`` and the last epoch, per class, with flip test-time augmentation beside the plain
figure, plus the curves of both splits and a picture of holdout frames (image | truth | prediction |
error map).  Writes bench/results/camvid_seg<tag>.json, camvid_miou_curve<tag>.png and
camvid_holdout<tag>.png.  Everything runs through the public CLI, so the figures are what a user gets.
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
    ap.add_argument("--holdout", help="CamVid sequence(s) whose training frames become the holdout split")
    ap.add_argument("--select-on", default="val", help="the split that picks the best checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config overrides")
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
                     "--out", str(shards), "--workdir", str(wd)] + (["--holdout", args.holdout] if args.holdout else []))
    train = [GENSEG, "train", "seg", "--data", str(shards), "--config", args.config, "--workers", str(args.workers),
             "--class-weights", args.class_weights, "--run-name", args.run_name, "--workdir", str(wd),
             "--json", str(wd / "train_summary.json"), "--select-on", args.select_on]
    for kv in args.set:
        train += ["--set", kv]
    if args.epochs:
        train += ["--epochs", str(args.epochs)]
    t_train = sh(train)
    summary = json.loads((wd / "train_summary.json").read_text())
    splits = ["val"] + (["holdout"] if (shards / "holdout").is_dir() else [])

    # the checkpoint --select-on picked and the last one, on every split, plain and with flip TTA
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    import shutil
    import tempfile

    final_dir = wd / "final_checkpoint"        # this run's last checkpoint, fetched afresh every time
    shutil.rmtree(final_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=wd) as tmp:
        client.download_artifacts(summary["mlflow_run_id"], "checkpoint", tmp)
        shutil.move(str(Path(tmp) / "checkpoint"), str(final_dir))
    t_eval = 0.0
    evals: dict = {}
    for label, ckpt in (("selected", summary["best_checkpoint"]), ("last", str(final_dir))):
        for split in splits:
            for tta in (False, True):
                out = wd / f"eval_{label}_{split}{'_flip' if tta else ''}.json"
                cmd = [GENSEG, "eval", "seg", "--model", ckpt, "--data", str(shards), "--split", split,
                       "--json", str(out), "--workdir", str(wd)]
                if tta:
                    cmd.append("--tta-flip")
                if split == "holdout" and label == "selected" and not tta:
                    cmd += ["--pictures", str(res_dir / f"camvid_holdout{args.tag}.png"), "--pictures-num", "4"]
                t_eval += sh(cmd)
                evals[f"{label}_{split}{'_flip' if tta else ''}"] = json.loads(out.read_text())
    ev = evals["selected_val"]

    # per-epoch curves of every scored split from the MLflow run
    hist = {split: sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"],
                                                                                f"{split}_miou"))
            for split in splits}
    secs = sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], "epoch_seconds"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for split, h in hist.items():
        label = "val (0016E5, seen in training)" if split == "val" and len(splits) > 1 else split
        if split == "holdout":
            label = f"holdout ({args.holdout}, never trained on)"
        ax.plot([s + 1 for s, _ in h], [100 * v for _, v in h], label=label)
    for name, v in (("SegNet-Basic 46.4", 46.4), ("ENet 51.3", 51.3)):
        ax.axhline(v, ls="--", lw=0.8, color="grey")
        ax.text(1, v + 0.5, name, fontsize=7, color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("CamVid mIoU per epoch (360x480, void ignored)")
    ax.legend(fontsize=7)
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
        "select_on": args.select_on, "holdout": args.holdout, "overrides": args.set,
        "splits": {k: {"miou": v["miou"], "pixel_acc": v["pixel_acc"], "mean_acc": v["mean_acc"],
                       "images": v["images"], "per_class_iou": v["per_class_iou"]} for k, v in evals.items()},
        "train_wall_s": round(t_train, 1),
        "train_epoch_s_median": sorted(v for _, v in secs)[len(secs) // 2] if secs else None,
        "prepare_wall_s": None if t_prep is None else round(t_prep, 1),
        "eval_wall_s": round(t_eval, 1),
        "val_miou": ev["miou"], "val_pixel_acc": ev["pixel_acc"], "val_mean_acc": ev["mean_acc"],
        "val_per_class_iou": ev["per_class_iou"],
        "last_epoch_val_miou": hist["val"][-1][1] if hist["val"] else None,   # selection on val is optimistic
        "miou_curve": [[s + 1, v] for s, v in hist["val"]],
        "curves": {split: [[s + 1, v] for s, v in h] for split, h in hist.items()},
        "protocol": ev["protocol"],
    }
    (res_dir / f"camvid_seg{args.tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("epochs", "best_epoch", "train_wall_s", "val_miou", "last_epoch_val_miou",
                                             "val_pixel_acc")}, indent=2))
    for k, v in evals.items():
        print(f"{k:24} mIoU {100 * v['miou']:.2f}  pixel acc {100 * v['pixel_acc']:.2f}")


if __name__ == "__main__":
    main()
