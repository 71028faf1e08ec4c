"""Markdown table of issue 14's recipe screen (bench/camvid_holdout_screen.sh) from its Tune summaries.

    .venv/bin/python bench/holdout_screen_table.py --workdir bench/runs/camvid-holdout \
        bench/results/tune_holdout_weights_loss.json bench/results/tune_holdout_schedule_seed.json ...

Per trial, from the trial's MLflow run: holdout mIoU at the last epoch, the mean of the last three
epochs (the curves swing by several points from epoch to epoch, so the last epoch alone is noisy),
the best epoch (what --select-on picks, an optimistic figure), and val at the last epoch.

With --add-to TABLE.json the rows of this call's searches join (or replace) those of an earlier
call's --out, for searches tracked to another MLflow store than the earlier ones:

    .venv/bin/python bench/holdout_screen_table.py --workdir bench/runs/camvid-holdout \
        bench/results/tune_holdout_classmix.json --add-to bench/results/tune_holdout_screen_table.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("summaries", nargs="+", help="--json files of `genseg tune seg`")
    ap.add_argument("--workdir", required=True, help="the searches' --workdir (its mlflow.db)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--add-to", help="an earlier --out: this call's rows replace those of the same searches "
                                     "in it, join the others, and the whole is written back")
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    from genseg.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(Path(args.workdir).resolve()))
    rows = []
    print("| search | trial | holdout, last | holdout, mean of last 3 | holdout, best (epoch) | val, last |")
    print("|---|---|---|---|---|---|")
    for path in args.summaries:
        doc = json.loads(Path(path).read_text())
        for stage in doc["stages"].values():
            for t in stage["trials"]:
                hist = {k: [m.value for m in sorted(client.get_metric_history(t["mlflow_run_id"], k),
                                                    key=lambda m: m.step)]
                        for k in ("holdout_miou", "val_miou")}
                h = hist["holdout_miou"]
                if not h:
                    continue
                best = max(range(len(h)), key=h.__getitem__)
                row = {"search": Path(path).stem, "params": t["params"], "epochs": len(h),
                       "holdout_last": 100 * h[-1], "holdout_last3": 100 * sum(h[-3:]) / len(h[-3:]),
                       "holdout_best": 100 * h[best], "best_epoch": best + 1, "val_last": 100 * hist["val_miou"][-1]}
                rows.append(row)
                params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
                print(f"| {row['search']} | {params} | {row['holdout_last']:.1f} | {row['holdout_last3']:.1f} | "
                      f"{row['holdout_best']:.1f} ({row['best_epoch']}) | {row['val_last']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.add_to:
        table = Path(args.add_to)
        searches = {Path(p).stem for p in args.summaries}
        kept = [r for r in json.loads(table.read_text()) if r["search"] not in searches]
        table.write_text(json.dumps(kept + rows, indent=2))
        print(f"{table}: {len(kept)} earlier row(s) kept, {len(rows)} from these searches")


if __name__ == "__main__":
    main()
