"""Where the Ray Train worker's last ~10 % goes: wake-ups that preempt the training threads.

    .venv/bin/python bench/train_wakeups.py [--shards bench/runs/train_overhead/shards_180x240_png] [--repeats 2]

Runs `bench/train_overhead.py`'s `plain` loop (FCN-8s compact w32, crop 176x240, batch 8, 2 torch
threads, 3 epochs of CamVid train at 180x240) unchanged in three places, interleaved:
  own:        its own process, no Ray;
  train:      a Ray Train `TorchTrainer` worker (1 worker, 1 CPU) on a local Ray with its dashboard, as
              `genseg train seg` runs;
  train-lean: the same, with Ray's idle-worker pool trimmed (num_workers_soft_limit 0, no prestart).
Around the loop it reads every thread's context-switch counters and CPU time from /proc: the wake-ups
(voluntary switches) of every thread on the machine, how often the two compute threads were
preempted (involuntary switches) and the CPU the rest of the machine took.  The shards come from
`bench/train_overhead.py` (run it first).  Writes bench/results/train_wakeups.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LEAN = {"num_workers_soft_limit": 0, "prestart_worker_first_driver": False, "enable_worker_prestart": False}


def threads() -> dict:
    """(pid, tid) -> (process name, thread name, voluntary, involuntary switches, cpu ticks) for every thread."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            pname = Path(f"/proc/{p}/comm").read_text().strip()
            for t in os.listdir(f"/proc/{p}/task"):
                status = Path(f"/proc/{p}/task/{t}/status").read_text().splitlines()
                stat = Path(f"/proc/{p}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
                count = {ln.split(":")[0]: int(ln.split()[1]) for ln in status if "ctxt_switches" in ln}
                out[(p, t)] = (pname, Path(f"/proc/{p}/task/{t}/comm").read_text().strip(),
                               count["voluntary_ctxt_switches"], count["nonvoluntary_ctxt_switches"],
                               int(stat[11]) + int(stat[12]))
        except (OSError, KeyError, IndexError):
            pass                     # a thread that ended while being read
    return out


def measured_loop(label: str, shards: str) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import train_overhead

    tick = os.sysconf("SC_CLK_TCK")
    before, t0 = threads(), time.perf_counter()
    epochs = train_overhead.plain(Path(shards), 3)
    seconds, after = time.perf_counter() - t0, threads()
    me = str(os.getpid())
    by_name, compute = defaultdict(lambda: [0, 0.0]), []
    wakeups = cpu_other = 0.0
    for key, (pname, tname, vol, invol, cpu) in after.items():
        b = before.get(key, (pname, tname, 0, 0, 0))
        dv, dn, dc = vol - b[2], invol - b[3], (cpu - b[4]) / tick
        wakeups += dv
        if key[0] == me and dc > 1.0:
            compute.append({"thread": key[1], "cpu_s": round(dc, 2), "preempted": dn})
        else:
            cpu_other += dc
        by_name[f"{pname} / {tname}"][0] += dv
        by_name[f"{pname} / {tname}"][1] += dc
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {"label": label, "nice": os.nice(0), "train_s": [round(e["train_s"], 2) for e in epochs],
            "val_s": [round(e["val_s"], 2) for e in epochs], "seconds": round(seconds, 1),
            "wakeups_per_s": round(wakeups / seconds), "compute_threads": compute,
            "preempted_per_s": round(sum(c["preempted"] for c in compute) / seconds),
            "other_cpu_share": round(cpu_other / seconds / (os.cpu_count() or 1), 3),
            "top_wakers": [(name, v, round(c, 2)) for name, (v, c) in top]}


def in_train_worker(shards: str, lean: bool) -> dict:
    import logging

    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    sys.path.insert(0, str(ROOT))
    from jobs.runtime import dashboard_port

    port = dashboard_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             logging_level=logging.WARNING, _system_config=LEAN if lean else None)
    label = "train-lean" if lean else "train"
    out = Path(os.environ["WAKEUPS_OUT"])

    def fn(config):
        out.write_text(json.dumps(measured_loop(label, shards)))

    TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1})).fit()
    ray.shutdown()
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=str(ROOT / "bench" / "runs" / "train_overhead" / "shards_180x240_png"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", choices=["own", "train", "train-lean"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (Path(args.shards) / "manifest.json").exists():
        sys.exit(f"{args.shards}: no shards (run bench/train_overhead.py first)")
    if args.one:       # a child: one measurement, printed as JSON
        res = measured_loop("own", args.shards) if args.one == "own" else in_train_worker(args.shards,
                                                                                            args.one == "train-lean")
        print("RESULT " + json.dumps(res), flush=True)
        return
    runs = []
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    for r in range(args.repeats):
        for label in ("own", "train", "train-lean"):
            env["WAKEUPS_OUT"] = str(RESULTS / f".wakeups_{label}.json")
            proc = subprocess.run([sys.executable, __file__, "--shards", args.shards, "--one", label],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[7:])
            Path(env["WAKEUPS_OUT"]).unlink(missing_ok=True)
            runs.append(res)
            print(f"{label:10s} repeat {r}: train s/epoch {res['train_s']}, val s {res['val_s']}, "
                  f"{res['wakeups_per_s']} wake-ups/s, compute threads preempted {res['preempted_per_s']}/s, "
                  f"other CPU {100 * res['other_cpu_share']:.1f} %", flush=True)
    print("\nmedians (epochs 2-3 of each repeat):")
    print("| where | train s/epoch | val s | wake-ups/s (machine) | compute threads preempted/s | other CPU |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for label in ("own", "train", "train-lean"):
        rs = [r for r in runs if r["label"] == label]
        row = {"train_s": statistics.median(x for r in rs for x in r["train_s"][1:]),
               "val_s": statistics.median(x for r in rs for x in r["val_s"][1:]),
               "wakeups_per_s": statistics.median(r["wakeups_per_s"] for r in rs),
               "preempted_per_s": statistics.median(r["preempted_per_s"] for r in rs),
               "other_cpu_share": statistics.median(r["other_cpu_share"] for r in rs)}
        summary[label] = row
        print(f"| {label} | {row['train_s']:.2f} | {row['val_s']:.2f} | {row['wakeups_per_s']:.0f} | "
              f"{row['preempted_per_s']:.0f} | {100 * row['other_cpu_share']:.1f} % |")
    print("\ntop wakers in the last train run (process / thread, wake-ups, CPU s):")
    for name, v, c in [r for r in runs if r["label"] == "train"][-1]["top_wakers"]:
        print(f"  {name:45s} {v:7d} {c:6.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_wakeups.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(f"\nwrote {RESULTS / 'train_wakeups.json'}")


if __name__ == "__main__":
    main()
