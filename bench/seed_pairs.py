"""Recipe changes against the base recipe on the 2-core holdout screen, paired by seed
(bench/README.md, issue 14): photometric augmentation at two strengths, a wider scale range,
twice the epochs, twice the width; photometric augmentation on top of twice the epochs, paired
with twice the epochs alone; twice the width on top of both, and four times the epochs with
photometric augmentation, each paired with twice the epochs and photometric augmentation; instance
normalisation in the early layers (IBN-a, IBN-b); mixing two training images (CutMix, ClassMix).
Reads the rows that bench/holdout_screen_table.py wrote (--out).

    .venv/bin/python bench/seed_pairs.py bench/results/tune_holdout_screen_table.json

The base recipe's seeds come from three searches: seed 0 is the weights x loss search's inv-sqrt +
CE trial, seeds 1-2 the schedule search's poly trials, seeds 3-5 the base_seeds345 search.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# search -> (which trials are the arm, the seed of a trial)
ARMS = {
    "base": [("tune_holdout_weights_loss", {"class_weights": "inv-sqrt", "loss": "ce"}, 0),
             ("tune_holdout_schedule_seed", {"schedule": "poly"}, None),
             ("tune_holdout_base_seeds345", {}, None)],
    "photometric 0.3": [("tune_holdout_photometric", {}, None), ("tune_holdout_photometric_seeds345", {}, None)],
    "photometric 0.5": [("tune_holdout_photometric_strong", {}, None)],
    "scale 0.25-1.0": [("tune_holdout_scale_wide", {}, None)],
    "40 epochs": [("tune_holdout_epochs40", {}, None), ("tune_holdout_epochs40_seed3", {}, None)],
    "width 64": [("tune_holdout_width64", {}, None)],
    "40 epochs + photometric 0.3": [("tune_holdout_epochs40_photometric", {}, None)],
    "80 epochs + photometric 0.3": [("tune_holdout_epochs80_photometric", {}, None),
                                    ("tune_holdout_epochs80_photometric_seeds23", {}, None)],
    "width 64 + 40 epochs + photometric 0.3": [("tune_holdout_width64_epochs40_photometric", {}, None),
                                               ("tune_holdout_width64_epochs40_photometric_seeds23", {}, None)],
    "IBN-b": [("tune_holdout_ibn_b", {}, None)],
    "IBN-a": [("tune_holdout_ibn_a", {}, None)],
    "40 epochs + photometric 0.3 + IBN-b": [("tune_holdout_epochs40_photometric_ibn_b", {}, None)],
    "40 epochs + IBN-b": [("tune_holdout_epochs40_ibn_b", {}, None), ("tune_holdout_epochs40_ibn_b_seeds23", {}, None)],
    "width 64 + 40 epochs + IBN-b": [("tune_holdout_width64_epochs40_ibn_b", {}, None),
                                     ("tune_holdout_width64_epochs40_ibn_b_seeds23", {}, None)],
    "ClassMix 0.5": [("tune_holdout_classmix", {}, None)],
    "CutMix 0.5": [("tune_holdout_cutmix", {}, None)],
    "40 epochs + CutMix 0.5": [("tune_holdout_epochs40_cutmix", {}, None)],
    # the base's seeds 0-1 trained again on 2026-12-05 (another machine, a new store): how far a
    # pairing across those sessions can trust the earlier base rows
    "base, rerun": [("tune_holdout_base_rerun01", {}, None)],
}
# (arm, the arm it is paired with): every arm against the base, and combinations against the arms they build
# on (or, for the two 40-epoch partners IBN-b and photometric augmentation, against each other)
PAIRS = [*((a, "base") for a in ARMS if a != "base"), ("40 epochs + photometric 0.3", "40 epochs"),
         ("width 64 + 40 epochs + photometric 0.3", "40 epochs + photometric 0.3"),
         ("80 epochs + photometric 0.3", "40 epochs + photometric 0.3"),
         ("40 epochs + photometric 0.3 + IBN-b", "40 epochs + photometric 0.3"),
         ("40 epochs + IBN-b", "40 epochs"), ("40 epochs + IBN-b", "40 epochs + photometric 0.3"),
         ("width 64 + 40 epochs + IBN-b", "width 64 + 40 epochs + photometric 0.3"),
         ("40 epochs + CutMix 0.5", "40 epochs"), ("40 epochs + CutMix 0.5", "40 epochs + photometric 0.3")]
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}   # t, two-sided 95 %


def arm(rows: list[dict], spec) -> dict[int, dict]:
    out = {}
    for search, match, seed in spec:
        for r in rows:
            if r["search"] == search and all(r["params"].get(k) == v for k, v in match.items()):
                out[r["params"].get("seed", seed)] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table", help="JSON rows from bench/holdout_screen_table.py --out")
    args = ap.parse_args()
    rows = json.loads(Path(args.table).read_text())
    arms = {name: arm(rows, spec) for name, spec in ARMS.items()}
    base = arms["base"]
    print(f"base recipe, holdout at the last epoch by seed: "
          + ", ".join(f"{s}: {base[s]['holdout_last']:.1f}" for s in sorted(base))
          + f"  (mean {statistics.mean(r['holdout_last'] for r in base.values()):.1f}, "
          f"sd {statistics.stdev(r['holdout_last'] for r in base.values()):.1f})")
    print()
    print("| arm - reference, same seed | n | metric | differences by seed | mean | sd | 95 % interval (t) |")
    print("|---|---|---|---|---|---|---|")
    for name, ref_name in PAIRS:
        ref = arms[ref_name]
        seeds = sorted(set(arms[name]) & set(ref))
        if not seeds:
            print(f"| {name} - {ref_name} | 0 | (no trials in the table) | | | | |")
            continue
        for key, label in (("holdout_last", "holdout, last"), ("holdout_last3", "holdout, mean of last 3"),
                           ("val_last", "val, last")):
            d = [arms[name][s][key] - ref[s][key] for s in seeds]
            m = statistics.mean(d)
            sd = statistics.stdev(d) if len(d) > 1 else float("nan")
            half = T975.get(len(d) - 1, 2.0) * sd / len(d) ** 0.5
            by_seed = ", ".join(f"{v:+.1f}" for v in d)
            print(f"| {name} - {ref_name} | {len(d)} | {label} | {by_seed} | {m:+.1f} | {sd:.1f} | "
                  f"{m - half:+.1f} to {m + half:+.1f} |")


if __name__ == "__main__":
    main()
