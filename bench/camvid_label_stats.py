"""Per class, each CamVid sequence's share of labelled pixels and the number of frames that hold the
class: what the holdout split is made of (bench/README.md, issue 14).

    .venv/bin/python bench/camvid_label_stats.py --root ../shared/data/camvid --holdout 0006R0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from genseg.data.classes import CAMVID

NAMES = CAMVID.names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="CamVid root (trainannot/, valannot/)")
    ap.add_argument("--holdout", default="0006R0", help="comma-separated sequence prefixes held out of train")
    args = ap.parse_args()
    root, held = Path(args.root), set(args.holdout.split(","))
    groups: dict[str, list[Path]] = {}
    for split in ("train", "val"):
        for p in sorted((root / f"{split}annot").glob("*.png")):
            seq = p.name.split("_")[0]
            key = f"holdout ({seq})" if split == "train" and seq in held else f"{split} ({seq})"
            groups.setdefault(key, []).append(p)
    print("| split (sequence) | frames | " + " | ".join(NAMES) + " |")
    print("|---|---|" + "---|" * len(NAMES))
    for key, paths in groups.items():
        pixels = np.zeros(256, np.int64)
        frames = np.zeros(len(NAMES), np.int64)
        for p in paths:
            counts = np.bincount(np.asarray(Image.open(p)).ravel(), minlength=256)
            pixels += counts
            frames += counts[: len(NAMES)] > 0
        share = 100 * pixels[: len(NAMES)] / pixels[: len(NAMES)].sum()
        cells = " | ".join(f"{s:.2f} % ({f})" for s, f in zip(share, frames))
        print(f"| {key} | {len(paths)} | {cells} |")


if __name__ == "__main__":
    main()
