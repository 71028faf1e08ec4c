"""`genseg prepare` against baselines that do the same work, shard encodings, and streaming at size.

    .venv/bin/python bench/prepare_throughput.py --root ../shared/data/camvid [--repeats 3]
    .venv/bin/python bench/prepare_throughput.py --root ../shared/data/camvid --codecs raw,png,webp
    .venv/bin/python bench/prepare_throughput.py --scaling 250,1000,4000 --size 360x480

Throughput (default).  Three pipelines run the *same* work on the same files, in one process, each
`--repeats` times (interleaved, medians reported): decode + validate + histogram + encode every
pair (`pipelines.prepare.write_chunk`, chunks of `--chunk` pairs) and write the same Parquet files,
then add up the manifest from the per-pair numbers:
  loop: one process, chunk after chunk;
  pool: a `multiprocessing` pool of `--pool` processes (spawned), one chunk per task;
  ray:  `pipelines.prepare.prepare`, what `genseg prepare` runs (Ray Data `map_batches`).
Each runs on the data set (1x) and on it listed four times over (4x).  The steady rate is
3n / (T4x - T1x), free of fixed costs; the fixed cost is what remains of T1x.  Ray's own start-up
(`ray.init` of a local cluster, and one warm-up run that starts its workers) is reported apart.

Codecs (`--codecs`).  For each shard codec: `genseg prepare` time, bytes on disk, and the decode cost
a training epoch pays (reading and decoding every train row once, one process).

Scaling (`--scaling N1,N2,...`).  Synthetic data sets of those sizes through `genseg prepare`: wall
time and the peak resident memory of the driver and of all its descendants (Ray's processes and
workers), sampled every 0.1 s.  Draws bench/results/prepare_scaling.png.

Results go to bench/results/prepare_*.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import sources  # noqa: E402
from pipelines.prepare import MANIFEST, Tally, _manifest, prepare, work_items, write_chunk  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _chunks(items: list[dict], per: int) -> list[list[dict]]:
    return [items[i: i + per] for i in range(0, len(items), per)]


def _columns(stats: list[dict]) -> dict:
    return {k: [s[k] for s in stats] for k in stats[0]}


def _finish(src, tally: Tally, out: Path, codec: str) -> None:
    m = _manifest(src, tally, False, {}, codec)
    (out / MANIFEST).write_text(json.dumps(m))


def run_loop(src, items, out: Path, per: int, size, k, codec) -> list[tuple[float, int]]:
    times = []
    tally = Tally()
    for chunk in _chunks(items, per):
        tally.add(_columns(write_chunk(chunk, out, size, k, codec)))
        times.append((time.perf_counter(), len(chunk)))
    _finish(src, tally, out, codec)
    return times


def _pool_task(args):
    return write_chunk(*args)


def run_pool(src, items, out: Path, per: int, size, k, codec, processes: int) -> list[tuple[float, int]]:
    times = []
    tally = Tally()
    with mp.get_context("spawn").Pool(processes) as pool:
        jobs = [(chunk, out, size, k, codec) for chunk in _chunks(items, per)]
        for stats in pool.imap_unordered(_pool_task, jobs):
            tally.add(_columns(stats))
            times.append((time.perf_counter(), len(stats)))
    _finish(src, tally, out, codec)
    return times


def run_ray(src, out: Path, per: int, size, k, codec) -> list[tuple[float, int]]:
    times = []
    prepare(src, out, size=size, num_classes=k, codec=codec, chunk=per,
            on_rows=lambda n: times.append((time.perf_counter(), n)))
    return times


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def _ray_init() -> float:
    from jobs.runtime import Runtime, init_ray

    t = time.perf_counter()
    init_ray(Runtime(Path(tempfile.gettempdir()), "", None))
    return time.perf_counter() - t


def machine() -> dict:
    import pyarrow
    import ray
    from PIL import __version__ as pil

    return {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "ray": ray.__version__, "pyarrow": pyarrow.__version__, "pillow": pil,
            "date": datetime.date.today().isoformat()}


def replicate(src, copies: int):
    """The source's pairs listed ``copies`` times (distinct names): the same files, more work."""
    import dataclasses

    items = [{**it, "name": f"{it['name']}~{c}"} for c in range(copies) for it in src.items]
    return dataclasses.replace(src, items=items)


def throughput(args, src, size) -> dict:
    """Each pipeline on the data set once (1x) and listed four times over (4x), interleaved.

    steady rate = 3n / (T(4x) - T(1x)): the marginal cost of a pair, free of every fixed cost;
    fixed cost = T(1x) - n / steady: start-up and tail (pool start, Ray Data planning, last task)."""
    k = src.classes.num_classes
    init_s = _ray_init()
    sets = {1: src, 4: replicate(src, 4)}
    walls: dict[str, dict[int, list[float]]] = {p: {1: [], 4: []} for p in ("loop", "pool", "ray")}
    written: dict[str, int] = {}
    work = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    try:
        cold_s = None
        if args.warmup:            # Ray's first tasks start and import the workers: not a per-run cost
            t = time.perf_counter()
            run_ray(src, work / "warmup", args.chunk, size, k, args.codec)
            cold_s = time.perf_counter() - t
            shutil.rmtree(work / "warmup")
        for r in range(args.repeats):
            for times in (1, 4):
                data = sets[times]
                items = work_items(data)
                for name in ("ray", "loop", "pool"):     # interleaved: drift of the machine hits all three
                    out = work / f"{name}{r}x{times}"
                    t = time.perf_counter()
                    if name == "loop":
                        out.mkdir()
                        run_loop(data, items, out, args.chunk, size, k, args.codec)
                    elif name == "pool":
                        out.mkdir()
                        run_pool(data, items, out, args.chunk, size, k, args.codec, args.pool)
                    else:
                        run_ray(data, out, args.chunk, size, k, args.codec)
                    wall = time.perf_counter() - t
                    walls[name][times].append(wall)
                    if times == 1:
                        written[name] = du(out)
                    print(f"  repeat {r + 1} {times}x {name:4s}: {wall:6.2f} s ({len(items) / wall:.1f} pairs/s)",
                          flush=True)
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(src.items)
    med = {}
    for name, w in walls.items():
        t1, t4 = statistics.median(w[1]), statistics.median(w[4])
        steady = 3 * n / (t4 - t1)
        med[name] = {"wall_1x_s": t1, "wall_4x_s": t4, "overall_1x": n / t1, "overall_4x": 4 * n / t4,
                     "steady": steady, "fixed_s": t1 - n / steady, "bytes": written[name]}
    best = max(("loop", "pool"), key=lambda p: med[p]["steady"])
    summary = {"pairs": n, "ray_init_s": init_s, "ray_cold_1x_s": cold_s, "median": med, "walls": walls, "best_baseline": best,
               "ray_steady_vs_best": med["ray"]["steady"] / med[best]["steady"],
               "ray_overall_1x_vs_best": med["ray"]["overall_1x"] / med[best]["overall_1x"]}
    print(f"\n{n} pairs; not in any row: ray.init of the local cluster {init_s:.2f} s, and the first 1x run on "
          f"cold Ray workers {cold_s or float('nan'):.2f} s (warm: {med['ray']['wall_1x_s']:.2f} s)")
    print("| pipeline | steady pairs/s | fixed cost (s) | wall 1x (s) | pairs/s 1x | wall 4x (s) | pairs/s 4x |")
    print("|---|---|---|---|---|---|---|")
    for name in ("loop", "pool", "ray"):
        m = med[name]
        print(f"| {name} | {m['steady']:.1f} | {m['fixed_s']:.2f} | {m['wall_1x_s']:.2f} | {m['overall_1x']:.1f} | "
              f"{m['wall_4x_s']:.2f} | {m['overall_4x']:.1f} |")
    print(f"ray / best baseline ({best}): steady {summary['ray_steady_vs_best']:.2f}, "
          f"whole 1x run {summary['ray_overall_1x_vs_best']:.2f}")
    return summary


def codecs(args, src, size) -> dict:
    from genseg.data.shards import decode_batch
    from pipelines.shards import iter_split

    _ray_init()
    k = src.classes.num_classes
    out = {}
    work = Path(tempfile.mkdtemp(prefix="prep-codec-"))
    try:
        for codec in args.codecs.split(","):
            walls, decode_s = [], []
            for r in range(args.repeats):
                d = work / f"{codec}{r}"
                t = time.perf_counter()
                prepare(src, d, size=size, num_classes=k, codec=codec, chunk=args.chunk)
                walls.append(time.perf_counter() - t)
                t = time.perf_counter()
                n = 0
                for batch in iter_split(d, "train", batch_size=32):
                    n += len(decode_batch(batch))
                decode_s.append(time.perf_counter() - t)
                size_b = du(d)
                if r < args.repeats - 1:
                    shutil.rmtree(d)
            out[codec] = {"prepare_s": statistics.median(walls), "bytes": size_b,
                          "train_read_decode_s_per_epoch": statistics.median(decode_s), "train_rows": n}
            print(f"  {codec}: prepare {out[codec]['prepare_s']:.2f} s, {size_b / 2**20:.1f} MiB, "
                  f"read+decode train ({n} rows) {out[codec]['train_read_decode_s_per_epoch']:.2f} s/epoch", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| codec | shard MiB | prepare (s) | read + decode per epoch, train (s) |")
    print("|---|---|---|---|")
    for codec, v in out.items():
        print(f"| {codec} | {v['bytes'] / 2**20:.1f} | {v['prepare_s']:.2f} | {v['train_read_decode_s_per_epoch']:.2f} |")
    return out


class PeakRSS:
    """Peak of (this process + all its descendants) resident memory, sampled in a thread."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.proc, self.every, self.peak, self.peak_driver = psutil.Process(), every, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = driver = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        self.peak, self.peak_driver = max(self.peak, total), max(self.peak_driver, driver)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def __enter__(self):
        self._sample()
        self.start = self.peak
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def scaling(args, size) -> dict:
    _ray_init()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="prep-scale-"))
    try:      # a small warm-up run starts Ray's workers, so the first size does not carry their start
        prepare(sources.synthetic(64, size or (360, 480)), work / "warmup", codec=args.codec, chunk=args.chunk)
        shutil.rmtree(work / "warmup")
        for n in (int(v) for v in args.scaling.split(",")):
            src = sources.synthetic(n, size or (360, 480), seed=0, val_fraction=0.1)
            time.sleep(2)                  # let the last run's workers settle before the baseline sample
            with PeakRSS() as mem:
                t = time.perf_counter()
                prepare(src, work / f"n{n}", codec=args.codec, chunk=args.chunk)
                wall = time.perf_counter() - t
            rows.append({"pairs": n, "wall_s": wall, "pairs_per_s": n / wall, "rss_start_mb": mem.start / 2**20,
                         "rss_peak_mb": mem.peak / 2**20, "driver_rss_peak_mb": mem.peak_driver / 2**20,
                         "bytes": du(work / f"n{n}")})
            r = rows[-1]
            print(f"  {n:6d} pairs: {wall:7.1f} s ({r['pairs_per_s']:.1f}/s), all processes' RSS "
                  f"{r['rss_start_mb']:.0f} -> peak {r['rss_peak_mb']:.0f} MB (driver {r['driver_rss_peak_mb']:.0f} MB), "
                  f"{r['bytes'] / 2**20:.0f} MiB written", flush=True)
            shutil.rmtree(work / f"n{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _plot_scaling(rows)
    return {"rows": rows, "size": list(size or (360, 480))}


def _plot_scaling(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["pairs"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(n, [r["wall_s"] for r in rows], "o-", label="measured")
    a.plot(n, [rows[0]["wall_s"] / rows[0]["pairs"] * x for x in n], "--", color="grey", label="linear from the smallest")
    a.set_xlabel("pairs")
    a.set_ylabel("wall time (s)")
    a.legend()
    b.plot(n, [r["rss_peak_mb"] / 1024 for r in rows], "o-", label="peak, all processes")
    b.plot(n, [r["rss_start_mb"] / 1024 for r in rows], "s--", label="before the run")
    b.plot(n, [r["driver_rss_peak_mb"] / 1024 for r in rows], "^:", label="peak, driver")
    b.set_xlabel("pairs")
    b.set_ylabel("resident memory (GiB)")
    b.set_ylim(bottom=0)
    b.legend()
    fig.suptitle("genseg prepare, synthetic 360x480, 2 cores")
    fig.tight_layout()
    fig.savefig(RESULTS / "prepare_scaling.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="CamVid root (throughput and codecs)")
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default=None, help="HxW resize, as `genseg prepare --size`")
    ap.add_argument("--codec", default="png")
    ap.add_argument("--chunk", type=int, default=32, help="pairs per task / file (genseg prepare's default)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="count the Ray workers' first start in the first repeat")
    ap.add_argument("--pool", type=int, default=os.cpu_count() or 2, help="processes of the pool baseline")
    ap.add_argument("--codecs", help="compare these shard codecs, e.g. raw,png,webp")
    ap.add_argument("--scaling", help="synthetic data set sizes, e.g. 250,1000,4000")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "args": vars(args)}
    if args.scaling:
        doc["scaling"] = scaling(args, size)
        name = "prepare_scaling.json"
    else:
        if not args.root:
            ap.error("--root is needed for the throughput and codec comparisons")
        src = sources.camvid(args.root, args.splits.split(","))
        if args.codecs:
            doc["codecs"] = codecs(args, src, size)
            name = "prepare_codecs.json"
        else:
            doc["throughput"] = throughput(args, src, size)
            name = "prepare_throughput.json"
    (RESULTS / name).write_text(json.dumps(doc, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
