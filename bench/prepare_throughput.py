"""Ray Data prepare throughput vs plain PIL decoding of the same files on the same cores.

    .venv/bin/python bench/prepare_throughput.py --root ../shared/data/camvid [--repeats 3] [--size 180x240]

Three ways to do the same per-pair work (decode image + mask, validate labels, class histogram,
optional resize): (1) `genseg prepare`'s Ray Data pipeline, end to end including Parquet writes;
(2) a tight single-process PIL loop (the limit of one core); (3) a torch DataLoader with
`--loader-workers` processes.  Medians of `--repeats` runs; writes bench/results/prepare_throughput.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import sources  # noqa: E402
from pipelines.prepare import _decode_one  # noqa: E402


def work(item, size, k):
    import json as _json

    it = {**item, "label_map": _json.dumps(item["label_map"]) if item.get("label_map") else ""}
    image, mask = _decode_one(it, size, k)
    return np.bincount(mask.reshape(-1), minlength=256).sum()


class _Items:
    def __init__(self, items, size, k):
        self.items, self.size, self.k = items, size, k

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return work(self.items[i], self.size, self.k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default=None, help="HxW resize, as `genseg prepare --size`")
    ap.add_argument("--loader-workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    src = sources.camvid(args.root, args.splits.split(","))
    n, k = len(src.items), src.classes.num_classes

    import ray
    import torch

    from jobs.runtime import Runtime, init_ray
    from pipelines.prepare import prepare

    init_ray(Runtime(Path(tempfile.gettempdir()), "", None))
    ray_times, pil_times, dl_times = [], [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            prepare(src, Path(tmp) / "out", size=size)
            ray_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for item in src.items:
            work(item, size, k)
        pil_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        loader = torch.utils.data.DataLoader(_Items(src.items, size, k), batch_size=8,
                                             num_workers=args.loader_workers, collate_fn=list)
        for _ in loader:
            pass
        dl_times.append(time.perf_counter() - t)
        print(f"run {r + 1}: ray data {n / ray_times[-1]:.1f} img/s, PIL loop {n / pil_times[-1]:.1f} img/s, "
              f"DataLoader({args.loader_workers}) {n / dl_times[-1]:.1f} img/s", flush=True)
    ray.shutdown()
    med = {name: n / statistics.median(ts) for name, ts in
           (("ray_data_prepare", ray_times), ("pil_loop", pil_times), ("torch_dataloader", dl_times))}
    result = {
        "benchmark": "prepare_throughput", "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv), "images": n, "resize": args.size,
        "machine": {"cores": os.cpu_count(), "device": "cpu", "platform": platform.platform()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "images_per_s_median": {k2: round(v, 1) for k2, v in med.items()},
        "ratio_ray_to_pil_loop": round(med["ray_data_prepare"] / med["pil_loop"], 2),
        "ratio_ray_to_dataloader": round(med["ray_data_prepare"] / med["torch_dataloader"], 2),
        "seconds": {"ray_data_prepare": ray_times, "pil_loop": pil_times, "torch_dataloader": dl_times},
        "note": "ray_data_prepare includes Parquet writes and the manifest; the other two only decode+validate",
    }
    out = ROOT / "bench" / "results" / "prepare_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["images_per_s_median"]), "ratio ray/pil", result["ratio_ray_to_pil_loop"])


if __name__ == "__main__":
    main()
